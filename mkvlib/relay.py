"""A file's bytes sent to the client's socket without passing through
Python (the S3 gateway's GetObject, s3.py): a volume's answer body relayed
by splice(2) from the volume's socket into a pipe and from the pipe into
the client's socket, or a file of a volume on this host (mkvlib.localread)
sent by sendfile(2); the bytes are never copied into the worker.

The WSGI server still sends the status line, the headers and the first
piece of the body (what was read with the volume's answer head): so its
keep-alive and close decisions, its access log and the metrics stay its
own. The rest goes straight onto the client's socket, then the body ends.
This needs from the server (RelayBody.usable):
- the client's socket in the environ: 'mkv.socket', else gunicorn's
  'gunicorn.socket' (-k gevent) or 'gunicorn.sock' (-k gevent_pywsgi);
- plain HTTP/1.x on it (no TLS, no HTTP/2 framing);
- each body item written whole to that socket before the next is asked
  for (no buffering by the server);
- optionally 'mkv.sent' in the environ: a function of the number of bytes
  the app sent itself, added to the server's count (its access log);
  install_sent_counter() gives it to gunicorn's gevent workers.
Without the socket (another server), a body under RELAY_MIN, or no
os.splice, the body is streamed through the worker in pieces.

A failure after the headers went (the volume breaks off, the client stops
taking bytes for MKV_SEND_TIMEOUT, or goes away) closes the client's
connection: the client sees a body shorter than its Content-Length, as an
HTTP server can only say it. The volume's connection (or the file) is
closed, the pipe too; one log line but for a client that went away."""
import errno
import fcntl
import logging
import os
import select
import socket
import time

log = logging.getLogger("mkv.s3")

RELAY_MIN = 1 << 20        # bytes of a body below which it is streamed through the worker
PIPE_SIZE = 1 << 20        # bytes a relay's pipe holds (Linux's default pipe-max-size), if allowed
YIELD_EVERY = 16 << 20     # bytes relayed between two chances for the worker's other requests
FIRST_PIECE = 64 << 10     # bytes of a local file the server sends before sendfile(2) takes over
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
SPLICE = getattr(os, "splice", None)
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
MORE = getattr(os, "SPLICE_F_MORE", 4)
GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


class BrokeOff(Exception):
    """A relay stopped before the body's end; says which side and why."""


def client_socket(environ):
    """The client's socket if the server gives it and a relay may write
    to it (plain HTTP/1.x: no HTTP/2 framing, no TLS); else None."""
    if SPLICE is None or environ.get("SERVER_PROTOCOL") not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    for name in ("mkv.socket", "gunicorn.socket", "gunicorn.sock"):
        sock = environ.get(name)
        if sock is not None:
            break
    else:
        return None
    if hasattr(sock, "cipher") or getattr(sock, "type", None) != socket.SOCK_STREAM:   # TLS: the bytes go encrypted
        return None
    return sock


