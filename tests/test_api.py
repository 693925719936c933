"""The HTTP contract of the master, against real nginx volumes and gunicorn."""
import base64
import concurrent.futures
import hashlib
import json
import os
import socket

import requests

from mkvlib.index import Index, UNLINKED
from mkvlib.placement import key2path, key2volume


def on_disk(cluster, key, volume):
    """Path of the file holding `key` for a replica named like 'host:port/svXX'."""
    host, _, sub = volume.partition("/")
    port = int(host.rsplit(":", 1)[1])
    folder = next(d for v, d in zip(cluster.volumes, cluster.volume_dirs) if v.port == port)
    return os.path.join(folder, sub, key2path(key.encode()).lstrip("/"))


# ---------------------------------------------------------------- PUT and GET

def test_put_answers_201_and_get_redirects_to_a_replica(cluster, http, key):
    r = http.put(cluster.url(key), data=b"bigswag")
    assert r.status_code == 201, r.text
    r = http.get(cluster.url(key))
    assert r.status_code == 302
    assert r.headers["Content-Length"] == "0"
    assert r.headers["Content-Md5"] == hashlib.md5(b"bigswag").hexdigest()
    volumes = r.headers["Key-Volumes"].split(",")
    assert volumes == key2volume(key.encode(), cluster.volume_names(), 3, 10)
    assert any(r.headers["Location"] == f"http://{v}{key2path(key.encode())}" for v in volumes)
    assert requests.get(r.headers["Location"], timeout=10).content == b"bigswag"


def test_put_writes_every_replica_at_its_placement(cluster, http, key):
    assert http.put(cluster.url(key), data=b"x" * 1000).status_code == 201
    for volume in key2volume(key.encode(), cluster.volume_names(), 3, 10):
        with open(on_disk(cluster, key, volume), "rb") as f:
            assert f.read() == b"x" * 1000


def test_head_redirects_like_get(cluster, http, key):
    http.put(cluster.url(key), data=b"v")
    r = http.head(cluster.url(key))
    assert r.status_code == 302 and r.headers["Location"].startswith("http://")


def test_get_follows_to_the_value_and_serves_ranges(cluster, http, key):
    http.put(cluster.url(key), data=b"0123456789")
    r = http.get(cluster.url(key), follow=True)
    assert r.content == b"0123456789"
    r = http.get(cluster.url(key), follow=True, headers={"Range": "bytes=2-4"})
    assert r.status_code == 206 and r.content == b"234"


def test_get_of_a_missing_key_is_404_with_empty_body(cluster, http, key):
    r = http.get(cluster.url(key))
    assert r.status_code == 404
    assert r.headers["Content-Length"] == "0" and r.content == b""


def test_put_of_an_existing_key_is_403(cluster, http, key):
    assert http.put(cluster.url(key), data=b"one").status_code == 201
    r = http.put(cluster.url(key), data=b"two")
    assert r.status_code == 403 and r.text.strip()
    assert http.get(cluster.url(key), follow=True).content == b"one"


def test_put_of_an_empty_body_is_411(cluster, http, key):
    assert http.put(cluster.url(key), data=b"").status_code == 411
    assert http.get(cluster.url(key)).status_code == 404


def test_put_of_an_empty_chunked_body_is_411(cluster, http, key):
    r = http.put(cluster.url(key), data=iter([b""]))
    assert r.status_code == 411
    assert http.get(cluster.url(key)).status_code == 404


def test_put_with_a_chunked_body_stores_it(cluster, http, key):
    parts = [os.urandom(300_000) for _ in range(5)]
    r = http.put(cluster.url(key), data=iter(parts))   # no Content-Length: chunked
    assert r.status_code == 201, r.text
    r = http.get(cluster.url(key), follow=True)
    assert r.content == b"".join(parts)
    assert http.get(cluster.url(key)).headers["Content-Md5"] == hashlib.md5(b"".join(parts)).hexdigest()


def test_sixteen_puts_of_one_new_key_at_once_give_exactly_one_201(cluster, key):
    def put(i):
        return requests.put(cluster.url(key), data=os.urandom(200_000) + bytes([i]), timeout=30).status_code
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(put, range(16)))
    assert codes.count(201) == 1, codes
    assert set(codes) <= {201, 403, 409}, codes


