"""GetObject's relay (mkvlib.relay): a large object's bytes go from the
volume's socket to the client's by splice(2), past the gateway's Python;
or, for a gateway on the volumes' host (MKV_S3_VOLUME_DIRS,
mkvlib.localread), from the volume's file by sendfile(2). Against a real
cluster and real gateways (one worker each, so their open files can be
counted): whole bodies and ranges, keep-alive after them, HEAD, the access
log's count, reads racing replaces, and what a client that stops reading
or a volume that dies mid-body leaves behind."""
import hashlib
import http.client
import os
import re
import socket
import threading

import pytest
import requests

from conftest import TIMEOUT, Cluster, wait_until
from mkvlib.relay import RELAY_MIN, client_socket
from s3util import gateway_server

BUCKET = "relay"
SEND_TIMEOUT = 2          # MKV_SEND_TIMEOUT of the gateway: a client that takes nothing is dropped after it
BIG = 6 << 20             # a value relayed (over RELAY_MIN)


@pytest.fixture(scope="module")
def local(gw):
    """A second gateway over the same cluster that reads the volumes' folders itself (MKV_S3_VOLUME_DIRS)."""
    server = gateway_server(gw.cluster, workers=1, MKV_SEND_TIMEOUT=str(SEND_TIMEOUT),
                            MKV_S3_VOLUME_DIRS=",".join(gw.cluster.volume_dirs)).start()
    server.url, server.worker = f"http://127.0.0.1:{server.port}", server.pids()[1]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("s3relay"))
    cluster = Cluster(folder, n_volumes=3, replicas=2)
    try:
        server = gateway_server(cluster, workers=1, MKV_SEND_TIMEOUT=str(SEND_TIMEOUT))
        server.access_log = os.path.join(folder, "access.log")
        server.argv += ["--access-logfile", server.access_log, "--access-logformat", "%(m)s %(U)s %(s)s %(b)s"]
        server.start()
        server.cluster, server.url = cluster, f"http://127.0.0.1:{server.port}"
        server.worker = server.pids()[1]
        assert requests.put(f"{server.url}/{BUCKET}", timeout=TIMEOUT).status_code == 200
        try:
            yield server
        finally:
            server.stop()
    finally:
        cluster.kill()


def put(gw, name, value):
    r = requests.put(f"{gw.url}/{BUCKET}/{name}", data=value, timeout=TIMEOUT)
    assert r.status_code == 200, r.text


def fds(pid, kind=None):
    """The process's open files (only pipes, or sockets, with `kind`)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return [f for f in found if kind is None or f.startswith(kind + ":")]


def stalled_get(gw, name):
    """A GET whose client reads the answer's head and then nothing: its
    socket (a small receive buffer) and the head's bytes."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.settimeout(TIMEOUT)
    s.connect(("127.0.0.1", gw.port))
    s.sendall(f"GET /{BUCKET}/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    return s, got


def receive(s, got, n):
    """The n bytes of body of a stalled_get, read now."""
    body = bytearray(got.partition(b"\r\n\r\n")[2])
    while len(body) < n:
        body += s.recv(1 << 20)
    return bytes(body)


def read_to_end(s, got):
    """(Content-Length, body bytes received) of a stalled_get once read until the server closes."""
    head, _, body = got.partition(b"\r\n\r\n")
    received = len(body)
    while True:
        try:
            data = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        received += len(data)
    return int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)), received


def test_a_large_object_is_relayed_whole_and_the_connection_kept(gw):
    value = os.urandom(BIG)
    put(gw, "whole", value)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=TIMEOUT)
    conn.request("GET", f"/{BUCKET}/whole")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, value)
    first = conn.sock
    conn.request("GET", f"/{BUCKET}/whole")
    r = conn.getresponse()
    assert hashlib.md5(r.read()).digest() == hashlib.md5(value).digest()
    assert r.getheader("ETag") == '"%s"' % hashlib.md5(value).hexdigest()
    assert conn.sock is first          # the same connection served both: keep-alive held


def test_head_of_a_large_object_sends_no_body_and_keeps_the_connection(gw):
    put(gw, "head", os.urandom(BIG))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=TIMEOUT)
    conn.request("HEAD", f"/{BUCKET}/head")
    r = conn.getresponse()
    assert (r.status, r.getheader("Content-Length"), r.read()) == (200, str(BIG), b"")
    conn.request("GET", f"/{BUCKET}/head?partNumber=1")
    r = conn.getresponse()
    assert (r.status, len(r.read())) == (206, BIG)


