"""A plain GET or HEAD of a key answered in one index statement
(Master.answer_plain, Store.find, Index.live): the very status and headers
Falcon gives it, no volume the health view has down, every request counted,
and never a row another greenlet has not committed. In-process over the
shared cluster's real volumes (their prober's looks) and a real index; the
same path serves every GET of the real masters in the other tests."""
import subprocess
import sys
import textwrap

import falcon.testing
import pytest

import mkv
from conftest import ROOT
from mkvlib.frozenheaders import TAKEN
from mkvlib.index import Index
from mkvlib.metrics import Counted
from mkvlib.settings import Settings


@pytest.fixture
def lean(cluster, tmp_path):
    """(the WSGI app, its Master, settings) of a master over the shared
    cluster's volumes, one replica per key, on an index of its own."""
    settings = Settings.from_env(volumes=cluster.volume_names(), db=str(tmp_path / "index.sqlite3"),
                                 replicas=1, subvolumes=1)
    master = mkv.Master(settings)
    master.store.prober.every = 3600    # its first look vouches for the volumes; no thread left asking
    return mkv.create_app(settings, master=master), master, settings


def answer_of(app, environ):
    seen = []
    body = app(environ, lambda status, headers, exc_info=None: seen.extend([status, headers]))
    return seen[0], seen[1], b"".join(body)


def record(settings, key, volumes, md5):
    Index(settings.db).insert_live([(key, volumes, md5, 1)])


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_plain_read_has_falcons_very_status_and_headers(lean, method):
    app, master, settings = lean
    placed = settings.placement(b"/lean/balanced")
    elsewhere = next(v for v in settings.volumes if v not in settings.placement(b"/lean/unbalanced"))
    record(settings, b"/lean/balanced", placed, "ab" * 16)
    record(settings, b"/lean/unbalanced", [elsewhere], None)     # a record without md5 (rebuilt)
    for key in ("/lean/balanced", "/lean/unbalanced", "/lean/missing"):
        environ = falcon.testing.create_environ(path=key, method=method)
        lean_answer = master.answer_plain(dict(environ))
        assert lean_answer is not None, key                    # the lean path answered it
        through_falcon = answer_of(app.falcon_app, dict(environ))
        assert lean_answer == through_falcon[:2], key
        assert answer_of(app, dict(environ)) == (*lean_answer, b"")
    headers = dict(master.answer_plain(falcon.testing.create_environ(path="/lean/balanced", method=method))[1])
    assert headers["key-balance"] == "balanced" and headers["content-md5"] == "ab" * 16
    assert headers["location"].startswith(f"http://{placed[0]}/")


def test_a_keys_answer_is_made_once_and_made_anew_the_moment_its_row_changes(lean):
    app, master, settings = lean
    key, (one, other) = b"/lean/kept", settings.volumes[:2]
    record(settings, key, [one], "ab" * 16)
    environ = dict(falcon.testing.create_environ(path="/lean/kept"), **{TAKEN: True})   # as worker.MkvWorker's
    answers = [master.answer_plain(dict(environ)) for _ in range(4)]
    assert all(answer == answer_of(app.falcon_app, dict(environ))[:2] for answer in answers)
    assert answers[3][1] is answers[2][1]     # kept from the key's second GET on: the worker checks it once
    plain = master.answer_plain(falcon.testing.create_environ(path="/lean/kept"))[1]
    assert type(plain) is list and plain == answers[2][1]    # PEP 3333's list, to any other server
    for md5, volumes in [("cd" * 16, one), ("cd" * 16, other), (None, other)]:   # as a PUT, a move, a rebuild
        with Index(settings.db).db.write() as db:                              # in another process
            db.execute("UPDATE keys SET md5 = ?, volumes = ? WHERE key = ?", (md5, volumes, key))
        for _ in range(3):
            answer = master.answer_plain(dict(environ))
            assert answer == answer_of(app.falcon_app, dict(environ))[:2]
            assert dict(answer[1]).get("content-md5") == md5 and f"http://{volumes}/" in dict(answer[1])["location"]
    with Index(settings.db).db.write() as db:
        db.execute("UPDATE keys SET state = 'unlinked' WHERE key = ?", (key,))
    assert master.answer_plain(dict(environ)) == (mkv.NOT_FOUND, mkv.MISSING_HEADERS)


