"""index and list: random GETs and ?list pages on a master over a big filled
index (10,000,000 keys, 200,000 with --quick) against one over 1,000 keys."""
from benchkit.common import http
from benchkit.workload import Workload
from benchkit.wrk import ensure_wrk, random_key_lua, unexpected, wrk


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
    lower_is_better = True

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

    def goal_text(self):
        return f"p99 <= {self.goal:.0f} ms"

    def met(self, mkv, limit, ratio, go=None):
        return mkv["value"] <= self.goal
