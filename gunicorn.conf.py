# gunicorn reads this file from the working directory by default; flags on the
# command line win over it.
# The gevent worker monkey-patches the standard library when it starts; this
# file is read by the arbiter before that, and it imports mkvlib (socket,
# threading), so patch first, as gevent asks.
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import gunicorn.util  # noqa: E402

from mkvlib.errors import SettingsError  # noqa: E402
from mkvlib.index import Index  # noqa: E402
from mkvlib.lease import LOCK_LEASE  # noqa: E402
from mkvlib.placement import check_named_once  # noqa: E402
from mkvlib.settings import Settings  # noqa: E402
from mkvlib.volumes import Volumes  # noqa: E402

# gunicorn's gevent worker with mkv's reader of request heads in front of its
# parser (worker.py); `-k gevent` on the command line runs gunicorn's own.
worker_class = "worker.MkvWorker"
# Per worker: the connection budget (connections.py drops the oldest idle one
# when it is spent); each takes an open file, and the worker raises its limit.
worker_connections = 4000
keepalive = 30          # seconds; clients of a blob store come back; also the time a request's head may take
graceful_timeout = 30
# A worker that stops answering (paused, starved) is killed after `timeout`
# seconds (a second or two more: gunicorn looks once a second): before the
# lease of any key it holds runs out, so that it can never write a key that
# another request has taken since. on_starting refuses a longer one.
timeout = 20
TIMEOUT_MAX = LOCK_LEASE - 10
# gunicorn 27's control socket is one fixed path per user: two masters on one
# machine (or a test run beside a cluster) would take it from each other.
control_socket_disable = True
# A client's SCRIPT_NAME (or PATH_INFO) header must not reshape the request:
# gunicorn takes them from 127.0.0.1 by default (a local proxy), and a
# SCRIPT_NAME made GET /k/k1 serve the key /k1, or a 500. No header may.
forwarder_headers = ""

ERROR_LINE_MAX = 200    # characters of gunicorn's message kept in its one-line answer


def write_error_line(sock, status_int, reason, mesg):
    """gunicorn answers a request it cannot parse itself, before mkv sees it
    (400 for a lowercase method, a bad Content-Length or raw non-ASCII bytes
    in the request line, 414 for a request line over 4094 bytes, 431, 417...),
    through gunicorn.util.write_error, whose body is an HTML page. This takes
    its place: the same status line and Connection: close, and gunicorn's
    message as one line of text/plain, like every other error of mkv; and
    counts it (kind "server" in mkv_requests_total: the app never saw it),
    but a 500 (an app that raised: counted under its own kind). The
    workers look write_error up in gunicorn.util at each call and fork from
    the arbiter, which reads this file first, so it holds under worker.py's
    MkvWorker (whose requests outside its plain subset gunicorn parses) and
    with `-k gevent` on the command line (not under gevent_pywsgi, which
    parses HTTP itself).
    """
    if status_int != 500:   # gunicorn's 500 is for an app that raised: mkvlib.metrics.Counted counted it
        from mkvlib.metrics import count_server_answer
        count_server_answer(status_int)
    line = (mesg or reason).encode("unicode_escape").decode("ascii")   # one line, ASCII
    if len(line) > ERROR_LINE_MAX:
        line = line[:ERROR_LINE_MAX - 3] + "..."
    body = (line + "\n").encode("ascii")
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n")
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = write_error_line


def disk_ids(settings):
    """{host: identity} of the volumes in MKV_VOLUMES that answer now."""
    found = Volumes(timeout=settings.voltimeout).identities(settings.volumes, mark=False)
    return {h: i for h, i in zip(settings.volumes, found) if isinstance(i, str)}


def app_module(server):
    """The module of the app gunicorn serves: "mkv", "s3" (the S3 gateway),
    "benchkit.bare" (bench.py's bare function)..."""
    return (getattr(server.app, "app_uri", None) or "").partition(":")[0]


def serves_the_master(server):
    """True for `gunicorn mkv:app`. The S3 gateway (s3:app) and bench.py's
    bare app read this file too, but the run folder (emptied at a start,
    removed at exit) and the admin listener belong to the master that
    shares their index."""
    return app_module(server) == "mkv"


