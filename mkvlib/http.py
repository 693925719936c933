"""The HTTP/1.1 client to the volumes' nginx: keep-alive connections per
server (Pool), requests fanned out to several servers at once, streamed
uploads and downloads (pipelined requests: mkvlib.exchange). It knows HTTP framing, not volumes:
a failure is one of the plain errors below, and what it means for a
volume's health is mkvlib.volumes' business.

Our own client because nginx's answers to what we ask are simple (a status,
a Content-Length or chunks) and a client library cost more than the
volume's work. Measured on this kind of machine: a HEAD to a local nginx
took 73 us this way and 574 us through urllib3's PoolManager. Under gevent
the sockets are gevent's, so a call waits without blocking the worker; in
the tools' threads they are the standard library's."""
import fcntl
import itertools
import re
import select
import socket
import struct
import termios
import time
from time import perf_counter
from urllib.parse import quote

from mkvlib.arrivals import arrivals, system_poll

KEEPALIVE_IDLE = 30.0      # seconds we reuse an idle socket to a volume (nginx keeps it 75 s)
SEND_SLICE = 256 << 10     # bytes of an upload a server must take within the socket's timeout


class Unreachable(Exception):
    """No connection to the server could be made: the request was not sent."""

    def __init__(self, host, cause):
        super().__init__(reason(cause))
        self.host, self.cause = host, cause


class NoAnswer(Exception):
    """The request was (or may have been) sent and no whole answer came: a
    timeout, a reset, a closed connection, or bytes that are not HTTP. What
    the server did with the request is unknown."""

    def __init__(self, host, cause):
        super().__init__(reason(cause))
        self.host, self.cause = host, cause


class Refused(Exception):
    """The server answered before it had read the whole request body."""

    def __init__(self, host, status, body):
        super().__init__(f"{status}: {nginx_reason(body)}")
        self.host, self.status, self.body = host, status, body


class Closed(ConnectionError):
    """The server closed the connection (an end of file, not a reset): the
    end of a body that has no length, else a failure like any other."""


def reason(exc):
    """One line saying why a connection failed."""
    while getattr(exc, "reason", None) is not None and exc.reason is not exc:
        exc = exc.reason
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def nginx_reason(body: bytes):
    """The <title> of an nginx error page, or a short form of the body."""
    text = body.decode("latin-1", "replace")
    start = text.find("<title>")
    if start >= 0:
        end = text.find("</title>", start)
        return text[start + 7:end].strip()
    return text.strip()[:200] or "no reason given"


# what quote(path, safe="/=+") leaves as it is: hex, svXX and base64 folder names are
_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/=+"


def target(path):
    """A path as a request target, percent-encoded as nginx expects, as bytes."""
    if path.strip(_SAFE):   # quote() only what needs it: it costs a few us
        path = quote(path, safe="/=+")
    return path.encode()


def request(method, host, path, headers=b""):
    """The bytes of a request without a body; `headers` are whole lines."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method.encode(), target(path), host.encode(), headers)


def header(head, needle):
    """The value of a header in an answer's header block (lower case, without
    its final blank line), found by `needle` (b"\\r\\nname:"); None if absent."""
    at = head.find(needle)
    if at < 0:
        return None
    end = head.find(b"\r\n", at + 2)
    return head[at + len(needle):end if end >= 0 else len(head)].strip()


_DIGITS = re.compile(rb"[0-9]{1,19}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


def parse_length(value: bytes) -> int:
    """A Content-Length: decimal digits only (no sign, '_', space or 0x), or ValueError."""
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"bad Content-Length: {value[:40]!r}")
    return int(value)


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk's line (extensions after ';' ignored): hex digits only, or ValueError."""
    size = line.split(b";", 1)[0]
    if not _HEX.fullmatch(size):
        raise ValueError(f"bad chunk size: {line[:40]!r}")
    return int(size, 16)


def send_all(sock, data):
    """sock.sendall(data), in one send() when the socket takes it all at
    once, as it takes a request of a few hundred bytes: gevent's sendall
    asks for the socket's buffer size first, a system call more each time."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def unsent(sock):
    """Bytes sent on `sock` that the peer has not acknowledged yet (Linux's
    TIOCOUTQ); None where it cannot be asked."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return None


