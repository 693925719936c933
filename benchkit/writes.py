"""thrash and bigput: writes through the master against the same work sent
straight to the volumes (thrasher.py --direct; three PUTs at once)."""
import hashlib
import os
import re
import subprocess
import sys
import time

from benchkit.common import MB, ensure_curl, failure, http, peak_rss, timed
from benchkit.mkvdata import direct_urls
from benchkit.peer import thrasher_rate
from benchkit.workload import Workload


class Thrash(Workload):
    name, goal, sizes = "thrash", 0.85, (1000, 10000)
    title = "write/read/delete, 1 KB values, 16 at once ({keys:,} keys)"
    note = "thrasher.py; limit: --direct, per key 3 PUTs, 1 GET, 3 DELETEs to nginx"

    def run(self, where):
        size = [] if "--size" in where else ["--size", "1K"]
        took, p = timed([sys.executable, "thrasher.py", *where, "--keys", str(self.keys), *size,
                         "--concurrency", "16"])
        m = re.search(r"^thats ([\d.]+)/sec$", p.stdout, re.M)
        if p.returncode != 0 or not m or " 0 failed" not in p.stdout:
            raise failure(f"thrasher.py {' '.join(where)}", p)
        rate = float(m.group(1))
        return {"value": rate, "text": f"{rate:,.0f} keys/s"}

    def mkv(self):
        return self.run(["--master", f"127.0.0.1:{self.b.cluster().master.port}"])

    def limit(self):
        return self.run(["--direct", ",".join(self.b.cluster().volume_names())])

    def go(self):
        return self.run(["--master", f"127.0.0.1:{self.b.go_master().port}"])


class GoThrash(Thrash):
    """The original's own tools/thrasher.go (10,000 keys of about 25 bytes,
    PUT, GET through the redirect, DELETE, 16 at once) against each master."""
    name, goal, sizes, needs_peer = "gothrash", 0.6, None, True
    goal_vs_go = True
    title = "the original's tools/thrasher.go (10,000 keys, 16 at once)"
    note = "goal: mkv/Go; limit: thrasher.py --direct --size 25 (its values' size), 10,000 keys"

    def setup(self):
        if self.b.peer is None:
            raise RuntimeError("needs the Go original: bench.py --peer DIR")
        self.keys = 10000

    def go_thrasher(self, port):
        took, p = timed([self.b.peer.thrasher(port)], timeout=900)
        rate = thrasher_rate(p.stdout)
        errors = [line for line in p.stdout.splitlines() if "FAILED" in line or "ERROR" in line]
        if p.returncode != 0 or rate is None or errors:
            raise RuntimeError(f"thrasher.go on :{port}: exit {p.returncode}, {len(errors)} errors: "
                               f"{(errors or [p.stdout[-300:]])[0]}")
        return {"value": rate, "text": f"{rate:,.0f} keys/s"}

    def mkv(self):
        return self.go_thrasher(self.b.cluster().master.port)

    def go(self):
        return self.go_thrasher(self.b.go_master().port)

    def limit(self):
        return self.run(["--direct", ",".join(self.b.cluster().volume_names()), "--size", "25"])


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

    def go(self):
        self.count += 1
        url = f"http://127.0.0.1:{self.b.go_master().port}/bench/go-big-{self.count}"
        start = time.monotonic()
        out, err = self.curl_put(url).communicate(timeout=600)
        took = time.monotonic() - start
        if "status 201" not in out:
            raise RuntimeError(f"PUT {url} of 256 MB (Go): {out}{err}")
        http("DELETE", url)
        rate = self.size / MB / took
        return {"value": rate, "text": f"{rate:,.0f} MB/s"}

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

    def met(self, mkv, limit, ratio, go=None):
        return ratio >= self.goal and mkv["rss"] <= 64 * MB
