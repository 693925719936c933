"""A small PUT in one round trip to each volume (mkvlib.upload.put_whole):
the value is in hand, so its fence comes first and each volume gets the
upload and the MOVE of it in one send. What each answer of a volume makes of
it: a MOVE that meets a file, one refused as late, an upload refused, a
volume that closes the connection after the upload."""
import socket
import threading

import pytest

from mkvlib.index import Index
from mkvlib.placement import key2path, key2volume
from mkvlib.upload import put_whole
from mkvlib.volumes import Volumes
from conftest import Cluster, Http
from holding_proxy import HoldingProxy, _Reader


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """3 volumes, 3 replicas; the master reaches the third through a holding proxy."""
    c = Cluster(str(tmp_path_factory.mktemp("whole")), n_volumes=3, replicas=3)
    proxy = HoldingProxy(c.volumes[2].port)
    c.aliases[proxy.port] = c.volumes[2].port
    names = c.volume_names()
    names[2] = proxy.name
    c.restart_master(volumes=names)
    yield c, proxy, names
    proxy.close()
    c.kill()


def on_disk(c, names, key):
    """{volume: bytes or None} of `key`'s file on each of its placement volumes."""
    found = {}
    for volume in key2volume(key.encode(), names, 3, 10):
        try:
            with open(c.file_of(volume, key.encode()), "rb") as f:
                found[volume] = f.read()
        except FileNotFoundError:
            found[volume] = None
    return found


def test_a_small_put_sends_each_volume_its_upload_and_its_move_in_one_go(proxied):
    c, proxy, names = proxied
    key = "/whole/one-go"
    proxy.hold(rb"^PUT /\.tmp/", delay=1)     # the upload waits a second before it reaches nginx
    assert Http().put(c.url(key), data=b"v1").status_code == 201
    (upload, _, upload_sent), = [a for a in proxy.arrived if a[0].startswith(b"PUT /.tmp/")]
    (move, move_came, _), = [a for a in proxy.arrived if a[0].startswith(b"MOVE /.tmp/")]
    assert move.split()[1] == upload.split()[1]
    assert move_came < upload_sent            # the MOVE came with the upload, not after its answer
    assert set(on_disk(c, names, key).values()) == {b"v1"}


def test_a_small_put_over_a_stray_file_at_its_path_replaces_it(proxied):
    c, proxy, names = proxied
    key = "/whole/stray"
    stray_on = key2volume(key.encode(), names, 3, 10)[0]
    c.plant(stray_on, key.encode(), b"a stray file")   # a crash's leftover: no record names it
    assert Http().put(c.url(key), data=b"the value").status_code == 201
    assert set(on_disk(c, names, key).values()) == {b"the value"}


def test_a_small_put_whose_upload_a_volume_refuses_lands_nothing_and_leaves_no_note(proxied):
    c, proxy, names = proxied
    key = "/whole/refused"
    proxy.refuse(rb"^PUT /\.tmp/", 507)        # its disk full: the other two MOVEs land, then go
    r = Http().put(c.url(key), data=b"v1")
    assert r.status_code == 502 and "507" in r.text
    assert set(on_disk(c, names, key).values()) == {None}
    index = Index(c.db())
    assert index.get(key.encode()) is None and index.notes(key.encode()) == {}


def test_a_small_put_whose_move_a_volume_refuses_as_late_moves_it_again(proxied):
    c, proxy, names = proxied
    key = "/whole/late-move"
    proxy.refuse(rb"^MOVE /\.tmp/", 410)       # as nginx answers a MOVE that reached it past its deadline
    http = Http()
    assert http.put(c.url(key), data=b"v1").status_code == 201
    assert set(on_disk(c, names, key).values()) == {b"v1"}
    r = http.get(c.url(key))
    assert r.status_code == 302 and http.get(r.headers["Location"]).content == b"v1"


class ClosingVolume:
    """A volume server that answers an upload and closes the connection, as
    it said it would (Connection: close): a request behind it is not run."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.name = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.ran = []              # (connection number, request line) of each request answered
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        n = 0
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            n += 1
            threading.Thread(target=self.requests, args=(sock, n), daemon=True).start()

    def requests(self, sock, n):
        reader = _Reader(sock)
        with sock:
            while True:
                head = reader.upto(b"\r\n\r\n")
                if head is None:
                    return
                for _ in reader.body_of(head):
                    pass
                line = head.split(b"\r\n", 1)[0]
                self.ran.append((n, line.split()[0]))
                if line.startswith(b"PUT "):
                    sock.sendall(b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    return
                sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")


def test_a_move_that_the_volume_did_not_run_after_closing_the_connection_is_sent_again():
    volume = ClosingVolume()
    try:
        put_whole(Volumes(), [volume.name], key2path(b"/whole/closed"), b"v1")
        assert volume.ran == [(1, b"PUT"), (2, b"MOVE")]
    finally:
        volume.listener.close()