def test_a_ranged_read_of_a_large_object_serves_that_part(gw):
    value = os.urandom(BIG)
    put(gw, "ranged", value)
    for spec, want, first, last in (("bytes=1000-4000999", value[1000:4001000], 1000, 4000999),
                                    (f"bytes=-{3 << 20}", value[-(3 << 20):], BIG - (3 << 20), BIG - 1)):
        r = requests.get(f"{gw.url}/{BUCKET}/ranged", headers={"Range": spec}, timeout=TIMEOUT)
        assert r.status_code == 206
        assert r.headers["Content-Range"] == f"bytes {first}-{last}/{BIG}"
        assert r.content == want


def test_the_access_log_counts_the_relayed_bytes(gw):
    put(gw, "logged", os.urandom(BIG))
    assert requests.get(f"{gw.url}/{BUCKET}/logged", timeout=TIMEOUT).status_code == 200
    wait_until(lambda: f"GET /{BUCKET}/logged 200 {BIG}" in open(gw.access_log).read(), 5,
               "the access log line of the GET with its whole length")


@pytest.mark.parametrize("reader_gateway", ["gw", "local"])
def test_reads_racing_replaces_get_the_old_value_or_the_new_whole(gw, request, reader_gateway):
    reading = request.getfixturevalue(reader_gateway)
    values = [bytes([65 + i]) * (2 << 20) for i in range(4)]   # one size: only the bytes tell them apart
    put(gw, "race", values[0])
    bad, seen, done = [], set(), threading.Event()

    def reader():
        session = requests.Session()
        while not done.is_set():
            r = session.get(f"{reading.url}/{BUCKET}/race", timeout=TIMEOUT)
            body = r.content
            if r.status_code != 200 or body not in values or \
                    r.headers["ETag"] != '"%s"' % hashlib.md5(body).hexdigest():
                bad.append((r.status_code, body[:1], body[-1:], r.headers.get("ETag")))
            seen.add(body[:1])
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for value in values[1:] * 3:
            put(gw, "race", value)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert bad == []
    assert len(seen) > 1      # the readers did see the value change


def test_a_relay_holds_a_pipe_while_it_runs_and_a_client_that_goes_away_leaks_nothing(gw):
    put(gw, "gone", os.urandom(32 << 20))
    pipes, files = len(fds(gw.worker, "pipe")), len(fds(gw.worker))
    for _ in range(4):
        s, _ = stalled_get(gw, "gone")
        wait_until(lambda: len(fds(gw.worker, "pipe")) == pipes + 2, 5, "the relay's pipe")
        s.close()
        wait_until(lambda: len(fds(gw.worker, "pipe")) == pipes, 5, "the pipe closed")
    # four relays cut off: none left a socket behind (one more may be an idle one to a volume)
    wait_until(lambda: len(fds(gw.worker)) <= files + 1, 5, "no open file left by the relays")
    assert requests.get(f"{gw.url}/{BUCKET}/gone", timeout=TIMEOUT).status_code == 200


def test_a_client_that_takes_nothing_is_dropped_after_the_send_timeout(gw):
    put(gw, "stall", os.urandom(32 << 20))
    pipes = len(fds(gw.worker, "pipe"))
    s, got = stalled_get(gw, "stall")
    wait_until(lambda: len(fds(gw.worker, "pipe")) == pipes + 2, 5, "the relay's pipe")
    wait_until(lambda: len(fds(gw.worker, "pipe")) == pipes, SEND_TIMEOUT + 5, "the stalled relay ended")
    length, received = read_to_end(s, got)
    assert received < length
    assert "the client took nothing for 2 s (MKV_SEND_TIMEOUT)" in gw.tail()
    assert requests.get(f"{gw.url}/{BUCKET}/stall", timeout=TIMEOUT).status_code == 200


def test_the_relay_runs_under_gunicorns_pywsgi_worker_too(gw):
    other = gateway_server(gw.cluster, workers=1)
    other.argv[3:3] = ["-k", "gevent_pywsgi"]    # after "python -m gunicorn"
    other.start()
    try:
        value = os.urandom(BIG)
        put(gw, "pywsgi", value)
        worker = other.pids()[1]
        pipes = len(fds(worker, "pipe"))
        s, got = stalled_get(other, "pywsgi")
        wait_until(lambda: len(fds(worker, "pipe")) == pipes + 2, 5, "the relay's pipe")
        assert receive(s, got, BIG) == value
        s.sendall(f"GET /{BUCKET}/pywsgi HTTP/1.1\r\nHost: x\r\n\r\n".encode())   # the same connection again
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        s.close()
    finally:
        other.stop()


