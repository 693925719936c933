"""Edges of the HTTP face, on real servers: listings of keys that are not UTF-8
(percent-encoded names, paging on the raw bytes), MKV_FALLBACK redirects of keys
with dot segments, and requests malformed at the HTTP level (answered by gunicorn
itself, in one line)."""
import itertools
import os
import socket
import sqlite3
from urllib.parse import quote, unquote_to_bytes

import pytest

from mkvlib.errors import BadKey
from mkvlib.placement import check_storable, key2path, key2volume
from conftest import TIMEOUT, Cluster

_n = itertools.count()


# ---------------------------------------------------------------- helpers

def raw_request(port, data):
    """Send raw bytes to the master; (status line, {header: value}, body) of its
    answer, read until it closes the connection or the answer is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = s.recv(65536)
            if not piece:
                break
            answer += piece
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            piece = s.recv(65536)
            if not piece:
                break
            body += piece
    return lines[0], headers, body


def raw_get(port, target):
    """GET of a request target sent exactly as given (no client normalizes it)."""
    return raw_request(port, b"GET " + target.encode("ascii") + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def put_behind_the_master(cluster, key: bytes, state="live", value=b"value"):
    """Store `key` the way the original Go mkv and rebuild.py can, without the
    master's PUT (which refuses keys that are not UTF-8): its file on every
    replica's disk, then its row in the index."""
    replicas = int(cluster.settings.get("replicas", 3))
    subvolumes = int(cluster.settings.get("subvolumes", 10))
    volumes = key2volume(key, cluster.volume_names(), replicas, subvolumes)
    for volume in volumes:
        cluster.plant(volume, key, value)
    with sqlite3.connect(cluster.db(), timeout=30) as db:
        db.execute("INSERT INTO keys (key, state, volumes, md5, size) VALUES (?, ?, ?, NULL, ?)",
                   (key, state, ",".join(volumes), len(value)))
    db.close()


def storable(keys):
    out = []
    for k in keys:
        try:
            check_storable(k)
        except BadKey:
            continue
        out.append(k)
    return out


def new_base():
    return f"/edges-{os.getpid()}-{next(_n)}/".encode()


def names_of(answer):
    """The keys and next of a listing as bytes, whichever way the page is encoded."""
    if answer.get("encoding-type") == "url":
        return [unquote_to_bytes(k) for k in answer["keys"]], unquote_to_bytes(answer["next"])
    return [k.encode("utf-8") for k in answer["keys"]], answer["next"].encode("utf-8")


MIXED = [b"a", b"b c", b"b+c", b"caf\xc3\xa9", b"caf\xe9", b"%41", b"\xc3", b"\xff", b"\xff\xfe", b"z?q#h", b"\x01"]


# ---------------------------------------------------------------- listing keys that are not UTF-8

def test_list_pages_one_by_one_through_keys_that_are_not_utf8_each_once_in_byte_order(cluster, http):
    base = new_base()
    keys = storable(base + s for s in MIXED)
    for k in keys:
        put_behind_the_master(cluster, k)
    seen, start = [], b""
    for _ in range(len(keys) + 2):
        r = http.get(cluster.url(quote(base) + "?list&limit=1&start=" + quote(start, safe="")))
        assert r.status_code == 200, r.text
        page, start = names_of(r.json())
        seen += page
        if not start:
            break
    assert seen == sorted(keys)


def test_list_page_with_a_key_that_is_not_utf8_is_percent_encoded_without_asking(cluster, http):
    base = new_base()
    for k in [base + b"caf\xc3\xa9", base + b"caf\xe9"]:
        put_behind_the_master(cluster, k)
    r = http.get(cluster.url(quote(base) + "?list"))
    assert r.status_code == 200
    assert r.json() == {"encoding-type": "url", "next": "",
                        "keys": [quote(base) + "caf%C3%A9", quote(base) + "caf%E9"]}


def test_list_page_whose_next_is_not_utf8_is_percent_encoded_without_asking(cluster, http):
    base = new_base()
    for k in [base + b"a", base + b"b\xff"]:
        put_behind_the_master(cluster, k)
    r = http.get(cluster.url(quote(base) + "?list&limit=1"))
    assert r.json() == {"encoding-type": "url", "next": quote(base) + "b%FF", "keys": [quote(base) + "a"]}


