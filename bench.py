"""Benchmarks of mkv against their limits, on a throwaway cluster on loopback.

    python bench.py [--quick] [--rounds N] [--only NAME,...] [--duration S] [--keep]
    python bench.py fill --db FILE --keys N [--volumes H:P,...] [--replicas N] [--subvolumes N]

Starts 3 nginx volumes (`python volume DIR`), a master (`gunicorn -k gevent -w 2
mkv:app`, MKV_REPLICAS=3) and whatever limit servers a workload needs, all on
free loopback ports in a temporary folder; runs each workload against the
master and against its limit, alternating, best of --rounds; prints a markdown
table (workload, mkv, limit, ratio, goal, met, notes) and a line naming the
machine. Ratios are mkv / limit, so higher is better everywhere; a benchmark,
never a test: nothing here fails on a number.

Workloads (--only takes these names):
  get        GET of an existing key (302), wrk -t2 -c100; limit: bare nginx `return 302`
  missing    GET of a missing key (404), same; limit: the same bare nginx
             (the master's answers are counted by status: only 302s, or 404s,
             count in its rate, and a note gives the number of any others)
  thrash     write/read/delete of 1 KB values, 16 at once (thrasher.py); limit:
             thrasher.py --direct, the same work straight to the volumes
  bigput     one 256 MB PUT, 3 replicas, and the master worker's peak RSS growth;
             limit: the three copies PUT straight to the three volumes at once
  rebuild    rebuild.py of 20,000 tiny keys on 3 volumes into a fresh index; limit:
             the volumes' leaf folders / nginx's rate of JSON listings of one folder
  rebalance  rebalance.py from 3 volumes to 4 (1,500 keys of 10 B to 300 KB);
             limit: a plain copy (sendfile) of the bytes that must move
  index      GET at random over an index of 10,000,000 keys (filled straight into
             SQLite); limit: the same on an index of 1,000 keys
  list       ?list&limit=1000 from a random start on that index, one client: p99
             latency; limit: the same on the 1,000-key index

--quick: shorter runs and smaller data (a 200,000-key index); under 3 minutes.
The volumes of the `index` and `list` masters are stub nginx servers that
answer 200 to everything (no files behind 10 million keys), so a master that
checks a volume before redirecting still redirects.

`fill` writes N records straight into an index file: keys /fill/%09d, state
live, volumes from mkvlib.key2volume over --volumes ($MKV_VOLUMES), md5 and
size made up; in transactions of 100,000 rows.
"""

import argparse
import hashlib
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mkvlib  # noqa: E402

# ---------------------------------------------------------------- settings and helpers


MB = 1 << 20
SUBVOLUMES = 10
REPLICAS = 3
WORKERS = 2


