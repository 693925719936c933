"""mkvlib.volumes.Volumes, the master's and the tools' HTTP client to the volumes
(its own keep-alive connections), against real nginx volumes: uploads,
MOVEs, downloads, and what a closed, frozen or refusing volume does to them."""
import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from mkvlib.errors import ClientGone, VolumeDown, VolumeError
from mkvlib.http import SEND_SLICE
from mkvlib.upload import put
from mkvlib.volumes import CHUNK, TRANSFER_TIMEOUT, Volumes
from conftest import start_volume


@pytest.fixture
def two_volumes(tmp_path):
    servers = [start_volume(str(tmp_path / f"vol{i}")) for i in range(2)]
    yield servers, [str(tmp_path / f"vol{i}") for i in range(2)]
    for s in servers:
        s.stop()


def names(servers):
    return [f"127.0.0.1:{s.port}" for s in servers]


def read(folder, path):
    with open(os.path.join(folder, path.lstrip("/")), "rb") as f:
        return f.read()


def test_a_value_of_known_length_lands_byte_exact_on_every_volume(two_volumes):
    servers, folders = two_volumes
    value = os.urandom(3 * CHUNK + 17)
    chunks = [value[i:i + CHUNK] for i in range(0, len(value), CHUNK)]
    md5, size = put(Volumes(), names(servers), "/aa/bb/known", chunks, len(value))
    assert (md5, size) == (hashlib.md5(value).hexdigest(), len(value))
    assert [read(f, "/aa/bb/known") for f in folders] == [value, value]


def test_a_value_of_unknown_length_is_sent_chunked_and_lands_byte_exact(two_volumes):
    servers, folders = two_volumes
    chunks = [b"x" * 5, b"", b"y" * CHUNK, b"z"]
    put(Volumes(), names(servers), "/aa/bb/chunked", chunks)
    assert [read(f, "/aa/bb/chunked") for f in folders] == [b"".join(chunks)] * 2


def test_a_body_shorter_than_announced_lands_nothing(two_volumes):
    servers, folders = two_volumes
    with pytest.raises(VolumeError, match="not the 100 announced") as e:
        put(Volumes(), names(servers), "/aa/bb/short", [b"only ten b"], 100)
    assert e.value.outcomes == {}
    assert not any(os.path.exists(os.path.join(f, "aa/bb/short")) for f in folders)
    assert all(os.listdir(os.path.join(f, ".tmp")) == [] for f in folders)


def test_a_client_that_fails_mid_value_breaks_every_upload_off_and_lands_nothing(two_volumes):
    servers, folders = two_volumes

    def body():
        yield b"a" * CHUNK
        raise ClientGone("the client went away")
    with pytest.raises(ClientGone):
        put(Volumes(), names(servers), "/aa/bb/gone", body(), 10 * CHUNK)
    time.sleep(0.5)   # nginx has seen the connections close
    assert not any(os.path.exists(os.path.join(f, "aa/bb/gone")) for f in folders)
    assert all(os.listdir(os.path.join(f, ".tmp")) == [] for f in folders)


def test_connections_a_restarted_volume_closed_while_idle_are_replaced_not_failed(two_volumes):
    servers, folders = two_volumes
    volumes = Volumes()
    put(volumes, names(servers), "/aa/bb/before", [b"before"], 6)   # leaves kept-alive connections
    for s in servers:
        s.restart()                                               # which nginx closed on its way out
    # an upload cannot be sent twice, so it must not start on a dead connection
    put(volumes, names(servers), "/aa/bb/after", [b"after"], 5)
    assert [read(f, "/aa/bb/after") for f in folders] == [b"after"] * 2
    assert volumes.has(names(servers)[0], "/aa/bb/after")


