"""get and missing: GETs of one key, existing (302) or missing (404), from the
master, against bare nginx answering `return 302`."""
from benchkit.common import http
from benchkit.workload import Workload
from benchkit.wrk import ensure_wrk, wrk


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
