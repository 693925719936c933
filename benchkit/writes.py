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
from benchkit.workload import Workload


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
