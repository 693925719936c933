"""rebuild.py's listing client (Volumes.listdirs: pipelined JSON listings over
keep-alive sockets) against real nginx and against small fake servers that
answer the ways HTTP allows, and rebuild.py into a new index with a volume that
fails its listings."""
import socket
import threading
import time

import pytest

import mkvlib.volumes
from mkvlib.errors import VolumeDown, VolumeError
from mkvlib.exchange import Pipeline
from mkvlib.placement import key2path, key2volume
from mkvlib.settings import Settings
from mkvlib.volumes import Volumes
import rebuild
from conftest import free_port, plant_file, start_volume
from test_tools import make_keys, rows, run_tool, summary


@pytest.fixture
def volume(tmp_path):
    server = start_volume(str(tmp_path / "vol"))
    yield server, str(tmp_path / "vol")
    server.stop()


def test_listdirs_answers_like_listdir_in_order_past_its_window(volume):
    server, folder = volume
    name = f"127.0.0.1:{server.port}"
    folders = []
    for i in range(300):
        sub = f"sv{i % 3:02X}"
        plant_file(folder, f"{sub}/{i % 256:02x}/{i:04d}/file{i}", b"y" * i)
        folders.append((f"{name}/{sub}", f"/{i % 256:02x}/{i:04d}/"))
    folders.insert(7, (name, "/no/such/folder/"))
    folders.insert(150, (name, "/.mkv/"))                      # refused by the volume: 403
    folders.insert(200, ("127.0.0.1:1", "/"))                  # nothing listens there
    v = Volumes(timeout=5)
    got = v.listdirs(folders, window=16)
    assert len(got) == len(folders)
    assert got[7] == []
    assert isinstance(got[150], VolumeError) and "403" in str(got[150])
    assert isinstance(got[200], VolumeDown)
    for i, (vol, path) in enumerate(folders):
        if i not in (7, 150, 200):
            assert got[i] == v.listdir(vol, path), (vol, path)
            assert [e["name"] for e in got[i]] == [f"file{int(path.split('/')[2])}"]
    # its sockets, kept alive, serve the next call; has() is not disturbed
    assert v.listdirs(folders[:3]) == got[:3]
    assert v.has(f"{name}/sv00", "/00/0000/file0")


class FakeVolume:
    """A server that answers each GET of a folder /N/ with the listing
    [{"name": "fN", "type": "file", "size": N}] in the way `style` says."""

    def __init__(self, style, close_after=None, silent_after=None, freeze_after=None, delay=0):
        self.style, self.close_after, self.silent_after = style, close_after, silent_after
        self.freeze_after, self.delay = freeze_after, delay
        self.backlog = 0   # most bytes of requests received and not answered yet
        self.thaw = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf, answered = b"", 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    time.sleep(self.delay)   # a slow server: requests pile up meanwhile
                    data = conn.recv(1 << 20)
                    if not data:
                        return
                    buf += data
                    self.backlog = max(self.backlog, len(buf))
                head, buf = buf.split(b"\r\n\r\n", 1)
                n = int(head.split()[1].split(b"/")[1])
                time.sleep(self.delay)
                if self.silent_after is not None and answered == self.silent_after:
                    return   # as nginx closing an idle socket just as a request arrives
                if self.freeze_after is not None and answered == self.freeze_after:
                    self.thaw.wait(30)   # as a volume stopped with SIGSTOP
                    return
                last = self.close_after is not None and answered + 1 == self.close_after
                conn.sendall(self._answer(n, last))
                answered += 1
                if last or self.style == "http10":
                    return

    def _answer(self, n, last):
        body = b'[\r\n{ "name":"f%d", "type":"file", "mtime":"x", "size":%d }\r\n]' % (n, n)
        close = b"Connection: close\r\n" if last else b"Connection: keep-alive\r\n"
        if self.style == "length":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), close, body)
        if self.style == "chunks":   # several chunks, an extension, a trailer, header case as it comes
            parts = [body[i:i + 7] for i in range(0, len(body), 7)]
            chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: 1\r\n\r\n"
            return b"HTTP/1.1 200 OK\r\ntransfer-encoding:  Chunked\r\n%s\r\n%s" % (close, chunked)
        if self.style == "http10":   # no length: the body ends when the server closes
            return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body
        raise AssertionError(self.style)

    def stop(self):
        self.stopped = True
        self.thaw.set()
        self.listener.close()


