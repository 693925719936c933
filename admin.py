"""The admin listener: once per master, on MKV_ADMIN_PORT (loopback unless
MKV_ADMIN_BIND), apart from the key space (every path of the master's port
is a key). Started from the gunicorn arbiter's hooks (gunicorn.conf.py) in
a thread of its own, so it answers whatever the workers are doing:

    /health/live    200 "live": the master's arbiter answers
    /health/ready   200 "ready", or 503 and one line why not: the index
                    cannot be written, or fewer than MKV_REPLICAS volumes up
    /metrics        Prometheus text: every worker's counts (mkvlib.metrics),
                    the tools' progress, and what is read here per scrape
    /               the status page (statuspage.py)
"""
import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
import wsgiref.simple_server

from mkvlib import counts
from mkvlib.db import is_full
from mkvlib.health import PROBE_FRESH, SHARED_ENV, Table, is_up

log = logging.getLogger("mkv")

READY_WRITE_TIMEOUT = 2.0   # seconds the readiness check waits for the index's write lock
INDEX_SPACE_MIN = 1 << 20   # bytes free on the index's disk under which it is full (a PUT
                            # writes a few pages; a WAL with room left takes writes a while longer)
_server = []                # the one listener of this process
# The arbiter must not fork while this thread has the index open: SQLite's
# state of an open file (its locks, the WAL index's) is kept per process and
# a fork copies it, so a worker forked during a readiness check saw the WAL
# write lock as held within its own process, and its first BEGIN IMMEDIATE
# waited out the busy timeout and failed (sqlite.org/howtocorrupt.html,
# "carrying an open database connection across a fork"). listen() makes
# every fork of the arbiter wait until this thread's connection is closed.
_no_fork = []               # the lock, once listen() made it


class View:
    """What the admin listener reads, once per request: the shared volume
    health, the index, the run folder."""

    def __init__(self, settings):
        self.settings = settings
        self.table = Table(os.environ.get(SHARED_ENV))

    def volumes(self):
        """[(host, row)] of MKV_VOLUMES, then any other host a worker met."""
        hosts = list(self.settings.volumes)
        hosts += [h for h in self.table.hosts() if h not in hosts]
        return [(h, self.table.get(h)) for h in hosts]

    def up(self, row, now=None):
        return is_up(row, time.monotonic() if now is None else now, PROBE_FRESH)

    def index_write(self):
        """None if the index takes a write now, else why not (one line)."""
        try:
            st = os.statvfs(os.path.dirname(self.settings.db))
            if st.f_bavail * st.f_frsize < INDEX_SPACE_MIN:
                return (f"index {self.settings.db}: its disk is full "
                        f"({st.f_bavail * st.f_frsize >> 10} KB free)")
        except OSError:
            pass
        try:
            with index_connection(self.settings.db, timeout=READY_WRITE_TIMEOUT, isolation_level=None) as db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('ready_check', ?)",
                           (str(time.time()),))
                db.execute("COMMIT")
        except sqlite3.Error as e:
            what = "disk full" if is_full(e) else " ".join(str(e).split())
            return f"index {self.settings.db} cannot be written: {what}"
        return None

    def ready(self):
        """None if ready, else the one-line reason."""
        why = self.index_write()
        if why:
            return why
        now = time.monotonic()
        up = [h for h, row in self.volumes() if h in self.settings.volumes and self.up(row, now)]
        if len(up) < self.settings.replicas:
            down = [h for h in self.settings.volumes if h not in up]
            return (f"{len(up)} of {len(self.settings.volumes)} volumes up, MKV_REPLICAS={self.settings.replicas}"
                    f" needs {self.settings.replicas}; down: {','.join(down)}")
        return None

    def index(self):
        """(counts, notes, volume_ids) read from the index; ({}, None, {}) if it cannot be read."""
        try:
            with index_connection(f"file:{self.settings.db}?mode=ro", uri=True, timeout=1.0) as db:
                notes = db.execute("SELECT count(*) FROM pending_deletes").fetchone()[0]
                ids = dict(db.execute("SELECT host, id FROM volume_ids"))
                return counts.read(db), notes, ids
        except sqlite3.Error:
            return {}, None, {}

    def run_folder(self):
        return os.path.dirname(self.table.folder) if self.table.folder else None

    def disks(self):
        """{host: {free, used, total}} of the volumes up now (each /.disk,
        written by its launcher); a volume that does not answer at once is left out."""
        now = time.monotonic()
        found = {}
        for host, row in self.volumes():
            if self.up(row, now):
                disk = fetch_json(host, "/.disk")
                if isinstance(disk, dict):
                    found[host] = disk
        return found

    def file_sizes(self):
        out = {}
        for name, path in (("index", self.settings.db), ("wal", self.settings.db + "-wal")):
            try:
                out[name] = os.stat(path).st_size
            except OSError:
                out[name] = 0
        return out


