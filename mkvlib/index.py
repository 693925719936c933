"""The index: one record per key (its state, replicas, md5, size and
per-key lock) and the notes of unvouched copies, kept in SQLite (mkvlib.db),
and the per-key protocol every writer follows: claim, finish or abandon a
PUT; start and finish a DELETE; lock, note, list."""
import dataclasses
import time

from mkvlib.db import BUSY_TIMEOUT, Database, Lookup
from mkvlib.errors import KeyBusy, KeyExists, KeyMissing, KeyProtected
from mkvlib.lease import LOCK_LEASE, boot_id, lock_clock

LIST_MAX = 1_000_000       # keys one listing may return
WRITING, LIVE, UNLINKED, DELETING = "writing", "live", "unlinked", "deleting"


def prefix_end(prefix: bytes):
    """Smallest byte string above every string that starts with prefix (None: no bound)."""
    p = prefix.rstrip(b"\xff")
    if not p:
        return None
    return p[:-1] + bytes([p[-1] + 1])


SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key        BLOB PRIMARY KEY,      -- the key as bytes: ranges sort like bytes
    state      TEXT NOT NULL CHECK (state IN ('writing', 'live', 'unlinked', 'deleting')),
    volumes    TEXT NOT NULL,         -- replicas, comma-separated, placement order
    md5        TEXT,                  -- hex md5 of the whole value; NULL if not known
    size       INTEGER,               -- bytes; NULL if not known
    lock_owner TEXT,                  -- who holds the per-key lock, if anyone
    lock_until REAL                   -- lock_clock() time the lock expires unless renewed
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_unlinked ON keys (key) WHERE state = 'unlinked';
-- Unvouched copies: (key, volume) where a file may sit that no record vouches
-- for. Noted BEFORE anything can put one there: before a write sends its
-- first byte (with the name of its upload, whose MOVE may still land), before a
-- record forgets a volume (a PUT over an old record, a rebalance's switch).
-- A note goes in the transaction that records the copy as the key's value, or
-- once the file is known gone. Nothing adopts a noted copy: rebuild skips it,
-- rebalance overwrites or removes it (the table's name is from when it held
-- only rebalance's old copies).
CREATE TABLE IF NOT EXISTS pending_deletes (
    key    BLOB NOT NULL,
    volume TEXT NOT NULL,
    since  REAL NOT NULL,             -- unix time of the note
    tmp    TEXT,                      -- upload under TMP_DIR whose MOVE onto it may still land
    PRIMARY KEY (key, volume)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT
) WITHOUT ROWID;
-- The identity of the disk behind each volume (its /.id), as first seen, or
-- as rebalance.py accepted it once it had filled a replaced disk. A volume
-- that answers with another identity is not a redirect target.
CREATE TABLE IF NOT EXISTS volume_ids (
    host  TEXT PRIMARY KEY,
    id    TEXT NOT NULL,
    since REAL NOT NULL
) WITHOUT ROWID;
"""
COLUMNS = "key, state, volumes, md5, size, lock_owner, lock_until"
NOTES_OF_KEY = "SELECT volume, tmp FROM pending_deletes WHERE key = ?"
LIVE_OF_KEY = f"SELECT volumes, md5 FROM keys WHERE key = ? AND state = '{LIVE}'"   # a GET's one statement
# state meanings:
#   writing   a PUT is streaming replicas; invisible; expired lock = a PUT that died
#   live      every replica written; GET redirects to it
#   unlinked  soft-deleted: invisible, bytes kept on the volumes
#   deleting  invisible; replicas may remain on `volumes` until a DELETE finishes


@dataclasses.dataclass
class Record:
    key: bytes
    state: str
    volumes: list
    md5: str = None
    size: int = None
    lock_owner: str = None
    lock_until: float = None

    @classmethod
    def from_row(cls, row):
        key, state, volumes, md5, size, owner, until = row
        return cls(bytes(key), state, volumes.split(",") if volumes else [], md5, size, owner, until)

    def locked(self, now=None):
        return self.lock_owner is not None and (self.lock_until or 0) > (now or lock_clock())


@dataclasses.dataclass
class Claim:
    """What Index.start_put found and did."""
    old: Record          # the record the PUT replaced, or None
    added: list          # volumes it noted (the notes that were already there stay theirs)
    notes: dict          # every note of the key now: {volume: upload name or None}


def upgrade(db):
    """Bring an index of an earlier mkv up to SCHEMA, and drop the locks of
    an earlier boot (inside the setup transaction)."""
    columns = [r[1] for r in db.execute("PRAGMA table_info(pending_deletes)")]
    if "tmp" not in columns:
        db.execute("ALTER TABLE pending_deletes ADD COLUMN tmp TEXT")
    # lock_until is on lock_clock(), which starts again at every boot; no
    # holder survives a reboot, and an index of an earlier mkv kept wall-clock times
    row = db.execute("SELECT value FROM meta WHERE name = 'boot_id'").fetchone()
    boot = boot_id()
    if row is None or row[0] != boot:
        db.execute("UPDATE keys SET lock_owner = NULL, lock_until = NULL WHERE lock_owner IS NOT NULL")
        db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('boot_id', ?)", (boot,))


class Index:
    """The SQLite index. One per process (per gunicorn worker, opened after
    the fork); safe to share between the threads or greenlets of that process.

    Every write is a short BEGIN IMMEDIATE transaction and never waits on the
    network while it holds the write lock."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self.db = Database(path, SCHEMA, setup=upgrade, busy_timeout=busy_timeout)
        # live(key): (volumes as stored, comma-separated; md5 or None) of a
        # live key, else None: a plain GET's one statement (a bound method
        # of mkvlib.db.Lookup: no call of ours in between)
        self.live = Lookup(self.db, LIVE_OF_KEY).first

    def close(self):
        self.db.close()

    def checkpoint(self):
        """See Database.checkpoint: True if the WAL was copied and truncated."""
        return self.db.checkpoint()

    # -- reads

    def get(self, key: bytes):
        rows = self.db.read(f"SELECT {COLUMNS} FROM keys WHERE key = ?", (key,))
        return Record.from_row(rows[0]) if rows else None

    def list(self, prefix: bytes, start: bytes = b"", limit=None, state=LIVE):
        """Keys with `prefix`, from `start` on, in byte order; returns (keys, next)
        where next is the first key not returned (None if none)."""
        if state not in (LIVE, UNLINKED):
            raise ValueError(state)
        low = max(prefix, start or b"")
        high = prefix_end(prefix)
        want = (limit if limit is not None else LIST_MAX) + 1
        # the state is a literal so that SQLite can use the partial index for 'unlinked'
        sql = (f"SELECT key FROM keys WHERE state = '{state}' AND key >= ?"
               + (" AND key < ?" if high is not None else "") + " ORDER BY key LIMIT ?")
        params = (low, high, want) if high is not None else (low, want)
        keys = [bytes(r[0]) for r in self.db.read(sql, params)]
        if len(keys) == want:
            return keys[:-1], keys[-1]
        return keys, None

    def scan(self, after: bytes = None, batch=1000):
        """Every record in key order, read in short transactions of `batch` rows."""
        last = after
        while True:
            if last is None:
                rows = self.db.read(f"SELECT {COLUMNS} FROM keys ORDER BY key LIMIT ?", (batch,))
            else:
                rows = self.db.read(f"SELECT {COLUMNS} FROM keys WHERE key > ? ORDER BY key LIMIT ?", (last, batch))
            if not rows:
                return
            for row in rows:
                yield Record.from_row(row)
            last = bytes(rows[-1][0])

    # -- the per-key protocol (see the state meanings above SCHEMA)

    def _get(self, db, key):
        row = db.execute(f"SELECT {COLUMNS} FROM keys WHERE key = ?", (key,)).fetchone()
        return Record.from_row(row) if row else None

    def start_put(self, key, volumes, owner, lease=LOCK_LEASE, tmp=None):
        """Claim `key` for a PUT to `volumes`, whose uploads are named `tmp`.
        In the same transaction, note every copy the PUT may write and every
        copy the record it replaces names (unlinked, deleting, or a dead PUT's),
        so that a crash from here on leaves no file that nothing records.
        Returns a Claim: the replaced record (or None), the notes this call
        added, and every note of the key."""
        now = lock_clock()

        def claim(db):
            old = self._get(db, key)
            if old is not None:
                if old.state == LIVE:
                    raise KeyExists("key exists: DELETE it first (PUT does not overwrite)")
                if old.locked(now):
                    raise KeyBusy("key is being written or deleted by another request")
            # the notes there stay as they are (with their upload names); ours go in at once
            notes = self._notes(db, key)
            added = {v: tmp for v in volumes if v not in notes}
            if old is not None:
                added.update((v, None) for v in old.volumes if v not in volumes and v not in notes)
            when = time.time()
            db.executemany("INSERT INTO pending_deletes (key, volume, since, tmp) VALUES (?, ?, ?, ?)",
                           [(key, v, when, t) for v, t in added.items()])
            notes.update(added)
            db.execute("INSERT OR REPLACE INTO keys (key, state, volumes, md5, size, lock_owner, lock_until)"
                       " VALUES (?, ?, ?, NULL, NULL, ?, ?)",
                       (key, WRITING, ",".join(volumes), owner, now + lease))
            return Claim(old, list(added), notes)
        return self.db.transact(claim)

    def finish_put(self, key, owner, md5, size, resolved=()):
        """Make a claimed key live: its copies are vouched for now, so their
        notes go, with those of `resolved` (copies removed meanwhile). False
        if the claim was lost."""
        def finish(db):
            rows = db.execute("UPDATE keys SET state = ?, md5 = ?, size = ?, lock_owner = NULL, lock_until = NULL"
                              " WHERE key = ? AND lock_owner = ? AND state = ? RETURNING volumes",
                              (LIVE, md5, size, key, owner, WRITING)).fetchall()
            if len(rows) != 1:
                return False
            self._unnote(db, key, rows[0][0].split(",") + list(resolved))
            return True
        return self.db.transact(finish)

    def abandon_put(self, key, owner, leftovers=(), resolved=()):
        """A claimed PUT failed: forget the key, or, if files may remain on the
        volumes `leftovers`, keep it as 'deleting' with those volumes, so that
        a DELETE (or rebalance.py) finishes the job. The notes of `resolved`
        (volumes whose path is known to hold nothing of the key) go."""
        def abandon(db):
            if leftovers:
                cur = db.execute("UPDATE keys SET state = ?, volumes = ?, md5 = NULL, size = NULL,"
                                 " lock_owner = NULL, lock_until = NULL WHERE key = ? AND lock_owner = ?",
                                 (DELETING, ",".join(leftovers), key, owner))
            else:
                cur = db.execute("DELETE FROM keys WHERE key = ? AND lock_owner = ?", (key, owner))
            if cur.rowcount == 1:
                self._unnote(db, key, resolved)
        self.db.transact(abandon)

    def restore(self, key, owner, old, resolved=()):
        """Put back the record a claimed PUT replaced (nothing of the PUT
        reached a final path): it vouches for its copies again."""
        def put_back(db):
            cur = db.execute("UPDATE keys SET state = ?, volumes = ?, md5 = ?, size = ?, lock_owner = NULL,"
                             " lock_until = NULL WHERE key = ? AND lock_owner = ?",
                             (old.state, ",".join(old.volumes), old.md5, old.size, key, owner))
            if cur.rowcount == 1:
                self._unnote(db, key, resolved)
        self.db.transact(put_back)

    # -- notes of unvouched copies (the table pending_deletes; see SCHEMA)

    def note(self, key, volumes, tmp=None):
        """Note copies of `key` on `volumes` that no record vouches for; a note
        already there is kept (with its upload name). Returns the volumes
        noted now."""
        with self.db.write() as db:
            return self._note(db, key, volumes, tmp)

    @staticmethod
    def _note(db, key, volumes, tmp=None):
        """Add notes that are not there yet; returns the volumes noted now."""
        now = time.time()
        added = []
        for v in volumes:
            cur = db.execute("INSERT OR IGNORE INTO pending_deletes (key, volume, since, tmp) VALUES (?, ?, ?, ?)",
                             (key, v, now, tmp))
            if cur.rowcount == 1:
                added.append(v)
        return added

    @staticmethod
    def _unnote(db, key, volumes):
        db.executemany("DELETE FROM pending_deletes WHERE key = ? AND volume = ?", [(key, v) for v in volumes])

    @staticmethod
    def _notes(db, key):
        return dict(db.execute(NOTES_OF_KEY, (key,)).fetchall())

    def notes(self, key):
        """{volume: upload name or None} of the key's unvouched copies."""
        return dict(self.db.read(NOTES_OF_KEY, (key,)))

    def all_notes(self):
        """[(key, volume, since)] of every note, oldest first."""
        rows = self.db.read("SELECT key, volume, since FROM pending_deletes ORDER BY since")
        return [(bytes(k), v, s) for k, v, s in rows]

    def unnote(self, key, *volumes):
        """The copies of `key` on `volumes` are gone (or vouched for): drop their notes."""
        with self.db.write() as db:
            self._unnote(db, key, list(volumes))

    # -- locks

    def unlink(self, key):
        with self.db.write() as db:
            rec = self._get(db, key)
            if rec is None or rec.state != LIVE:
                raise KeyMissing("no such key")
            if rec.locked():
                raise KeyBusy("key is being written or deleted by another request")
            db.execute("UPDATE keys SET state = ? WHERE key = ?", (UNLINKED, key))

    def start_delete(self, key, owner, protect=False, lease=LOCK_LEASE):
        """Mark a key deleted (invisible at once) and claim it while its
        replicas are removed. Returns its record."""
        now = lock_clock()

        def start(db):
            rec = self._get(db, key)
            if rec is None:
                raise KeyMissing("no such key")
            if rec.locked(now):
                raise KeyBusy("key is being written or deleted by another request")
            if protect and rec.state == LIVE:
                raise KeyProtected("MKV_PROTECT is on: UNLINK the key before DELETE")
            db.execute("UPDATE keys SET state = ?, lock_owner = ?, lock_until = ? WHERE key = ?",
                       (DELETING, owner, now + lease, key))
            return rec
        return self.db.transact(start)

    def finish_delete(self, key, owner):
        self.db.transact(lambda db: db.execute("DELETE FROM keys WHERE key = ? AND lock_owner = ?", (key, owner)))

    def lock(self, key, owner, lease=LOCK_LEASE):
        """Take the per-key lock without changing the state (for the tools).
        Returns the record, None if the key is missing; KeyBusy if held."""
        now = lock_clock()
        with self.db.write() as db:
            rec = self._get(db, key)
            if rec is None:
                return None
            if rec.locked(now):
                raise KeyBusy("key is being written or deleted by another request")
            db.execute("UPDATE keys SET lock_owner = ?, lock_until = ? WHERE key = ?",
                       (owner, now + lease, key))
            rec.lock_owner, rec.lock_until = owner, now + lease
            return rec

    def renew(self, key, owner, lease=LOCK_LEASE):
        until = lock_clock() + lease    # from before the (maybe shared) transaction: never later than alone
        return self.db.transact(lambda db: db.execute(
            "UPDATE keys SET lock_until = ? WHERE key = ? AND lock_owner = ?", (until, key, owner)).rowcount == 1)

    def release(self, key, owner):
        self.db.transact(lambda db: db.execute("UPDATE keys SET lock_owner = NULL, lock_until = NULL"
                                               " WHERE key = ? AND lock_owner = ?", (key, owner)))

    # -- for the tools (rebuild.py, rebalance.py)

    def count(self):
        return self.db.read("SELECT COUNT(*) FROM keys")[0][0]

    def claim(self, key, volumes, owner, lease=LOCK_LEASE):
        """Claim a key that has no record, as a PUT does (state 'writing', locked
        by `owner`); False if a record exists. rebuild.py uses it before it
        checks that the files it listed are still there."""
        with self.db.write() as db:
            cur = db.execute("INSERT OR IGNORE INTO keys (key, state, volumes, md5, size, lock_owner, lock_until)"
                             " VALUES (?, ?, ?, NULL, NULL, ?, ?)",
                             (key, WRITING, ",".join(volumes), owner, lock_clock() + lease))
            return cur.rowcount == 1

    def set_value(self, key, owner, volumes, size, md5, dropped=()):
        """Set a locked key's replicas, size and md5 (rebuild.py); the state is
        kept. Copies on `dropped` leave the record and are noted. False if
        the lock was lost."""
        with self.db.write() as db:
            cur = db.execute("UPDATE keys SET volumes = ?, size = ?, md5 = ? WHERE key = ? AND lock_owner = ?",
                             (",".join(volumes), size, md5, key, owner))
            if cur.rowcount != 1:
                return False
            self._note(db, key, dropped)
            return True

    def insert_live(self, rows):
        """Add records [(key, volumes list, md5, size)] as live and unlocked,
        in one transaction (rebuild.py into a fresh index). A key that has a
        record already keeps it. Returns how many were added."""
        rows = sorted((key, LIVE, ",".join(volumes), md5, size) for key, volumes, md5, size in rows)
        with self.db.write() as db:   # in key order: each B-tree page is written once
            return db.executemany("INSERT OR IGNORE INTO keys (key, state, volumes, md5, size)"
                                  " VALUES (?, ?, ?, ?, ?)", rows).rowcount

    def lock_many(self, keys, owner, lease=LOCK_LEASE):
        """Index.lock of several keys in one transaction (rebalance.py's
        deletes): {key: (record, its notes as Index.notes gives them)} of
        those it locked; a key missing or held by someone is left out."""
        now = lock_clock()
        locked = {}
        with self.db.write() as db:
            for key in keys:
                rec = self._get(db, key)
                if rec is None or rec.locked(now):
                    continue
                db.execute("UPDATE keys SET lock_owner = ?, lock_until = ? WHERE key = ?",
                           (owner, now + lease, key))
                rec.lock_owner, rec.lock_until = owner, now + lease
                locked[key] = (rec, self._notes(db, key))
        return locked

    def release_many(self, keys, owner, unnoted=()):
        """Drop the notes `unnoted` [(key, volume)] (copies gone) and release
        the locks of `keys` held by `owner`, in one transaction."""
        with self.db.write() as db:
            db.executemany("DELETE FROM pending_deletes WHERE key = ? AND volume = ?", list(unnoted))
            db.executemany("UPDATE keys SET lock_owner = NULL, lock_until = NULL WHERE key = ? AND lock_owner = ?",
                           [(key, owner) for key in keys])

    def take_over(self, key, old_owner, owner, lease=LOCK_LEASE):
        """Move a lock from `old_owner` (a process known to be dead) to `owner`.
        Returns the record, or None if the lock is no longer old_owner's."""
        with self.db.write() as db:
            cur = db.execute("UPDATE keys SET lock_owner = ?, lock_until = ? WHERE key = ? AND lock_owner = ?",
                             (owner, lock_clock() + lease, key, old_owner))
            return self._get(db, key) if cur.rowcount == 1 else None

    def switch_volumes(self, key, owner, volumes, dropped, written=(), release=False):
        """Set a locked key's replicas to `volumes`, note the copies on
        `dropped` for a later delete, and drop the notes of `written` (copies
        this holder just wrote), at once; and with `release`, release the
        lock in the same transaction. False if the lock was lost."""
        with self.db.write() as db:
            return self._switch(db, key, owner, volumes, dropped, written, release)

    def note_many(self, notes):
        """Index.note of each (key, volumes, upload name) of `notes`, in one transaction (rebalance's batches)."""
        with self.db.write() as db:
            for key, volumes, tmp in notes:
                self._note(db, key, volumes, tmp)

    def switch_many(self, switches, owner):
        """switch_volumes(..., release=True) of each (key, volumes, dropped, written) in one
        transaction: the keys switched (the others' locks were lost: nothing of theirs changed)."""
        with self.db.write() as db:
            return [key for key, volumes, dropped, written in switches
                    if self._switch(db, key, owner, volumes, dropped, written, True)]

    @classmethod
    def _switch(cls, db, key, owner, volumes, dropped, written, release):
        """switch_volumes in the transaction `db`."""
        unlock = ", lock_owner = NULL, lock_until = NULL" if release else ""
        cur = db.execute(f"UPDATE keys SET volumes = ?{unlock} WHERE key = ? AND lock_owner = ?",
                         (",".join(volumes), key, owner))
        if cur.rowcount != 1:
            return False
        cls._unnote(db, key, written)
        cls._note(db, key, dropped)
        return True

    # -- the identities of the volumes' disks

    def volume_ids(self):
        """{host: identity} as recorded."""
        return dict(self.db.read("SELECT host, id FROM volume_ids"))

    def record_volume_id(self, host, ident, replace=False):
        """Record the identity of a host's disk: the first seen, or (replace)
        the one rebalance.py has filled."""
        with self.db.write() as db:
            db.execute(f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO volume_ids (host, id, since)"
                       " VALUES (?, ?, ?)", (host, ident, time.time()))
