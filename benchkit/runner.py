"""Running one workload: set up, rounds of limit and mkv alternating, the best
of each side, teardown; its row of the table, or a row saying it failed."""
import time

from benchkit.common import say


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