def on_starting(server):
    """Check the settings and create the index once, before any worker forks:
    bad settings stop the start with one line and exit status 1."""
    try:
        settings = Settings.from_env()
        Index(settings.db).close()
        answering = disk_ids(settings)
        check_named_once(settings.volumes, answering)   # one disk under two names
    except SettingsError as e:
        sys.exit(f"mkv: {e}")
    # checked before the run folder is made: a start that stops here leaves nothing behind
    if not 0 < server.cfg.timeout <= TIMEOUT_MAX:
        sys.exit(f"mkv: --timeout {server.cfg.timeout}: a worker that stops must be killed within "
                 f"{TIMEOUT_MAX:.0f} s, before a key's {LOCK_LEASE:.0f} s lease runs out (1 to {TIMEOUT_MAX:.0f})")
    if server.cfg.keepalive <= 0:
        sys.exit("mkv: --keep-alive 0 would leave no time limit on a request's head "
                 "(connections.py, docs/limits.md): give it seconds, 30 by default")
    warn_at_start(server, settings, answering)
    if serves_the_master(server):
        start_run_folder(settings)
    else:
        from mkvlib import logs, runfolder
        logs.use_format(settings.log_format)   # the run folder and the listener are the master's:
        runfolder.join_master(settings.db)     # the gateway counts into its metrics, if it runs,
        runfolder.join_health(settings.db)     # and shares its view of the volumes' health
    server.log.info("mkv: %d volume(s), %d replica(s), %d subvolume(s), index %s",
                    len(settings.volumes), settings.replicas, settings.subvolumes, settings.db)


# -- operability (issue 16): the run folder the workers share, and the admin
# listener (admin.py), once per master, in a thread of the arbiter. Nothing
# here imports prometheus_client before start_run_folder has named its folder.

def start_run_folder(settings):
    """The run folder made empty (mkvlib.runfolder), the index's counts
    installed (mkvlib.counts), the admin port bound: before any worker forks."""
    import admin
    from mkvlib import counts, logs, runfolder
    logs.use_format(settings.log_format)
    try:
        runfolder.prepare(settings.db)
    except runfolder.MasterRunning as e:
        sys.exit(f"mkv: a master (pid {e.pid}) already runs on MKV_DB {settings.db}: one master per index; "
                 "stop it first (gunicorn's USR2 upgrade is not supported: docs/operations.md)")
    counts.install(settings.db)
    try:
        admin.listen(settings)
    except OSError as e:
        sys.exit(f"mkv: MKV_ADMIN_PORT {settings.admin_port} on {settings.admin_bind}: {e.strerror}")


def warn_at_start(server, settings, answering):
    """Name what is likely a mistake, without stopping the start: an MKV_*
    variable nothing reads, a volume that does not answer now."""
    from mkvlib.settings import unknown_names
    for name, guess in unknown_names():
        server.log.warning("mkv: %s is no setting of mkv, ignored%s", name, f" (did you mean {guess}?)" if guess else "")
    for host in settings.volumes:
        if host not in answering:
            server.log.warning("mkv: volume %s does not answer now: reads go to the other replicas, and PUTs "
                               "placed on it fail until it does", host)


def when_ready(server):
    import admin
    for listener in admin._server:
        admin.serve_in_a_thread(listener)
        server.log.info("mkv: admin listener on http://%s:%d/ (/metrics, /health/ready)",
                        *listener.server_address[:2])


def post_fork(server, worker):
    import admin
    admin.close_in_worker()


def post_worker_init(worker):
    """The connection budget, the send timeout and their one-line logs
    (connections.py), installed in each worker whatever -k said. Then the
    worker opens its store (mkvlib.metrics.Counted.boot): its prober looks
    at the volumes before any request, so a master nobody has asked
    anything yet is ready (a load balancer waits for that). The gateway's
    requests get a count for the bytes its relay sends (the access log's)."""
    import connections
    connections.install(worker)
    boot = getattr(worker.wsgi, "boot", None)
    if boot is not None:
        boot()
    if app_module(worker) == "s3":   # the S3 gateway relays GetObject's bytes itself (mkvlib.relay)
        from mkvlib.relay import install_sent_counter
        install_sent_counter(worker)


def child_exit(server, worker):
    import admin
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):   # the master's, or the one the gateway joined
        admin.worker_exited(worker.pid)


def on_exit(server):
    if serves_the_master(server):
        from mkvlib import runfolder
        runfolder.remove(Settings.from_env().db)
