"""The on-disk format and placement: the original Go minikeyvalue's, bit for bit."""
import base64
import os
import socket
import time

import falcon.testing
import pytest
from hypothesis import given, settings, strategies as st

import mkv
import mkvlib.index
from mkvlib.errors import BadKey, ClientGone
from mkvlib.index import Index, prefix_end
from mkvlib.placement import check_storable, disk_of, key2path, key2volume, named_twice, path2key, volume_host
from mkvlib.settings import Settings
from mkvlib.volumes import CHUNK
from conftest import Http, start_master, start_volume


# ---------------------------------------------------------------- fixed values

def test_key2path_of_hello():
    assert key2path(b"hello") == "/5d/41/aGVsbG8="


def test_key2path_of_wehave():
    assert key2path(b"/wehave") == "/60/08/L3dlaGF2ZQ=="


def test_key2volume_of_the_issue_example():
    volumes = ["localhost:4001", "localhost:4002", "localhost:4003"]
    assert key2volume(b"/wehave", volumes, 3, 10) == [
        "localhost:4002/sv00", "localhost:4001/sv08", "localhost:4003/sv04"]


def test_key2volume_with_one_subvolume_is_the_bare_volume():
    volumes = ["localhost:4001", "localhost:4002", "localhost:4003"]
    assert key2volume(b"/wehave", volumes, 2, 1) == ["localhost:4002", "localhost:4001"]


def test_path2key_reverses_key2path():
    assert path2key("L3dlaGF2ZQ==") == b"/wehave"
    with pytest.raises(ValueError):
        path2key("not base64!")


def test_prefix_end_bounds_a_prefix_like_bytes():
    assert prefix_end(b"/we") == b"/wf"
    assert prefix_end(b"/a\xff\xff") == b"/b"
    assert prefix_end(b"\xff") is None


# ---------------------------------------------------------------- properties

keys = st.binary(min_size=1, max_size=64).map(lambda b: b"/" + b)
volume_sets = st.lists(st.from_regex(r"\Ahost[0-9]{1,3}:[0-9]{2,5}\Z"), min_size=1, max_size=8, unique=True)


@given(keys, volume_sets, st.integers(1, 8), st.integers(1, 256))
def test_placement_is_distinct_volumes_and_ignores_their_order(key, volumes, replicas, subvolumes):
    replicas = min(replicas, len(volumes))
    chosen = key2volume(key, volumes, replicas, subvolumes)
    assert len(chosen) == replicas
    assert len({volume_host(v) for v in chosen}) == replicas
    assert chosen == key2volume(key, list(reversed(volumes)), replicas, subvolumes)


@given(keys, volume_sets, st.from_regex(r"\Anew[0-9]{1,3}:[0-9]{2,5}\Z"))
def test_adding_a_volume_moves_a_key_only_onto_the_new_volume(key, volumes, new):
    before = key2volume(key, volumes, 1, 10)
    after = key2volume(key, volumes + [new], 1, 10)
    assert after == before or volume_host(after[0]) == new


@given(keys)
def test_key2path_is_md5_folders_and_base64(key):
    path = key2path(key)
    _, a, b, name = path.split("/", 3)
    assert len(a) == len(b) == 2
    assert base64.b64decode(name) == key


@given(st.text(min_size=1, max_size=60).map(lambda t: "/" + t))
def test_every_short_utf8_key_is_storable(text):
    # valid UTF-8 never holds the bytes that make '//' in base64
    key = text.encode("utf-8")
    if base64.b64encode(key).endswith(b"/"):
        with pytest.raises(BadKey):
            check_storable(key)
    else:
        check_storable(key)