def say(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


def conftest():
    """tests/conftest.py: Server, start_volume, start_master (bounded waits,
    terminate -> wait -> kill, logs of each server in a file)."""
    import conftest as c
    return c


def http(method, url, data=None, timeout=30):
    import requests
    return requests.request(method, url, data=data, timeout=timeout, allow_redirects=False)


def timed(argv, env=None, timeout=600):
    """(seconds, CompletedProcess) of a command run from the repo."""
    start = time.monotonic()
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return time.monotonic() - start, p


def timed_tool(script, names, db):
    """(seconds, CompletedProcess) of `python SCRIPT --db DB` over the volume
    servers `names`, with the bench's replicas and subvolumes."""
    env = dict(os.environ, MKV_VOLUMES=",".join(names), MKV_DB=db,
               MKV_REPLICAS=str(REPLICAS), MKV_SUBVOLUMES=str(SUBVOLUMES))
    return timed([sys.executable, script, "--db", db], env=env)


def failure(what, p):
    """The error of a command `what` that failed: its exit code, output and
    the end of its stderr."""
    return RuntimeError(f"{what}: exit {p.returncode}\n{p.stdout}{p.stderr[-3000:]}")


def peak_rss(pid):
    """VmHWM of a process, in bytes (as tests/test_failures.py reads it)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def remove_tree(path):
    """rm -rf: a volume that served the thrasher holds ~100,000 empty folders,
    which shutil.rmtree took minutes to remove on a busy machine."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


def ensure_curl():
    if not shutil.which("curl"):
        raise SystemExit("bench: curl is missing (apt-get install curl)")


# ---------------------------------------------------------------- wrk


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


TALLY_LUA = """
-- bench.py: count the answers by status; done() prints 'status N: COUNT' lines
local threads = {}
setup = function(thread) table.insert(threads, thread) end
statuses = {}
response = function(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
done = function(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("status %d: %d\\n", k, v)) end
end
"""


def ensure_wrk():
    if shutil.which("wrk"):
        return
    say("wrk is missing: installing it with apt-get (apt-get install -y wrk)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = sudo + ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    if not shutil.which("wrk"):
        raise SystemExit("bench: could not install wrk")


def wrk(url, duration, threads=2, conns=100, lua="", tally=False):
    """Run wrk, with the Lua script text `lua` if any, counting the answers
    by status if `tally`; {'rate': req/s, 'requests', 'bad' (non-2xx/3xx),
    'errors' (socket errors), 'statuses' {status: count} (with tally), 'p50',
    'p99' (ms)}."""
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "10s", "--latency"]
    script = None
    if lua or tally:
        fd, script = tempfile.mkstemp(suffix=".lua", prefix="bench-")
        with os.fdopen(fd, "w") as f:
            f.write(lua + (TALLY_LUA if tally else ""))
        argv += ["-s", script]
    try:
        p = subprocess.run(argv + [url], capture_output=True, text=True, timeout=duration + 60)
    finally:
        if script:
            os.unlink(script)
    out = p.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk {url} failed ({p.returncode}): {out}{p.stderr}")
    result = {"rate": float(m.group(1)), "bad": 0, "errors": 0,
              "statuses": {int(a): int(b) for a, b in re.findall(r"^status (\d+): (\d+)$", out, re.M)}}
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        result["bad"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        result["errors"] = sum(int(x) for x in m.groups())
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            result["p" + pct] = float(m.group(1)) * _UNITS[m.group(2)]
    return result


def unexpected(w, expect):
    """'N answers S, ...' for the answers of a tallied wrk run whose status is not `expect`."""
    odd = {s: n for s, n in w["statuses"].items() if s != expect}
    parts = [f"{n} answers {s}" for s, n in sorted(odd.items())]
    if w["errors"]:
        parts.append(f"{w['errors']} socket errors or timeouts")
    return ", ".join(parts)


def good_rate(w, expect):
    """Requests per second that got the `expect` status: a fast 503 is no GET served."""
    total = sum(w["statuses"].values())
    return w["rate"] * w["statuses"].get(expect, 0) / total if total else 0.0


def random_key_lua(fmt, n):
    """wrk Lua asking for fmt % random(0, n-1) on every request."""
    return f"""\
local n = {int(n)}
local fmt = "{fmt}"
init = function(args)
  math.randomseed(os.time() + (tonumber(tostring({{}}):match("0x(%x+)") or "0", 16) % 1000003))
end
request = function()
  return wrk.format("GET", string.format(fmt, math.random(0, n - 1)))
end
"""


FILL_BATCH = 100_000


# ---------------------------------------------------------------- index files

def _placements(args):
    """Worker of fill: the volumes column of keys start..stop-1."""
    start, stop, volumes, replicas, subvolumes = args
    return [",".join(mkvlib.key2volume(b"/fill/%09d" % i, volumes, replicas, subvolumes))
            for i in range(start, stop)]


def fill(db, keys, volumes, replicas=REPLICAS, subvolumes=SUBVOLUMES, start=0, progress=None):
    """Write records /fill/START.. /fill/START+KEYS-1 into the index `db`
    (created by mkvlib.Index if new); returns seconds taken."""
    began = time.monotonic()
    mkvlib.Index(db).close()          # the file, its schema and WAL mode, as the master makes it
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")      # 256 MB: inserts in key order, mostly appends
    sql = ("INSERT OR REPLACE INTO keys (key, state, volumes, md5, size, lock_owner, lock_until) "
           "VALUES (?, 'live', ?, ?, 1024, NULL, NULL)")
    md5 = "d41d8cd98f00b204e9800998ecf8427e"       # made up: no file is behind these keys
    batches = [(i, min(i + FILL_BATCH, start + keys), volumes, replicas, subvolumes)
               for i in range(start, start + keys, FILL_BATCH)]
    done = 0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, os.cpu_count() or 1)) as pool:
        for (lo, hi, *_), column in zip(batches, pool.imap(_placements, batches)):
            conn.execute("BEGIN")
            conn.executemany(sql, ((b"/fill/%09d" % i, v, md5) for i, v in zip(range(lo, hi), column)))
            conn.execute("COMMIT")
            done += hi - lo
            if progress:
                progress(done, time.monotonic() - began)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - began