def new_pipe():
    """(read end, write end, capacity): a pipe made as large as allowed."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:     # over the user's pipe quota, say: the default size does too
        pass
    return r, w, fcntl.fcntl(w, F_GETPIPE_SZ)


def relay(src, dst, n, src_timeout, dst_timeout):
    """Move n bytes from socket `src` to socket `dst` (both non-blocking
    fds) through a pipe. When neither splice moves anything it waits,
    cooperatively under gevent (select is patched): for `dst` while the
    pipe holds bytes (the pipe may be full, its slots taken by small
    pieces, though it holds less than its size), else for `src`. BrokeOff
    if `src` ends or sends nothing for `src_timeout`, or `dst` takes
    nothing for `dst_timeout`; OSError (EPIPE, ECONNRESET) if the client
    went away. Returns n."""
    r, w, size = new_pipe()
    try:
        left, held, since_yield = n, 0, 0
        while left or held:
            moved = False
            if left and held < size:
                try:
                    got = SPLICE(src, w, min(left, size - held), flags=FLAGS)
                except BlockingIOError:
                    got = None
                except OSError as e:     # the volume's side: not the client going away
                    raise BrokeOff(f"reading from the volume failed: {e.strerror}") from None
                if got == 0:
                    raise BrokeOff(f"the volume closed the connection with {left} bytes to go")
                if got:
                    left, held, moved = left - got, held + got, True
            if held:
                try:
                    put = SPLICE(r, dst, held, flags=FLAGS | (MORE if left else 0))
                except BlockingIOError:
                    put = None
                if put:
                    held, moved = held - put, True
                    since_yield += put
            if moved:
                if since_yield >= YIELD_EVERY:     # let the worker's other requests run
                    since_yield = 0
                    time.sleep(0)
            elif held:
                wait(dst, True, dst_timeout, f"the client took nothing for {dst_timeout:g} s (MKV_SEND_TIMEOUT)")
            else:
                wait(src, False, src_timeout, f"the volume sent nothing for {src_timeout:g} s ({left} bytes to go)")
        return n
    finally:
        os.close(r)
        os.close(w)


def wait(fd, writing, timeout, stalled):
    """Until `fd` is writable (or readable); BrokeOff(`stalled`) after `timeout` seconds."""
    ready = select.select([], [fd], [], timeout)[1] if writing else select.select([fd], [], [], timeout)[0]
    if not ready:
        raise BrokeOff(stalled)


def send_file(fd, offset, n, dst, timeout):
    """sendfile(2) n bytes of file `fd` from `offset` to socket `dst` (a
    non-blocking fd), waiting as relay() does. BrokeOff if the file ends
    early or the client takes nothing for `timeout`; OSError (EPIPE,
    ECONNRESET) if the client went away. Returns n."""
    end, since_yield = offset + n, 0
    while offset < end:
        try:
            sent = os.sendfile(dst, fd, offset, end - offset)
        except BlockingIOError:
            wait(dst, True, timeout, f"the client took nothing for {timeout:g} s (MKV_SEND_TIMEOUT)")
            continue
        if sent == 0:
            raise BrokeOff(f"the file ended {end - offset} bytes early")
        offset += sent
        since_yield += sent
        if since_yield >= YIELD_EVERY:
            since_yield = 0
            time.sleep(0)
    return n


class RelayBody:
    """A volumes.Download, or a localread.LocalFile, as a WSGI body: when
    the server and the body allow it, relayed by splice(2) (a Download) or
    sent by sendfile(2) (a LocalFile) after a first piece the server sends;
    else streamed through the worker in pieces of `chunk`. Closed when the
    server is done with it, read or not."""

    def __init__(self, download, environ, send_timeout, chunk):
        self.download, self.environ = download, environ
        self.send_timeout, self.chunk = send_timeout, chunk

    def usable(self):
        """The client's socket, if this body goes to it directly; else None."""
        d = self.download
        if d.length is None or d.length < RELAY_MIN or not (d.relayable or getattr(d, "fd", None) is not None):
            return None
        return client_socket(self.environ)

    def __iter__(self):
        sock = self.usable()
        if sock is None:
            yield from self.download.stream(self.chunk)
            return
        d = self.download
        if d.relayable:
            first, src, left = d.take_over()
            move = lambda: relay(src.fileno(), sock.fileno(), left, src.gettimeout(), self.send_timeout)
        else:
            first = next(d.stream(FIRST_PIECE))
            left = d.length - len(first)
            move = lambda: send_file(d.fd, d.offset + len(first), left, sock.fileno(), self.send_timeout)
        yield first          # the server sends the status line, the headers and this
        try:
            move()
        except (BrokeOff, OSError) as e:
            self.broke_off(sock, e)
            return
        if d.relayable:
            d.done()
        count_sent(self.environ, left)

    def broke_off(self, sock, exc):
        """The body cannot be finished: end the client's connection (the
        server then closes it), one line unless the client went away."""
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        env = self.environ
        if getattr(exc, "errno", None) in GONE:
            log.debug("relay of %s %s: the client went away", env.get("REQUEST_METHOD"), env.get("PATH_INFO"))
        else:
            log.warning("relay of %s %s broke off, connection closed: %s", env.get("REQUEST_METHOD"),
                        env.get("PATH_INFO"), exc)

    def close(self):
        self.download.close()


def count_sent(environ, n):
    """Add n bytes the app sent itself to the server's count, if it gave a way to ('mkv.sent')."""
    add = environ.get("mkv.sent")
    if add is not None:
        add(n)


def sent_counter(start_response):
    """A function adding n to the byte count of the server whose
    start_response this is (its access log's): gunicorn's Response (.sent)
    or gevent.pywsgi's handler (.response_length); None for another server."""
    owner = getattr(start_response, "__self__", None)
    for name in ("sent", "response_length"):
        if isinstance(getattr(owner, name, None), int):
            def add(n, owner=owner, name=name):
                setattr(owner, name, getattr(owner, name) + n)
            return add
    return None


def install_sent_counter(worker):
    """Under a gunicorn worker (gunicorn.conf.py's post_worker_init), give
    each request's environ 'mkv.sent' for the bytes a relay sends itself."""
    app = worker.wsgi

    def app_with_sent_counter(environ, start_response):
        add = sent_counter(start_response)
        if add is not None:
            environ["mkv.sent"] = add
        return app(environ, start_response)
    worker.wsgi = app_with_sent_counter
