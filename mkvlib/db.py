"""SQLite under gevent: one connection per process in WAL mode, explicit
transactions (BEGIN IMMEDIATE for writes), waits for other processes that
never block the event loop, bounded WAL, and a reopen once a read-only disk
is writable again. Knows nothing of what the tables hold."""
import logging
import os
import sqlite3
import sys
import threading
import time

from mkvlib.errors import IndexBusy, SettingsError

log = logging.getLogger("mkv")

BUSY_TIMEOUT = 10.0        # seconds SQLite waits for another writer
CHECKPOINT_EVERY = 60.0    # seconds between WAL checkpoints of one process
WAL_CHECKPOINT = 16 << 20  # bytes of WAL past which a write checkpoints
CHECKPOINT_WAIT = 0.1      # seconds a checkpoint waits for readers of older snapshots
WAL_LIMIT = 64 << 20       # bytes of WAL file kept after a checkpoint (journal_size_limit)


def is_busy(error: sqlite3.Error) -> bool:
    """SQLITE_BUSY or one of its extended codes: another connection is in the way."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


def is_read_only(error: sqlite3.Error) -> bool:
    """SQLITE_READONLY, any of its kinds."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_READONLY


def is_full(error: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk (or its quota) is full."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


class Database:
    """One SQLite file, one connection, safe to share between the threads or
    greenlets of a process. `schema` (statements separated by ';\\n') and
    `setup(connection)` run in one transaction when the file is opened."""

    def __init__(self, path, schema, setup=None, busy_timeout=BUSY_TIMEOUT):
        self.path, self.schema, self.setup = path, schema, setup
        self.busy_timeout = busy_timeout
        self._mutex = threading.RLock()
        self.group = None          # a GroupCommit for transact(), or None: each on its own
        self._last_checkpoint = self._last_look = self._last_reopen = time.monotonic()
        self.connection = self._open()

    def _open(self, setup=True):
        """A connection in WAL mode, with the schema set up (unless not
        `setup`: then it never waits for another process). Two processes
        that switch a new file to WAL at once can deadlock in SQLite, which
        then answers one of them 'database is locked' at once, without its
        busy handler (the master and the S3 gateway started together did):
        the open is tried again until busy_timeout."""
        deadline = time.monotonic() + (self.busy_timeout if setup else 0)
        while True:
            try:
                return self._try_open(setup)
            except SettingsError as e:
                if not (is_busy(e.__context__) and time.monotonic() < deadline):
                    raise
            time.sleep(0.05)

    def _try_open(self, setup):
        path = self.path
        folder = os.path.dirname(os.path.abspath(path))
        db = None
        try:
            os.makedirs(folder, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=self.busy_timeout if setup else 0)
            mode = db.execute("PRAGMA journal_mode=wal").fetchone()[0]
            if mode != "wal":
                raise SettingsError(f"MKV_DB={path}: SQLite would not switch to WAL mode (got {mode})")
            # NORMAL in WAL mode survives any process crash; only power loss can
            # drop the last commits (nginx does not fsync values either).
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            if setup:
                self._set_up(db)
            # From here on SQLite never waits for a lock by itself: its busy
            # handler sleeps in C, which would stall every greenlet of a gevent
            # worker. _begin waits instead, with time.sleep (a greenlet switch there).
            db.execute("PRAGMA busy_timeout=0")
            return db
        except BaseException as e:
            if db is not None:
                db.close()
            if isinstance(e, sqlite3.Error):
                raise SettingsError(f"MKV_DB={path}: cannot open the index: {e}") from None
            if isinstance(e, OSError):
                raise SettingsError(f"MKV_DB={path}: cannot create {folder}: {e.strerror}") from None
            raise

    def _set_up(self, db):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in self.schema.split(";\n"):   # not executescript: it COMMITs first
                if statement.strip():
                    db.execute(statement)
            if self.setup is not None:
                self.setup(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _reopen_if_writable(self):
        """SQLite opens a file on a read-only disk read-only, and that
        connection stays read-only after the disk is writable again: then a
        new connection replaces it (looked at once a second at most). The old
        one is closed first: SQLite shares one WAL index per file in a
        process, and the new connection would find it read-only too. The
        schema is there already: the new connection waits for nobody."""
        now = time.monotonic()
        if now - self._last_reopen < 1.0 or not os.access(self.path, os.W_OK):
            return
        self._last_reopen = now
        with self._mutex:
            self.connection.close()
            try:
                self.connection = self._open(setup=False)
                log.warning("MKV_DB=%s is writable again: index reopened", self.path)
            except SettingsError as e:
                log.warning("the index could not be reopened: %s", e)
                self.connection = sqlite3.connect(self.path, isolation_level=None,
                                                  check_same_thread=False, timeout=0)

    def close(self):
        self.connection.close()

    # -- transactions

    class _Tx:
        def __init__(self, database, mode):
            self.database, self.mode = database, mode

        def __enter__(self):
            self.database._begin(self.mode)   # holds the mutex from here to __exit__
            return self.database.connection

        def __exit__(self, exc_type, exc, tb):
            database = self.database
            db = database.connection
            try:
                db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                try:
                    if db.in_transaction:   # COMMIT failed (disk full, I/O error): never leave it open
                        db.execute("ROLLBACK")
                finally:
                    database._mutex.release()
            if not exc_type and self.mode == "IMMEDIATE":
                database._maybe_checkpoint()
            elif isinstance(exc, sqlite3.Error) and is_read_only(exc):
                database._reopen_if_writable()
            return False

    def write(self):
        """`with db.write() as connection:` one BEGIN IMMEDIATE transaction,
        committed at the end of the block, rolled back if it raises."""
        return self._Tx(self, "IMMEDIATE")

    def transact(self, fn):
        """fn(connection) in a write transaction, committed once it returns,
        rolled back if it raises; returns its value once committed. With a
        group commit set (self.group, mkvlib.groupcommit), the transaction
        may be shared with the writes of other greenlets of this process."""
        if self.group is not None:
            return self.group.run(fn)
        with self.write() as db:
            return fn(db)

    def _patience(self):
        """Tries while another process keeps SQLite busy: yields, then sleeps
        (a greenlet switch under gevent) a little longer each time, and
        raises IndexBusy after busy_timeout."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.0005
        while True:
            yield
            if time.monotonic() > deadline:
                raise IndexBusy(f"the index stayed locked by another process for "
                                f"{self.busy_timeout:.0f} s; try again")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _begin(self, mode):
        """BEGIN, and return holding the mutex. While another process writes,
        wait without the mutex, so that this process's reads go on."""
        for _ in self._patience():
            self._mutex.acquire()
            try:
                self.connection.execute(f"BEGIN {mode}")
                return
            except sqlite3.OperationalError as e:
                self._mutex.release()
                if is_read_only(e):
                    self._reopen_if_writable()
                if not is_busy(e):
                    raise
            except BaseException:
                self._mutex.release()
                raise

    def read(self, sql, params=()):
        """Every row of a query. Under the mutex: on a connection shared by
        threads, a read in the middle of another thread's transaction would
        see its uncommitted rows. A read that finds SQLite busy (another
        process recovering the WAL after a crash, say) is tried again."""
        rows = self._read_once(sql, params)    # the common case: no clock, no generator
        if rows is None:
            for _ in self._patience():
                rows = self._read_once(sql, params)
                if rows is not None:
                    break
        return rows

    def _read_once(self, sql, params):
        """The rows of one try of a query, or None if SQLite was busy."""
        with self._mutex:
            try:
                return self.connection.execute(sql, params).fetchall()
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise
        return None

    # -- the WAL

    def checkpoint(self):
        """Copy the WAL into the database and truncate it. Returns True if it
        completed, False if a reader or writer stayed in the way.

        Under a steady stream of reads the WAL is never free to start over,
        and it grows without bound (checkpoint starvation): a TRUNCATE
        checkpoint keeps writers out and waits for the readers of older
        snapshots, whose reads take microseconds. That wait is SQLite's own
        (a sleep in C, which stalls a gevent worker), so it is short:
        CHECKPOINT_WAIT, once every CHECKPOINT_EVERY seconds."""
        try:
            with self._mutex:
                db = self.connection
                db.execute(f"PRAGMA busy_timeout={int(CHECKPOINT_WAIT * 1000)}")
                try:
                    busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    db.execute("PRAGMA busy_timeout=0")
        except sqlite3.OperationalError as e:
            if not is_busy(e):
                raise
            busy = 1
        return not busy

    def _maybe_checkpoint(self):
        """The WAL grows without bound while readers keep SQLite's automatic
        checkpoints from starting it over. After a write, at most four times
        a second, look at its size: past WAL_CHECKPOINT bytes, or
        CHECKPOINT_EVERY seconds after the last one, checkpoint."""
        now = time.monotonic()
        if now - self._last_look < 0.25:
            return
        self._last_look = now
        try:
            big = os.path.getsize(self.path + "-wal") > WAL_CHECKPOINT
        except OSError:
            big = False
        if big or now - self._last_checkpoint >= CHECKPOINT_EVERY:
            try:
                done = self.checkpoint()
            except sqlite3.Error as e:
                log.warning("checkpoint of %s failed: %s", self.path, e)
                done = False
            if done:
                self._last_checkpoint = now


def greenlets_only() -> bool:
    """True when this process's threads are gevent's greenlets (the master's
    workers: gunicorn.conf.py monkey-patches before anything else): one OS
    thread, where another greenlet runs only while this one waits on I/O or
    a gevent lock, never in the middle of a Python call into SQLite. (gevent's
    real threads, mkv.in_a_thread's, only hash: they never touch the index.)"""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


class Lookup:
    """One read statement run very often (a GET's lookup of its key), at
    about half the cost of Database.read: on a cursor of its own (a new
    cursor per query was half of SQLite's time), and without the mutex
    where that is safe.

    The mutex keeps a read out of another thread's open transaction on the
    shared connection, where it would see uncommitted rows. Among greenlets
    (greenlets_only()), a lookup runs whole before any other greenlet runs:
    nothing in it waits on I/O. So it needs the mutex only while a
    transaction is open on the connection (in_transaction: a writer that
    waited in the middle of one, which no writer does today): then it reads
    as Database.read does, mutex and all. Each lookup is its own read
    transaction (fetchall steps the statement to its end, which resets it),
    so it sees every commit of every process made before it started.
    Elsewhere (tools, threads) it is Database.read."""

    def __init__(self, database, sql):
        self.database, self.sql = database, sql
        self.lockless = greenlets_only()
        self._connection = self._cursor = None

    def first(self, *params):
        """The first row of the statement with `params`, or None."""
        database = self.database
        connection = database.connection          # a reopen replaces it
        if self.lockless:
            try:
                if not connection.in_transaction:
                    if connection is not self._connection:
                        self._connection, self._cursor = connection, connection.cursor()
                    rows = self._cursor.execute(self.sql, params).fetchall()
                    return rows[0] if rows else None
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise
            except sqlite3.ProgrammingError:
                pass    # closed by a reopen under way (which holds the mutex): read after it
        rows = database.read(self.sql, params)    # busy (Database.read waits and retries), or locked
        return rows[0] if rows else None
