"""Clients that misbehave, against real servers: a PUT cut off half-way, clients
that leave in the middle of a big listing or before reading their redirect,
and slow clients holding many connections (slowloris) while others are served.
Every test is bounded (30 s) and every request has a timeout."""
import os
import socket
import sqlite3
import struct
import threading
import time

import pytest
import requests

from mkvlib.index import Index, WRITING
from mkvlib.placement import key2volume
from mkvlib.volumes import CHUNK
from conftest import TIMEOUT, enough_open_files, wait_until

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------- helpers

def connect(port, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before connect: a small window
    s.settimeout(TIMEOUT)
    s.connect(("127.0.0.1", port))
    return s


def reset(s):
    """Close with a TCP RST, as a client that crashes or is killed does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def files_under(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def data_files(cluster):
    """Every file on the volumes but their own (.mkv, .id) and the uploads (.tmp)."""
    return [f for d in cluster.volume_dirs for f in files_under(d)
            if not f.startswith((os.path.join(d, ".mkv") + os.sep, os.path.join(d, ".tmp") + os.sep))
            and f != os.path.join(d, ".id")]


def round_trip(http_url, key, value=b"ordinary value"):
    """An ordinary client's PUT, GET (and the volume's answer), DELETE; each
    within TIMEOUT. Returns the slowest request's seconds."""
    slowest = 0.0

    def timed(method, url, **kw):
        nonlocal slowest
        started = time.monotonic()
        r = requests.request(method, url, timeout=TIMEOUT, allow_redirects=False, **kw)
        slowest = max(slowest, time.monotonic() - started)
        return r
    assert timed("PUT", http_url(key), data=value).status_code == 201
    r = timed("GET", http_url(key))
    assert r.status_code == 302
    assert timed("GET", r.headers["Location"]).content == value
    assert timed("DELETE", http_url(key)).status_code == 204
    return slowest


def accepted(cluster):
    """Connections the master's workers have accepted and hold open."""
    import psutil
    return sum(1 for pid in cluster.master.pids()
               for conn in psutil.Process(pid).net_connections("tcp")
               if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == cluster.master.port)


def master_health(cluster):
    """The master's workers and where its log ends, to compare after."""
    return sorted(cluster.master.pids()), os.path.getsize(cluster.master.log_path)