DISK_TIMEOUT = 0.5   # seconds a volume may take to send its /.disk


def fetch_json(host, path, timeout=DISK_TIMEOUT):
    """GET http://host/path as JSON over a plain socket (this thread is no
    gevent's); None on any failure."""
    name, _, port = host.rpartition(":")
    try:
        sock = original("socket", "socket")(socket.AF_INET6 if ":" in name.strip("[]") else socket.AF_INET,
                                            socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((name.strip("[]"), int(port)))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while len(data) < 65536:
                piece = sock.recv(4096)
                if not piece:
                    break
                data += piece
        finally:
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            return None
        return json.loads(body)
    except (OSError, ValueError):
        return None


def text(start_response, status, body, ctype="text/plain; charset=utf-8"):
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(data))),
                            ("Cache-Control", "no-store")])
    return [data]


def make_app(view):
    import statuspage
    from mkvlib import scrape

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return text(start_response, "405 Method Not Allowed", "GET only\n")
        if path == "/health/live":
            return text(start_response, "200 OK", "live\n")
        if path == "/health/ready":
            why = view.ready()
            return text(start_response, "503 Service Unavailable" if why else "200 OK",
                        f"not ready: {why}\n" if why else "ready\n")
        if path == "/metrics":
            body, ctype = scrape.scrape(view)
            return text(start_response, "200 OK", body, ctype)
        if path == "/":
            return text(start_response, "200 OK", statuspage.render(view), "text/html; charset=utf-8")
        return text(start_response, "404 Not Found", "not found: /, /metrics, /health/live, /health/ready\n")
    return app


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):    # a scrape every few seconds is no news
        pass


class Server(wsgiref.simple_server.WSGIServer):
    """One connection at a time, on the original (blocking) socket: it runs
    in a real thread of the arbiter, which gevent has patched, and a gevent
    socket belongs to the hub of the thread that made it."""
    allow_reuse_address = True
    CLIENT_TIMEOUT = 5.0      # seconds a client of the admin port may take

    def __init__(self, address, family):
        self.address_family = family
        super().__init__(address, QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = original("socket", "socket")(family, socket.SOCK_STREAM)
        self.server_bind()
        self.server_activate()

    def serve(self):
        while True:
            try:
                conn, addr = self.socket.accept()
            except OSError:          # closed: the master stops
                return
            conn.settimeout(self.CLIENT_TIMEOUT)
            try:
                self.finish_request(conn, addr)
            except Exception:
                log.exception("admin listener: a request failed")
            finally:
                conn.close()


def original(module, name):
    """The standard library's own `name` of `module`, even where gevent patched it."""
    from gevent import monkey
    return monkey.get_original(module, name)


@contextlib.contextmanager
def index_connection(*args, **kwargs):
    """sqlite3.connect(*args, **kwargs), closed at the end, and no fork of
    this process meanwhile (once listen() has run)."""
    with _no_fork[0] if _no_fork else contextlib.nullcontext():
        db = sqlite3.connect(*args, **kwargs)
        try:
            yield db
        finally:
            db.close()


def hold_forks_while_the_index_is_open():
    """Make every fork of this process wait for index_connection()s to close
    (a real lock: the fork is in the arbiter's main thread, the connection
    in the listener's)."""
    if not _no_fork:
        lock = original("_thread", "allocate_lock")()
        os.register_at_fork(before=lock.acquire, after_in_parent=lock.release, after_in_child=lock.release)
        _no_fork.append(lock)


def listen(settings):
    """Bind MKV_ADMIN_PORT (in the arbiter, before the workers fork); None if unset."""
    if not settings.admin_port:
        return None
    hold_forks_while_the_index_is_open()
    family = socket.AF_INET6 if ":" in settings.admin_bind else socket.AF_INET
    server = Server((settings.admin_bind, settings.admin_port), family)
    server.set_app(make_app(View(settings)))
    _server.append(server)
    return server


def serve_in_a_thread(server):
    """Serve from a real thread of the arbiter (gevent patched the arbiter's
    threading: a greenlet there would be copied into every worker at fork)."""
    original("_thread", "start_new_thread")(server.serve, ())


def close_in_worker():
    """A worker does not serve the admin port: its copy of the socket is closed."""
    for server in _server:
        server.socket.close()
    _server.clear()


def worker_exited(pid):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid)