def test_a_gateway_on_the_volumes_host_sends_the_file_from_the_volumes_folder(gw, local):
    value = os.urandom(32 << 20)
    put(gw, "local", value)
    r = requests.get(f"{local.url}/{BUCKET}/local", headers={"Range": "bytes=5-8000004"}, timeout=TIMEOUT)
    assert (r.status_code, r.content) == (206, value[5:8000005])
    pipes = len(fds(local.worker, "pipe"))
    s, got = stalled_get(local, "local")

    def files_open():
        return [f for f in fds(local.worker) if any(f.startswith(d + "/") for d in gw.cluster.volume_dirs)]
    wait_until(lambda: len(files_open()) == 1, 5, "the file open in the gateway, from a volume's folder")
    assert len(fds(local.worker, "pipe")) == pipes       # no relay: sendfile(2) from the file
    assert receive(s, got, len(value)) == value
    s.close()
    wait_until(lambda: files_open() == [], 5, "the file closed")


def test_a_folder_is_read_only_while_its_id_is_the_one_a_volume_answers(gw, tmp_path):
    from mkvlib.localread import LocalVolumes
    from mkvlib.volumes import Volumes
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / ".id").write_text("not-any-volumes-id\n")
    hosts = gw.cluster.volume_names()
    local = LocalVolumes([gw.cluster.volume_dirs[1], str(stranger)], Volumes(), hosts)
    assert {host: folder for host, (folder, _) in local.map().items()} == {hosts[1]: gw.cluster.volume_dirs[1]}
    assert local.folder_of(hosts[1]) == gw.cluster.volume_dirs[1]
    assert local.folder_of(hosts[0]) is None


def test_volume_dirs_that_are_not_folders_are_refused_at_the_start(tmp_path):
    from mkvlib.errors import SettingsError
    from mkvlib.settings import S3Settings
    with pytest.raises(SettingsError, match="MKV_S3_VOLUME_DIRS"):
        S3Settings.from_env({"MKV_S3_VOLUME_DIRS": str(tmp_path / "missing")})
    assert S3Settings.from_env({"MKV_S3_VOLUME_DIRS": f" {tmp_path} ,"}).volume_dirs == (str(tmp_path),)


def test_only_a_plain_http1_client_socket_is_relayed_to():
    import ssl
    sock = socket.socket()
    tls = ssl.create_default_context().wrap_socket(socket.socket(), server_hostname="x")
    try:
        env = {"SERVER_PROTOCOL": "HTTP/1.1", "gunicorn.socket": sock}
        assert client_socket(env) is sock
        assert client_socket({"SERVER_PROTOCOL": "HTTP/1.0", "gunicorn.sock": sock}) is sock
        assert client_socket(dict(env, SERVER_PROTOCOL="HTTP/2")) is None
        assert client_socket(dict(env, **{"gunicorn.socket": tls})) is None
        assert client_socket({"SERVER_PROTOCOL": "HTTP/1.1"}) is None
    finally:
        sock.close()
        tls.close()
    assert RELAY_MIN <= BIG // 2


def test_a_volume_that_dies_mid_body_ends_the_connection_with_one_log_line(gw):
    # last in the module: it kills the volumes that hold the object
    put(gw, "dies", os.urandom(64 << 20))
    pipes = len(fds(gw.worker, "pipe"))
    s, got = stalled_get(gw, "dies")
    wait_until(lambda: len(fds(gw.worker, "pipe")) == pipes + 2, 5, "the relay's pipe")
    for volume in gw.cluster.volumes:
        volume.kill()
    length, received = read_to_end(s, got)
    assert received < length
    wait_until(lambda: len(fds(gw.worker, "pipe")) == pipes, 5, "the pipe closed")
    log = gw.tail(200)
    # the volume's end: its close after what it had sent, or a reset
    assert re.search(r"relay of GET /relay/dies broke off, connection closed: (the volume closed the connection"
                     r"|reading from the volume failed)", log)
    assert "Traceback" not in log
