"""Workload: what the runner asks of every workload.

The runner makes one per run (cls(bench)), calls setup(), then for each round
limit(), mkv() and, with bench.py --peer and runs_go(), go() (the Go
original's master or tool on the same volumes), in the order order() gives
(each first in turn; `side` names the one running), each returning a result
dict with at least 'text'; then best() of each side, ratio(mkv, limit)
(higher is better for mkv) and ratio(mkv, go), goal_text() and met() for the
table; teardown() always. Notes added to `notes` go to the row's notes
column, once each."""
from benchkit.wrk import good_rate, unexpected


class Workload:
    name = title = goal = ""
    sizes = None      # (keys with --quick, keys without) of a workload over a number of keys
    note = ""         # a first note, if any
    needs_peer = False   # runs only with bench.py --peer (left out of the default run without it)

    def __init__(self, bench):
        self.b = bench
        self.notes = [self.note] if self.note else []
        self.side = "mkv"      # which side the runner measures now: "mkv", "limit" or "go"
        self.load = []         # the load average after each measurement
        if self.sizes:
            self.keys = self.sizes[0] if bench.quick else self.sizes[1]
            self.title = self.title.format(keys=self.keys)

    def setup(self):
        pass

    def teardown(self):
        pass

    def order(self, sides, round_no):
        """The sides in the order of round `round_no`: each goes first in turn."""
        shift = round_no % len(sides)
        return sides[shift:] + sides[:shift]

    def runs_go(self):
        """True if go() can run this workload against the Go original."""
        return type(self).go is not Workload.go

    def go(self):
        raise NotImplementedError

    lower_is_better = False     # True for a latency: the best round is the lowest

    def best(self, results):
        return (min if self.lower_is_better else max)(results, key=lambda r: r["value"])

    def ratio(self, mkv, limit):
        """mkv / limit for a rate, limit / mkv for a latency: higher is better either way."""
        mkv, limit = mkv["value"], limit["value"]
        return limit / mkv if self.lower_is_better else mkv / limit

    goal_vs_go = False   # True: the goal is a ratio to the Go original's best round, not to the limit

    def goal_text(self):
        return f"mkv/Go >= {self.goal}" if self.goal_vs_go else f">= {self.goal}"

    def met(self, mkv, limit, ratio, go=None):
        """True or False; None when the goal is against Go and Go did not run."""
        if not self.goal_vs_go:
            return ratio >= self.goal
        return None if go is None else self.ratio(mkv, go) >= self.goal

    def served(self, w, expect):
        """The rate of the answers of the tallied wrk run `w` that had the
        status `expect`, as a result; a note of this side's other answers."""
        odd = unexpected(w, expect)
        if odd:
            self.notes.append(f"{self.side}: {odd} (not counted)")
        rate = good_rate(w, expect)
        return {"value": rate, "text": f"{rate:,.0f} req/s"}