def test_an_upload_to_a_volume_that_freezes_mid_value_fails_within_the_op_timeout(two_volumes):
    """A volume that takes no byte for OP_TIMEOUT seconds is down: the write
    fails then, not after TRANSFER_TIMEOUT (30 s), and lands nothing."""
    servers, folders = two_volumes
    volumes = Volumes(timeout=0.5)

    def body():
        for i in range(256):           # more than the sockets' buffers hold
            if i == 2:
                servers[1].pause()
            yield b"v" * CHUNK
    started = time.monotonic()
    try:
        with pytest.raises(VolumeDown, match=f"127.0.0.1:{servers[1].port} failed during upload"):
            put(volumes, names(servers), "/aa/bb/frozen", body(), 256 * CHUNK)
        took = time.monotonic() - started
    finally:
        servers[1].resume()
    assert took < TRANSFER_TIMEOUT, took
    assert volumes.health.down(names(servers)[1])
    time.sleep(1)
    assert not any(os.path.exists(os.path.join(f, "aa/bb/frozen")) for f in folders)


def test_a_volume_that_refuses_an_upload_is_named_with_its_status_and_not_marked_down(tmp_path):
    guarded = start_volume(str(tmp_path / "guarded"), MKV_SECRET="s3cret")
    try:
        volumes = Volumes()          # carries no secret
        with pytest.raises(VolumeError, match="answered PUT with 403") as e:
            put(volumes, [f"127.0.0.1:{guarded.port}"], "/aa/bb/refused", [b"r" * CHUNK] * 4,
                        4 * CHUNK)
        assert not isinstance(e.value, VolumeDown)
        assert not volumes.health.down(f"127.0.0.1:{guarded.port}")
        assert not os.path.exists(tmp_path / "guarded" / "aa" / "bb" / "refused")
    finally:
        guarded.stop()


def test_a_download_read_to_its_end_or_broken_off_leaves_the_next_call_a_clean_connection(two_volumes):
    servers, folders = two_volumes
    volume = names(servers)[0]
    value = os.urandom(2 * CHUNK + 5)
    volumes = Volumes()
    put(volumes, [volume], "/aa/bb/file", [value], len(value))

    d = volumes.open(volume, "/aa/bb/file")
    assert d.length == len(value)
    assert b"".join(d.stream(CHUNK)) == value
    d.close()
    assert volumes.has(volume, "/aa/bb/file")

    d = volumes.open(volume, "/aa/bb/file")
    next(d.stream(1000))                   # the rest of the file is still on its way
    d.close()
    for _ in range(3):                     # never an answer read from the middle of a file
        assert volumes.has(volume, "/aa/bb/file")
        assert volumes.open(volume, "/aa/bb/missing") is None


def test_a_move_never_replaces_a_file_a_delete_of_a_missing_file_is_fine(two_volumes):
    servers, folders = two_volumes
    volume = names(servers)[0]
    volumes = Volumes()
    put(volumes, [volume], "/aa/bb/moved", [b"first"], 5)
    put(volumes, [volume], "/aa/bb/moved", [b"second"], 6)   # the file found there is removed first
    assert read(folders[0], "/aa/bb/moved") == b"second"
    volumes.delete(volume, "/aa/bb/moved")
    volumes.delete(volume, "/aa/bb/moved")
    assert not volumes.has(volume, "/aa/bb/moved")


def fake_volume(serve):
    """A server on a free port whose every connection goes to serve(conn)
    (small receive buffers: what it does not read soon stops the sender)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def test_an_upload_complete_on_one_volume_when_another_resets_is_removed(two_volumes):
    servers, folders = two_volumes

    def reset(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    broken = fake_volume(reset)

    def body():
        time.sleep(0.3)        # the reset has come by the time the value is sent
        yield b"v" * 1000
    with pytest.raises(VolumeDown):
        put(Volumes(), [names(servers)[0], broken], "/aa/bb/reset", body(), 1000)
    time.sleep(0.5)
    assert os.listdir(os.path.join(folders[0], ".tmp")) == []
    assert not os.path.exists(os.path.join(folders[0], "aa/bb/reset"))


def test_a_slow_but_steady_volume_is_not_taken_for_down(tmp_path):
    """A volume taking 400 KB/s: the value takes about 4 s, more than its
    op_timeout, but it never takes nothing for that long."""
    got = []

    def slow(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                     .split(b":")[1])
        while len(body) < length:
            tick = len(body) + 40960          # 40 KB each tenth of a second
            while len(body) < min(tick, length):
                body += conn.recv(min(tick, length) - len(body))
            time.sleep(0.1)
        got.append(len(body))
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    volume = fake_volume(slow)
    volumes = Volumes(timeout=0.5)
    volumes.op_timeout = 1.0                  # the same rule, sooner
    value = b"s" * (SEND_SLICE * 6)    # 1.5 MB
    with pytest.raises(VolumeError, match="MOVE"):   # a fake volume knows no MOVE
        put(volumes, [volume], "/aa/bb/slow", [value], len(value))
    assert got == [len(value)]


class BrokenPeer:
    """A server that answers every request with the same bytes: a broken
    peer (nginx never sends these), whose framing our client must refuse."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.name = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.answer)
                time.sleep(0.5)

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n[]",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n[]",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\n[]",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n[]\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n[]\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n[]\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]XX0\r\n\r\n",
])
def test_an_answer_framed_in_a_way_http_does_not_allow_fails_the_request(answer):
    peer = BrokenPeer(answer)
    try:
        volumes = Volumes(timeout=2)
        with pytest.raises(VolumeError):
            volumes.listdir(peer.name, "/aa/")
        with pytest.raises(VolumeError):
            d = volumes.open(peer.name, "/aa/bb/x")
            b"".join(d.stream(CHUNK))
        assert volumes.pool.idle(peer.name) == 0    # no socket in an unknown state is kept
    finally:
        peer.close()