def test_key_is_utf8_bytes_of_the_decoded_path(cluster, http):
    key = "/caf\u00e9-\u263a-%d" % os.getpid()
    assert http.put(cluster.url(requests.utils.quote(key)), data=b"v").status_code == 201
    r = http.get(cluster.url(requests.utils.quote(key)))
    assert r.headers["Location"].endswith(key2path(key.encode("utf-8")))


# ---------------------------------------------------------------- DELETE and UNLINK

def test_delete_answers_204_and_removes_every_replica(cluster, http, key):
    http.put(cluster.url(key), data=b"gone soon")
    volumes = http.get(cluster.url(key)).headers["Key-Volumes"].split(",")
    assert http.delete(cluster.url(key)).status_code == 204
    assert http.get(cluster.url(key)).status_code == 404
    for v in volumes:
        assert not os.path.exists(on_disk(cluster, key, v))


def test_delete_of_a_missing_key_is_404(cluster, http, key):
    assert http.delete(cluster.url(key)).status_code == 404


def test_key_can_be_put_again_after_delete(cluster, http, key):
    http.put(cluster.url(key), data=b"first")
    http.delete(cluster.url(key))
    assert http.put(cluster.url(key), data=b"second").status_code == 201
    assert http.get(cluster.url(key), follow=True).content == b"second"


def test_unlink_hides_the_key_and_keeps_the_bytes(cluster, http, key):
    http.put(cluster.url(key), data=b"kept")
    volumes = http.get(cluster.url(key)).headers["Key-Volumes"].split(",")
    assert http.request("UNLINK", cluster.url(key)).status_code == 204
    assert http.get(cluster.url(key)).status_code == 404
    assert http.request("UNLINK", cluster.url(key)).status_code == 404
    for v in volumes:
        assert open(on_disk(cluster, key, v), "rb").read() == b"kept"


def test_delete_after_unlink_removes_the_bytes(cluster, http, key):
    http.put(cluster.url(key), data=b"kept")
    volumes = http.get(cluster.url(key)).headers["Key-Volumes"].split(",")
    http.request("UNLINK", cluster.url(key))
    assert http.delete(cluster.url(key)).status_code == 204
    for v in volumes:
        assert not os.path.exists(on_disk(cluster, key, v))


# ---------------------------------------------------------------- listing

def test_list_returns_keys_with_the_prefix_in_order(cluster, http):
    base = f"/list-{os.getpid()}"
    for k in ["b", "a", "c/d", "c"]:
        assert http.put(cluster.url(f"{base}/{k}"), data=b"v").status_code == 201
    http.put(cluster.url(f"{base}x"), data=b"v")   # shares the text prefix but not "/"
    r = http.get(cluster.url(f"{base}/?list"))
    assert r.status_code == 200
    assert r.json() == {"next": "", "keys": [f"{base}/{k}" for k in ["a", "b", "c", "c/d"]]}


def test_list_pages_with_limit_and_start(cluster, http):
    base = f"/page-{os.getpid()}/"
    for i in range(5):
        http.put(cluster.url(f"{base}{i}"), data=b"v")
    first = http.get(cluster.url(f"{base}?list&limit=2")).json()
    assert first == {"next": f"{base}2", "keys": [f"{base}0", f"{base}1"]}
    second = http.get(cluster.url(base), params={"list": "", "limit": "2", "start": first["next"]}).json()
    assert second == {"next": f"{base}4", "keys": [f"{base}2", f"{base}3"]}
    last = http.get(cluster.url(base), params={"list": "", "limit": "2", "start": second["next"]}).json()
    assert last == {"next": "", "keys": [f"{base}4"]}


def test_list_skips_unlinked_keys_and_unlinked_lists_them(cluster, http):
    base = f"/unl-{os.getpid()}/"
    http.put(cluster.url(base + "live"), data=b"v")
    http.put(cluster.url(base + "soft"), data=b"v")
    http.request("UNLINK", cluster.url(base + "soft"))
    assert http.get(cluster.url(base + "?list")).json()["keys"] == [base + "live"]
    assert http.get(cluster.url(base + "?unlinked")).json()["keys"] == [base + "soft"]


def test_list_with_a_bad_limit_is_400(cluster, http):
    for bad in ["0", "-1", "x", "", "10000001"]:
        r = http.get(cluster.url("/"), params={"list": "", "limit": bad})
        assert r.status_code == 400, bad
        assert len(r.text.strip().splitlines()) == 1


# ---------------------------------------------------------------- bad input

