"""Answers read as they come, not in the order their requests were sent:
a fan of requests to several servers (mkvlib.http's Pool.fan, mkvlib.exchange)
times each server's answer, and a slow or frozen server must not have its
delay charged to the servers read after it (nor a frozen server cost a
timeout per server). One poll over the fan's sockets while more than one
answer is awaited; a plain receive for the last one. The same code under
gevent (the master: the wait lets the worker's other greenlets run) and
without (the tools: the system's poll waits).

A connection is handed over on the first bytes of its answer, and its
caller reads that answer whole before asking for the next: a server that
sends part of an answer and then stalls holds the others up until its
socket's timeout, and their times include that wait (as before this
module; nginx sends a small answer in one piece)."""
import select
import socket
import sys
import time
from time import perf_counter

# the system's poll, not gevent's: a look that never waits needs no greenlet
# switch. gevent is not imported for it (a tool never patches anything, and
# importing gevent is a fifth of a tool's start-up): a process that has
# patched select has gevent.monkey loaded, and gets the original from it.
_monkey = sys.modules.get("gevent.monkey")
system_poll = _monkey.get_original("select", "poll") if _monkey is not None else select.poll


def gevent_wait(conns, timeout):
    """Let the worker's other greenlets run until bytes come on one of
    `conns` or `timeout` seconds pass. Each Conn keeps its read watcher
    (conn.watcher): started here, stopped before this returns (gevent's
    own select.poll makes new ones at each call, and costs a volume
    request of a small PUT about ten times as much)."""
    from gevent.hub import Waiter, get_hub     # loaded already: the process patched select
    hub = get_hub()
    waiter = Waiter(hub)
    timer = hub.loop.timer(timeout)
    started = []
    try:
        for c in conns:
            if c.watcher is None:
                c.watcher = hub.loop.io(c.sock.fileno(), 1)    # 1: readable
            c.watcher.start(waiter.switch, None)
            started.append(c.watcher)
        timer.start(waiter.switch, None)
        waiter.get()
    finally:
        timer.close()
        for watcher in started:
            watcher.stop()


def arrivals(waiting, timeout, end=None, again=None):
    """For each (conn, started) of `waiting`, as the first bytes of an
    answer come on it, in that order (not the order sent): (its index in
    `waiting`, seconds from `started` to then, None); or (index, None, the
    error) for one that got nothing: socket.timeout if nothing came on any
    within `timeout` of the last that did (or by the time.monotonic()
    `end`), so a frozen server costs that once, not once per server. The
    caller reads the answer before it asks for the next; `again(index)`:
    true if that conn has another answer to come (it is waited for again).

    Bytes in a conn's hand come first; else one look of the system's poll
    (no greenlet switch); else a wait: gevent's under gevent (the worker's
    other greenlets run meanwhile), the system's poll in a tool."""
    left = {}              # fd -> (index, conn, started) of those awaited
    look = system_poll()
    for k, (conn, started) in enumerate(waiting):
        fd = conn.sock.fileno()
        left[fd] = (k, conn, started)
        look.register(fd, select.POLLIN)
    while left:
        ready = [fd for fd, (_, conn, _) in left.items() if not conn.clean()]
        if not ready and len(left) == 1:    # nothing else to watch meanwhile: a plain receive
            (fd, (k, conn, _)), = left.items()
            try:
                if end is not None:
                    conn.sock.settimeout(max(end - time.monotonic(), 0.001))
                conn.more()
            except OSError as e:
                yield k, None, e
                return
            ready = [fd]
        elif not ready:
            until = time.monotonic() + timeout if end is None else end
            got = look.poll(0)     # what came already is timed without a greenlet switch
            while not got and time.monotonic() < until:    # a wake-up with nothing to read waits on
                wait = max(until - time.monotonic(), 0.001)
                if select.poll is system_poll:     # no gevent: the system's poll waits
                    got = look.poll(wait * 1000)
                else:
                    gevent_wait([conn for _, conn, _ in left.values()], wait)
                    got = look.poll(0)
            if not got:
                for k, _, _ in list(left.values()):
                    yield k, None, socket.timeout("timed out")
                return
            ready = [fd for fd, _ in got]
        now = perf_counter()
        for fd in ready:
            k, conn, started = left[fd]
            yield k, now - started, None
            if again is None or not again(k):
                del left[fd]
                look.unregister(fd)