def answers_read(data, answer):
    """What answer(conn) makes of `data` arriving on a connection: each
    answer in turn, then the error that ended them."""
    from mkvlib.http import Conn
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        theirs.settimeout(1)
        conn, got = Conn(theirs), []
        while True:
            try:
                got.append(answer(conn))
            except (OSError, ValueError) as e:
                return got + [type(e).__name__]
    finally:
        ours.close()
        theirs.close()


NGINX_HEAD = b"HTTP/1.1 %s\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 09:30:00 GMT\r\n"


@pytest.mark.parametrize("data", [
    NGINX_HEAD % b"201 Created" + b"Content-Length: 0\r\nLocation: http://x/.tmp/a\r\nConnection: keep-alive\r\n\r\n"
    + NGINX_HEAD % b"204 No Content" + b"Connection: keep-alive\r\n\r\n",
    NGINX_HEAD % b"412 Precondition Failed" + b"Content-Type: text/html\r\nContent-Length: 5\r\n"
    b"Connection: keep-alive\r\n\r\nhello" + NGINX_HEAD % b"404 Not Found" + b"Content-Length: 3\r\n\r\nabc",
    NGINX_HEAD % b"200 OK" + b"Content-Length: 10\r\n\r\nshort",               # cut off mid-body
    NGINX_HEAD % b"201 Created" + b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    NGINX_HEAD % b"201 Created" + b"Connection: Keep-Alive, Upgrade\r\nContent-Length: 0\r\n\r\n",
    NGINX_HEAD % b"200 OK" + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n[]\r\n0\r\n\r\n",
    NGINX_HEAD % b"100 Continue" + b"\r\n" + NGINX_HEAD % b"201 Created" + b"Content-Length: 0\r\n\r\n",
    NGINX_HEAD % b"200 OK" + b"Content-Length: 0x2\r\n\r\n[]",
    NGINX_HEAD % b"200 OK" + b"\r\nbody until the close",
    NGINX_HEAD % b"2000 Odd" + b"Content-Length: 0\r\n\r\n",
    NGINX_HEAD % b"200\r\nContent-Length: 1" + b"\r\n\r\nx",                 # a status line without a reason
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 20x OK\r\nContent-Length: 1\r\n\r\nx",
])
def test_nginxs_usual_answer_read_in_one_step_is_what_the_full_reader_makes_of_it(data):
    assert answers_read(data, lambda conn: conn.answer()) == answers_read(data, lambda conn: conn.answer_slowly())
    heads = answers_read(data, lambda conn: conn.answer(to_head=True))
    assert heads == answers_read(data, lambda conn: conn.answer_slowly(to_head=True))


def test_a_volumes_usual_answer_is_read_in_one_step_without_the_full_reader():
    from mkvlib.http import Conn
    conn = Conn(None)    # no socket: the answer is in hand
    conn.buf = NGINX_HEAD % b"201 Created" + b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nokHTTP/1.1"
    assert conn.usual_answer(False) == (201, b"ok", True)
    assert conn.buf[conn.pos:] == b"HTTP/1.1"