@settings(max_examples=200)
@given(st.lists(keys, min_size=1, max_size=30, unique=True), keys, st.integers(1, 5))
def test_listing_pages_cover_every_key_with_the_prefix_once(tmp_path_factory, all_keys, prefix, limit):
    index = Index(str(tmp_path_factory.mktemp("idx") / "i.sqlite3"))
    for k in all_keys:
        index.start_put(k, ["v:1"], "t")
        index.finish_put(k, "t", "0" * 32, 1)
    want = sorted(k for k in all_keys if k.startswith(prefix))
    got, start = [], b""
    while True:
        page, nxt = index.list(prefix, start, limit)
        got += page
        if nxt is None:
            break
        start = nxt
    assert got == want


# ---------------------------------------------------------------- the HTTP edge, in process

@pytest.fixture
def client(tmp_path):
    s = Settings.from_env({"MKV_VOLUMES": "127.0.0.1:9", "MKV_DB": str(tmp_path / "i.sqlite3"),
                                  "MKV_REPLICAS": "1"})
    return falcon.testing.TestClient(mkv.create_app(s))


@pytest.mark.parametrize("query, says", [
    ("list&bogus", "unknown query parameter: bogus"),
    ("list&list", "given twice"),
    ("list&unlinked", "not both"),
    ("limit=3", "go with ?list"),
    ("list=yes", "takes no value"),
    ("list&limit=many", "limit must be"),
    ("list&limit=%C2%B2", "limit must be"),     # a digit to str.isdigit, not to int()
])
def test_bad_queries_are_400_with_a_reason(client, query, says):
    r = client.simulate_get("/k", query_string=query)
    assert r.status_code == 400 and says in r.text and r.text.count("\n") == 1


def test_errors_map_to_their_status(client):
    assert client.simulate_get("/missing").status_code == 404
    assert client.simulate_request("OPTIONS", "/k").status_code == 405
    assert client.simulate_put("/k", body=b"").status_code == 411
    assert client.simulate_put("/" + "x" * 400, body=b"v").status_code == 414


def test_a_put_to_an_unreachable_volume_is_503(client):
    r = client.simulate_put("/k", body=b"v")
    assert r.status_code == 503 and "127.0.0.1:9" in r.text
    assert client.simulate_get("/k").status_code == 404


# ---------------------------------------------------------------- the example, live

def ports_free(*ports):
    for p in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def test_wehave_lands_where_the_original_puts_it(tmp_path):
    if not ports_free(4001, 4002, 4003):
        pytest.skip("ports 4001-4003 are taken on this machine; the example needs exactly those names")
    vols = [start_volume(str(tmp_path / f"v{p}"), port=p) for p in (4001, 4002, 4003)]
    master = start_master(str(tmp_path), ["localhost:4001", "localhost:4002", "localhost:4003"])
    try:
        http = Http()
        assert http.put(f"http://127.0.0.1:{master.port}/wehave", data=b"bigswag").status_code == 201
        r = http.get(f"http://127.0.0.1:{master.port}/wehave")
        assert r.headers["Key-Volumes"] == "localhost:4002/sv00,localhost:4001/sv08,localhost:4003/sv04"
        with open(os.path.join(str(tmp_path / "v4001"), "sv08/60/08/L3dlaGF2ZQ=="), "rb") as f:
            assert f.read() == b"bigswag"
    finally:
        master.stop()
        for v in vols:
            v.stop()


def test_listing_more_than_the_cap_without_a_limit_is_413(client, tmp_path, monkeypatch):
    monkeypatch.setattr(mkvlib.index, "LIST_MAX", 3)
    index = Index(str(tmp_path / "i.sqlite3"))
    for i in range(4):
        index.start_put(b"/many/%d" % i, ["v:1"], "t")
        index.finish_put(b"/many/%d" % i, "t", "0" * 32, 1)
    r = client.simulate_get("/many/", query_string="list")
    assert r.status_code == 413 and "limit" in r.text
    r = client.simulate_get("/many/", query_string="list&limit=3")
    assert r.status_code == 200 and r.json == {"next": "/many/3", "keys": ["/many/0", "/many/1", "/many/2"]}