def every(seconds, report, last_done=None):
    """A progress(done, took) for fill that calls report(done, took) once
    `seconds` have passed since it last did, and at `last_done` keys."""
    last = [0.0]

    def progress(done, took):
        if took - last[0] >= seconds or done == last_done:
            last[0] = took
            report(done, took)
    return progress


def index_size(db):
    """Bytes of the index file and its WAL."""
    return sum(os.path.getsize(f) for f in (db, db + "-wal") if os.path.exists(f))


def write_index(db, rows):
    """A new index `db` holding `rows` (key, state, volumes, md5, size)."""
    mkvlib.Index(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO keys (key, state, volumes, md5, size) VALUES (?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.close()


# ---------------------------------------------------------------- keys on volumes

def placement(key, names):
    """The volumes ('host:port/svXX') of `key` over the volume servers `names`,
    with the bench's replicas and subvolumes."""
    return mkvlib.key2volume(key, names, REPLICAS, SUBVOLUMES)


def direct_urls(key, names):
    """The URLs of `key`'s copies straight on the volume servers `names`."""
    path = mkvlib.key2path(key)
    return [f"http://{v}{path}" for v in placement(key, names)]


def plant(folder, volume, key, value, owner, made=None):
    """Write a key's file straight onto the disk of `volume` ('host:port/svXX')
    served from `folder`, owned like the folder (tests/conftest.py plant_file)."""
    return conftest().plant_file(folder, volume.partition("/")[2] + mkvlib.key2path(key), value, made, owner)


def plant_copies(key, value, volumes, folders, names, owner, made):
    """plant() `key` on each of `volumes`, where folders[i] is served as
    names[i]; the files written."""
    return [plant(folders[names.index(mkvlib.volume_host(v))], v, key, value, owner, made)
            for v in volumes]


# ---------------------------------------------------------------- servers


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
        self._cluster = self._limit302 = self._index = None
        self.load = os.getloadavg()[0]

    # -- shared servers, started on first use

    def cluster(self):
        if self._cluster is None:
            folder = os.path.join(self.tmp, "cluster")
            os.makedirs(folder)
            self._cluster = self.c.Cluster(folder, n_volumes=3, workers=WORKERS, replicas=REPLICAS)
            say(f"cluster: master :{self._cluster.master.port}, volumes {','.join(self._cluster.volume_names())}")
        return self._cluster

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


# ---------------------------------------------------------------- the workloads


class Workload:
    name = title = goal = ""
    sizes = None      # (keys with --quick, keys without) of a workload over a number of keys
    note = ""         # a first note, if any

    def __init__(self, bench):
        self.b = bench
        self.notes = [self.note] if self.note else []
        self.side = "mkv"      # which side the runner measures now: "mkv" or "limit"
        if self.sizes:
            self.keys = self.sizes[0] if bench.quick else self.sizes[1]
            self.title = self.title.format(keys=self.keys)

    def setup(self):
        pass

    def teardown(self):
        pass

    def limit_first(self, round_no):
        return round_no % 2 == 0

    def best(self, results):
        return max(results, key=lambda r: r["value"])

    def ratio(self, mkv, limit):
        return mkv["value"] / limit["value"]

    def goal_text(self):
        return f">= {self.goal}"

    def met(self, mkv, limit, ratio):
        return ratio >= self.goal

    def served(self, w, expect):
        """The rate of the answers of the tallied wrk run `w` that had the
        status `expect`, as a result; a note of this side's other answers."""
        odd = unexpected(w, expect)
        if odd:
            self.notes.append(f"{self.side}: {odd} (not counted)")
        rate = good_rate(w, expect)
        return {"value": rate, "text": f"{rate:,.0f} req/s"}


class Get(Workload):
    name, title, goal = "get", "GET of an existing key (302)", 0.15
    path = "/bench/get-existing"
    expect = 302

    def setup(self):
        ensure_wrk()
        c = self.b.cluster()
        if self.expect == 302:
            r = http("PUT", c.url(self.path), data=b"x" * 1024)
            if r.status_code not in (201, 403):
                raise RuntimeError(f"PUT {self.path}: {r.status_code} {r.text}")
        r = http("GET", c.url(self.path))
        if r.status_code != self.expect:
            raise RuntimeError(f"GET {self.path}: {r.status_code}, not {self.expect}")
        self.b.limit302()

    def mkv(self):
        # the master's answers are counted by status (wrk's Lua costs it little at
        # a few thousand per second); nginx's only by wrk's non-2xx/3xx count
        return self.served(wrk(self.b.cluster().url(self.path), self.b.duration, tally=True), self.expect)

    def limit(self):
        w = wrk(f"http://127.0.0.1:{self.b.limit302().port}{self.path}", self.b.duration)
        if w["bad"] or w["errors"]:
            self.notes.append(f"limit: {w['bad']} answers not 2xx/3xx, {w['errors']} socket errors")
        return {"value": w["rate"], "text": f"{w['rate']:,.0f} req/s"}


class Missing(Get):
    name, title, goal = "missing", "GET of a missing key (404)", 0.15
    path = "/bench/get-missing"
    expect = 404
    note = "limit: nginx `return 302`"


class Thrash(Workload):
    name, goal, sizes = "thrash", 0.85, (1000, 10000)
    title = "write/read/delete, 1 KB values, 16 at once ({keys:,} keys)"
    note = "thrasher.py; limit: --direct, per key 3 PUTs, 1 GET, 3 DELETEs to nginx"

    def run(self, where):
        took, p = timed([sys.executable, "thrasher.py", *where, "--keys", str(self.keys),
                         "--size", "1K", "--concurrency", "16"])
        m = re.search(r"^thats ([\d.]+)/sec$", p.stdout, re.M)
        if p.returncode != 0 or not m or " 0 failed" not in p.stdout:
            raise failure(f"thrasher.py {' '.join(where)}", p)
        rate = float(m.group(1))
        return {"value": rate, "text": f"{rate:,.0f} keys/s"}

    def mkv(self):
        return self.run(["--master", f"127.0.0.1:{self.b.cluster().master.port}"])

    def limit(self):
        return self.run(["--direct", ",".join(self.b.cluster().volume_names())])


class BigPut(Workload):
    name, title, goal = "bigput", "one 256 MB PUT, 3 replicas", 0.9
    size = 256 * MB

    def setup(self):
        ensure_curl()
        self.notes.append("curl -T of a file in the page cache; limit: 3 such curls at once, "
                          "one to each volume; RSS: VmHWM growth of the busiest gunicorn worker")
        self.file = os.path.join(self.b.tmp, "big.bin")
        md5 = hashlib.md5()
        with open(self.file, "wb") as f:
            for _ in range(self.size // MB):
                chunk = os.urandom(MB)
                md5.update(chunk)
                f.write(chunk)
        self.md5 = md5.hexdigest()
        self.count = 0
        self.growth = []

    def teardown(self):
        if os.path.exists(getattr(self, "file", "")):
            os.unlink(self.file)

    def curl_put(self, url):
        return subprocess.Popen(["curl", "-sS", "-H", "Expect:", "-T", self.file, "-o", "/dev/null",
                                 "-D", "-", "-w", "\nstatus %{http_code}\n", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mkv(self):
        c = self.b.cluster()
        self.count += 1
        key = f"/bench/big-{self.count}"
        workers = c.master.pids()[1:]
        before = {pid: peak_rss(pid) for pid in workers}
        start = time.monotonic()
        out, err = self.curl_put(c.url(key)).communicate(timeout=600)
        took = time.monotonic() - start
        grown = max(peak_rss(pid) - before[pid] for pid in workers)
        if "status 201" not in out or self.md5 not in out.lower():
            raise RuntimeError(f"PUT {key} of 256 MB: {out}{err}")
        self.growth.append(grown)
        http("DELETE", c.url(key))
        rate = self.size / MB / took
        return {"value": rate, "text": f"{rate:,.0f} MB/s", "rss": grown}

    def limit(self):
        self.count += 1
        urls = direct_urls(f"/bench/big-{self.count}".encode(), self.b.cluster().volume_names())
        start = time.monotonic()
        procs = [self.curl_put(u) for u in urls]
        outs = [p.communicate(timeout=600) for p in procs]
        took = time.monotonic() - start
        for u, (out, err) in zip(urls, outs):
            if "status 201" not in out and "status 204" not in out:
                raise RuntimeError(f"PUT {u}: {out}{err}")
            http("DELETE", u)
        rate = self.size / MB / took
        return {"value": rate, "text": f"{rate:,.0f} MB/s"}

    def best(self, results):
        best = super().best(results)
        if "rss" in best:
            rss = max(self.growth)
            best = dict(best, text=f"{best['value']:,.0f} MB/s, peak RSS +{rss / MB:.0f} MB", rss=rss)
        return best

    def goal_text(self):
        return f">= {self.goal}, memory <= +64 MB"

    def met(self, mkv, limit, ratio):
        return ratio >= self.goal and mkv["rss"] <= 64 * MB


def leaf_folders(folders):
    """Every svXX/aa/bb folder under the volume folders."""
    leaves = []
    for top in folders:
        for sv in os.scandir(top):
            if not (sv.is_dir() and re.fullmatch(r"sv[0-9A-F]{2}", sv.name)):
                continue
            for a in os.scandir(sv.path):
                if a.is_dir():
                    leaves += [b.path for b in os.scandir(a.path) if b.is_dir()]
    return leaves


class Rebuild(Workload):
    name, goal, sizes = "rebuild", 0.5, (5000, 20000)
    title = "rebuild of {keys:,} tiny keys on 3 volumes into a fresh index"

    def setup(self):
        ensure_wrk()
        self.dir = os.path.join(self.b.tmp, "rebuild")
        self.folders = [os.path.join(self.dir, f"volume{i}") for i in range(3)]
        self.volumes, self.names = self.b.start_volumes(self.folders)
        owner = os.stat(self.folders[0])
        began = time.monotonic()
        rng = random.Random(1)
        made = set()
        for i in range(self.keys):
            key = b"/rebuild/%06d" % i
            value = rng.randbytes(rng.randint(1, 100))
            plant_copies(key, value, placement(key, self.names), self.folders, self.names, owner, made)
        self.leaves = leaf_folders(self.folders)
        leaf = self.leaves[0]
        i = self.folders.index(os.path.dirname(os.path.dirname(os.path.dirname(leaf))))
        self.leaf_url = f"http://{self.names[i]}/{os.path.relpath(leaf, self.folders[i])}/"
        r = http("GET", self.leaf_url)
        if r.status_code != 200 or not isinstance(r.json(), list):
            raise RuntimeError(f"GET {self.leaf_url}: {r.status_code} {r.text[:200]}")
        self.notes.append("rebuild.py with its default --workers; limit: wrk -t2 -c64 on one leaf "
                          "folder's JSON listing")
        say(f"rebuild: planted {self.keys:,} keys x 3 in {time.monotonic() - began:.1f} s, "
            f"{len(self.leaves):,} leaf folders")
        self.count = 0

    def teardown(self):
        for v in getattr(self, "volumes", []):
            v.stop()
        if hasattr(self, "dir"):
            remove_tree(self.dir)

    def best(self, results):
        return min(results, key=lambda r: r["seconds"])

    def mkv(self):
        self.count += 1
        db = os.path.join(self.dir, f"new-{self.count}.sqlite3")
        took, p = timed_tool("rebuild.py", self.names, db)
        if p.returncode != 0 or f"{self.keys} added" not in p.stdout.replace(",", ""):
            raise failure("rebuild.py", p)
        for f in (db, db + "-wal", db + "-shm"):
            if os.path.exists(f):
                os.unlink(f)
        return {"seconds": took, "text": f"{took:.2f} s ({self.keys / took:,.0f} keys/s)"}

    def limit(self):
        w = wrk(self.leaf_url, self.b.duration, conns=64)
        seconds = len(self.leaves) / w["rate"]
        return {"seconds": seconds, "rate": w["rate"],
                "text": f"{seconds:.2f} s ({len(self.leaves):,} folders at {w['rate']:,.0f} listings/s)"}

    def ratio(self, mkv, limit):
        return limit["seconds"] / mkv["seconds"]


class Rebalance(Workload):
    name, goal, sizes = "rebalance", 1.0, (300, 1500)
    title = "rebalance 3 -> 4 volumes ({keys:,} keys of 10 B to 300 KB)"
    note = ("Go's rebalance is not available here; wall time, which includes "
            "rebalance.py's 2 s grace before old copies are deleted; "
            "limit: one sendfile copy per moved replica")

    def setup(self):
        rng = random.Random(2)
        self.values = [(b"/rebalance/%05d" % i, rng.randbytes(rng.randint(10, 300 * 1000)))
                       for i in range(self.keys)]
        self.md5s = [hashlib.md5(v).hexdigest() for _, v in self.values]
        self.count = 0
        self.round = None

    def limit_first(self, round_no):
        return True    # the limit copies the files the rebalance then moves

    def prepare(self):
        """A fresh round: 4 volumes, the keys planted on the first 3 and indexed."""
        self.clean()
        self.count += 1
        d = os.path.join(self.b.tmp, f"rebalance-{self.count}")
        folders = [os.path.join(d, f"volume{i}") for i in range(4)]
        servers, names = self.b.start_volumes(folders)
        owner = os.stat(folders[0])
        db = os.path.join(d, "index.sqlite3")
        moves = []        # (a recorded copy's file, bytes) for every replica the rebalance must write
        rows = []
        made = set()
        for (key, value), md5 in zip(self.values, self.md5s):
            old = placement(key, names[:3])
            files = plant_copies(key, value, old, folders, names, owner, made)
            new = placement(key, names)
            moves += [(files[0], len(value))] * len([v for v in new if v not in old])
            rows.append((key, "live", ",".join(old), md5, len(value)))
        write_index(db, rows)
        self.round = (d, servers, names, db, moves)

    def clean(self):
        if self.round:
            d, servers, *_ = self.round
            for s in servers:
                s.stop()
            remove_tree(d)
            self.round = None

    def teardown(self):
        self.clean()

    def limit(self):
        self.prepare()
        d, _, _, _, moves = self.round
        scratch = os.path.join(d, "copies")
        os.makedirs(scratch)
        start = time.monotonic()
        for i, (src, _) in enumerate(moves):
            shutil.copyfile(src, os.path.join(scratch, str(i)))
        took = time.monotonic() - start
        moved = sum(n for _, n in moves)
        shutil.rmtree(scratch)
        rate = moved / MB / took
        return {"value": rate, "text": f"{rate:,.0f} MB/s ({moved / MB:,.0f} MB in {took:.2f} s)"}

    def mkv(self):
        if self.round is None:
            self.prepare()
        _, _, names, db, moves = self.round
        took, p = timed_tool("rebalance.py", names, db)
        self.clean()
        if p.returncode != 0:
            raise failure("rebalance.py", p)
        moved = sum(n for _, n in moves)
        rate = moved / MB / took
        return {"value": rate, "text": f"{rate:,.1f} MB/s ({moved / MB:,.0f} MB in {took:.2f} s)",
                "summary": p.stdout.strip().splitlines()[-1]}

    def best(self, results):
        best = super().best(results)
        if "summary" in best:
            said = re.sub(r"^rebalance: ", "", best["summary"])
            self.notes.append(f"its summary: {said}")
        return best


class Index(Workload):
    name, goal = "index", 0.9

    def __init__(self, bench):
        super().__init__(bench)
        self.title = f"GET at random on an index of {bench.index_keys:,} keys"

    def setup(self):
        ensure_wrk()
        self.big, self.small, self.n, notes = self.b.index()
        self.notes.append(notes + "; limit: 1,000 keys; volumes are stub nginx (200)")
        self.scripts = {m.port: random_key_lua(self.fmt(), n - self.tail())
                        for m, n in ((self.big, self.n), (self.small, 1000))}

    def fmt(self):
        return "/fill/%09d"

    def tail(self):
        return 0

    def run(self, master):
        return self.served(wrk(f"http://127.0.0.1:{master.port}/", self.b.duration,
                               lua=self.scripts[master.port], tally=True), 302)

    def mkv(self):
        return self.run(self.big)

    def limit(self):
        return self.run(self.small)


class List(Index):
    name, goal = "list", 20.0

    def __init__(self, bench):
        Workload.__init__(self, bench)
        self.title = f"?list&limit=1000 on that index ({bench.index_keys:,} keys)"

    def setup(self):
        super().setup()
        self.notes[:] = ["one client (wrk -t1 -c1), random start; limit: the 1,000-key index (start at its first key)"]
        for m in (self.big, self.small):
            r = http("GET", f"http://127.0.0.1:{m.port}/fill/?list&limit=1000")
            if r.status_code != 200 or len(r.json()["keys"]) != 1000:
                raise RuntimeError(f"GET /fill/?list&limit=1000: {r.status_code} {r.text[:200]}")

    def fmt(self):
        return "/fill/?list&limit=1000&start=/fill/%09d"

    def tail(self):
        return 999     # every page has 1000 keys

    def run(self, master):
        w = wrk(f"http://127.0.0.1:{master.port}/", self.b.duration, threads=1, conns=1,
                lua=self.scripts[master.port], tally=True)
        odd = unexpected(w, 200)
        if odd:
            self.notes.append(f"{self.side}: {odd}")
        return {"value": w["p99"], "text": f"p99 {w['p99']:.1f} ms (p50 {w['p50']:.1f} ms, {w['rate']:,.0f} req/s)"}

    def best(self, results):
        return min(results, key=lambda r: r["value"])

    def ratio(self, mkv, limit):
        return limit["value"] / mkv["value"]

    def goal_text(self):
        return f"p99 <= {self.goal:.0f} ms"

    def met(self, mkv, limit, ratio):
        return mkv["value"] <= self.goal


# ---------------------------------------------------------------- running a workload


def run(bench, cls, rounds):
    """(the table row of workload class `cls`, whether it ran without failing)."""
    w = cls(bench)
    started = time.monotonic()
    try:
        say(f"{w.name}: {w.title}")
        w.setup()
        return measure(w, rounds), True
    except Exception as e:
        say(f"{w.name} failed: {type(e).__name__}: {e}")
        bench.show_logs()
        return (w.title, "failed", "", "", w.goal_text(), "",
                f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"), False
    finally:
        try:
            w.teardown()
        except Exception as e:
            say(f"{w.name} teardown: {type(e).__name__}: {e}")
        say(f"{w.name}: {time.monotonic() - started:.0f} s")


def measure(w, rounds):
    """Best of `rounds` of the set-up workload `w` on each side: its row
    (workload, mkv, limit, ratio, goal, met, notes)."""
    mkvs, limits = [], []
    for r in range(rounds):
        order = [("limit", w.limit, limits), ("mkv", w.mkv, mkvs)]
        if not w.limit_first(r):
            order.reverse()
        for side, fn, out in order:
            w.side = side
            out.append(fn())
            say(f"{w.name} round {r + 1}: {side} {out[-1]['text']}")
    mkv, limit = w.best(mkvs), w.best(limits)
    ratio = w.ratio(mkv, limit)
    return (w.title, mkv["text"], limit["text"], f"{ratio:.3f}", w.goal_text(),
            "yes" if w.met(mkv, limit, ratio) else "no", "; ".join(dict.fromkeys(w.notes)))


# ---------------------------------------------------------------- the table


def print_table(rows):
    print("| workload | mkv | limit | ratio | goal | met | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |")


def machine_line(bench):
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nginx = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    except (OSError, SystemExit):
        nginx = "?"
    from importlib.metadata import version
    return (f"machine: {os.cpu_count()} cores (nproc), {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, load average {bench.load:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end (1 min); "
            f"master: gunicorn {version('gunicorn')} -k gevent -w {WORKERS} (gevent {version('gevent')}), "
            f"MKV_REPLICAS={REPLICAS}, MKV_SUBVOLUMES={SUBVOLUMES}; volumes: nginx {nginx} via `python volume`; "
            f"wrk -t2 -c100 -d{bench.duration}s; best of {bench.args.rounds} rounds, master and limit alternating"
            + ("; --quick" if bench.quick else ""))


WORKLOADS = [Get, Missing, Thrash, BigPut, Rebuild, Rebalance, Index, List]


# ---------------------------------------------------------------- the command line

def fill_main(argv):
    p = argparse.ArgumentParser(prog="bench.py fill",
                                description="Write N records /fill/%09d straight into an mkv index.")
    p.add_argument("--db", required=True, help="the SQLite index file (created if missing)")
    p.add_argument("--keys", type=int, required=True, help="how many records")
    p.add_argument("--volumes", default=os.environ.get("MKV_VOLUMES"),
                   help="volume servers H:P,H:P,... (default: $MKV_VOLUMES)")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("MKV_REPLICAS", REPLICAS)))
    p.add_argument("--subvolumes", type=int, default=int(os.environ.get("MKV_SUBVOLUMES", SUBVOLUMES)))
    p.add_argument("--start", type=int, default=0, help="first key number (default 0)")
    args = p.parse_args(argv)
    volumes = [v for v in (args.volumes or "").split(",") if v]
    if not volumes:
        p.error("name the volumes with --volumes or MKV_VOLUMES")
    if args.keys < 1 or not 1 <= args.replicas <= len(volumes) or not 1 <= args.subvolumes <= 256:
        p.error("--keys >= 1, 1 <= --replicas <= volumes, 1 <= --subvolumes <= 256")
    progress = every(5, lambda done, took: print(f"fill: {done:,} keys, {took:.0f} s", file=sys.stderr, flush=True),
                     last_done=args.keys)
    took = fill(args.db, args.keys, volumes, args.replicas, args.subvolumes, args.start, progress)
    size = index_size(args.db)
    print(f"fill: {args.keys:,} keys in {took:.1f} s ({args.keys / took:,.0f} keys/s); "
          f"{args.db} is {size / MB:,.1f} MB, {size / args.keys:.0f} B/key")
    return 0


def parse_args(argv):
    """(the options, the names of the chosen workloads)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, small data: under 3 minutes")
    p.add_argument("--rounds", type=int, default=3, help="rounds per workload, best kept (default %(default)s)")
    p.add_argument("--only", metavar="NAME,...", help="these workloads: " + ",".join(w.name for w in WORKLOADS))
    p.add_argument("--duration", type=int, help="seconds of each wrk run (default 5, 2 with --quick)")
    p.add_argument("--tmp", help="folder for the temporary cluster (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    names = [w.name for w in WORKLOADS]
    chosen = [n for n in (args.only or ",".join(names)).split(",") if n]
    unknown = [n for n in chosen if n not in names]
    if unknown or args.rounds < 1:
        p.error(f"unknown workload {','.join(unknown)} (known: {','.join(names)})" if unknown
                else "--rounds must be at least 1")
    return args, chosen


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fill"]:
        return fill_main(argv[1:])
    args, chosen = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    bench = Bench(args)
    rows, failed = [], False
    try:
        for cls in WORKLOADS:
            if cls.name in chosen:
                row, ran = run(bench, cls, args.rounds)
                rows.append(row)
                failed = failed or not ran
    finally:
        bench.close()
    print_table(rows)
    print()
    print(machine_line(bench))
    print(f"bench: took {time.monotonic() - began:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