class Conn:
    """One keep-alive HTTP/1.1 connection to a server, and the bytes read
    from it that no answer has taken yet."""

    __slots__ = ("sock", "buf", "pos", "since", "used", "poller", "watcher")

    def __init__(self, sock):
        self.sock, self.buf, self.pos = sock, b"", 0
        self.since = time.monotonic()   # when it was last left idle
        self.used = False               # it has answered: a failure now may be the server closing it
        self.poller = None              # made on the first alive()
        self.watcher = None             # gevent's read watcher, made on the first arrivals.gevent_wait

    def close(self):
        if self.watcher is not None:
            self.watcher.close()
        self.sock.close()

    def clean(self):
        """Nothing read and not taken: the next bytes are the next answer's."""
        return self.pos == len(self.buf)

    def alive(self):
        """Idle for less than KEEPALIVE_IDLE (nginx keeps one 75 s) and not
        closed by the server meanwhile: a peek that does not wait."""
        if time.monotonic() - self.since >= KEEPALIVE_IDLE or not self.clean():
            return False
        if self.poller is None:
            self.poller = system_poll()
            self.poller.register(self.sock.fileno(), select.POLLIN)
        try:
            # nothing to read: a close (an end of file), bytes nobody asked for or an error would be
            return not self.poller.poll(0)
        except OSError:
            return False

    # -- reading answers from self.buf, refilled from the socket

    def more(self):
        data = self.sock.recv(1 << 18)
        if not data:
            raise Closed("connection closed")
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def upto(self, mark, limit=65536):
        """The bytes up to the next `mark` (which is passed over)."""
        while True:
            end = self.buf.find(mark, self.pos)
            if end >= 0:
                out, self.pos = self.buf[self.pos:end], end + len(mark)
                return out
            if len(self.buf) - self.pos > limit:
                raise ValueError("answer headers too long")
            self.more()

    def take(self, n):
        """The next n bytes (a large body is read in pieces, joined once)."""
        have = len(self.buf) - self.pos
        if have < n:
            parts = [self.buf[self.pos:]]
            while have < n:
                data = self.sock.recv(max(n - have, 1 << 18))
                if not data:
                    raise Closed("connection closed")
                parts.append(data)
                have += len(data)
            self.buf, self.pos = b"".join(parts), 0
        out, self.pos = self.buf[self.pos:self.pos + n], self.pos + n
        return out

    def head(self):
        """(status, header block in lower case, keep-alive?) of the next
        answer, interim ones (1xx) skipped. ValueError if it is not HTTP."""
        while True:
            head = self.upto(b"\r\n\r\n")
            first = head[:head.find(b"\r\n")] if b"\r\n" in head else head
            status_line = first.split(None, 2)
            if (len(status_line) < 2 or not status_line[0].startswith(b"HTTP/")
                    or not status_line[1].isdigit()):
                raise ValueError(f"not an HTTP answer: {first[:80]!r}")
            status = int(status_line[1])
            if not 100 <= status < 200:
                break
        low = head.lower()
        connection = header(low, b"\r\nconnection:")
        if connection is None or connection == b"keep-alive":
            keep = connection is not None or status_line[0] == b"HTTP/1.1"
        else:   # HTTP/1.1 keeps the connection unless told otherwise, HTTP/1.0 only if told
            tokens = connection.replace(b" ", b"").split(b",")
            keep = b"close" not in tokens and (status_line[0] == b"HTTP/1.1" or b"keep-alive" in tokens)
        return status, low, keep

    def body(self, status, low, head_request=False):
        """The whole body of the answer whose head() was (status, low)."""
        if head_request or status in (204, 304):   # never a body
            return b""
        if b"chunked" in (header(low, b"\r\ntransfer-encoding:") or b""):
            # nginx sends a small listing as one chunk and the last one: take both at once
            buf, pos = self.buf, self.pos
            eol = buf.find(b"\r\n", pos, pos + 20)
            if eol > pos and _HEX.fullmatch(buf[pos:eol]):
                end = eol + 2 + int(buf[pos:eol], 16)
                if buf.startswith(b"\r\n0\r\n\r\n", end):
                    self.pos = end + 7
                    return buf[eol + 2:end]
            return b"".join(self.chunks())
        length = header(low, b"\r\ncontent-length:")
        if length is not None:
            return self.take(parse_length(length))
        return b"".join(self.until_closed())

    def until_closed(self):
        """The pieces of a body without a length: it ends when the server closes."""
        while True:
            try:
                self.more()
            except Closed:
                yield self.take(len(self.buf) - self.pos)
                return
            yield self.take(len(self.buf) - self.pos)

    def chunks(self):
        """The pieces of a chunked body, as they arrive."""
        while True:
            size = parse_chunk_size(self.upto(b"\r\n"))
            if size == 0:
                while self.upto(b"\r\n"):   # trailers, up to the blank line
                    pass
                return
            piece = self.take(size + 2)
            if piece[-2:] != b"\r\n":      # each chunk ends in CRLF
                raise ValueError("a chunk does not end in CRLF")
            yield piece[:-2]

    def answer(self, to_head=False):
        """(status, body, keep-alive?) of the next answer; `to_head`: it answers a HEAD."""
        if self.pos == len(self.buf):
            self.more()    # what head() would read first
        quick = self.usual_answer(to_head)
        return quick if quick is not None else self.answer_slowly(to_head)

    def usual_answer(self, to_head):
        """answer() of nginx's usual answer, read whole already (its head and
        its Content-Length's worth of body): HTTP/1.1, no 1xx, no
        Transfer-Encoding, no Connection but keep-alive. Returns what head()
        and body() would, in one step; None for any other answer (nothing
        taken: answer() reads it as always). A volume's answer to a small
        PUT, a MOVE or a DELETE is nearly always this."""
        buf, pos = self.buf, self.pos
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0 or not buf.startswith(b"HTTP/1.1 ", pos) or buf[pos + 12:pos + 13] not in (b" ", b"\r") \
                or not buf[pos + 9:pos + 12].isdigit() or buf[pos + 9] == 49:   # 49: b"1", an interim answer
            return None
        low = buf[pos:end].lower()
        connection = header(low, b"\r\nconnection:")
        if connection is not None and connection != b"keep-alive":
            return None
        status, start = int(buf[pos + 9:pos + 12]), end + 4
        if to_head or status in (204, 304):
            self.pos = start
            return status, b"", True
        length = header(low, b"\r\ncontent-length:")
        if length is None or b"\r\ntransfer-encoding:" in low:
            return None
        stop = start + parse_length(length)
        if stop > len(buf):
            return None
        self.pos = stop
        return status, buf[start:stop], True

    def answer_slowly(self, to_head=False):
        """answer() without usual_answer()'s shortcut (tests compare the two)."""
        status, low, keep = self.head()
        return status, self.body(status, low, to_head), keep

    # -- sending a request body

    def send(self, host, data):
        """Part of a request body, in slices of SEND_SLICE bytes, each of
        which the server must take within the socket's timeout (a sendall's
        timeout is for the whole call). Refused if the server stopped
        reading to answer; NoAnswer if it stopped without one."""
        try:
            if len(data) <= SEND_SLICE:
                send_all(self.sock, data)
            else:
                view = memoryview(data)
                for at in range(0, len(view), SEND_SLICE):
                    self.sock.sendall(view[at:at + SEND_SLICE])
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise NoAnswer(host, e) from None
            try:
                self.sock.settimeout(min(self.sock.gettimeout() or 1.0, 1.0))
                status, low, _ = self.head()
                body = self.body(status, low)
            except (OSError, ValueError):
                raise NoAnswer(host, e) from None
            raise Refused(host, status, body) from None


