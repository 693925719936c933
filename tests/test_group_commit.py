"""Group commit (mkvlib.groupcommit): the index writes that a master
worker's greenlets want at the same moment share one transaction, on a real
SQLite file, read back through a connection of another Index (as another
process would). Greenlets here run as in a gevent worker; SQLite calls do
not yield, so no monkey-patching is needed."""
import sqlite3

import gevent
import gevent.event
import pytest

from mkvlib.errors import KeyExists
from mkvlib.groupcommit import GroupCommit, under_gevent
from mkvlib.index import LIVE, WRITING, Index

VOLUMES = ["127.0.0.1:1/sv01", "127.0.0.1:2/sv02", "127.0.0.1:3/sv03"]


@pytest.fixture
def grouped(tmp_path):
    """(Index with group commit, another Index on the same file)."""
    index = Index(str(tmp_path / "index.sqlite3"))
    index.db.group = under_gevent(index.db)
    other = Index(str(tmp_path / "index.sqlite3"))
    yield index, other
    index.close()
    other.close()


def all_at_once(*calls):
    """Run each call in a greenlet of its own, started together; their
    greenlets (value or exception), in order."""
    greenlets = [gevent.spawn(call) for call in calls]
    gevent.joinall(greenlets)
    return greenlets


def test_writes_wanted_at_once_share_one_transaction_and_all_commit(grouped):
    index, other = grouped
    keys = [b"/g/%d" % i for i in range(8)]
    done = all_at_once(*[lambda k=k: index.start_put(k, VOLUMES, f"owner-{k.decode()}", tmp="t")
                         for k in keys])
    assert all(g.successful() for g in done)
    assert (index.db.group.groups, index.db.group.grouped) == (1, 8)
    for k in keys:
        rec = other.get(k)
        assert rec.state == WRITING and rec.lock_owner == f"owner-{k.decode()}"
        assert set(other.notes(k)) == set(VOLUMES)


def test_a_write_refused_in_a_group_before_it_writes_leaves_the_others_to_commit(grouped):
    index, other = grouped
    index.insert_live([(b"/g/live", VOLUMES, "m" * 32, 5)])
    done = all_at_once(lambda: index.start_put(b"/g/a", VOLUMES, "a", tmp="t"),
                       lambda: index.start_put(b"/g/live", VOLUMES, "b", tmp="t"),
                       lambda: index.start_put(b"/g/c", VOLUMES, "c", tmp="t"))
    assert index.db.group.groups == 1
    assert isinstance(done[1].exception, KeyExists)
    assert done[0].successful() and done[2].successful()
    assert other.get(b"/g/a").state == other.get(b"/g/c").state == WRITING
    live = other.get(b"/g/live")
    assert (live.state, live.lock_owner) == (LIVE, None) and other.notes(b"/g/live") == {}


def test_a_write_that_fails_after_changing_rows_leaves_nothing_and_the_others_commit(grouped):
    index, other = grouped

    def note_then_fail(db):
        db.execute("INSERT INTO pending_deletes (key, volume, since) VALUES (?, ?, 0)", (b"/g/half", VOLUMES[0]))
        raise KeyExists("refused halfway")
    done = all_at_once(lambda: index.start_put(b"/g/p", VOLUMES, "p", tmp="t"),
                       lambda: index.db.transact(note_then_fail),
                       lambda: index.start_put(b"/g/q", VOLUMES, "q", tmp="t"))
    assert isinstance(done[1].exception, KeyExists)
    assert other.notes(b"/g/half") == {}
    assert other.get(b"/g/p").lock_owner == "p" and other.get(b"/g/q").lock_owner == "q"


def test_an_sqlite_error_in_a_group_writes_each_of_the_others_alone(grouped):
    index, other = grouped
    broken = lambda db: db.execute("INSERT INTO no_such_table VALUES (1)")   # noqa: E731
    done = all_at_once(lambda: index.start_put(b"/g/x", VOLUMES, "x", tmp="t"),
                       lambda: index.db.transact(broken),
                       lambda: index.start_put(b"/g/y", VOLUMES, "y", tmp="t"))
    assert isinstance(done[1].exception, sqlite3.OperationalError)
    assert done[0].successful() and done[2].successful()
    assert other.get(b"/g/x").lock_owner == "x" and other.get(b"/g/y").lock_owner == "y"
    assert index.db.connection.in_transaction is False


def test_each_caller_returns_after_the_commit_of_its_write(grouped):
    index, other = grouped
    seen = []

    def put_then_look(key):
        index.start_put(key, VOLUMES, "o", tmp="t")
        seen.append(other.get(key))      # another process's view, the moment the call returns
    all_at_once(*[lambda k=k: put_then_look(k) for k in (b"/g/1", b"/g/2", b"/g/3")])
    assert len(seen) == 3 and all(rec is not None and rec.state == WRITING for rec in seen)


def gathering_long(index):
    """A group commit whose first writer gathers for 0.2 s (instead of one
    turn of the loop), so that a test can act while it does."""
    index.db.group = GroupCommit(index.db, lambda: gevent.sleep(0.2), gevent.event.Event)


def test_a_first_writer_cut_off_while_gathering_leaves_the_others_written(grouped):
    index, other = grouped
    gathering_long(index)
    first = gevent.spawn(index.start_put, b"/g/first", VOLUMES, "f", tmp="t")
    second = gevent.spawn(index.start_put, b"/g/second", VOLUMES, "s", tmp="t")
    gevent.sleep(0.05)         # both wait now: the first gathers, the second joined its group
    first.kill()               # as a graceful stop's GreenletExit would
    second.join()
    assert second.successful() and other.get(b"/g/second").lock_owner == "s"
    assert other.get(b"/g/first") is None          # cut off before its group began: never written


def test_a_writer_cut_off_while_waiting_is_never_written_if_its_group_had_not_begun(grouped):
    index, other = grouped
    gathering_long(index)
    first = gevent.spawn(index.start_put, b"/g/first", VOLUMES, "f", tmp="t")
    second = gevent.spawn(index.start_put, b"/g/second", VOLUMES, "s", tmp="t")
    gevent.sleep(0.05)
    second.kill()              # while the first still gathers
    first.join()
    second.join()
    assert first.successful() and other.get(b"/g/first").lock_owner == "f"
    assert other.get(b"/g/second") is None
    assert index.db.group.grouped == 1