def test_listed_names_that_are_not_utf8_redirect_to_their_file(cluster, http):
    base = new_base()
    keys = storable(base + s for s in MIXED)
    for k in keys:
        put_behind_the_master(cluster, k)
    names = http.get(cluster.url(quote(base) + "?list&encoding-type=url")).json()["keys"]
    assert len(names) == len(keys)
    for name in names:
        r = http.get(cluster.url(name))
        assert r.status_code == 302, (name, r.status_code, r.text)
        assert r.headers["Location"].endswith(key2path(unquote_to_bytes(name))), name


def test_list_with_encoding_type_url_pages_when_next_is_passed_back_verbatim(cluster, http):
    base = new_base()
    keys = storable(base + s for s in MIXED)
    for k in keys:
        put_behind_the_master(cluster, k)
    seen, start = [], ""
    for _ in range(len(keys) + 2):
        answer = http.get(cluster.url(quote(base) + "?list&encoding-type=url&limit=2&start=" + start)).json()
        assert answer["encoding-type"] == "url"
        seen += answer["keys"]
        start = answer["next"]
        if not start:
            break
    assert seen == [quote(k, safe="/") for k in sorted(keys)]


def test_list_with_encoding_type_url_percent_encodes_utf8_keys_too(cluster, http):
    base = f"/edges-{os.getpid()}-{next(_n)}/"
    for k in ["café", "b c"]:
        assert http.put(cluster.url(quote(base + k)), data=b"v").status_code == 201
    r = http.get(cluster.url(quote(base)), params={"list": "", "encoding-type": "url"})
    assert r.json() == {"encoding-type": "url", "next": "", "keys": [base + "b%20c", base + "caf%C3%A9"]}


def test_list_of_utf8_keys_is_json_text_without_encoding_type(cluster, http):
    base = f"/edges-{os.getpid()}-{next(_n)}/"
    for k in ["café", "b c", "b+c"]:
        assert http.put(cluster.url(quote(base + k)), data=b"v").status_code == 201
    r = http.get(cluster.url(quote(base) + "?list&limit=2"))
    assert r.json() == {"next": base + "café", "keys": [base + "b c", base + "b+c"]}


def test_list_start_in_utf8_text_reads_as_before(cluster, http):
    base = f"/edges-{os.getpid()}-{next(_n)}/"
    for k in ["a b", "é1", "é2"]:
        assert http.put(cluster.url(quote(base + k)), data=b"v").status_code == 201
    # requests sends the query form-encoded: '+' for a space, %C3%A9 for é
    r = http.get(cluster.url(quote(base)), params={"list": "", "start": base + "é"})
    assert r.json() == {"next": "", "keys": [base + "é1", base + "é2"]}
    r = http.get(cluster.url(quote(base)), params={"list": "", "start": base + "a b"})
    assert r.json()["keys"] == [base + "a b", base + "é1", base + "é2"]


def test_unlinked_lists_keys_that_are_not_utf8_percent_encoded(cluster, http):
    base = new_base()
    put_behind_the_master(cluster, base + b"gone\xff", state="unlinked")
    put_behind_the_master(cluster, base + b"here\xff")
    assert http.get(cluster.url(quote(base) + "?unlinked")).json() == {
        "encoding-type": "url", "next": "", "keys": [quote(base) + "gone%FF"]}


def test_list_with_an_encoding_type_other_than_url_is_400_in_one_line(cluster, http):
    for bad in ["", "json", "URL"]:
        r = http.get(cluster.url("/"), params={"list": "", "encoding-type": bad})
        assert r.status_code == 400, bad
        assert r.text.strip().splitlines() == ["encoding-type must be url"]


def test_encoding_type_without_list_is_400(cluster, http, key):
    r = http.get(cluster.url(key), params={"encoding-type": "url"})
    assert r.status_code == 400 and "encoding-type" in r.text


# ---------------------------------------------------------------- MKV_FALLBACK

FALLBACK = "127.0.0.1:9"


@pytest.fixture(scope="module")
def fallback_cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("fallback")), n_volumes=1, replicas=1, fallback=FALLBACK)
    yield c
    c.kill()