class Pool:
    """Idle keep-alive connections per server ("host:port"), and the calls
    made over them. `timeout`: seconds to connect, and the default for an
    answer."""

    def __init__(self, timeout=1.0, maxsize=64):
        self.timeout = timeout
        self.maxsize = maxsize
        self._idle = {}          # host -> idle Conns, the last given back last

    def connect(self, host):
        name, _, port = host.rpartition(":")
        sock = socket.create_connection((name, int(port)), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Conn(sock)

    def take(self, host, new=False):
        """An idle connection to `host` that the server has not closed, or a
        new one; Unreachable if none can be made."""
        idle = self._idle.get(host)
        while idle and not new:
            try:
                conn = idle.pop()
            except IndexError:      # another thread took the last one
                break
            if conn.alive():
                return conn
            conn.close()
        try:
            return self.connect(host)
        except OSError as e:
            raise Unreachable(host, e) from None

    def idle(self, host):
        """How many idle connections to `host` are kept."""
        return len(self._idle.get(host, ()))

    def give(self, host, conn, keep=True):
        """Keep `conn` for the next call to `host` if it may be used again."""
        idle = self._idle.setdefault(host, [])
        if keep and conn.clean() and len(idle) < self.maxsize:
            conn.since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    def fan(self, method, calls, timeout=None, times=None):
        """Requests without a body, one to each (host, path, extra header
        lines) of `calls`, all at once without a thread each: every request
        is sent, then the answers read as they come (arrivals), so a frozen
        server costs `timeout` once, not once per server. Returns, in order,
        (status, body) or the error (Unreachable, NoAnswer). A connection
        that the server closed while it was idle is replaced, once, for
        requests that change nothing (GET, HEAD). `times`, a list if given:
        set to, per call, the seconds from its send to the first bytes of
        its answer (None where none came): each server's own, not the wait
        for another's answer (but for one that stalls mid-answer: arrivals)."""
        timeout = timeout or self.timeout
        # a write is never sent twice: the first may have reached the server,
        # and run later than the second (conn.alive() finds most idle closes)
        repeatable = method in ("GET", "HEAD")
        results = [None] * len(calls)
        if times is not None:
            times[:] = results
        todo = [(i, host, request(method, host, path, headers)) for i, (host, path, headers) in enumerate(calls)]
        for attempt in (1, 2):
            sent, failed = [], []
            for i, host, data in todo:
                try:
                    conn = self.take(host, new=attempt == 2)
                except Unreachable as e:
                    results[i] = e
                    continue
                try:
                    conn.sock.settimeout(timeout)
                    started = perf_counter()
                    send_all(conn.sock, data)
                    sent.append((i, host, data, conn, started))
                except OSError as e:
                    failed.append(((i, host, data, conn, None), None, e))
            todo = []
            came = ((sent[k], seconds, error) for k, seconds, error in
                    arrivals([(s[3], s[4]) for s in sent], timeout))
            for (i, host, data, conn, _), seconds, error in itertools.chain(failed, came):
                if error is None:
                    try:
                        status, body, keep = conn.answer(to_head=method == "HEAD")
                    except (OSError, ValueError) as e:
                        error = e
                if error is not None:
                    conn.close()
                    if conn.used and repeatable and attempt == 1 and not isinstance(error, socket.timeout):
                        todo.append((i, host, data))   # closed while idle: once more, on a new one
                    else:
                        results[i] = NoAnswer(host, error)
                    continue
                conn.used = True
                self.give(host, conn, keep)
                results[i] = (status, body)
                if times is not None:
                    times[i] = seconds
            if not todo:
                return results

    def open(self, host, path, timeout, headers=b"", times=None):
        """A streaming GET: (status, Reader) for a 200 (or a 206: a Range in
        `headers`), else (status, body). Unreachable or NoAnswer if no answer
        came. `times`, a list if given: the seconds from the send to the
        answer's head are appended to it."""
        data = request("GET", host, path, headers)
        for attempt in (1, 2):
            conn = self.take(host, new=attempt == 2)
            try:
                conn.sock.settimeout(timeout)
                started = perf_counter()
                send_all(conn.sock, data)
                status, low, keep = conn.head()
                if times is not None:
                    times.append(perf_counter() - started)
                if status in (200, 206):
                    reader = Reader(self, host, conn, low, keep)
                else:
                    body = conn.body(status, low)
            except (OSError, ValueError) as e:
                conn.close()
                if conn.used and attempt == 1 and not isinstance(e, socket.timeout):
                    continue
                raise NoAnswer(host, e) from None
            conn.used = True
            if status in (200, 206):
                return status, reader
            self.give(host, conn, keep)
            return status, body


class Reader:
    """A body being read (Pool.open): `length` (None if the server did not
    say), stream(n) for its bytes, close() when done."""

    def __init__(self, pool, host, conn, low, keep):
        self.pool, self.host, self.conn, self.keep = pool, host, conn, keep
        length = header(low, b"\r\ncontent-length:")
        self.length = parse_length(length) if length is not None else None
        self.chunked = b"chunked" in (header(low, b"\r\ntransfer-encoding:") or b"")
        self.finished = False

    def stream(self, n):
        """The body's bytes, at most n at a time. NoAnswer if the transfer breaks."""
        conn = self.conn
        try:
            if self.chunked:
                yield from conn.chunks()
            elif self.length is None:
                yield from conn.until_closed()
                self.keep = False
            else:
                left = self.length
                while left:
                    if conn.clean():
                        conn.more()
                    piece = conn.take(min(left, n, len(conn.buf) - conn.pos))
                    left -= len(piece)
                    yield piece
        except (OSError, ValueError) as e:
            self.keep = False
            raise NoAnswer(self.host, e) from None
        self.finished = True

    @property
    def relayable(self):
        """Its length is known (not chunked, not up to a close): a relay may take it over."""
        return self.length is not None and not self.chunked

    def take_over(self):
        """For a relay that reads the rest of the body from the socket itself
        (mkvlib.relay): (the body's first bytes, read already or by one
        receive, the socket, how many bytes are still to come on it). done()
        once it has read them all. NoAnswer if the transfer breaks."""
        conn = self.conn
        try:
            if conn.clean() and self.length:
                conn.more()
            first = conn.take(min(self.length, len(conn.buf) - conn.pos))
        except (OSError, ValueError) as e:
            self.keep = False
            raise NoAnswer(self.host, e) from None
        return first, conn.sock, self.length - len(first)

    def done(self):
        """The body was read to its end (by a relay): the connection may serve again."""
        self.finished = True

    def close(self):
        """Give the connection back if the body was read to its end, else close it."""
        if self.conn is not None:
            self.pool.give(self.host, self.conn, self.keep and self.finished)
            self.conn = None
