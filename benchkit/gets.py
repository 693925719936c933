"""get and missing: GETs of one key, existing (302) or missing (404), from the
master, against bare nginx answering `return 302` (and the Go original's
master); bare and bare-missing: the same against a bare WSGI function under
the same gunicorn."""
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
        if self.b.peer is not None and self.runs_go():
            self.go_url = f"http://127.0.0.1:{self.b.go_master().port}/bench/go-{self.path.rsplit('/', 1)[1]}"
            if self.expect == 302:
                r = http("PUT", self.go_url, data=b"x" * 1024)
                if r.status_code not in (201, 403):
                    raise RuntimeError(f"PUT {self.go_url} (Go): {r.status_code} {r.text}")
            r = http("GET", self.go_url)
            if r.status_code != self.expect:
                raise RuntimeError(f"GET {self.go_url} (Go): {r.status_code}, not {self.expect}")

    def mkv(self):
        # the master's answers are counted by status (wrk's Lua costs it little at
        # a few thousand per second); nginx's only by wrk's non-2xx/3xx count
        return self.served(wrk(self.b.cluster().url(self.path), self.b.duration, tally=True), self.expect)

    def go(self):
        # the original HEADs a volume before each 302 (not before a 404)
        return self.served(wrk(self.go_url, self.b.duration, tally=True), self.expect)

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


class Bare(Get):
    """mkv's GET against a bare WSGI function (benchkit/bare.py) under the
    same gunicorn command: the app's own cost (the issue's item 2a)."""
    name, title, goal = "bare", "GET of an existing key (302), against a bare WSGI function", 0.9
    note = ("limit: benchkit/bare.py (one SQLite lookup, then a 302 or a 404) under the same "
            "gunicorn -w 2 (gunicorn.conf.py's worker)")

    def runs_go(self):
        return False

    def setup(self):
        super().setup()
        r = http("GET", f"http://127.0.0.1:{self.b.bare().port}{self.path}")
        if r.status_code != self.expect:
            raise RuntimeError(f"GET {self.path} of the bare function: {r.status_code}, not {self.expect}")

    def limit(self):
        return self.served(wrk(f"http://127.0.0.1:{self.b.bare().port}{self.path}", self.b.duration, tally=True),
                           self.expect)


class BareMissing(Bare):
    name, title = "bare-missing", "GET of a missing key (404), against a bare WSGI function"
    path, expect = Missing.path, 404