def fallback_path(port, target):
    status, headers, _ = raw_get(port, target)
    assert status.split()[1] == "302", status
    location = headers["location"]
    assert location.startswith(f"http://{FALLBACK}/"), location
    return location[len(f"http://{FALLBACK}"):]


def dot_segments(path):
    """Segments that a client normalizes away: '.' and '..', also spelled with
    %2e as the WHATWG URL standard (browsers, fetch) reads them."""
    return [s for s in path.split("/") if s.lower().replace("%2e", ".") in (".", "..")]


@pytest.mark.parametrize("target", ["/..%2f..%2fetc%2fpasswd", "/a/%2e%2e/%2e%2e/b", "/a/%2e%2e",
                                    "/%2e/x", "/x/%2e", "/a//%2e%2e/b", "/%ff/%2e%2e/%2e%2e%2f%fe"])
def test_fallback_redirect_has_no_dot_segments(fallback_cluster, target):
    path = fallback_path(fallback_cluster.master.port, target)
    assert dot_segments(path) == [], path


@pytest.mark.parametrize("target", ["/..%2f..%2fetc%2fpasswd", "/a/%2e%2e/%2e%2e/b", "/a/%2e%2e",
                                    "/%2e/x", "/a//%2e%2e/b", "/%ff/%2e%2e/%2e%2e%2f%fe", "/a%20b/+/%3f/%23/%25"])
def test_fallback_redirect_names_the_same_key(fallback_cluster, target):
    path = fallback_path(fallback_cluster.master.port, target)
    assert unquote_to_bytes(path) == unquote_to_bytes(target)


def test_fallback_redirect_of_a_key_without_dot_segments_is_unchanged(fallback_cluster):
    for target in ["/isos/big.iso", "/a/.../b..", "/x.y/.z"]:
        assert fallback_path(fallback_cluster.master.port, target) == target


def test_fallback_redirect_of_a_dots_only_key_stays_at_the_fallback_root(fallback_cluster):
    # "/.." cannot be spelled without a segment WHATWG reads as '..'; it is sent
    # as %2E%2E, which such a client normalizes to the fallback's "/", no higher
    for target, path in [("/%2e%2e", "/%2E%2E"), ("/%2e", "/%2E")]:
        assert fallback_path(fallback_cluster.master.port, target) == path


# ---------------------------------------------------------------- requests malformed at the HTTP level

def assert_one_line_error(answer, status):
    status_line, headers, body = answer
    assert status_line.startswith(f"HTTP/1.1 {status} "), status_line
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("text/plain")
    assert len(body) == int(headers["content-length"])
    text = body.decode("ascii")
    assert text.endswith("\n") and len(text.splitlines()) == 1 and text.strip(), text
    assert "<" not in text and "Traceback" not in text, text


def test_lowercase_method_is_400_in_one_line(cluster):
    answer = raw_request(cluster.master.port, b"get /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_one_line_error(answer, 400)


def test_negative_content_length_is_400_in_one_line(cluster):
    answer = raw_request(cluster.master.port, b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert_one_line_error(answer, 400)


def test_raw_non_ascii_bytes_in_the_request_line_are_400_in_one_line(cluster):
    answer = raw_request(cluster.master.port, b"GET /caf\xe9\xff HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_one_line_error(answer, 400)


def test_a_5000_byte_path_is_414_in_one_line(cluster):
    answer = raw_request(cluster.master.port, b"GET /" + b"k" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_one_line_error(answer, 414)


@pytest.mark.parametrize("script_name", ["/k", "/other", "/"])
def test_a_script_name_header_reshapes_no_request(cluster, http, script_name):
    # gunicorn trusts SCRIPT_NAME from 127.0.0.1 by default: a GET of /k/k1 served the key /k1, or a 500
    assert http.put(cluster.url("/k1"), data=b"not this one").status_code == 201
    r = http.get(cluster.url("/k/k1"), headers={"SCRIPT_NAME": script_name})
    assert r.status_code == 404, (r.status_code, r.text)
    assert http.put(cluster.url("/k/k1"), data=b"this one").status_code == 201
    r = http.get(cluster.url("/k/k1"), headers={"SCRIPT_NAME": script_name}, follow=True)
    assert r.status_code == 200 and r.content == b"this one"
    assert http.delete(cluster.url("/k/k1")).status_code == 204
    assert http.delete(cluster.url("/k1")).status_code == 204