def test_a_slow_but_steady_client_is_not_taken_for_gone():
    import gevent

    class Trickle:
        def __init__(self):
            self.sent = 0

        def read(self, n):
            gevent.sleep(0.02)
            self.sent += 100
            return b"x" * min(n, 100) if self.sent <= 10_000 else b""
    # 10 KB at 5 KB/s: 2 s in all, far over the idle timeout, but never idle that long
    chunks = list(mkv.read_body(Trickle(), None, idle_timeout=0.5))
    assert sum(map(len, chunks)) == 10_000


def test_a_fast_client_is_read_a_chunk_at_a_time():
    class Fast:
        def __init__(self):
            self.asked = []
            self.left = 8 * CHUNK

        def read(self, n):
            self.asked.append(n)
            n = min(n, self.left)
            self.left -= n
            return b"f" * n
    fast = Fast()
    chunks = list(mkv.read_body(fast, 8 * CHUNK))
    assert b"".join(chunks) == b"f" * 8 * CHUNK
    assert fast.asked[0] == mkv.READ_PIECE and fast.asked.count(CHUNK) >= 6
    assert all(len(c) < 2 * CHUNK for c in chunks)


def test_a_fast_client_that_gets_8_times_slower_is_not_taken_for_gone():
    import gevent

    class Slowing:
        """2 MB at 32 MB/s, then 2 MB at 4 MB/s."""
        def __init__(self):
            self.sent = 0

        def read(self, n):
            n = min(n, 4 * CHUNK - self.sent)
            gevent.sleep(n / ((32 if self.sent < 2 * CHUNK else 4) * CHUNK))
            self.sent += n
            return b"s" * n
    # read pieces of 1 MB at the fast rate; at the slow one such a read takes
    # 0.25 s: within the 0.5 s idle timeout
    chunks = list(mkv.read_body(Slowing(), 4 * CHUNK, idle_timeout=0.5))
    assert sum(map(len, chunks)) == 4 * CHUNK


def test_a_slow_clients_bytes_are_passed_on_before_a_volume_would_give_up_waiting(monkeypatch):
    """nginx drops an upload that gets no byte for 20 s: a slow client's
    bytes go on every PASS_ON_EVERY seconds, not once a megabyte is in."""
    import gevent
    monkeypatch.setattr(mkv, "PASS_ON_EVERY", 0.2)

    class Slow:
        def read(self, n):
            gevent.sleep(0.05)
            return b"s" * min(n, 1000)
    started, when = time.monotonic(), []
    for chunk in mkv.read_body(Slow(), 20_000):
        when.append((time.monotonic() - started, len(chunk)))
    assert sum(n for _, n in when) == 20_000
    assert len(when) >= 3 and when[0][0] < 0.5, when


def test_a_client_that_stops_sending_is_gone_after_the_idle_timeout():
    import gevent

    class Stuck:
        def read(self, n):
            gevent.sleep(5)
            return b"x"
    with pytest.raises(ClientGone, match="value not stored"):
        list(mkv.read_body(Stuck(), 10, idle_timeout=0.2))


def test_two_names_of_one_disk_are_told_by_its_identity():
    ids = {"localhost:1": "X", "127.0.0.1:1": "X", "localhost:2": "Y", "old:3": ""}
    assert named_twice(["localhost:1", "localhost:2", "127.0.0.1:1"], ids) == ("localhost:1", "127.0.0.1:1")
    assert named_twice(["localhost:2", "old:3", "new:3"], ids) is None    # no identity: never one disk
    assert disk_of("localhost:1/sv03", ids) == disk_of("127.0.0.1:1/sv03", ids) == ("X", "/sv03")
    assert disk_of("localhost:1/sv03", ids) != disk_of("127.0.0.1:1/sv04", ids)
    assert disk_of("old:3/sv01", ids) == ("old:3", "/sv01")
