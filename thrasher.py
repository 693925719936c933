"""Hammer a running mkv master with PUT / GET / DELETE and check every answer.

    python thrasher.py                       # 10000 keys of 1 KB, 16 at a time, on localhost:3000
    python thrasher.py --keys 200 --size 4M --concurrency 8 --master localhost:3000
    python thrasher.py --direct localhost:3001,localhost:3002,localhost:3003   # no master: the limit

Each key goes PUT (201) -> GET (302), then GET of the volume URL it names (200,
the exact bytes) -> DELETE (204) -> GET (404). Any other answer is a failure,
printed with its key. The keys live under /thrasher-<random>/ so a run never
touches other data. Ends with the original Go thrasher's two lines

    10000 write/read/delete in 2.62s
    thats 3815.40/sec

and one line of its own (rate, MB/s moved, failures); exits 1 if anything failed.

--direct H:P,... does the same work straight to nginx volumes, without a
master: for each key a PUT to each of its --replicas placement paths (at once,
as the master writes them), a GET of one of them (the exact bytes), a DELETE of
each (at once). Its rate is what the master's could at most be.

The client is gevent (the standard library is monkey-patched) with keep-alive
connections: idle ones are kept per host, the master's and each volume's that
the redirects name, so that the thrasher measures the store and not itself.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from urllib.parse import quote, urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

TIMEOUT = 60          # seconds: any request may wait this long for an answer
CONNECT_TIMEOUT = 10  # seconds: to open a connection


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Stale(Exception):
    """A kept-alive connection the server had closed: nothing was answered on it."""


class Http:
    """HTTP/1.1 over keep-alive sockets, a stack of idle ones per host:port,
    shared by every greenlet. It reads what a store answers (a status, a few
    headers, a body of Content-Length or chunked) and nothing more. Measured
    here (16 greenlets, GETs of a small answer from a local nginx, same run):
    83 to 101 us of CPU per request, against 190 to 205 us through
    geventhttpclient 2.6's pools."""

    def __init__(self, timeout=TIMEOUT):
        self.timeout = timeout
        self.idle = {}

    def connect(self, hostport):
        host, _, port = hostport.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        return sock

    def request(self, method, hostport, path, body=b""):
        """(status, headers with lowercase names, body bytes)."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {hostport}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        idle = self.idle.setdefault(hostport, [])
        while True:
            reused = bool(idle)
            sock = idle.pop() if reused else self.connect(hostport)
            try:
                try:
                    if len(body) < 65536:
                        sock.sendall(head + body)
                    else:
                        sock.sendall(head)
                        sock.sendall(body)
                except (ConnectionResetError, BrokenPipeError):
                    if reused:
                        raise Stale() from None
                    raise
                status, headers, data, keep = self.answer(sock, method, reused)
            except Stale:
                sock.close()
                continue          # once more, on a new connection
            except BaseException:
                sock.close()
                raise
            if keep:
                idle.append(sock)
            else:
                sock.close()
            return status, headers, data

    @staticmethod
    def answer(sock, method, reused):
        buf = b""
        try:
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    break
                more = sock.recv(65536)
                if not more:
                    if not buf and reused:
                        raise Stale()
                    raise ConnectionError(f"connection closed after {len(buf)} bytes of the answer's head")
                buf += more
        except (ConnectionResetError, BrokenPipeError):
            if not buf and reused:
                raise Stale() from None
            raise
        lines = buf[:end].decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        status = int(status)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = buf[end + 4:]
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", keep
        if "content-length" in headers:
            data = Http.read_exactly(sock, rest, int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = Http.read_chunked(sock, rest)
        else:
            parts = [rest]
            while True:
                more = sock.recv(65536)
                if not more:
                    break
                parts.append(more)
            data, keep = b"".join(parts), False
        return status, headers, data, keep

    @staticmethod
    def read_exactly(sock, have, n):
        parts, got = [have], len(have)
        while got < n:
            more = sock.recv(min(n - got, 1 << 20))
            if not more:
                raise ConnectionError(f"connection closed {n - got} bytes before the end of the body")
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
        if len(data) != n:
            raise ConnectionError(f"{len(data) - n} bytes after the body")
        return data

    @staticmethod
    def read_chunked(sock, buf):
        parts = []
        while True:
            while b"\r\n" not in buf:
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("connection closed inside a chunked body")
                buf += more
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(buf) < size + 2:   # the chunk and its CRLF
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("connection closed inside a chunked body")
                buf += more
            if size == 0:
                return b"".join(parts)   # no trailers: a store sends none
            parts.append(buf[:size])
            buf = buf[size + 2:]

    def close(self):
        for idle in self.idle.values():
            for sock in idle:
                sock.close()
        self.idle.clear()


def one_key(http, master, key, size):
    """PUT, GET (302 and the volume's bytes), DELETE, GET one key through the
    master; returns a failure message or None."""
    value = os.urandom(size)
    path = quote(key)
    status, _, body = http.request("PUT", master, path, value)
    if status != 201:
        return f"PUT {key}: {status} {body.decode(errors='replace').strip()}"
    status, head, body = http.request("GET", master, path)
    if status != 302:
        return f"GET {key}: {status} {body.decode(errors='replace').strip()}, not a redirect"
    url = urlsplit(head.get("location") or "")
    if url.scheme != "http" or not url.netloc:
        return f"GET {key}: 302 to {head.get('location')!r}, not an http:// URL"
    target = url.path + (f"?{url.query}" if url.query else "")
    status, _, body = http.request("GET", url.netloc, target)
    if status != 200 or body != value:
        return (f"GET {key} -> {url.netloc}{target}: {status}, {len(body)} bytes, "
                f"{'same' if body == value else 'different'}")
    status, _, body = http.request("DELETE", master, path)
    if status != 204:
        return f"DELETE {key}: {status} {body.decode(errors='replace').strip()}"
    status, _, _ = http.request("GET", master, path)
    if status != 404:
        return f"GET after DELETE {key}: {status}"
    return None


def one_key_direct(http, volumes, replicas, subvolumes, key, size):
    """The same work straight to the volumes: PUT each replica (at once), GET
    one, DELETE each (at once); returns a failure message or None."""
    from mkvlib.placement import key2path, key2volume, volume_host
    value = os.urandom(size)
    raw = key.encode()
    path = quote(key2path(raw), safe="/=+")
    places = [(volume_host(v), v[len(volume_host(v)):] + path)
              for v in key2volume(raw, volumes, replicas, subvolumes)]

    def on_each(method, body, ok):
        jobs = [gevent.spawn(http.request, method, host, p, body) for host, p in places]
        gevent.joinall(jobs)
        for (host, p), job in zip(places, jobs):
            if not job.successful():
                raise job.exception
            if job.value[0] not in ok:
                return f"{method} {key} -> {host}{p}: {job.value[0]}"
        return None

    failure = on_each("PUT", value, (201,))   # a new file: 201 (204 would be an overwrite)
    if failure:
        return failure
    host, p = places[0]
    status, _, body = http.request("GET", host, p)
    if status != 200 or body != value:
        return (f"GET {key} -> {host}{p}: {status}, {len(body)} bytes, "
                f"{'same' if body == value else 'different'}")
    return on_each("DELETE", b"", (204,))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--master", default="localhost:3000", help="host:port of the master (default %(default)s)")
    p.add_argument("--keys", type=int, default=10000, help="how many keys (default %(default)s)")
    p.add_argument("--size", default="1K", help="bytes per value, e.g. 1000, 64K, 4M (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="keys in flight at once (default %(default)s)")
    p.add_argument("--direct", metavar="H:P,...",
                   help="no master: do the same work straight to these nginx volumes (the limit)")
    p.add_argument("--replicas", type=int, default=3, help="with --direct: copies per key (default %(default)s)")
    p.add_argument("--subvolumes", type=int, default=10,
                   help="with --direct: svXX folders per volume, as MKV_SUBVOLUMES (default %(default)s)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    if args.keys < 1 or args.concurrency < 1 or size < 1:
        p.error("--keys, --concurrency and --size must be at least 1")
    volumes = [v for v in (args.direct or "").split(",") if v]
    if args.direct is not None and not 1 <= args.replicas <= len(volumes):
        p.error("--direct needs at least --replicas volumes")
    base = f"/thrasher-{uuid.uuid4().hex[:8]}"
    where = f"{len(volumes)} volumes, straight" if volumes else args.master
    print(f"thrasher: {args.keys} keys of {size} bytes, {args.concurrency} at a time, on {where}",
          file=sys.stderr)
    http = Http()

    def work(i):
        key = f"{base}/{i}"
        try:
            if volumes:
                return one_key_direct(http, volumes, args.replicas, args.subvolumes, key, size)
            return one_key(http, args.master, key, size)
        except Exception as e:   # a refused or broken connection, a timeout: this key failed
            return f"key {i}: {type(e).__name__}: {e}"

    start = time.monotonic()
    failures = 0
    for failure in gevent.pool.Pool(args.concurrency).imap_unordered(work, range(args.keys)):
        if failure:
            failures += 1
            if failures <= 20:
                print(f"FAIL {failure}", file=sys.stderr)
    took = time.monotonic() - start
    http.close()
    # the original's two lines, then ours
    print(f"{args.keys} write/read/delete in {took:.2f}s")
    print(f"thats {args.keys / took:.2f}/sec")
    print(f"thrasher: {args.keys} write/read/delete in {took:.2f} s, that's {args.keys / took:.1f} keys/s, "
          f"{args.keys * size * 2 / took / 1e6:.1f} MB/s moved; {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
