"""The master's connections under gunicorn's gevent worker: what a flood of
connections or a client that never reads can take from everyone else.

- A budget per worker: at most `worker_connections` connections in all
  (gunicorn's own setting, 4000 in gunicorn.conf.py) and MKV_CLIENT_CONNECTIONS
  from one client address (1000). When a new connection would go over either,
  the oldest idle connection (of that client, then of anyone) is dropped to
  make room; idle means waiting for a request's head, a keep-alive connection
  between requests or a slow sender's unfinished head alike (nothing of it is
  lost: no request has started). If none is idle, the new connection gets a
  one-line 503 and is closed at once.
- A request's head must arrive within gunicorn's `keepalive` (30 s) of the
  connection opening or of the previous answer (gunicorn's own timeout).
- An answer must be taken by the client within MKV_SEND_TIMEOUT (30 s) for each
  piece written (a whole redirect, a batch of a listing), or the connection is
  dropped: a client that pipelines requests and never reads holds one answer in
  the worker and what the kernel's buffers hold, and that only so long.
- The worker raises its open-file limit to the hard limit, and spends at most
  half of it on client connections (the rest is for the volumes' connections).

install(worker) sets it up from gunicorn.conf.py's post_worker_init, so that it
holds however gunicorn was started: gunicorn.conf.py's worker.MkvWorker, or
`-k gevent` on the command line.
"""
import collections
import errno
import logging
import resource
import socket

from mkvlib.metrics import count_server_answer
from mkvlib.settings import Settings

FD_RESERVE = 64          # open files a worker keeps for itself (log, index, pipes)
POOL_HEADROOM = 64       # greenlets of dropped or refused connections still finishing
BUSY_LINE = b"mkv: too many connections, none idle (worker_connections); try again\n"


class Budget:
    """Who holds a worker's connections, and which of them are idle, oldest
    first. Every method is O(1); nothing here touches the network except
    drop(), which shuts a socket down for its own greenlet to find."""

    def __init__(self, total, per_client):
        self.total, self.per_client = total, per_client
        self.members = {}                                     # socket -> client address
        self.of_client = collections.Counter()
        self.idle = collections.OrderedDict()                 # socket -> client, oldest idle first
        self.idle_of = collections.defaultdict(collections.OrderedDict)   # client -> {socket: None}
        self.dropped = 0
        self.refused = 0

    def admit(self, sock, client):
        """Count a new connection in, dropping an older idle one if a budget is
        spent; False (and nothing counted) if there is none to drop."""
        if self.of_client[client] >= self.per_client and not self._drop_oldest(self.idle_of.get(client)):
            self.refused += 1
            return False
        if len(self.members) >= self.total and not self._drop_oldest(self.idle):
            self.refused += 1
            return False
        self.members[sock] = client
        self.of_client[client] += 1
        self.set_idle(sock)
        return True

    def set_idle(self, sock):
        client = self.members.get(sock)
        if client is not None:
            self.idle[sock] = client
            self.idle_of[client][sock] = None

    def set_busy(self, sock):
        client = self.idle.pop(sock, None)
        if client is not None:
            mine = self.idle_of[client]
            mine.pop(sock, None)
            if not mine:
                del self.idle_of[client]

    def leave(self, sock):
        """The connection is gone (closed, or dropped); a second call does nothing."""
        self.set_busy(sock)
        client = self.members.pop(sock, None)
        if client is not None:
            self.of_client[client] -= 1
            if not self.of_client[client]:
                del self.of_client[client]

    def _drop_oldest(self, idle):
        if not idle:
            return False
        sock = next(iter(idle))
        self.leave(sock)
        self.dropped += 1
        drop(sock)
        return True


def drop(sock):
    """End a connection whose greenlet waits for a request's head: its read
    returns the end of the stream, and gunicorn closes it as a client that
    went away (no log line above debug). The raw socket's shutdown: gevent's
    own cancels the greenlet's wait with EBADF, which gunicorn logs as an
    error with a traceback."""
    try:
        getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def refuse(sock):
    """A one-line 503 and the end of the connection, without reading a byte
    (counted as kind "server": no app saw it)."""
    count_server_answer(503)
    head = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(BUSY_LINE))
    try:
        sock.setblocking(0)
        sock.send(head + BUSY_LINE)
    except OSError:
        pass
    finally:
        sock.close()


