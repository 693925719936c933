"""A TCP proxy in front of one volume that delivers chosen requests late, as a
stalled nginx worker, a blocked disk or a slow network does: the request
reaches nginx seconds after it was sent, and is carried out then, even if its
client gave up on it and closed the connection meanwhile. Everything else
passes at once, in order (a held request holds those behind it on its
connection, as nginx serves one connection's requests in order)."""
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
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()

    def _answers(self, upstream, client):
        """nginx's answers back to the client; once the client is gone, read and dropped."""
        upstream.settimeout(None)
        client_ok = True
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if client_ok:
                try:
                    client.sendall(data)
                except OSError:
                    client_ok = False
        for s in (client, upstream):
            try:
                s.close()
            except OSError:
                pass

    def _requests(self, client, upstream):
        """The client's requests, one by one, each passed on whole (held ones late)."""
        reader = _Reader(client)
        try:
            while True:
                head = reader.upto(b"\r\n\r\n")
                if head is None:
                    break
                line = head.split(b"\r\n", 1)[0]
                delay = self._delay_for(line)
                body = reader.body_of(head)
                if delay < 0:                  # refused here: the volume never sees it
                    for _ in body:
                        pass
                    client.sendall(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % -delay)
                    continue
                if delay:
                    sent = time.monotonic()
                    time.sleep(delay)
                upstream.sendall(head + b"\r\n\r\n")
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


class _Reader:
    """Bytes from the client, kept after it closes: what it sent still goes on."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""
        sock.settimeout(None)

    def more(self):
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        self.buf += data
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
