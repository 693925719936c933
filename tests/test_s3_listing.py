"""mkvlib.objects' listings against a model: for any keys, prefix,
delimiter and page size, paging through (each page started after the last
key or prefix the one before gave) lists what S3 would, once each, in byte
order. A real SQLite index in a temporary file; no servers."""
import types

from hypothesis import given, settings
from hypothesis import strategies as st

from mkvlib.index import Index
from mkvlib.objects import Objects

BASE = b"/bk/"
NAMES = st.lists(st.text(alphabet="ab/c.", min_size=1, max_size=6), max_size=25, unique=True)


def model(names, prefix, delimiter):
    """What S3 lists: keys with the prefix, those with the delimiter after it rolled up."""
    out = []
    for name in sorted(n.encode() for n in names):
        if not name.startswith(prefix):
            continue
        at = name.find(delimiter, len(prefix)) if delimiter else -1
        item = ("prefix", name[:at + len(delimiter)]) if at >= 0 else ("key", name)
        if item not in out:
            out.append(item)
    return out


def page_through(objects, prefix, delimiter, max_keys):
    got, after = [], None
    for _ in range(200):
        keys, prefixes, truncated, last = objects.list(BASE + prefix, after, delimiter, max_keys)
        assert len(keys) + len(prefixes) <= max_keys
        page = [("key", o.key[len(BASE):]) for o in keys] + [("prefix", p[len(BASE):]) for p in prefixes]
        got += sorted(page, key=lambda item: item[1])
        if not truncated:
            return got
        after = last
    raise AssertionError("listing did not end")


@settings(max_examples=60, deadline=None)
@given(names=NAMES, prefix=st.sampled_from(["", "a", "a/", "b/c"]), delimiter=st.sampled_from(["", "/", "c"]),
       max_keys=st.integers(1, 4))
def test_paged_listing_is_s3s(tmp_path_factory, names, prefix, delimiter, max_keys):
    index = Index(str(tmp_path_factory.mktemp("listing") / "index.sqlite3"))
    try:
        index.insert_live([(BASE + n.encode(), ["v:1"], "0" * 32, 1) for n in names])
        index.insert_live([(b"/other/" + n.encode(), ["v:1"], "0" * 32, 1) for n in names])   # not this bucket
        objects = Objects(types.SimpleNamespace(index=index))
        got = page_through(objects, prefix.encode(), delimiter.encode() or None, max_keys)
        assert got == model(names, prefix.encode(), delimiter.encode())
    finally:
        index.close()