def test_a_get_or_head_of_a_key_ignores_query_parameters_it_does_not_know(cluster, http, key):
    assert http.put(cluster.url(key), data=b"v").status_code == 201
    plain = http.get(cluster.url(key))
    for query in ("?_=1701", "?v=2&v=3", "?frobnicate", "?cache+buster=%ff"):
        r = http.get(cluster.url(key + query))
        assert r.status_code == 302 and r.headers["Key-Volumes"] == plain.headers["Key-Volumes"], query
        assert http.head(cluster.url(key + query)).status_code == 302
    assert http.get(cluster.url("/no-such-key-at-all?_=1")).status_code == 404


def test_a_listing_refuses_a_query_parameter_it_does_not_know(cluster, http, key):
    r = http.get(cluster.url(key + "?list&frobnicate"))
    assert r.status_code == 400 and "frobnicate" in r.text


def test_query_on_put_is_400(cluster, http, key):
    assert http.put(cluster.url(key + "?list"), data=b"v").status_code == 400
    assert http.get(cluster.url(key)).status_code == 404


def test_unknown_method_is_405(cluster, http, key):
    r = http.request("PATCH", cluster.url(key))
    assert r.status_code == 405 and "PUT" in r.headers["Allow"]


def test_key_too_long_for_a_file_name_is_414(cluster, http):
    r = http.put(cluster.url("/" + "k" * 300), data=b"v")
    assert r.status_code == 414 and r.text.strip()


def test_key_whose_file_name_would_end_in_a_slash_is_400(cluster, http):
    key = "/a?"   # base64 "L2E/": nginx cannot PUT a name ending in '/'
    r = http.put(cluster.url(requests.utils.quote(key, safe="/")), data=b"v")
    assert r.status_code == 400 and "cannot be stored" in r.text


def test_body_shorter_than_content_length_stores_nothing(cluster, key):
    with socket.create_connection(("127.0.0.1", cluster.master.port), timeout=10) as s:
        s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n".encode()
                  + b"x" * 1_500_000)
        s.shutdown(socket.SHUT_WR)   # the client goes away half-way
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert Index(os.path.join(cluster.workdir, "index.sqlite3")).get(key.encode()) is None
    placement = key2volume(key.encode(), cluster.volume_names(), 3, 10)
    assert not any(os.path.exists(on_disk(cluster, key, v)) for v in placement)
    assert requests.get(cluster.url(key), timeout=10, allow_redirects=False).status_code == 404
    assert requests.put(cluster.url(key), data=b"ok", timeout=10).status_code == 201


def test_errors_are_one_line_without_traceback(cluster, http, key):
    http.put(cluster.url(key), data=b"v")
    for r in [http.put(cluster.url(key), data=b"v"), http.get(cluster.url(key + "?list&x=1")),
              http.request("PATCH", cluster.url(key))]:
        assert r.status_code < 500
        assert len(r.text.strip().splitlines()) == 1 and "Traceback" not in r.text


def test_list_output_is_json(cluster, http):
    r = http.get(cluster.url("/?list&limit=1"))
    assert r.headers["Content-Type"].startswith("application/json")
    json.loads(r.text)


def test_a_failed_put_over_an_unlinked_key_keeps_the_unlinked_value(cluster, http, key):
    http.put(cluster.url(key), data=b"old value")
    http.request("UNLINK", cluster.url(key))
    with socket.create_connection(("127.0.0.1", cluster.master.port), timeout=10) as s:
        s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n".encode() + b"x" * 10)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert key in http.get(cluster.url(key + "?unlinked")).json()["keys"]
    rec = Index(os.path.join(cluster.workdir, "index.sqlite3")).get(key.encode())
    assert rec.state == UNLINKED and rec.md5 == hashlib.md5(b"old value").hexdigest()
    for v in rec.volumes:
        assert open(on_disk(cluster, key, v), "rb").read() == b"old value"


def test_key_that_is_not_utf8_is_400(cluster, http):
    r = http.put(cluster.url("/not-utf8-%FF%FE"), data=b"v")
    assert r.status_code == 400 and "UTF-8" in r.text


def test_key_whose_file_path_is_too_long_is_414(cluster, http):
    key = "/k?" + "kk?" * 600    # each '?' ends a base64 group as '/': 601 folders of 3 letters
    assert max(map(len, base64.b64encode(key.encode()).split(b"/"))) <= 255
    r = http.put(cluster.url(requests.utils.quote(key, safe="/")), data=b"v")
    assert r.status_code == 414 and r.text.strip()
