"""Answers read as they come (mkvlib.arrivals), against small servers on
loopback that answer late: each server's time is its own, never the wait for
another server's answer read before it, and the answers still come back in
the order of the calls."""
import time

from mkvlib.exchange import exchange
from mkvlib.http import Pool, request
from test_volume_client import fake_volume

SLOW = 0.3        # seconds the slow server waits before each answer


def late_server(delay):
    """A server on a free loopback port that answers every request (heads
    only, pipelined ones in order) with a 200 whose body is its path, `delay`
    seconds after the request came; `delay` None: it never answers."""
    def serve(conn):
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                got = conn.recv(65536)
                if not got:
                    return
                data += got
            head, data = data.split(b"\r\n\r\n", 1)
            if delay is None:
                continue
            time.sleep(delay)
            path = head.split(b" ")[1]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
    return fake_volume(serve)


def test_a_fan_times_each_answer_from_its_own_send_not_behind_a_slow_one_read_first():
    slow, fast = late_server(SLOW), late_server(0)
    times = []
    got = Pool(timeout=5).fan("GET", [(slow, "/first", b""), (fast, "/second", b""), (slow, "/third", b"")],
                              times=times)
    assert got == [(200, b"/first"), (200, b"/second"), (200, b"/third")]    # in the order of the calls
    assert times[0] >= SLOW and times[2] >= SLOW
    assert times[1] < SLOW / 2, times     # read before the slow ones, whose requests went first


def test_a_fan_with_two_frozen_servers_costs_its_timeout_once():
    frozen = [late_server(None), late_server(None)]
    fast = late_server(0)
    times = []
    started = time.monotonic()
    got = Pool(timeout=1.0).fan("HEAD", [(frozen[0], "/a", b""), (frozen[1], "/b", b""), (fast, "/c", b"")],
                                times=times)
    took = time.monotonic() - started
    assert [type(r).__name__ for r in got[:2]] == ["NoAnswer", "NoAnswer"] and got[2][0] == 200
    assert times[:2] == [None, None] and times[2] < 0.5
    assert took < 1.8, took       # not a timeout per frozen server (2 s)


def test_an_exchange_times_each_answer_of_each_server_from_the_send():
    slow, fast = late_server(SLOW), late_server(0)
    two = request("GET", slow, "/1") + request("GET", slow, "/2")
    times = []
    got = exchange(Pool(timeout=5), [(slow, two, 2), (fast, request("GET", fast, "/x") + request("GET", fast, "/y"), 2)],
                   times=times)
    assert got == [([(200, b"/1"), (200, b"/2")], None), ([(200, b"/x"), (200, b"/y")], None)]
    assert SLOW <= times[0][0] < times[0][1]     # the server answers them one after the other
    assert times[0][1] >= 2 * SLOW
    assert max(times[1]) < SLOW / 2, times


UNDER_GEVENT = """
from gevent import monkey; monkey.patch_all()     # as a gunicorn gevent worker does, before anything else
import select, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from mkvlib import arrivals
assert select.poll is not arrivals.system_poll    # the wait is gevent's: arrivals.gevent_wait
import test_arrivals
for name in sys.argv[2:]:
    getattr(test_arrivals, name)()
    print(name, "passed", flush=True)
"""


def test_the_same_fans_and_exchanges_under_gevent():
    import subprocess
    import sys
    from conftest import ROOT
    names = ["test_a_fan_times_each_answer_from_its_own_send_not_behind_a_slow_one_read_first",
             "test_a_fan_with_two_frozen_servers_costs_its_timeout_once",
             "test_an_exchange_times_each_answer_of_each_server_from_the_send"]
    p = subprocess.run([sys.executable, "-c", UNDER_GEVENT, ROOT, *names], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.count(" passed") == len(names), p.stdout + p.stderr