def test_a_read_whose_drawn_replica_is_down_goes_to_one_that_is_up(lean):
    app, master, settings = lean
    volumes = list(settings.volumes[:2])
    record(settings, b"/lean/two", volumes, "cd" * 16)
    master.store.health.failed(volumes[0], "down for this test")
    environ = falcon.testing.create_environ(path="/lean/two")
    for _ in range(40):    # the draw takes the down one about half the time: locate() answers those
        status, headers, _ = answer_of(app, dict(environ))
        assert status == "302 Found" and dict(headers)["location"].startswith(f"http://{volumes[1]}/")


def test_every_quick_read_is_counted_in_its_row(lean):
    app, master, settings = lean
    record(settings, b"/lean/counted", list(settings.placement(b"/lean/counted")), "ef" * 16)
    counted = Counted(app)
    for path, method in [("/lean/counted", "GET")] * 3 + [("/lean/counted", "HEAD"), ("/lean/nothing", "GET")]:
        counted(falcon.testing.create_environ(path=path, method=method), lambda *a: None)
    rows = counted.tally.rows
    assert {key: row[0] for key, row in rows.items()} == {
        ("GET", "redirect", 302): 3, ("HEAD", "redirect", 302): 1, ("GET", "404", 404): 1}
    assert all(sum(row[4:]) == row[0] for row in rows.values())     # each one in a latency bucket


def test_a_quick_read_that_fails_is_answered_as_every_error(lean):
    app, master, settings = lean

    def broken(key):
        import sqlite3
        raise sqlite3.OperationalError("disk I/O error")
    master.store.index.live = broken
    master.store.index.get = broken
    counted = Counted(app)
    seen = []
    body = counted(falcon.testing.create_environ(path="/lean/broken"), lambda s, h, e=None: seen.append(s))
    assert seen == ["503 Service Unavailable"]
    assert b"".join(body) == b"index error (MKV_DB): disk I/O error; see the master's log\n"
    assert list(counted.tally.rows) == [("GET", "redirect", 503)]


LOOKUP_UNDER_GEVENT = """
from gevent import monkey
monkey.patch_all()
import gevent, sys
from mkvlib.index import Index, LIVE
index = Index(sys.argv[1])
assert index.live.__self__.lockless, "greenlets only: the lookup goes without the mutex"
seen = []

def writer():
    try:
        with index.db.write() as db:
            db.execute("INSERT INTO keys (key, state, volumes) VALUES (?, ?, 'v:1')", (b"/k", LIVE))
            gevent.sleep(0.2)              # a writer waiting inside its transaction
            raise RuntimeError("rolled back")
    except RuntimeError:
        seen.append("rolled back")

def reader():
    gevent.sleep(0.05)                     # inside the writer's transaction
    seen.append(index.live(b"/k"))

gevent.joinall([gevent.spawn(writer), gevent.spawn(reader)])
print(seen)
"""


def under_gevent(tmp_path, script):
    """What `script` prints, run in a process that gevent has patched, on an index in tmp_path."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    out = subprocess.run([sys.executable, str(path), str(tmp_path / "index.sqlite3")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_lookup_never_sees_a_row_another_greenlet_has_not_committed(tmp_path):
    # the reader waited for the transaction's end (the mutex), and found nothing
    assert under_gevent(tmp_path, LOOKUP_UNDER_GEVENT) == "['rolled back', None]"


LOOKUP_DURING_A_REOPEN = """
from gevent import monkey
monkey.patch_all()
import gevent, sqlite3, sys
from mkvlib.index import Index, LIVE
index = Index(sys.argv[1])
index.db.connection.execute("INSERT INTO keys (key, state, volumes) VALUES (?, ?, 'v:1')", (b"/k", LIVE))
index.live(b"/k")                          # its cursor made on the first connection
seen = []

def reopen():                              # as Database._reopen_if_writable, waiting in the middle
    with index.db._mutex:
        index.db.connection.close()
        gevent.sleep(0.1)
        index.db.connection = sqlite3.connect(sys.argv[1], isolation_level=None, check_same_thread=False)

def reader():
    gevent.sleep(0.02)
    seen.append(index.live(b"/k"))

gevent.joinall([gevent.spawn(reopen), gevent.spawn(reader)])
print(seen)
"""


def test_a_lookup_during_a_reopen_of_the_index_reads_after_it(tmp_path):
    assert under_gevent(tmp_path, LOOKUP_DURING_A_REOPEN) == "[('v:1', None)]"
