"""Running one workload: set up, rounds of its sides alternating (the limit,
mkv, and the Go original when bench.py has --peer and the workload can run
it), the best of each side, teardown; its row of the table, or a row saying
it failed."""
import time

from benchkit.common import say

MET = {True: "yes", False: "no", None: "needs --peer"}   # the "met" column


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
        return (w.title, "failed", "", "", w.goal_text(), "", "", "",
                f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"), False
    finally:
        try:
            w.teardown()
        except Exception as e:
            say(f"{w.name} teardown: {type(e).__name__}: {e}")
        say(f"{w.name}: {time.monotonic() - started:.0f} s")


def sides(w):
    """[(side, function)]: the limit and mkv, and Go when it runs here."""
    out = [("limit", w.limit), ("mkv", w.mkv)]
    if w.b.peer is not None and w.runs_go():
        out.append(("go", w.go))
    return out


def measure(w, rounds):
    """Best of `rounds` of the set-up workload `w` on each side: its row
    (workload, mkv, limit, ratio, goal, met, Go, mkv/Go, notes)."""
    results = {}
    for r in range(rounds):
        fns = dict(sides(w))
        for side in w.order(list(fns), r):
            fn = fns[side]
            w.side = side
            results.setdefault(side, []).append(fn())
            w.load.append(_load())
            say(f"{w.name} round {r + 1}: {side} {results[side][-1]['text']} (load {w.load[-1]:.2f})")
    mkv, limit = w.best(results["mkv"]), w.best(results["limit"])
    ratio = w.ratio(mkv, limit)
    go = None
    go_text = go_ratio = ""
    if "go" in results:
        go = w.best(results["go"])
        go_text, go_ratio = go["text"], f"{w.ratio(mkv, go):.2f}"
    w.notes.append(f"load {min(w.load):.1f} to {max(w.load):.1f}")
    return (w.title, mkv["text"], limit["text"], f"{ratio:.3f}", w.goal_text(),
            MET[w.met(mkv, limit, ratio, go)], go_text, go_ratio, "; ".join(dict.fromkeys(w.notes)))


def _load():
    import os
    return os.getloadavg()[0]