def assert_same_health(cluster, before):
    pids, offset = before
    assert sorted(cluster.master.pids()) == pids, "a worker died or was replaced"
    with open(cluster.master.log_path, "rb") as f:
        f.seek(offset)
        log = f.read().decode("utf-8", "replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


class Drip:
    """Many connections, each sent `opening` at once and then one byte of
    `drip` a second by one thread, until stop(). `open_after` counts the
    connections still open (the last byte sent went through)."""

    def __init__(self, port, openings, drip):
        self.socks = [connect(port) for _ in openings]
        for s, opening in zip(self.socks, openings):
            s.sendall(opening)
        self.drip, self.open = drip, [True] * len(self.socks)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stopped.wait(1.0):
            byte = self.drip[i % len(self.drip):][:1]
            i += 1
            for n, s in enumerate(self.socks):
                if self.open[n]:
                    try:
                        s.send(byte)
                    except OSError:
                        self.open[n] = False

    def still_open(self):
        return sum(self.open)

    def stop(self):
        self.stopped.set()
        self.thread.join(TIMEOUT)
        for s in self.socks:
            reset(s)


def hold_while_serving(cluster, drip, seconds):
    """Ordinary round trips for `seconds` while `drip` holds its connections;
    (round trips done, slowest request's seconds)."""
    deadline, done, slowest = time.monotonic() + seconds, 0, 0.0
    while time.monotonic() < deadline:
        slowest = max(slowest, round_trip(cluster.url, f"/ordinary-{done}"))
        done += 1
    return done, slowest


# ---------------------------------------------------------------- clients that go away

def test_a_put_cut_off_at_half_its_content_length_leaves_no_key_no_file_and_the_key_writable(private_cluster):
    c = private_cluster()
    key, length = "/cut-off", 4 * CHUNK
    s = connect(c.master.port)
    s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
    s.sendall(os.urandom(length // 2))
    # two whole chunks sent: the master streams them to every volume (nginx buffers them in .mkv/body_temp)
    wait_until(lambda: all(files_under(os.path.join(d, ".mkv", "body_temp")) for d in c.volume_dirs), TIMEOUT,
               "the master to stream the first chunks to every volume")
    s.close()
    index = Index(c.db())
    wait_until(lambda: index.get(key.encode()) is None, TIMEOUT, "the cut-off PUT to let go of its key")
    for d in c.volume_dirs:   # nginx drops the broken-off uploads and keeps no partial body
        wait_until(lambda: files_under(os.path.join(d, ".tmp")) + files_under(os.path.join(d, ".mkv", "body_temp"))
                   == [], 5, f"the uploads on {d} to be gone")
    assert data_files(c) == []
    assert requests.get(c.url(key), timeout=TIMEOUT, allow_redirects=False).status_code == 404
    value = os.urandom(length)
    assert requests.put(c.url(key), data=value, timeout=TIMEOUT).status_code == 201
    assert requests.get(c.url(key), timeout=TIMEOUT).content == value


def put_straight_into_the_index(cluster, keys):
    """Live records of `keys` (no files): a listing has something to list."""
    placement = ",".join(key2volume(b"/listed", cluster.volume_names(), 3, 10))
    with sqlite3.connect(cluster.db(), timeout=30) as db:
        db.executemany("INSERT INTO keys (key, state, volumes, md5, size) VALUES (?, 'live', ?, NULL, 1)",
                       ((k, placement) for k in keys))
    db.close()


def test_clients_that_leave_in_the_middle_of_a_big_listing_do_not_stop_the_master(private_cluster):
    c = private_cluster()
    # a listing of about 10 MB: more than a socket's send buffer (4 MB at most here) and our 4 KB window
    keys = [b"/listed/%08d-%s" % (i, b"k" * 32) for i in range(200_000)]
    put_straight_into_the_index(c, keys)
    before = master_health(c)
    for n in range(6):
        s = connect(c.master.port, rcvbuf=4096)
        s.sendall(b"GET /listed/?list HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")   # the answer is on its way
        reset(s) if n % 2 else s.close()                 # killed, or closed without reading on
    r = requests.get(c.url("/listed/?list"), timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["keys"]) == len(keys)
    round_trip(c.url, "/after-the-listings")
    assert_same_health(c, before)


def test_clients_that_leave_before_reading_their_redirect_do_not_stop_the_master(cluster, key):
    assert requests.put(cluster.url(key), data=b"redirected", timeout=TIMEOUT).status_code == 201
    before = master_health(cluster)
    for n in range(100):
        s = connect(cluster.master.port)
        s.sendall(f"GET {key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        if n % 2:
            time.sleep(0.005)          # the redirect may be written by now, never read
        reset(s)
    r = requests.get(cluster.url(key), timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == b"redirected"
    round_trip(cluster.url, key + "-after")
    assert_same_health(cluster, before)


# ---------------------------------------------------------------- slow clients

def test_2100_slowloris_connections_do_not_stop_ordinary_gets_and_puts(private_cluster):
    """More than gunicorn's default 1000 per worker on 2 workers: the master
    holds what its budget allows (the oldest go first) and serves the rest."""
    enough_open_files(2100)
    c = private_cluster(workers=2)
    # half stall inside the request line, half inside the headers
    openings = [b"GET /slowloris-%d" % i if i % 2 else b"GET /slowloris HTTP/1.1\r\nHost: x\r\nX-Slow: "
                for i in range(2100)]
    drip = Drip(c.master.port, openings, b"abcdefghijklmnopqrstuvwxyz")
    try:
        # up to 1000 a worker from one address (MKV_CLIENT_CONNECTIONS), the oldest dropped
        wait_until(lambda: accepted(c) >= 1500, TIMEOUT, "the workers to accept the slow connections")
        done, slowest = hold_while_serving(c, drip, 8)
        assert accepted(c) >= 1500, "the master dropped slow connections: nothing was held"
    finally:
        drip.stop()
    print(f"{done} ordinary round trips in 8 s, slowest request {slowest:.3f} s")
    assert done >= 10, f"only {done} ordinary round trips in 8 s"
    assert slowest < TIMEOUT


def test_50_puts_sending_their_bodies_at_a_byte_a_second_do_not_stop_other_clients(private_cluster):
    c = private_cluster(workers=2)
    openings = [b"PUT /slow-body-%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" % i for i in range(50)]
    drip = Drip(c.master.port, openings, b"v")
    try:
        index = Index(c.db())
        wait_until(lambda: all(index.get(b"/slow-body-%d" % i) for i in range(50)), TIMEOUT,
                   "every slow PUT to claim its key")   # and wait for its body
        assert {index.get(b"/slow-body-%d" % i).state for i in range(50)} == {WRITING}
        done, slowest = hold_while_serving(c, drip, 8)
        assert drip.still_open() == 50, "the master dropped slow uploads: nothing was held"
    finally:
        drip.stop()
    print(f"{done} ordinary round trips in 8 s, slowest request {slowest:.3f} s")
    assert done >= 10, f"only {done} ordinary round trips in 8 s"
    assert slowest < TIMEOUT