@pytest.mark.parametrize("style,close_after,silent_after", [
    ("length", None, None),
    ("chunks", None, None),
    ("http10", None, None),          # one answer per connection
    ("length", 7, None),             # nginx's keepalive_requests: the 7th answer says close
    ("chunks", None, 5),             # the server drops the socket after 5 answers, saying nothing
])
def test_listdirs_survives_every_way_a_server_may_answer_or_close(style, close_after, silent_after):
    server = FakeVolume(style, close_after, silent_after)
    try:
        host = f"127.0.0.1:{server.port}"
        v = Volumes(timeout=5)
        got = v.listdirs([(host, f"/{n}/") for n in range(40)], window=8)
        assert got == [[{"name": f"f{n}", "type": "file", "mtime": "x", "size": n}] for n in range(40)]
        if close_after or silent_after or style == "http10":
            assert server.connections > 1
        else:
            assert server.connections == 1
            assert v.listdirs([(host, "/3/")]) == [got[3]] and server.connections == 1   # kept alive
    finally:
        server.stop()


def test_listdirs_keeps_its_unanswered_requests_under_max_bytes():
    """Long paths (base64 names cut into folders): a slow server never holds
    more than MAX_BYTES of requests it has not answered, so a send cannot wait
    on a server that waits for its answers to be read."""
    server = FakeVolume("length", delay=0.001)
    try:
        host = f"127.0.0.1:{server.port}"
        long = "Zm9v" * 300
        got = Volumes(timeout=5).listdirs([(host, f"/{n}/{long}/") for n in range(120)])
        assert got == [[{"name": f"f{n}", "type": "file", "mtime": "x", "size": n}] for n in range(120)]
        assert 0 < server.backlog <= Pipeline.MAX_BYTES
    finally:
        server.stop()


def test_listdirs_of_a_server_that_never_answers_fails_within_its_timeout(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))   # accepts (the kernel does), never answers
    try:
        monkeypatch.setattr(mkvlib.volumes, "TRANSFER_TIMEOUT", 1.0)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        v = Volumes(timeout=1)
        started = time.monotonic()
        got = v.listdirs([(host, f"/{n}/") for n in range(10)])
        assert time.monotonic() - started < 5
        assert all(isinstance(g, VolumeDown) for g in got)
        assert v.health.down(host)
    finally:
        listener.close()


def test_listdirs_of_a_server_that_freezes_midway_keeps_what_it_answered_and_marks_it_down(monkeypatch):
    server = FakeVolume("length", freeze_after=4)
    try:
        monkeypatch.setattr(mkvlib.volumes, "TRANSFER_TIMEOUT", 1.0)
        host = f"127.0.0.1:{server.port}"
        v = Volumes(timeout=1)
        got = v.listdirs([(host, f"/{n}/") for n in range(10)])
        assert got[:4] == [[{"name": f"f{n}", "type": "file", "mtime": "x", "size": n}] for n in range(4)]
        assert all(isinstance(g, VolumeDown) for g in got[4:])
        assert v.health.down(host)
    finally:
        server.stop()


def test_rebuild_into_a_new_index_with_a_volume_that_cannot_be_listed(tmp_path):
    """Every key the answering volumes hold is added; the dead volume's listing
    is counted failed, named on stderr, and the exit status is 1."""
    folders = [str(tmp_path / f"v{i}") for i in range(2)]
    servers = [start_volume(f) for f in folders]
    try:
        names = [f"127.0.0.1:{s.port}" for s in servers]
        dead = f"127.0.0.1:{free_port()}"
        data = make_keys(60, "half", seed=21)
        for key, value in data.items():
            for v in key2volume(key.encode(), names, 2, 10):
                host, _, sub = v.partition("/")
                plant_file(folders[names.index(host)], sub + key2path(key.encode()), value)
        db = str(tmp_path / "new.sqlite3")
        p = run_tool("rebuild.py", names + [dead], db, replicas=2)
        assert p.returncode == 1, p.stdout + p.stderr
        assert f"cannot list {dead}/" in p.stderr
        counts = summary(p.stdout, "rebuild")
        assert counts["seen"] == counts["added"] == 60 and counts["failed"] == 1
        got = rows(db)
        settings = Settings.from_env({}, volumes=",".join(names + [dead]), db=db, replicas=2,
                                            subvolumes=10)
        for key, value in data.items():
            state, volumes, size, md5 = got[key.encode()]
            assert (state, size, md5) == ("live", len(value), None)
            holders = key2volume(key.encode(), names, 2, 10)
            assert volumes.split(",") == rebuild.order_replicas(key.encode(), holders, settings)
    finally:
        for s in servers:
            s.stop()
