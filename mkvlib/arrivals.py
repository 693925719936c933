"""Answers read as they come, not in the order their requests were sent:
a fan of requests to several servers (mkvlib.http's Pool.fan, mkvlib.exchange)
times each server's answer, and a slow or frozen server must not have its
delay charged to the servers read after it. One poll over the fan's sockets
while more than one answer is awaited; a plain receive for the last one.
The same code under gevent (the master: select.poll is gevent's, the worker
goes on while it waits) and without (the tools: the system's)."""
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


def readable(conns, timeout):
    """The Conns of `conns` that have bytes of an answer to read: those
    with bytes in hand or in their socket now, else the first to get some
    within `timeout` seconds; [] if none did. The look at once is the
    system's poll (no greenlet switch); the wait is select.poll as the
    process has it: gevent's in the master (the worker goes on meanwhile),
    the system's in a tool."""
    ready = [c for c in conns if not c.clean()]
    if ready:
        return ready
    by_fd = {c.sock.fileno(): c for c in conns}
    look = system_poll()
    for fd in by_fd:
        look.register(fd, select.POLLIN)
    got = look.poll(0)
    if not got and timeout > 0:
        look = select.poll()
        for fd in by_fd:
            look.register(fd, select.POLLIN)
        got = look.poll(timeout * 1000)
    return [by_fd[fd] for fd, _ in got if fd in by_fd]


def arrivals(waiting, timeout, end=None, again=None):
    """For each (conn, started) of `waiting`, as the first bytes of an
    answer come on it, in that order (not the order sent): (its index in
    `waiting`, seconds from `started` to then, None); or (index, None, the
    error) for one that got nothing: socket.timeout if nothing came on any
    within `timeout` of the last that did (or by the time.monotonic()
    `end`), so a frozen server costs that once, not once per server. The
    caller reads the answer before it asks for the next; `again(index)`:
    true if that conn has another answer to come (it is waited for again)."""
    left = dict(enumerate(waiting))
    while left:
        wait = timeout if end is None else max(end - time.monotonic(), 0.001)
        if len(left) == 1:    # nothing else to watch meanwhile: a plain receive
            (k, (conn, started)), = left.items()
            try:
                if conn.clean():
                    if end is not None:
                        conn.sock.settimeout(wait)
                    conn.more()
            except OSError as e:
                yield k, None, e
                return
            ready = [k]
        else:
            by_conn = {id(conn): k for k, (conn, _) in left.items()}
            ready = [by_conn[id(c)] for c in readable([conn for conn, _ in left.values()], wait)]
            if not ready:
                for k in list(left):
                    yield k, None, socket.timeout("timed out")
                return
        now = perf_counter()
        for k in ready:
            yield k, now - left[k][1], None
            if again is None or not again(k):
                del left[k]

