"""mkvlib.listing against the index, in process: pages under a cap in keys and
in bytes cover every key once in byte order, and their JSON is what one
json.dumps of the whole page would be."""
import json
from unittest import mock
from urllib.parse import quote

from hypothesis import given, settings, strategies as st

import mkvlib.listing as listing
from mkvlib.index import Index, LIVE

keys = st.binary(min_size=1, max_size=12).map(lambda b: b"/" + b)


def filled(tmp_path_factory, all_keys):
    index = Index(str(tmp_path_factory.mktemp("idx") / "i.sqlite3"))
    index.insert_live([(k, ["v:1"], None, 1) for k in all_keys])
    return index


def page(index, prefix, start, limit, max_bytes):
    ext = listing.extent(index, prefix, start, limit, LIVE, max_bytes)
    answer = json.loads(b"".join(listing.render(index, ext, url=not ext.utf8)))
    return ext, answer


@settings(max_examples=60, deadline=None)
@given(st.lists(keys, min_size=1, max_size=40, unique=True), st.binary(max_size=2).map(lambda b: b"/" + b),
       st.integers(1, 7), st.integers(1, 40))
def test_pages_under_a_key_and_a_byte_cap_cover_every_key_once_in_order(tmp_path_factory, all_keys, prefix,
                                                                         limit, max_bytes):
    index = filled(tmp_path_factory, all_keys)
    want = sorted(k for k in all_keys if k.startswith(prefix))
    got, start = [], b""
    for _ in range(len(want) + 2):
        with mock.patch.object(listing, "STEP", 3), mock.patch.object(listing, "BATCH", 2):   # many of each
            ext, answer = page(index, prefix, start, limit, max_bytes)
        assert len(answer["keys"]) == ext.count
        on_page = [k for k in want if start <= k and (ext.last is not None and k <= ext.last)]
        assert len(on_page) == ext.count <= limit
        assert ext.count == 1 or sum(map(len, on_page)) <= max_bytes
        got += on_page
        if ext.next is None:
            break
        start = ext.next
    assert got == want


@settings(max_examples=40, deadline=None)
@given(st.lists(keys, min_size=0, max_size=30, unique=True), st.integers(1, 40))
def test_a_page_renders_as_one_json_dumps_of_it_would(tmp_path_factory, all_keys, limit):
    index = filled(tmp_path_factory, all_keys)
    ext = listing.extent(index, b"/", b"", limit, LIVE)
    want, nxt = sorted(all_keys)[:limit], (sorted(all_keys)[limit:] or [None])[0]
    utf8 = all(k.isascii() or _decodes(k) for k in want + ([nxt] if nxt else []))
    assert ext.utf8 == utf8
    names = [k.decode() if utf8 else quote(k, safe="/") for k in want]
    answer = {"next": (nxt.decode() if utf8 else quote(nxt, safe="/")) if nxt else "", "keys": names}
    if not utf8:
        answer["encoding-type"] = "url"
    assert b"".join(listing.render(index, ext, url=not utf8)) == json.dumps(answer).encode()


def _decodes(k):
    try:
        k.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_more_than_counts_past_a_hop(tmp_path_factory):
    index = filled(tmp_path_factory, [b"/m/%03d" % i for i in range(250)])
    assert listing.more_than(index, 249, b"/m/", hop=100)
    assert not listing.more_than(index, 250, b"/m/", hop=100)
    assert not listing.more_than(index, 100, b"/m/", start=b"/m/150", hop=100)
    assert listing.more_than(index, 99, b"/m/", start=b"/m/150", hop=7)