def client_of(addr):
    """A connection's client: its address (a unix socket's peers are one client)."""
    return addr[0] if isinstance(addr, tuple) and addr else "local"


def guarded_handle(budget, handle):
    """gunicorn's per-connection handler, counted against the budget."""
    def handle_within_budget(listener, client, addr):
        if not budget.admit(client, client_of(addr)):
            return refuse(client)
        try:
            handle(listener, client, addr)
        finally:
            budget.leave(client)
    return handle_within_budget


def tracked_handle_request(budget, handle_request):
    """gunicorn's per-request handler: the connection is busy while it runs."""
    def handle_request_busy(listener_name, req, sock, addr):
        budget.set_busy(sock)
        try:
            return handle_request(listener_name, req, sock, addr)
        finally:
            budget.set_idle(sock)
    return handle_request_busy


def write_within(send_timeout, write):
    """gunicorn.util.write with a deadline: each piece of an answer must be
    taken by the client within send_timeout seconds (socket.timeout, and the
    connection is closed). What the kernel takes at once (a redirect, nearly
    always) is sent by one non-blocking send of the raw socket, without a
    timer: cheaper than gevent's sendall. A non-blocking write (gunicorn's
    error answers, timeout 0) is left as it is."""
    def write_or_time_out(sock, data, chunked=False):
        if sock.timeout is not None:
            return write(sock, data, chunked)
        if not chunked:
            try:
                sent = getattr(sock, "_sock", sock).send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return None
            data = memoryview(data)[sent:]
        sock.settimeout(send_timeout)
        try:
            return write(sock, data, chunked)
        finally:
            sock.settimeout(None)
    write_or_time_out.within = send_timeout
    return write_or_time_out


class OneLineTimeouts(logging.Filter):
    """gunicorn logs a connection that timed out (a client that stopped
    reading its answers) as 'Socket error processing request.' with a
    traceback: one line instead, with what happened."""

    def __init__(self, send_timeout):
        super().__init__()
        self.send_timeout = send_timeout

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
            record.msg = ("mkv: dropped a connection whose client took nothing of its answer for "
                          f"{self.send_timeout:g} s (MKV_SEND_TIMEOUT)")
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def open_files_for(connections):
    """Raise the soft open-file limit towards what `connections` need (as far
    as the hard limit allows); returns how many connections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(1, min(connections, (soft - FD_RESERVE) // 2))


def install(worker, settings=None):
    """Put the budget, the send timeout and the one-line log on a gunicorn
    gevent worker, worker.MkvWorker included (after its init, before it
    serves). Other workers (sync, gevent_pywsgi's own server) are left as
    they are; returns the Budget or None."""
    from gunicorn.workers.ggevent import GeventWorker
    import gunicorn.util
    if not isinstance(worker, GeventWorker) or worker.server_class is not None:
        return None
    settings = settings or Settings.from_env()
    total = open_files_for(worker.cfg.worker_connections)
    if total < worker.cfg.worker_connections:
        worker.log.warning("mkv: the open-file limit allows %d connections per worker, not %d "
                           "(worker_connections): raise ulimit -n / LimitNOFILE to %d",
                           total, worker.cfg.worker_connections, 2 * worker.cfg.worker_connections + FD_RESERVE)
    budget = Budget(total, min(settings.client_connections, total))
    worker.budget = budget
    worker.worker_connections = total + POOL_HEADROOM   # the pool never fills: the budget decides
    worker.handle = guarded_handle(budget, worker.handle)
    worker.handle_request = tracked_handle_request(budget, worker.handle_request)
    if getattr(gunicorn.util.write, "within", None) is None:
        gunicorn.util.write = write_within(settings.send_timeout, gunicorn.util.write)
    worker.log.error_log.addFilter(OneLineTimeouts(settings.send_timeout))
    return budget
