"""A TCP proxy in front of one volume that delivers chosen requests late, as a
stalled nginx worker, a blocked disk or a slow network does: the request
reaches nginx seconds after it was sent, and is carried out then, even if its
client gave up on it and closed the connection meanwhile. Everything else
passes at once, in order (a held request holds those behind it on its
connection, as nginx serves one connection's requests in order; a refused
one is answered in its turn, after the answers to those before it)."""
import collections
import re
import socket
import threading
import time

from conftest import TIMEOUT, free_port


class HoldingProxy:
    def __init__(self, target_port, port=None):
        self.target_port = target_port
        self.port = port or free_port()
        self.rules = []             # [pattern, delay, times left]
        self.delivered = []         # (request line, seconds late) of each held request once sent on
        self.arrived = []           # (request line, time its head came, time it was sent on) of each
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="proxy").start()

    @property
    def name(self):
        return f"127.0.0.1:{self.port}"

    def hold(self, pattern, delay, times=1):
        """Deliver the next `times` requests whose request line matches
        `pattern` (a regex on bytes, e.g. rb"^DELETE ") `delay` seconds late."""
        with self._lock:
            self.rules.append([re.compile(pattern), delay, times])

    def refuse(self, pattern, status, times=1):
        """Answer the next `times` matching requests with `status` (an int)
        instead of passing them on, as a volume with a full disk does."""
        with self._lock:
            self.rules.append([re.compile(pattern), -status, times])

    def wait_delivered(self, n=1, timeout=TIMEOUT):
        """Wait until n held requests have reached the volume (and it has had a moment)."""
        deadline = time.monotonic() + timeout
        while len(self.delivered) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"held requests not delivered after {timeout} s: {self.delivered}")
            time.sleep(0.05)
        time.sleep(0.3)

    def close(self):
        self._stop.set()
        self._listener.close()

    def _delay_for(self, line):
        with self._lock:
            for rule in self.rules:
                if rule[2] > 0 and rule[0].search(line):
                    rule[2] -= 1
                    return rule[1]
        return 0

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=TIMEOUT)
            except OSError:
                client.close()
                continue
            turns = _Turns(client)
            threading.Thread(target=self._requests, args=(client, upstream, turns), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, turns), daemon=True).start()

    def _answers(self, upstream, client, turns):
        """nginx's answers back to the client; once the client is gone, read and dropped."""
        upstream.settimeout(None)
        answers = _Answers(turns)
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            turns.send(data)
            answers.feed(data)
        for s in (client, upstream):
            try:
                s.close()
            except OSError:
                pass

    def _requests(self, client, upstream, turns):
        """The client's requests, one by one, each passed on whole (held ones late)."""
        reader = _Reader(client)
        try:
            while True:
                head = reader.upto(b"\r\n\r\n")
                if head is None:
                    break
                came = reader.came
                line = head.split(b"\r\n", 1)[0]
                delay = self._delay_for(line)
                body = reader.body_of(head)
                if delay < 0:                  # refused here: the volume never sees it
                    for _ in body:
                        pass
                    turns.refuse(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % -delay)
                    continue
                turns.passed_on(line.startswith(b"HEAD "))
                if delay:
                    sent = time.monotonic()
                    time.sleep(delay)
                upstream.sendall(head + b"\r\n\r\n")
                self.arrived.append((line, came, time.monotonic()))
                for piece in body:
                    upstream.sendall(piece)
                if delay:
                    self.delivered.append((line, time.monotonic() - sent))
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class _Turns:
    """One connection's requests in order, each passed on (to be answered
    by the volume) or refused (answered by the proxy, once the volume has
    answered every request before it)."""

    def __init__(self, client):
        self.client, self.client_ok = client, True
        self.lock = threading.Lock()
        self.waiting = collections.deque()   # True/False (a HEAD?) for a request passed on; bytes: a refusal

    def send(self, data):
        if self.client_ok:
            try:
                self.client.sendall(data)
            except OSError:
                self.client_ok = False

    def passed_on(self, is_head):
        with self.lock:
            self.waiting.append(is_head)

    def refuse(self, answer):
        with self.lock:
            if self.waiting:
                self.waiting.append(answer)
            else:
                self.send(answer)

    def next_is_head(self):
        with self.lock:
            return bool(self.waiting and self.waiting[0] is True)

    def answered(self):
        """The volume's answer to the oldest request passed on is sent: then the refusals behind it."""
        with self.lock:
            if self.waiting:
                self.waiting.popleft()
            while self.waiting and isinstance(self.waiting[0], bytes):
                self.send(self.waiting.popleft())


class _Answers:
    """Where each of the volume's answers ends, in the bytes it sends back."""

    def __init__(self, turns):
        self.turns, self.buf, self.left = turns, b"", None   # left: body bytes still to come, or "chunked"

    def feed(self, data):
        self.buf += data
        while self._one():
            self.turns.answered()

    def _one(self):
        """Take one whole answer from the buffer: True if there was one."""
        if self.left is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head, self.buf = self.buf[:end].lower(), self.buf[end + 4:]
            status = int(head.split(b" ", 2)[1])
            length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if self.turns.next_is_head() or status in (204, 304):
                self.left = 0
            elif re.search(rb"\r\ntransfer-encoding:\s*chunked", head):
                self.left = "chunked"
            else:
                self.left = int(length.group(1)) if length else 0
        if self.left == "chunked":
            return self._chunks()
        if len(self.buf) < self.left:
            return False
        self.buf, self.left = self.buf[self.left:], None
        return True

    def _chunks(self):
        while True:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return False
            size = int(self.buf[:eol].split(b";")[0], 16)
            if size == 0:
                if not self.buf.startswith(b"\r\n", eol + 2):
                    return False
                self.buf, self.left = self.buf[eol + 4:], None
                return True
            if len(self.buf) < eol + 2 + size + 2:
                return False
            self.buf = self.buf[eol + 2 + size + 2:]


class _Reader:
    """Bytes from the client, kept after it closes: what it sent still goes on."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""
        self.came = None           # when the bytes last read came: upto() reads until its mark came
        sock.settimeout(None)

    def more(self):
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        self.buf += data
        self.came = time.monotonic()
        return bool(data)

    def upto(self, mark):
        while mark not in self.buf:
            if not self.more():
                return None
        out, _, self.buf = self.buf.partition(mark)
        return out

    def take(self, n):
        while len(self.buf) < n:
            if not self.more():
                raise OSError("client closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def body_of(self, head):
        """The request's body, as pieces (Content-Length or chunked; none otherwise)."""
        low = head.lower()
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", low)
        if m:
            left = int(m.group(1))
            while left:
                piece = self.take(min(left, max(len(self.buf), 1)))
                left -= len(piece)
                yield piece
        elif re.search(rb"\r\ntransfer-encoding:\s*chunked", low):
            while True:
                line = self.upto(b"\r\n")
                if line is None:
                    raise OSError("client closed mid-body")
                size = int(line.split(b";")[0], 16)
                yield line + b"\r\n" + self.take(size + 2)
                if size == 0:
                    return
