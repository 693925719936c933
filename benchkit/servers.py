"""The servers of the bench: stub nginx servers of one location each, and
Bench, which owns the temporary folder and the servers workloads share (the
cluster, nginx `return 302`, the masters of a big and a small filled index)."""
import os
import shutil
import signal
import sys
import tempfile

from benchkit.common import MB, REPLICAS, WORKERS, conftest, http, remove_tree, say
from benchkit.mkvdata import every, fill, index_size


def nginx_binary():
    for path in (shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("bench: nginx is missing: run ./install.sh")


STUB_CONF = """\
worker_processes auto;
pid {dir}/nginx.pid;
error_log stderr error;
daemon off;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port} default_server backlog=4096;
{body}
  }}
}}
"""
LIMIT_302 = "    location / { return 302 http://x/; }"
# a volume with a file behind every name: 200 to every HEAD or GET; no /.id
STUB_VOLUME = "    location = /.id { return 404; }\n    location / { return 200; }"


def start_stub(workdir, name, body):
    """A bare nginx of its own config in workdir/name."""
    c = conftest()
    folder = os.path.join(workdir, name)
    os.makedirs(folder, exist_ok=True)
    port = c.free_port()
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(STUB_CONF.format(dir=folder, port=port, body=body))
    argv = [nginx_binary(), "-p", folder + "/", "-c", conf, "-e", "stderr"]
    return c.Server(f"{name} :{port}", argv, dict(os.environ), os.path.join(workdir, f"{name}.log"),
                    port).start()


class Bench:
    """The temporary folder, the servers, and the shared setups."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.duration = args.duration or (2 if args.quick else 5)
        self.index_keys = 200_000 if args.quick else 10_000_000    # the big index's
        self.tmp = tempfile.mkdtemp(prefix="mkv-bench-", dir=args.tmp)
        self.c = conftest()
        self._cluster = self._limit302 = self._index = self._go = self._bare = None
        self.peer = None
        if getattr(args, "peer", None):
            from benchkit.peer import Peer
            self.peer = Peer(args.peer)
        self.load = os.getloadavg()[0]

    # -- shared servers, started on first use

    def cluster(self):
        if self._cluster is None:
            folder = os.path.join(self.tmp, "cluster")
            os.makedirs(folder)
            self._cluster = self.c.Cluster(folder, n_volumes=3, workers=WORKERS, replicas=REPLICAS,
                                           admin_port=self.c.free_port())   # the scrape workload's
            say(f"cluster: master :{self._cluster.master.port}, volumes {','.join(self._cluster.volume_names())}")
        return self._cluster

    def admin_url(self):
        return f"http://127.0.0.1:{self.cluster().settings['admin_port']}"

    def go_master(self):
        """The Go original's master over the cluster's volumes (--peer), its index its own."""
        if self._go is None:
            self._go = self.peer.start_master(self.cluster().workdir, self.cluster().volume_names())
            say(f"go master :{self._go.port}")
        return self._go

    def bare(self):
        """A bare WSGI function (benchkit/bare.py: one SQLite lookup in the
        cluster's index, then a 302 or a 404) under the master's own gunicorn
        command and gunicorn.conf.py: what the server gives an app that does
        nothing more."""
        if self._bare is None:
            c, cluster = self.c, self.cluster()
            port = c.free_port()
            env = dict(os.environ, MKV_VOLUMES=",".join(cluster.volume_names()), MKV_DB=cluster.db())
            argv = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS),   # gunicorn.conf.py's worker, as the master's
                    "-b", f"127.0.0.1:{port}", "benchkit.bare:app"]
            self._bare = c.Server(f"bare :{port}", argv, env, os.path.join(self.tmp, f"bare-{port}.log"), port,
                                  stop_signal=signal.SIGINT, children=WORKERS).start()
        return self._bare

    def limit302(self):
        if self._limit302 is None:
            self._limit302 = start_stub(self.tmp, "nginx-302", LIMIT_302)
        return self._limit302

    def index(self):
        """(big master, small master, keys in the big index, notes) over stub volumes."""
        if self._index is None:
            n = self.index_keys
            stubs = [start_stub(self.tmp, f"stub-volume{i}", STUB_VOLUME) for i in range(3)]
            names = [f"127.0.0.1:{s.port}" for s in stubs]
            big, small = os.path.join(self.tmp, "index-big"), os.path.join(self.tmp, "index-small")
            notes = self._fill_indexes(big, small, n, names)
            wait, self.c.START_TIMEOUT = self.c.START_TIMEOUT, max(self.c.START_TIMEOUT, 120)
            try:   # the master opens (and checks) an index of 10 million keys before it answers
                masters = [self.c.start_master(d, names, workers=WORKERS, replicas=REPLICAS) for d in (big, small)]
            finally:
                self.c.START_TIMEOUT = wait
            for m, keys in zip(masters, (n, 1000)):
                for i in (0, keys - 1):
                    r = http("GET", f"http://127.0.0.1:{m.port}/fill/{i:09d}")
                    if r.status_code != 302:
                        raise RuntimeError(f"GET /fill/{i:09d} of a filled index: {r.status_code} {r.text}")
            self._index = (masters[0], masters[1], n, notes)
        return self._index

    def _fill_indexes(self, big, small, n, names):
        """Fill index.sqlite3 in the new folders big (n keys) and small (1,000
        keys) over the volume servers `names`; the notes on the big one."""
        for d in (big, small):
            os.makedirs(d)
        say(f"filling an index of {n:,} keys")
        progress = every(10, lambda done, took: say(f"fill: {done:,} keys in {took:.0f} s "
                                                    f"({done / took:,.0f} keys/s)"))
        took = fill(os.path.join(big, "index.sqlite3"), n, names, progress=progress)
        fill(os.path.join(small, "index.sqlite3"), 1000, names)
        size = index_size(os.path.join(big, "index.sqlite3"))
        say(f"fill: {n:,} keys in {took:.1f} s ({n / took:,.0f} keys/s), {size / MB:,.0f} MB")
        return (f"fill {n:,} keys: {took:.0f} s ({n / took:,.0f} keys/s); "
                f"index {size / MB:,.0f} MB on disk, {size / n:.0f} B/key")

    def start_volumes(self, folders):
        """(servers, their names 'host:port') of new volumes serving `folders`."""
        servers = [self.c.start_volume(f) for f in folders]
        return servers, [f"127.0.0.1:{s.port}" for s in servers]

    def stop(self):
        for server in reversed(self.c._running):
            server.stop()

    def close(self):
        """Stop every server; remove the temporary folder unless --keep."""
        self.stop()
        if self.args.keep:
            say(f"kept {self.tmp}")
        else:
            remove_tree(self.tmp)

    def show_logs(self):
        for server in self.c._running:
            say(f"---- log of {server.name} ({server.log_path}):\n{server.tail()}")
