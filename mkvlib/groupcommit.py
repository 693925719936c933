"""Group commit: the index writes that one process's greenlets want at the
same moment share one BEGIN IMMEDIATE ... COMMIT (mkvlib.db).

Under the thrasher a master worker makes four short write transactions per
key (a PUT's claim and commit, a DELETE's start and finish), each with its
own BEGIN, COMMIT and WAL frames of the same few pages. Here a writer hands
its transaction over as a function of the connection; the first one in
yields once (pause(): every greenlet ready now runs up to its own write or
its next wait), then runs every function handed over meanwhile, in order,
in one transaction:

- each function sees the effects of those before it, as if they had
  committed one after the other; no read of the process sees any of them
  before the COMMIT (the database's mutex is held from BEGIN to COMMIT, as
  for any write, and nothing yields in between);
- a function that raises (KeyExists, KeyBusy, ...) before it has changed a
  row (the index's look before they write) gets its error; the others commit;
- if one raises after it has changed rows, or SQLite itself fails after the
  BEGIN (a statement, or the COMMIT: a full or failing disk), nothing of the
  group is written, and each function runs again alone, in a transaction of
  its own: each caller gets exactly what it would have got without group
  commit;
- each caller returns only once its own transaction has committed (or
  failed): what a caller does after the write (a request to a volume, an
  answer to a client) still comes after the write is durable, as before.

Nothing else changes: the same rows, the same order of effects per key (one
key's writes come from one request, one after another), the same
durability (synchronous=NORMAL, see docs/reliability.md). A caller cut off
while it waits (GreenletExit at a graceful stop) leaves its function to run
if the group has started, as a process killed right after its COMMIT would,
and takes it out if not.
"""
import sqlite3

from mkvlib.errors import IndexBusy


class WroteThenFailed(Exception):
    """A grouped function raised after it had changed rows: the group is
    rolled back and each function runs alone (no SAVEPOINT per function:
    two statements more each, and the index's functions raise before they
    write)."""


class Job:
    """One caller's transaction: fn(connection) and what came of it."""

    __slots__ = ("fn", "value", "error", "done")

    def __init__(self, fn):
        self.fn, self.value, self.error, self.done = fn, None, None, False

    def finish(self, value=None, error=None):
        self.value, self.error, self.done = value, error, True

    def result(self):
        if not self.done:   # its group was cut off (an error that is no Exception, in another's function)
            raise IndexBusy("the index write was cut off before it ran; try again")
        if self.error is not None:
            error, self.error = self.error, None   # no reference cycle through the traceback
            raise error
        return self.value


class Group:
    """The jobs gathered while a first caller yields, and the event its
    others wait on."""

    __slots__ = ("jobs", "done", "started")

    def __init__(self, job, event):
        self.jobs, self.done, self.started = [job], event(), False


class GroupCommit:
    """The group commit of one Database (mkvlib.db) under gevent: `pause()`
    yields to every greenlet ready now (gevent.sleep(0)), `event()` makes
    what the others wait on (gevent.event.Event). `groups` and `grouped`
    count the transactions made and the writes they held."""

    def __init__(self, database, pause, event):
        self.database, self.pause, self.event = database, pause, event
        self.gathering = None        # the Group whose first caller is yielding now
        self.groups = self.grouped = 0

    def run(self, fn):
        """fn(connection) in a write transaction, maybe shared; its value, or
        what it raised."""
        job = Job(fn)
        group = self.gathering
        if group is not None:
            group.jobs.append(job)
            try:
                group.done.wait()
            except BaseException:
                if not group.started:
                    group.jobs.remove(job)   # cut off before its group began: never runs
                raise
            return job.result()
        self.gathering = group = Group(job, self.event)
        try:
            self.pause()
        except BaseException:
            group.jobs.remove(job)   # cut off while gathering: the others' writes still run
            raise
        finally:
            self.gathering = None
            group.started = True
            try:
                self._commit(group.jobs)
            finally:
                group.done.set()
        return job.result()

    def _commit(self, jobs):
        if not jobs:
            return
        self.groups += 1
        self.grouped += len(jobs)
        if len(jobs) == 1:
            self._alone(jobs[0])
            return
        began = False
        try:
            with self.database.write() as db:
                began = True
                for job in jobs:
                    _run_grouped(db, job)
            for job in jobs:
                job.done = True    # committed: what each found or raised holds
            return
        except (sqlite3.Error, IndexBusy, WroteThenFailed) as e:
            if not began:   # the BEGIN failed (busy past busy_timeout, a read-only disk): as it would alone
                for job in jobs:
                    job.finish(error=e)
                return
        # a statement or the COMMIT failed, or a function failed halfway: nothing
        # of the group is written; each on its own, as without group commit
        for job in jobs:
            self._alone(job)

    def _alone(self, job):
        try:
            with self.database.write() as db:
                value = job.fn(db)
        except Exception as e:
            job.finish(error=e)
        else:
            job.finish(value)


def _run_grouped(db, job):
    """A job in the group's transaction. An error of its own before it
    changed a row is its outcome; after, or an error of SQLite's, goes up
    (the group falls back). Its outcome is kept, not yet done: that waits
    for the COMMIT."""
    before = db.total_changes
    try:
        job.value, job.error = job.fn(db), None
    except sqlite3.Error:
        raise
    except Exception as e:
        if db.total_changes != before:
            raise WroteThenFailed() from e
        job.value, job.error = None, e


def under_gevent(database):
    """A GroupCommit for `database` in a gevent worker (the master's)."""
    import gevent
    import gevent.event
    return GroupCommit(database, lambda: gevent.sleep(0), gevent.event.Event)
