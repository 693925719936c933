"""Instructions per answer of a plain GET, mkv's against the bare function's
(benchkit/bare.py), through worker.MkvWorker's own serve loop: the measure of
issue 17's item 2a that the machine's load does not move.

    .venv/bin/python -m benchkit.instructions [--answers N] [--keys] [--connections C]

Starts a cluster (3 volumes, replicas 3, a key PUT), then for each row serves
one app under `valgrind --tool=cachegrind` (the worker's serve loop with
connections.py's budget and send timeout, as post_worker_init installs them;
the prober's first look vouches for the volumes, and they stay vouched for
however slow valgrind is) while a client process keeps one request in flight
on each of C connections (8; 1 makes the count nearly exact, for telling
two versions apart). An answer's instructions are the difference of two
runs (N and 3N answers) over 2N: start-up cancels out. User-space
instructions of the server process only; the kernel's are not counted (the
two apps make the same system calls per answer: two fcntl of SQLite's, one
recv, one send). --keys: 4,096 keys read in turn, none answered twice in a
row of the worker's kept answers (mkv.ANSWERS_KEPT)."""
import argparse
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time

from benchkit.common import ROOT, conftest, http

CONNECTIONS = 8
KEYS = 4096


def serve(which, port, connections):
    """Serve `which` (mkv, bare) on `port` until `connections` have come and gone."""
    from gevent import monkey
    monkey.patch_all()
    import gevent.pool
    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    import connections as budget
    import worker
    cfg = Config()
    cfg.set("forwarder_headers", "")     # as gunicorn.conf.py
    cfg.set("keepalive", 30)
    if which == "bare":
        from benchkit.bare import app
    else:
        import mkv
        app = mkv._app_from_env()
    w = object.__new__(worker.MkvWorker)   # its serve loop, without a master's fork and signals
    w.cfg, w.log, w.wsgi, w.fast, w.server_class = cfg, Logger(cfg), app, True, None
    w.heads = worker.HeadReader(cfg, cfg.secure_scheme_headers)
    w.base_environ = worker.fast_base_environ(cfg)
    w.pre_request_hook, w.post_request_hook = worker.request_hooks(cfg, w.log)
    w.nr, w.max_requests, w.alive = 0, 1 << 40, True
    worker.util.http_date = worker.http_date_per_second(worker.util.http_date)
    budget.install(w)
    if which == "mkv":
        app.boot()
        store = app.app.quick.__self__.store
        store.prober.every = 3600     # its first look vouches for the volumes, then it rests
        store.health.fresh = 1e9      # and they stay vouched for under valgrind's pace
    listener = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    group = gevent.pool.Group()
    for _ in range(connections):
        client, addr = listener.accept()
        group.spawn(w.handle, listener, client, addr)
    group.join()


def client(port, path, answers, connections):
    """Keep one GET of `path` (formatted with a count, if it takes one) in
    flight on each connection until `answers` came (each with Content-Length: 0)."""
    asks = [f"GET {path.format(i)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for i in range(KEYS if "{" in path else 1)]
    sel, sent, got = selectors.DefaultSelector(), 0, 0
    for _ in range(connections):
        for _ in range(600):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.1)
        sel.register(s, selectors.EVENT_READ, bytearray())
        s.sendall(asks[0])
        sent += 1
    statuses = set()
    while got < answers:
        for key, _ in sel.select():
            buf = key.data
            buf += key.fileobj.recv(65536)
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                statuses.add(bytes(buf[9:12]))
                del buf[:end + 4]
                got += 1
                if sent < answers:
                    key.fileobj.sendall(asks[sent % len(asks)])
                    sent += 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    print(b",".join(sorted(statuses)).decode())


def instructions(which, path, answers, connections, env, workdir):
    """User-space instructions of the server for `answers` answers, and the statuses seen."""
    port = conftest().free_port()
    out = os.path.join(workdir, f"cachegrind.{which}.{answers}.{time.monotonic_ns()}")
    server = subprocess.Popen(["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
                               sys.executable, "-m", "benchkit.instructions", "serve", which, str(port), str(connections)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {which} server under valgrind did not start")
    asked = subprocess.run([sys.executable, "-m", "benchkit.instructions", "client", str(port), path, str(answers),
                            str(connections)],
                           cwd=ROOT, capture_output=True, text=True)
    if asked.returncode != 0:
        server.kill()
        raise RuntimeError(f"the client of {which} {path}: {asked.stderr.strip().splitlines()[-1:]}")
    seen = asked.stdout.strip()
    server.wait(timeout=600)
    with open(out) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("summary:")), seen


def measure(answers, keys, connections):
    c = conftest()
    workdir = tempfile.mkdtemp(prefix="mkv-instructions-")
    cluster = c.Cluster(workdir, n_volumes=3, workers=1, replicas=3)
    try:
        r = http("PUT", cluster.url("/bench/get-existing"), data=b"x" * 1024)
        if r.status_code != 201:
            raise RuntimeError(f"PUT: {r.status_code} {r.text}")
        env = dict(os.environ, MKV_VOLUMES=",".join(cluster.volume_names()), MKV_DB=cluster.db(), MKV_REPLICAS="3",
                   MKV_SUBVOLUMES="10", PYTHONHASHSEED="0")
        paths = ["/bench/get-existing", "/bench/get-missing"]
        if keys:
            from mkvlib.index import Index
            from mkvlib.settings import Settings
            settings = Settings.from_env(volumes=cluster.volume_names(), db=cluster.db(), replicas=3, subvolumes=10)
            Index(cluster.db()).insert_live([(b"/keys/%d" % i, settings.placement(b"/keys/%d" % i), "ab" * 16, 1)
                                             for i in range(KEYS)])
            paths = ["/keys/{}"]
        print("| GET | mkv | bare function | bare / mkv |\n| --- | --- | --- | --- |")
        for path in paths:
            each = {}
            for which in ("mkv", "bare"):
                (few, _), (many, seen) = (instructions(which, path, n, connections, env, workdir)
                                           for n in (answers, 3 * answers))
                each[which] = (many - few) / (2 * answers)
                each[which + " statuses"] = seen
            print(f"| {path} ({each['mkv statuses']}) | {each['mkv']:,.0f} | {each['bare']:,.0f} | "
                  f"{each['bare'] / each['mkv']:.3f} |", flush=True)
    finally:
        cluster.stop()


def main():
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if sys.argv[1:2] == ["client"]:
        return client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", type=int, default=1000, help="N: runs of N and 3N answers (default 1000)")
    p.add_argument("--keys", action="store_true", help=f"{KEYS} keys read in turn instead of one")
    p.add_argument("--connections", type=int, default=CONNECTIONS, help=f"requests in flight at once ({CONNECTIONS})")
    args = p.parse_args()
    measure(args.answers, args.keys, args.connections)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "tests"))    # conftest's servers
    main()
