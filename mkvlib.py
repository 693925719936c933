"""mkv's storage core: settings, placement and paths, the SQLite index, volume calls.

The master (mkv.py) and the tools (rebuild.py, rebalance.py) import this
module; it does not import Falcon or gevent. Under gunicorn's gevent worker the
standard library is monkey-patched, so the threads and sockets used here are
greenlets and gevent sockets there, and real ones in the tools.
"""
import base64
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import socket
import sqlite3
import struct
import termios
import threading
import time
import uuid
from urllib.parse import quote


log = logging.getLogger("mkv")

# ---------------------------------------------------------------- constants

CHUNK = 1 << 20            # bytes read from a client and sent to volumes at once
LOCK_LEASE = 30.0          # seconds a per-key lock lives unless renewed
DOWN_RETRY = 5.0           # seconds a volume that failed is skipped before one retry
TRANSFER_TIMEOUT = 30.0    # seconds a volume may stall sending a listing or a file (to rebuild, rebalance)
BUSY_TIMEOUT = 10.0        # seconds SQLite waits for another writer
CHECKPOINT_EVERY = 60.0    # seconds between WAL checkpoints of one process
WAL_CHECKPOINT = 16 << 20  # bytes of WAL past which a write checkpoints
CHECKPOINT_WAIT = 0.1      # seconds a checkpoint waits for readers of older snapshots
WAL_LIMIT = 64 << 20       # bytes of WAL file kept after a checkpoint (journal_size_limit)
KEEPALIVE_IDLE = 30.0      # seconds we reuse an idle socket to a volume (nginx keeps it 75 s)
NAME_MAX = 255             # longest file name a volume's filesystem takes
PATH_NAME_MAX = 2048       # longest base64 name with its '/' folders (PATH_MAX is 4096 with the volume's)
MAX_SUBVOLUMES = 256       # svXX: the subvolume folder name has two hex digits
LIST_MAX = 1_000_000       # keys one listing may return
TMP_DIR = "/.tmp/"         # on each volume: a value is uploaded here, then MOVEd into place
ID_PATH = "/.id"           # on each volume: its identity, made when its folder is first served
PROBE_EVERY = 1.0          # seconds between two looks of a process at each volume
PROBE_FRESH = 2.5          # seconds a volume's last answer keeps it a redirect target
OP_TIMEOUT = 5.0           # seconds a volume may take to answer a MOVE or DELETE (a rename, an unlink)
MOVE_TRIES = 3             # MOVEs onto a path where a foreign file keeps appearing
OFFLOAD_MIN = 256 << 10    # bytes of a chunk worth hashing in another thread (Volumes.offload)
SEND_SLICE = 256 << 10     # bytes of an upload a volume must take within OP_TIMEOUT: 51 KB/s at least

WRITING, LIVE, UNLINKED, DELETING = "writing", "live", "unlinked", "deleting"
SECRET_HEADER = "Mkv-Secret"                         # carries MKV_SECRET, to the master and to the volumes
SECRET_CHARS = re.compile(r"[A-Za-z0-9._-]{1,200}")   # what a volume's nginx config can hold as it is


# ---------------------------------------------------------------- errors
# Storage errors carry a one-line reason; mkv.py maps each class to a status.

class MkvError(Exception):
    """Base of every error this module reports to a client."""


class SettingsError(MkvError):
    pass


class BadKey(MkvError):
    pass


class KeyTooLong(BadKey):
    pass


class KeyMissing(MkvError):
    pass


class KeyExists(MkvError):
    pass


class KeyProtected(MkvError):
    pass


class KeyBusy(MkvError):
    pass


class EmptyValue(MkvError):
    pass


class ClientGone(MkvError):
    pass


class VolumeError(MkvError):
    """A volume answered with an error, or not at all."""


class VolumeDown(VolumeError):
    """A volume could not be reached (refused, timed out, or known down)."""


class MoveUnknown(VolumeDown):
    """A volume did not answer a MOVE: the value may land there yet."""


class Unavailable(MkvError):
    """The key exists but no replica could be served."""


class DeleteIncomplete(MkvError):
    pass


class Unauthorized(MkvError):
    """A write without MKV_SECRET."""


class IndexBusy(MkvError):
    """Another process held the index's write lock for longer than BUSY_TIMEOUT."""


def _busy(error: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or one of its extended codes: another connection is in the way."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


def _read_only(error: sqlite3.Error) -> bool:
    """SQLITE_READONLY, any of its kinds."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_READONLY


# ---------------------------------------------------------------- settings

def _parse_hostport(name, value):
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in value:
        raise SettingsError(f"{name}: {value!r} is not host:port")
    return value


def _parse_int(name, value, low, high):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a whole number") from None
    if not low <= n <= high:
        raise SettingsError(f"{name}: {n} is out of range ({low} to {high})")
    return n


def _parse_bool(name, value):
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: {value!r} is not on/off")


@dataclasses.dataclass(frozen=True)
class Settings:
    volumes: tuple
    db: str
    replicas: int = 3
    subvolumes: int = 10
    protect: bool = False
    fallback: str = None
    voltimeout: float = 1.0
    get_check: bool = False
    secret: str = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_env(cls, env=None, **overrides):
        """Read MKV_* from `env` (default os.environ); a non-None keyword
        (volumes=, db=, replicas=, ...) wins over the environment."""
        env = os.environ if env is None else env
        raw = {
            "volumes": env.get("MKV_VOLUMES", ""),
            "db": env.get("MKV_DB", ""),
            "replicas": env.get("MKV_REPLICAS", "3"),
            "subvolumes": env.get("MKV_SUBVOLUMES", "10"),
            "protect": env.get("MKV_PROTECT", ""),
            "fallback": env.get("MKV_FALLBACK", ""),
            "voltimeout": env.get("MKV_VOLTIMEOUT", "1"),
            "get_check": env.get("MKV_GET_CHECK", ""),
            "secret": env.get("MKV_SECRET", ""),
        }
        raw.update({k: v for k, v in overrides.items() if v is not None})
        volumes = raw["volumes"]
        if isinstance(volumes, str):
            volumes = [v.strip() for v in volumes.split(",") if v.strip()]
        if not volumes:
            raise SettingsError("MKV_VOLUMES is empty: name the volume servers, "
                                "e.g. MKV_VOLUMES=localhost:3001,localhost:3002,localhost:3003")
        volumes = tuple(_parse_hostport("MKV_VOLUMES", v) for v in volumes)
        if len(set(volumes)) != len(volumes):
            raise SettingsError(f"MKV_VOLUMES names a volume twice: {','.join(volumes)}")
        if not raw["db"]:
            raise SettingsError("MKV_DB is empty: give the index file, e.g. MKV_DB=/var/lib/mkv/index.sqlite3")
        replicas = _parse_int("MKV_REPLICAS", raw["replicas"], 1, 1000)
        if replicas > len(volumes):
            raise SettingsError(f"MKV_REPLICAS={replicas} but MKV_VOLUMES has only "
                                f"{len(volumes)} volume(s): need at least as many volumes as replicas")
        subvolumes = _parse_int("MKV_SUBVOLUMES", raw["subvolumes"], 1, MAX_SUBVOLUMES)
        try:
            voltimeout = float(raw["voltimeout"])
        except (TypeError, ValueError):
            raise SettingsError(f"MKV_VOLTIMEOUT: {raw['voltimeout']!r} is not a number of seconds") from None
        if not 0 < voltimeout <= 600:
            raise SettingsError(f"MKV_VOLTIMEOUT: {voltimeout} is out of range (0 to 600 seconds)")
        secret = raw["secret"] or None
        if secret is not None and not SECRET_CHARS.fullmatch(secret):
            raise SettingsError("MKV_SECRET may hold only letters, digits, '.', '_' and '-' (1 to 200)")
        fallback = raw["fallback"] or None
        if fallback:
            _parse_hostport("MKV_FALLBACK", fallback)
        return cls(volumes=volumes, db=os.path.abspath(str(raw["db"])), replicas=replicas,
                   subvolumes=subvolumes, protect=_parse_bool("MKV_PROTECT", raw["protect"]),
                   fallback=fallback, voltimeout=voltimeout,
                   get_check=_parse_bool("MKV_GET_CHECK", raw["get_check"]), secret=secret)


# ---------------------------------------------------------------- placement and paths
# The on-disk format of the original Go minikeyvalue, bit for bit.

def key2path(key: bytes) -> str:
    """Path of a key's file inside a (sub)volume: /md5[0]/md5[1]/base64(key)."""
    digest = hashlib.md5(key).digest()
    return "/%02x/%02x/%s" % (digest[0], digest[1], base64.b64encode(key).decode("ascii"))


def path2key(name: str) -> bytes:
    """The key whose file is named `name` (the part after /xx/yy/); ValueError if none."""
    return base64.b64decode(name.encode("ascii"), validate=True)


def key2volume(key: bytes, volumes, replicas: int, subvolumes: int) -> list:
    """The volumes (with their svXX folder) that hold a key, best first.

    Each volume scores md5(key + volume); highest scores win. Adding a volume
    moves only the keys it now wins, and the order does not depend on the
    order of MKV_VOLUMES."""
    scored = []
    for v in volumes:
        scored.append((hashlib.md5(key + v.encode()).digest(), v))
    scored.sort(key=lambda sv: sv[0], reverse=True)   # stable, like Go's sort.Stable
    chosen = []
    for score, v in scored[:replicas]:
        if subvolumes == 1:
            chosen.append(v)
        else:
            # the low 32 bits of the score: a single byte would skew the spread
            chosen.append("%s/sv%02X" % (v, int.from_bytes(score[12:16], "big") % subvolumes))
    return chosen


def fallback_path(key: bytes) -> str:
    """The key as a path on MKV_FALLBACK that no client normalizes into
    another: a '.' or '..' segment goes as %2E, joined to its neighbours by
    %2F (no normalizer decodes %2F; the fallback decodes it back to '/').
    '/..%2f..%2fetc%2fpasswd' -> '/%2E%2E%2F%2E%2E%2Fetc/passwd'."""
    parts = quote(key, safe="/").split("/")
    dots = [p in (".", "..") for p in parts]
    out = parts[0]
    for i in range(1, len(parts)):
        out += "%2F" if i > 1 and (dots[i - 1] or dots[i]) else "/"
        out += parts[i].replace(".", "%2E") if dots[i] else parts[i]
    return out


def volume_host(volume: str) -> str:
    """host:port of a volume string such as 'localhost:3001/sv08'."""
    return volume.split("/", 1)[0]


def check_storable(key: bytes) -> None:
    """Raise BadKey if a key's file name cannot exist on a volume.

    base64 may contain '/', which nginx turns into folders: an empty path
    part ('//' or a trailing '/') cannot be stored, and no part may be longer
    than a file name can be."""
    if not key.startswith(b"/"):
        raise BadKey("a key starts with /")
    parts = base64.b64encode(key).split(b"/")
    if any(len(p) > NAME_MAX for p in parts) or sum(map(len, parts)) + len(parts) > PATH_NAME_MAX:
        raise KeyTooLong(f"key too long: its file name would pass {NAME_MAX} bytes "
                         f"(or {PATH_NAME_MAX} with its folders)")
    if not all(parts):
        raise BadKey("key cannot be stored: its base64 file name has an empty path part")


def prefix_end(prefix: bytes):
    """Smallest byte string above every string that starts with prefix (None: no bound)."""
    p = prefix.rstrip(b"\xff")
    if not p:
        return None
    return p[:-1] + bytes([p[-1] + 1])


def lock_clock() -> float:
    """Seconds on the clock leases are kept by: CLOCK_BOOTTIME, one clock for
    every process of the machine (the index is on one machine), which neither
    NTP nor an operator can step. The wall clock can jump, and a jump would
    expire every lease at once, or keep dead ones for hours."""
    return time.clock_gettime(_LOCK_CLOCK)


_LOCK_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boot_id() -> str:
    """Which boot of this machine we are in: lock_clock() starts again at each."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def new_tmp() -> str:
    """A name for one write's uploads under TMP_DIR; unique, so two writers never share one."""
    return uuid.uuid4().hex


def new_owner(tag="") -> str:
    """A lock owner token; says who holds a lock when someone looks at the index."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag}{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- the index

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


class Index:
    """The SQLite index. One per process (per gunicorn worker, opened after
    the fork); safe to share between the threads or greenlets of that process.

    Every write is a short BEGIN IMMEDIATE transaction and never waits on the
    network while it holds the write lock."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self.busy_timeout = busy_timeout
        self._mutex = threading.RLock()
        self._last_checkpoint = self._last_look = self._last_reopen = time.monotonic()
        self.db = self._open()

    def _open(self, setup=True):
        """A connection to the index, in WAL mode, with the schema set up
        (unless not `setup`: then it never waits for another process)."""
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
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in SCHEMA.split(";\n"):   # not executescript: it COMMITs first
                        if statement.strip():
                            db.execute(statement)
                    self._upgrade(db)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            # From here on SQLite never waits for a lock by itself: its busy
            # handler sleeps in C, which would stall every greenlet of a gevent
            # worker. _Tx waits instead, with time.sleep (a greenlet switch there).
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

    def _reopen_if_writable(self):
        """SQLite opens an index on a read-only disk read-only, and that
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
            self.db.close()
            try:
                self.db = self._open(setup=False)
                log.warning("MKV_DB=%s is writable again: index reopened", self.path)
            except SettingsError as e:
                log.warning("the index could not be reopened: %s", e)
                self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)

    def _upgrade(self, db):
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

    def close(self):
        self.db.close()

    # -- transactions

    class _Tx:
        def __init__(self, index, mode):
            self.index, self.mode = index, mode

        def __enter__(self):
            self.index._begin(self.mode)   # holds the mutex from here to __exit__
            return self.index.db

        def __exit__(self, exc_type, exc, tb):
            db = self.index.db
            try:
                db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                try:
                    if db.in_transaction:   # COMMIT failed (disk full, I/O error): never leave it open
                        db.execute("ROLLBACK")
                finally:
                    self.index._mutex.release()
            if not exc_type and self.mode == "IMMEDIATE":
                self.index._maybe_checkpoint()
            elif isinstance(exc, sqlite3.Error) and _read_only(exc):
                self.index._reopen_if_writable()
            return False

    def _write(self):
        return self._Tx(self, "IMMEDIATE")

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
                self.db.execute(f"BEGIN {mode}")
                return
            except sqlite3.OperationalError as e:
                self._mutex.release()
                if _read_only(e):
                    self._reopen_if_writable()
                if not _busy(e):
                    raise
            except BaseException:
                self._mutex.release()
                raise

    def _read(self, sql, params=()):
        """Every row of a query. Under the mutex: on a connection shared by
        threads, a read in the middle of another thread's transaction would
        see its uncommitted rows. A read that finds SQLite busy (another
        process recovering the WAL after a crash, say) is tried again."""
        for _ in self._patience():
            with self._mutex:
                try:
                    return self.db.execute(sql, params).fetchall()
                except sqlite3.OperationalError as e:
                    if not _busy(e):
                        raise

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
                self.db.execute(f"PRAGMA busy_timeout={int(CHECKPOINT_WAIT * 1000)}")
                try:
                    busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    self.db.execute("PRAGMA busy_timeout=0")
        except sqlite3.OperationalError as e:
            if not _busy(e):
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

    # -- reads

    # Reads take the mutex too: on a connection shared by threads, a read in
    # the middle of another thread's transaction would see its uncommitted rows.

    def get(self, key: bytes):
        rows = self._read(f"SELECT {COLUMNS} FROM keys WHERE key = ?", (key,))
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
        keys = [bytes(r[0]) for r in self._read(sql, params)]
        if len(keys) == want:
            return keys[:-1], keys[-1]
        return keys, None

    def scan(self, after: bytes = None, batch=1000):
        """Every record in key order, read in short transactions of `batch` rows."""
        last = after
        while True:
            if last is None:
                rows = self._read(f"SELECT {COLUMNS} FROM keys ORDER BY key LIMIT ?", (batch,))
            else:
                rows = self._read(f"SELECT {COLUMNS} FROM keys WHERE key > ? ORDER BY key LIMIT ?", (last, batch))
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
        with self._write() as db:
            old = self._get(db, key)
            if old is not None:
                if old.state == LIVE:
                    raise KeyExists("key exists: DELETE it first (PUT does not overwrite)")
                if old.locked(now):
                    raise KeyBusy("key is being written or deleted by another request")
            added = self._note(db, key, volumes, tmp)
            if old is not None:
                added += self._note(db, key, [v for v in old.volumes if v not in volumes])
            db.execute("INSERT OR REPLACE INTO keys (key, state, volumes, md5, size, lock_owner, lock_until)"
                       " VALUES (?, ?, ?, NULL, NULL, ?, ?)",
                       (key, WRITING, ",".join(volumes), owner, now + lease))
            notes = self._notes(db, key)
        return Claim(old, added, notes)

    def finish_put(self, key, owner, md5, size, resolved=()):
        """Make a claimed key live: its copies are vouched for now, so their
        notes go, with those of `resolved` (copies removed meanwhile). False
        if the claim was lost."""
        with self._write() as db:
            cur = db.execute("UPDATE keys SET state = ?, md5 = ?, size = ?, lock_owner = NULL, lock_until = NULL"
                             " WHERE key = ? AND lock_owner = ? AND state = ?",
                             (LIVE, md5, size, key, owner, WRITING))
            if cur.rowcount != 1:
                return False
            self._unnote(db, key, self._get(db, key).volumes + list(resolved))
            return True

    def abandon_put(self, key, owner, leftovers=(), resolved=()):
        """A claimed PUT failed: forget the key, or, if files may remain on the
        volumes `leftovers`, keep it as 'deleting' with those volumes, so that
        a DELETE (or rebalance.py) finishes the job. The notes of `resolved`
        (volumes whose path is known to hold nothing of the key) go."""
        with self._write() as db:
            if leftovers:
                cur = db.execute("UPDATE keys SET state = ?, volumes = ?, md5 = NULL, size = NULL,"
                                 " lock_owner = NULL, lock_until = NULL WHERE key = ? AND lock_owner = ?",
                                 (DELETING, ",".join(leftovers), key, owner))
            else:
                cur = db.execute("DELETE FROM keys WHERE key = ? AND lock_owner = ?", (key, owner))
            if cur.rowcount == 1:
                self._unnote(db, key, resolved)

    def restore(self, key, owner, old, resolved=()):
        """Put back the record a claimed PUT replaced (nothing of the PUT
        reached a final path): it vouches for its copies again."""
        with self._write() as db:
            cur = db.execute("UPDATE keys SET state = ?, volumes = ?, md5 = ?, size = ?, lock_owner = NULL,"
                             " lock_until = NULL WHERE key = ? AND lock_owner = ?",
                             (old.state, ",".join(old.volumes), old.md5, old.size, key, owner))
            if cur.rowcount == 1:
                self._unnote(db, key, resolved)

    # -- notes of unvouched copies (the table pending_deletes; see SCHEMA)

    def note_pending(self, key, volumes, tmp=None):
        """Note copies of `key` on `volumes` that no record vouches for; a note
        already there is kept (with its upload name). Returns the volumes
        noted now."""
        with self._write() as db:
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
        return dict(self._read(NOTES_OF_KEY, (key,)))

    def pending_deletes(self):
        """[(key, volume, since)] of every note, oldest first."""
        rows = self._read("SELECT key, volume, since FROM pending_deletes ORDER BY since")
        return [(bytes(k), v, s) for k, v, s in rows]

    def pending_done(self, key, volume):
        with self._write() as db:
            self._unnote(db, key, [volume])

    # -- locks

    def unlink(self, key):
        with self._write() as db:
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
        with self._write() as db:
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

    def finish_delete(self, key, owner):
        with self._write() as db:
            db.execute("DELETE FROM keys WHERE key = ? AND lock_owner = ?", (key, owner))

    def lock(self, key, owner, lease=LOCK_LEASE):
        """Take the per-key lock without changing the state (for the tools).
        Returns the record, None if the key is missing; KeyBusy if held."""
        now = lock_clock()
        with self._write() as db:
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
        with self._write() as db:
            cur = db.execute("UPDATE keys SET lock_until = ? WHERE key = ? AND lock_owner = ?",
                             (lock_clock() + lease, key, owner))
            return cur.rowcount == 1

    def release(self, key, owner):
        with self._write() as db:
            db.execute("UPDATE keys SET lock_owner = NULL, lock_until = NULL WHERE key = ? AND lock_owner = ?",
                       (key, owner))

    # -- for the tools (rebuild.py, rebalance.py)

    def count(self):
        return self._read("SELECT COUNT(*) FROM keys")[0][0]

    def claim(self, key, volumes, owner, lease=LOCK_LEASE):
        """Claim a key that has no record, as a PUT does (state 'writing', locked
        by `owner`); False if a record exists. rebuild.py uses it before it
        checks that the files it listed are still there."""
        with self._write() as db:
            cur = db.execute("INSERT OR IGNORE INTO keys (key, state, volumes, md5, size, lock_owner, lock_until)"
                             " VALUES (?, ?, ?, NULL, NULL, ?, ?)",
                             (key, WRITING, ",".join(volumes), owner, lock_clock() + lease))
            return cur.rowcount == 1

    def set_facts(self, key, owner, volumes, size, md5, dropped=()):
        """Set a locked key's replicas, size and md5 (rebuild.py); the state is
        kept. Copies on `dropped` leave the record and are noted. False if
        the lock was lost."""
        with self._write() as db:
            cur = db.execute("UPDATE keys SET volumes = ?, size = ?, md5 = ? WHERE key = ? AND lock_owner = ?",
                             (",".join(volumes), size, md5, key, owner))
            if cur.rowcount != 1:
                return False
            self._note(db, key, dropped)
            return True

    def take_over(self, key, old_owner, owner, lease=LOCK_LEASE):
        """Move a lock from `old_owner` (a process known to be dead) to `owner`.
        Returns the record, or None if the lock is no longer old_owner's."""
        with self._write() as db:
            cur = db.execute("UPDATE keys SET lock_owner = ?, lock_until = ? WHERE key = ? AND lock_owner = ?",
                             (owner, lock_clock() + lease, key, old_owner))
            return self._get(db, key) if cur.rowcount == 1 else None

    def switch_volumes(self, key, owner, volumes, dropped, written=()):
        """Set a locked key's replicas to `volumes`, note the copies on
        `dropped` for a later delete, and drop the notes of `written` (copies
        this holder just wrote), at once. False if the lock was lost."""
        with self._write() as db:
            cur = db.execute("UPDATE keys SET volumes = ? WHERE key = ? AND lock_owner = ?",
                             (",".join(volumes), key, owner))
            if cur.rowcount != 1:
                return False
            self._unnote(db, key, written)
            self._note(db, key, dropped)
            return True


    # -- the identities of the volumes' disks

    def volume_ids(self):
        """{host: identity} as recorded."""
        return dict(self._read("SELECT host, id FROM volume_ids"))

    def record_volume_id(self, host, ident, replace=False):
        """Record the identity of a host's disk: the first seen, or (replace)
        the one rebalance.py has filled."""
        with self._write() as db:
            db.execute(f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO volume_ids (host, id, since)"
                       " VALUES (?, ?, ?)", (host, ident, time.time()))


@dataclasses.dataclass
class Claim:
    """What Index.start_put found and did."""
    old: Record          # the record the PUT replaced, or None
    added: list          # volumes it noted (the notes that were already there stay theirs)
    notes: dict          # every note of the key now: {volume: upload name or None}


class Lease:
    """Holds a per-key lock while a long transfer runs: renews it in the
    background, so a lock outlives a slow upload but not a killed process.

    One thread per process (a greenlet in the master) renews every lease
    held: a request costs no thread of its own. Each lease is renewed every
    lease/6 seconds; a renewal may wait up to BUSY_TIMEOUT for the index, so
    a lock survives the index being busy for a while. If the lock is lost
    anyway, `lost` is set and `check()` raises: the holder must stop, since
    another request may own the key by now."""

    TICK = 0.5                 # seconds between two looks of the renewer
    _held = {}                 # id(lease) -> every Lease this process holds now
    _renewer_pid = None        # the process whose renewer runs (a fork has none)
    _later = []                # (undo, until): index writes to try again, see later()
    _start = threading.Lock()

    def __init__(self, index, key, owner, lease=LOCK_LEASE):
        self.index, self.key, self.owner, self.lease = index, key, owner, lease
        self.lost = False
        self.renewed = time.monotonic()

    def check(self):
        if self.lost:
            raise KeyBusy("lost the lock on the key (the index was busy too long); try again")

    def guard(self, chunks):
        """`chunks`, stopping with KeyBusy as soon as the lock is lost."""
        for chunk in chunks:
            self.check()
            yield chunk

    def __enter__(self):
        self.renewed = time.monotonic()
        Lease._held[id(self)] = self
        Lease._start_renewer()
        return self

    @staticmethod
    def _start_renewer():
        if Lease._renewer_pid != os.getpid():
            with Lease._start:
                if Lease._renewer_pid != os.getpid():
                    Lease._renewer_pid = os.getpid()
                    Lease._later.clear()   # a fork's parent's: not ours to do
                    threading.Thread(target=Lease._renew_all, daemon=True, name="leases").start()

    @staticmethod
    def later(undo, within):
        """Call undo() (an index write that failed: the release of a lock, the
        undoing of a claim) every TICK until it gets through, for `within`
        seconds at most: by then the lock has expired by itself."""
        Lease._start_renewer()
        Lease._later.append((undo, time.monotonic() + within))

    def __exit__(self, *exc):
        Lease._held.pop(id(self), None)
        return False

    @staticmethod
    def _renew_all():
        while True:
            time.sleep(Lease.TICK)
            try:
                Lease._renew_due()
                Lease._try_later()
            except Exception:   # whatever it was, this thread must go on renewing
                log.exception("renewing locks failed")

    @staticmethod
    def _try_later():
        for job in list(Lease._later):
            undo, until = job
            try:
                undo()
            except (sqlite3.Error, IndexBusy):
                if time.monotonic() < until:
                    continue   # still not writable: next tick
            except Exception:
                log.exception("undoing a failed write in the index failed")
            Lease._later.remove(job)

    @staticmethod
    def _renew_due():
        for lease in list(Lease._held.values()):
            if lease.lost or time.monotonic() - lease.renewed < lease.lease / 6:
                continue
            try:
                if lease.index.renew(lease.key, lease.owner, lease.lease):
                    lease.renewed = time.monotonic()
                else:
                    lease.lost = True
            except (sqlite3.Error, IndexBusy):
                pass   # busy now; the next renewal comes long before the lease runs out


# ---------------------------------------------------------------- volume calls

class Volumes:
    """HTTP calls to volume servers, with a memory of which ones are down.

    A volume that fails to answer is skipped for DOWN_RETRY seconds; then one
    request tries it again. So a dead volume costs one timeout now and then,
    not one per request.

    Every call speaks HTTP/1.1 over our own keep-alive sockets (_Conn), kept
    per server: nginx's answers to what we ask are simple (a status, a
    Content-Length or chunks), and a client library cost more than the
    volume's work. Measured on this kind of machine: a HEAD to a local nginx
    took 73 us this way and 574 us through urllib3's PoolManager; a listing
    about 500 us of CPU through urllib3. Under gevent the sockets are
    gevent's, so a call waits without blocking the worker; in the tools'
    threads they are the standard library's."""

    def __init__(self, timeout=1.0, retry_after=DOWN_RETRY, maxsize=64, secret=None, offload=None):
        self.timeout = timeout
        # offload(fn, arg): starts fn(arg) in a real thread and returns a
        # function that waits for it; an upload hashes its chunks that way
        # (hashlib lets go of the GIL) while it sends them. None: hash inline.
        self.offload = offload
        # writes carry MKV_SECRET: a volume started with it refuses writes without it
        self.write_headers = b"%s: %s\r\n" % (SECRET_HEADER.encode(), secret.encode()) if secret else b""
        # a MOVE or DELETE is a rename or an unlink, and a volume that takes
        # no byte of an upload for this long is stuck: seconds at the most on
        # a healthy volume, so a frozen one costs this, not TRANSFER_TIMEOUT
        self.op_timeout = max(timeout, OP_TIMEOUT)
        self.retry_after = retry_after
        self._down_until = {}
        self._idle = {}          # host -> idle keep-alive _Conns, the last given back last
        self._maxsize = maxsize

    # -- health

    def usable(self, host):
        """False while `host` is known down; after DOWN_RETRY, True once (a probe)."""
        until = self._down_until.get(host)
        if until is None:
            return True
        now = time.monotonic()
        if now < until:
            return False
        self._down_until[host] = now + self.retry_after   # others keep skipping it meanwhile
        return True

    def known_down(self, host):
        """True while `host` failed less than DOWN_RETRY seconds ago."""
        return time.monotonic() < self._down_until.get(host, 0)

    def probe(self, volume):
        """Ask the volume now (one HEAD, `timeout`): True if it answers at all."""
        try:
            self.has(volume_host(volume), "/")
        except VolumeDown:
            return False
        except VolumeError:
            pass                   # any answer will do: the volume is up
        return True

    def mark_down(self, host, reason=""):
        if host not in self._down_until:
            log.warning("volume %s is down, skipping it for %.0f s: %s", host, self.retry_after, reason)
        self._down_until[host] = time.monotonic() + self.retry_after

    def mark_up(self, host):
        if self._down_until.pop(host, None) is not None:
            log.warning("volume %s is back up", host)

    def _down(self, host, error, mark=True, what="is unreachable", kind=None):
        """The error to raise for a volume that failed (marked down unless `mark` is False)."""
        if mark:
            self.mark_down(host, _reason(error))
        return (kind or VolumeDown)(f"volume {host} {what}: {_reason(error)}")

    # -- connections

    def _connect(self, host):
        name, _, port = host.rpartition(":")
        sock = socket.create_connection((name, int(port)), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _take(self, host, new=False):
        """An idle connection to `host` that the server has not closed, or a
        new one (OSError if it cannot be made)."""
        idle = self._idle.get(host)
        while idle and not new:
            try:
                conn = idle.pop()
            except IndexError:      # another thread took the last one
                break
            if conn.alive():
                return conn
            conn.close()
        return _Conn(self._connect(host))

    def _give(self, host, conn, keep=True):
        """Keep `conn` for the next call to `host` if it may be used again."""
        idle = self._idle.setdefault(host, [])
        if keep and conn.clean() and len(idle) < self._maxsize:
            conn.since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    def _fan(self, method, calls, timeout=None, mark=True, kind=None):
        """Requests without a body, one to each (volume, path, extra header
        lines) of `calls`, all at once without a thread each: every request
        is sent, then every answer read, so a frozen volume costs `timeout`
        (MKV_VOLTIMEOUT by default) once, not once per volume. Returns, in
        order, (status, body) or the error: VolumeDown if the request could
        not be sent, `kind` (VolumeDown by default) if it was sent and no
        answer came. A connection that the server closed while it was idle
        is replaced, once, for requests that change nothing, or nothing more,
        when repeated."""
        timeout = timeout or self.timeout
        repeatable = method in ("GET", "HEAD", "DELETE")
        results = [None] * len(calls)
        todo = []
        for i, (volume, path, headers) in enumerate(calls):
            host = volume_host(volume)
            todo.append((i, host, b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
                method.encode(), _target(volume, host, path), host.encode(), headers)))
        for attempt in (1, 2):
            sent = []
            for i, host, request in todo:
                try:
                    conn = self._take(host, new=attempt == 2)
                except OSError as e:
                    results[i] = self._down(host, e, mark)
                    continue
                try:
                    conn.sock.settimeout(timeout)
                    conn.sock.sendall(request)
                    sent.append((i, host, request, conn, None))
                except OSError as e:
                    sent.append((i, host, request, conn, e))
            todo = []
            for i, host, request, conn, error in sent:
                if error is None:
                    try:
                        status, body, keep = conn.answer(to_head=method == "HEAD")
                    except (OSError, ValueError) as e:
                        error = e
                if error is not None:
                    conn.close()
                    if conn.used and repeatable and attempt == 1 and not isinstance(error, socket.timeout):
                        todo.append((i, host, request))   # closed while idle: once more, on a new one
                    else:
                        results[i] = self._down(host, error, mark, f"did not answer {method}", kind)
                    continue
                conn.used = True
                self._give(host, conn, keep)
                self.mark_up(host)
                results[i] = (status, body)
            if not todo:
                return results

    def _call(self, method, volume, path, headers=b"", timeout=None, mark=True, kind=None):
        """(status, body) of one request without a body; raises what _fan() returns."""
        result = self._fan(method, [(volume, path, headers)], timeout, mark, kind)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _deletes(self, calls):
        """DELETE of each (volume, path) at once: None for each file removed
        (or already gone), else the VolumeError it got."""
        out = []
        for (volume, _), result in zip(calls, self._fan("DELETE", [(v, p, self.write_headers) for v, p in calls],
                                                        timeout=self.op_timeout)):
            if not isinstance(result, Exception) and result[0] not in (200, 204, 404):
                result = VolumeError(f"volume {volume_host(volume)} answered DELETE with {result[0]}: "
                                     f"{_nginx_reason(result[1])}")
            out.append(result if isinstance(result, Exception) else None)
        return out

    # -- single calls

    def has(self, volume, path):
        """True if the volume has the file, False if not; VolumeDown if it does not answer."""
        status, _ = self._call("HEAD", volume, path)
        if status == 200:
            return True
        if status == 404:
            return False
        raise VolumeError(f"volume {volume_host(volume)} answered HEAD with {status}")

    def identity(self, volume, mark=True):
        """The identity of the disk behind a volume (its /.id); '' for a volume
        that has none (served by an earlier launcher, or the original's nginx).
        VolumeDown if it does not answer (marked down unless `mark` is False)."""
        found = self.identities([volume_host(volume)], mark)[0]
        if isinstance(found, Exception):
            raise found
        return found

    def identities(self, hosts, mark=True):
        """identity() of each host, asked at once: the identity or the VolumeError."""
        out = []
        for host, result in zip(hosts, self._fan("GET", [(h, ID_PATH, b"") for h in hosts], mark=mark)):
            if not isinstance(result, Exception):
                status, body = result
                if status == 200:
                    result = body.decode("ascii", "replace").strip()
                elif status in (403, 404):
                    result = ""
                else:
                    result = VolumeError(f"volume {host} answered GET {ID_PATH} with {status}")
            out.append(result)
        return out

    def delete(self, volume, path):
        """Remove a file; a file that is already gone is fine."""
        error = self._deletes([(volume, path)])[0]
        if error is not None:
            raise error

    def delete_all(self, volumes, path):
        """Remove a file from each volume at once; returns {volume: reason} of those that failed."""
        errors = self._deletes([(v, path) for v in volumes])
        return {v: str(e) for v, e in zip(volumes, errors) if e is not None}

    def listdir(self, volume, path="/"):
        """Entries of a folder from nginx's JSON autoindex: [{'name', 'type', 'size'?}].
        A missing folder is an empty list."""
        status, body = self._call("GET", volume, path.rstrip("/") + "/", timeout=TRANSFER_TIMEOUT)
        if status == 404:
            return []
        if status != 200:
            raise VolumeError(f"volume {volume_host(volume)} answered GET {path} with {status}")
        try:
            return json.loads(body.decode())
        except ValueError:
            raise VolumeError(f"volume {volume_host(volume)}: {path} is not a JSON listing") from None

    def open(self, volume, path):
        """A streaming GET of a file: a _Download (.length, .stream(CHUNK),
        .close()); None if the file is missing."""
        host = volume_host(volume)
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (_target(volume, host, path), host.encode())
        for attempt in (1, 2):
            try:
                conn = self._take(host, new=attempt == 2)
            except OSError as e:
                raise self._down(host, e) from None
            try:
                conn.sock.settimeout(TRANSFER_TIMEOUT)
                conn.sock.sendall(request)
                status, head, keep = conn.head()
                if status != 200:
                    conn.body(status, head)
            except (OSError, ValueError) as e:
                conn.close()
                if conn.used and attempt == 1 and not isinstance(e, socket.timeout):
                    continue
                raise self._down(host, e, what="did not answer GET") from None
            conn.used = True
            self.mark_up(host)
            if status == 200:
                return _Download(self, host, conn, head, keep)
            self._give(host, conn, keep)
            if status == 404:
                return None
            raise VolumeError(f"volume {host} answered GET with {status}")

    # -- the fan-out write

    def put(self, volumes, path, chunks, length=None, tmp=None, fence=None):
        """Write one value at `path` on every volume; returns (md5 hex, size).

        1. Stream `chunks` to every volume, each into its own upload under
           TMP_DIR (upload_name(tmp, volume)), chunk by chunk: each chunk goes
           to every volume before the next one is read, so memory does not
           grow with the value.
        2. Once every upload is complete, fence(md5, size): it raises if the
           writer may no longer land these bytes (its lock lost, the wrong md5).
        3. MOVE every upload onto `path`, never over a file (Overwrite: F);
           a file found there is removed first (the caller holds the lock).

        Only the MOVE touches `path`, so an upload that a frozen volume
        finishes late stays an upload. On failure the error carries
        `.outcomes`: {volume: LANDED or UNKNOWN} for the volumes whose path
        may now hold these bytes; the others' paths were not touched."""
        tmp = tmp or new_tmp()
        names = {v: upload_name(tmp, v) for v in volumes}
        try:
            md5, size = self._upload(volumes, names, chunks, length)
            if fence is not None:
                try:
                    fence(md5, size)
                except Exception:
                    self._drop_uploads(names)   # complete, never to be moved: they only take space
                    raise
        except BaseException as e:
            e.outcomes = {}
            raise
        outcomes, errors = {}, {}
        for volume, error in zip(volumes, self._moves(volumes, names, path)):
            if error is None:
                outcomes[volume] = LANDED
            elif isinstance(error, MoveUnknown):
                outcomes[volume], errors[volume] = UNKNOWN, error
            else:
                errors[volume] = error
        if errors:
            # an upload whose MOVE was refused stays one, taking space (on a full disk, say)
            self._drop_uploads({v: names[v] for v in errors if v not in outcomes})
            error = next(errors[v] for v in volumes if v in errors)
            error.outcomes = outcomes
            raise error
        return md5, size

    def _upload(self, volumes, names, chunks, length):
        """Step 1 of put(): every upload complete, or an error (and the
        uploads that did complete removed, where the volume answers).

        One loop sends each chunk to every volume in turn: the kernel's
        socket buffers keep every volume busy meanwhile, and a PUT costs no
        thread or queue per replica. A volume that takes no byte for
        op_timeout seconds fails the write."""
        hosts = {v: volume_host(v) for v in volumes}
        framing = (b"Content-Length: %d\r\n" % length if length is not None
                   else b"Transfer-Encoding: chunked\r\n")
        heads = {v: b"PUT %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            _target(hosts[v], hosts[v], names[v]), hosts[v].encode(), framing, self.write_headers)
            for v in volumes}
        conns, sent = {}, set()       # sent: volumes that got the whole body
        errors, done = {}, []         # done: volumes whose upload completed
        md5, size = hashlib.md5(), 0
        hashing = None                # waits for the md5 of the chunk before
        try:
            for v in volumes:
                try:
                    conns[v] = self._take(hosts[v])
                except OSError as e:
                    raise self._down(hosts[v], e) from None
                conns[v].sock.settimeout(self.op_timeout)
            for chunk in chunks:
                if not chunk:
                    continue   # chunked, it would say the body ended
                if hashing is not None:
                    hashing()
                    hashing = None
                if self.offload is not None and len(chunk) >= OFFLOAD_MIN:
                    hashing = self.offload(md5.update, chunk)   # on another core while we send
                else:
                    md5.update(chunk)
                size += len(chunk)
                data = chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                for v in volumes:
                    self._send(hosts[v], conns[v], heads.pop(v, b"") + data)
                    if size == length:
                        sent.add(v)   # its upload is complete: it may land even if we break off now
            if hashing is not None:
                hashing()
            if length is not None and size != length:
                raise VolumeError(f"the value was {size} bytes, not the {length} announced")
            end = b"" if length is not None else b"0\r\n\r\n"   # a chunked body's last chunk
            for v in volumes:
                if v in heads or end:
                    self._send(hosts[v], conns[v], heads.pop(v, b"") + end)
                sent.add(v)
        except BaseException:
            # broken off (the client went away, a volume failed): a volume
            # ends an upload whose connection closes before its last byte.
            # One that got the last byte completes it: its answer is awaited
            # (op_timeout), so that the DELETE of the upload comes after it.
            for v, conn in conns.items():
                if v in sent:
                    try:
                        conn.sock.settimeout(self.op_timeout)
                        status, head, _ = conn.head()
                        conn.body(status, head)
                    except (OSError, ValueError):
                        pass
                conn.close()
            self._drop_uploads({v: names[v] for v in sent})
            raise
        for v in volumes:
            try:
                status, head, keep = self._answer_to_upload(conns[v])
                body = conns[v].body(status, head)
            except (OSError, ValueError) as e:
                conns[v].close()
                errors[v] = self._down(hosts[v], e, what="failed during upload")
                continue
            conns[v].used = True
            self._give(hosts[v], conns[v], keep)
            self.mark_up(hosts[v])
            if status in (201, 204):
                done.append(v)
            else:
                errors[v] = VolumeError(f"volume {hosts[v]} answered PUT with {status}: {_nginx_reason(body)}")
        if errors:
            self._drop_uploads({v: names[v] for v in done})
            raise next(errors[v] for v in volumes if v in errors)   # the first in placement order
        return md5.hexdigest(), size

    def _answer_to_upload(self, conn):
        """head() of the answer to an upload, waiting op_timeout from the
        volume's last progress: while bytes of ours that the volume has not
        taken yet (TIOCOUTQ: a megabyte or more in socket buffers) go down, it
        is slow, not frozen."""
        conn.sock.settimeout(self.op_timeout)
        left = _unsent(conn.sock)
        while True:
            try:
                return conn.head()    # a timeout takes nothing from conn.buf: it can be asked again
            except socket.timeout:
                now = _unsent(conn.sock)
                # all taken (a frozen volume's kernel takes what fits, then
                # nothing): no progress to wait for
                if left is None or now is None or not 0 < now < left:
                    raise
                left = now

    def _send(self, host, conn, data):
        """Part of an upload, in slices of SEND_SLICE bytes, each of which the
        volume must take within op_timeout (a sendall's timeout is for the
        whole call). On failure, the volume's answer if it gave one (a
        refusal: it stopped reading), else VolumeDown."""
        try:
            if len(data) <= SEND_SLICE:
                conn.sock.sendall(data)
            else:
                view = memoryview(data)
                for at in range(0, len(view), SEND_SLICE):
                    conn.sock.sendall(view[at:at + SEND_SLICE])
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise self._down(host, e, what="failed during upload") from None
            try:
                conn.sock.settimeout(min(self.timeout, 1.0))
                status, head, _ = conn.head()
                reason = _nginx_reason(conn.body(status, head))
            except (OSError, ValueError):
                raise self._down(host, e, what="failed during upload") from None
            raise VolumeError(f"volume {host} answered PUT with {status}: {reason}") from None

    def _drop_uploads(self, names):
        """Remove uploads that will not be moved (tidiness: a temp file is
        never read; rebalance.py sweeps what is left)."""
        self._deletes([(volume_host(v), names[v]) for v in names if not self.known_down(volume_host(v))])

    def _moves(self, volumes, names, path):
        """MOVE each volume's upload onto `path` at once, as move() does: None
        for each that landed, else the VolumeError (MoveUnknown: it may land yet)."""
        calls = [(volume_host(v), names[v], self._move_headers(v, path)) for v in volumes]
        out = []
        for volume, result in zip(volumes, self._fan("MOVE", calls, timeout=self.op_timeout, kind=MoveUnknown)):
            if not isinstance(result, Exception):
                status, body = result
                if status in (201, 204):
                    result = None
                elif status == 412:     # a file is there: remove it and try again, this volume alone
                    try:
                        self.move(volume, names[volume], path, delete_first=True)
                        result = None
                    except VolumeError as e:
                        result = e
                else:
                    result = VolumeError(f"volume {volume_host(volume)} answered MOVE with {status}: "
                                         f"{_nginx_reason(body)}")
            out.append(result)
        return out

    def _move_headers(self, volume, path):
        return b"Destination: %s\r\nOverwrite: F\r\n%s" % (
            _target(volume, volume_host(volume), path), self.write_headers)

    def move(self, volume, name, path, delete_first=False):
        """MOVE the upload `name` onto `path` without replacing a file (the
        volume checks and renames at once): a file found there (a stray
        copy, or a late writer's) is deleted and the MOVE tried again.
        VolumeError: nothing moved; MoveUnknown: no answer, it may land yet."""
        host = volume_host(volume)
        headers = self._move_headers(volume, path)
        for _ in range(MOVE_TRIES):
            if delete_first:
                self.delete(volume, path)
            delete_first = True
            status, body = self._call("MOVE", host, name, headers, timeout=self.op_timeout, kind=MoveUnknown)
            if status in (201, 204):
                return
            if status != 412:
                raise VolumeError(f"volume {host} answered MOVE with {status}: {_nginx_reason(body)}")
        raise VolumeError(f"volume {host}: a file kept appearing at {path} while a value was moved there")

    def remove(self, volume, path, tmp=None):
        """Remove a key's file for good: first the upload `tmp` (a write's,
        see upload_name) whose MOVE onto it may still be on its way, since
        once the upload is gone no MOVE can land; then the file.
        VolumeError if either is not confirmed."""
        if tmp:
            self.delete(volume_host(volume), upload_name(tmp, volume))
        self.delete(volume, path)

    def remove_all(self, notes, path):
        """remove() of {volume: tmp} at once, except on volumes known down;
        returns the volumes removed for sure."""
        asked = [v for v in notes if not self.known_down(volume_host(v))]
        uploads = [v for v in asked if notes[v]]
        gone = {v for v, e in zip(uploads, self._deletes([(volume_host(v), upload_name(notes[v], v))
                                                           for v in uploads])) if e is None}
        asked = [v for v in asked if v in gone or not notes[v]]
        return [v for v, e in zip(asked, self._deletes([(v, path) for v in asked])) if e is None]

    # -- many listings at once (rebuild.py)

    def listdirs(self, folders, window=128):
        """listdir() of many folders at once: [(volume, path)] -> a list in the
        same order, each item the folder's entries ([] if it is missing) or the
        VolumeError that folder got.

        rebuild.py lists every folder of every volume, most of them holding one
        file. So the requests to each server go pipelined on one keep-alive
        connection (nginx answers pipelined requests in order), at most
        `window` of them unanswered at a time, and all servers' at once.
        Unanswered requests stay under _ListingPipe.MAX_BYTES, so that a send
        never waits on a server that waits for its answers to be read. A
        connection that nginx closed (an idle one it timed out, or its
        keepalive_requests reached) is replaced and the requests it had not
        answered are sent again: a GET changes nothing."""
        results = [None] * len(folders)
        by_host = {}
        for i, (volume, path) in enumerate(folders):
            host = volume_host(volume)
            by_host.setdefault(host, []).append(
                (i, path, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (
                    _target(volume, host, path.rstrip("/") + "/"), host.encode())))
        pipes = [_ListingPipe(self, host, asked, results, window) for host, asked in by_host.items()]
        for pipe in pipes:
            pipe.send()
        for pipe in pipes:
            pipe.finish()
        return results


class _Closed(ConnectionError):
    """The server closed the connection (an end of file, not a reset): the
    end of a body that has no length, else a failure like any other."""


class _Conn:
    """One keep-alive HTTP/1.1 connection to a volume server, and the bytes
    read from it that no answer has taken yet."""

    __slots__ = ("sock", "buf", "pos", "since", "used")

    def __init__(self, sock):
        self.sock, self.buf, self.pos = sock, b"", 0
        self.since = time.monotonic()   # when it was last left idle
        self.used = False               # it has answered: a failure now may be the server closing it

    def close(self):
        self.sock.close()

    def clean(self):
        """Nothing read and not taken: the next bytes are the next answer's."""
        return self.pos == len(self.buf)

    def alive(self):
        """Idle for less than KEEPALIVE_IDLE (nginx keeps one 75 s) and not
        closed by the server meanwhile: a peek that does not wait."""
        if time.monotonic() - self.since >= KEEPALIVE_IDLE or not self.clean():
            return False
        try:
            self.sock.settimeout(0)
            self.sock.recv(1, socket.MSG_PEEK)   # b"" (closed) or bytes nobody asked for
        except OSError as e:
            return e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
        return False

    # -- reading answers from self.buf, refilled from the socket

    def more(self):
        data = self.sock.recv(1 << 18)
        if not data:
            raise _Closed("connection closed")
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def upto(self, mark, limit=65536):
        """The bytes up to the next `mark` (which is passed over)."""
        while True:
            end = self.buf.find(mark, self.pos)
            if end >= 0:
                out, self.pos = self.buf[self.pos:end], end + len(mark)
                return out
            if len(self.buf) - self.pos > limit:
                raise ValueError("answer headers too long")
            self.more()

    def take(self, n):
        """The next n bytes (a large body is read in pieces, joined once)."""
        have = len(self.buf) - self.pos
        if have < n:
            parts = [self.buf[self.pos:]]
            while have < n:
                data = self.sock.recv(max(n - have, 1 << 18))
                if not data:
                    raise _Closed("connection closed")
                parts.append(data)
                have += len(data)
            self.buf, self.pos = b"".join(parts), 0
        out, self.pos = self.buf[self.pos:self.pos + n], self.pos + n
        return out

    def head(self):
        """(status, header block in lower case, keep-alive?) of the next
        answer, interim ones (1xx) skipped. ValueError if it is not HTTP."""
        while True:
            head = self.upto(b"\r\n\r\n")
            first = head[:head.find(b"\r\n")] if b"\r\n" in head else head
            status_line = first.split(None, 2)
            if (len(status_line) < 2 or not status_line[0].startswith(b"HTTP/")
                    or not status_line[1].isdigit()):
                raise ValueError(f"not an HTTP answer: {first[:80]!r}")
            status = int(status_line[1])
            if not 100 <= status < 200:
                break
        low = head.lower()
        connection = _header(low, b"\r\nconnection:")
        if connection is None or connection == b"keep-alive":
            keep = connection is not None or status_line[0] == b"HTTP/1.1"
        else:   # HTTP/1.1 keeps the connection unless told otherwise, HTTP/1.0 only if told
            tokens = connection.replace(b" ", b"").split(b",")
            keep = b"close" not in tokens and (status_line[0] == b"HTTP/1.1" or b"keep-alive" in tokens)
        return status, low, keep

    def body(self, status, low, head_request=False):
        """The whole body of the answer whose head() was (status, low)."""
        if head_request or status in (204, 304):   # never a body
            return b""
        if b"chunked" in (_header(low, b"\r\ntransfer-encoding:") or b""):
            # nginx sends a small listing as one chunk and the last one: take both at once
            buf, pos = self.buf, self.pos
            eol = buf.find(b"\r\n", pos, pos + 20)
            if eol > pos and buf[pos:eol].isalnum():
                end = eol + 2 + int(buf[pos:eol], 16)
                if buf.startswith(b"\r\n0\r\n\r\n", end):
                    self.pos = end + 7
                    return buf[eol + 2:end]
            return b"".join(self.chunks())
        length = _header(low, b"\r\ncontent-length:")
        if length is not None:
            return self.take(int(length))
        parts = []
        while True:   # no length: the body ends when the server closes
            try:
                self.more()
            except _Closed:
                return b"".join(parts) + self.take(len(self.buf) - self.pos)
            parts.append(self.take(len(self.buf) - self.pos))

    def chunks(self):
        """The pieces of a chunked body, as they arrive."""
        while True:
            size = int(self.upto(b"\r\n").split(b";", 1)[0], 16)
            if size == 0:
                while self.upto(b"\r\n"):   # trailers, up to the blank line
                    pass
                return
            yield self.take(size + 2)[:-2]   # each chunk ends in CRLF

    def answer(self, to_head=False):
        """(status, body, keep-alive?) of the next answer; `to_head`: it answers a HEAD."""
        status, low, keep = self.head()
        return status, self.body(status, low, to_head), keep


class _Download:
    """A file being read from a volume (Volumes.open): `length` (None if the
    volume did not say), stream(n) for its bytes, close() when done."""

    def __init__(self, volumes, host, conn, low, keep):
        self.volumes, self.host, self.conn, self.keep = volumes, host, conn, keep
        length = _header(low, b"\r\ncontent-length:")
        self.length = int(length) if length is not None and length.isdigit() else None
        self.chunked = b"chunked" in (_header(low, b"\r\ntransfer-encoding:") or b"")
        self.finished = False

    def stream(self, n):
        """The file's bytes, at most n at a time. VolumeError if the transfer breaks."""
        conn = self.conn
        try:
            if self.chunked:
                yield from conn.chunks()
            elif self.length is None:
                while True:
                    try:
                        conn.more()
                    except _Closed:
                        break
                    yield conn.take(len(conn.buf) - conn.pos)
                self.keep = False
            else:
                left = self.length
                while left:
                    if conn.clean():
                        conn.more()
                    piece = conn.take(min(left, n, len(conn.buf) - conn.pos))
                    left -= len(piece)
                    yield piece
        except (OSError, ValueError) as e:
            self.keep = False
            raise VolumeError(f"volume {self.host}: reading a file broke off: {_reason(e)}") from None
        self.finished = True

    def close(self):
        """Give the connection back if the file was read to its end, else close it."""
        if self.conn is not None:
            self.volumes._give(self.host, self.conn, self.keep and self.finished)
            self.conn = None


class _ListingPipe:
    """Volumes.listdirs' requests to one server, pipelined on one keep-alive
    connection, taken from (and given back to) the volumes' idle ones."""

    # bytes of requests sent and not answered: less than the socket buffers
    # of both ends hold, so sendall() returns even while the server waits for
    # us to read its answers
    MAX_BYTES = 32768

    def __init__(self, volumes, host, asked, results, window):
        self.volumes, self.host, self.results, self.window = volumes, host, results, window
        self.todo = asked[::-1]   # (result index, path, request) not sent yet, next one last
        self.sent = []            # sent on self.conn and not answered yet, oldest first
        self.conn = None
        self.up = False

    def send(self):
        """Send requests until `window` (or MAX_BYTES) are unanswered (a new
        connection if needed)."""
        if self.conn is None:
            try:
                self.conn = self.volumes._take(self.host)
            except OSError as e:
                return self.fail(e)
            self.conn.sock.settimeout(TRANSFER_TIMEOUT)
        batch, room = [], self.MAX_BYTES - sum(len(request) for _, _, request in self.sent)
        while self.todo and len(self.sent) + len(batch) < self.window:
            size = len(self.todo[-1][2])
            if size > room and (batch or self.sent):   # one request always goes
                break
            room -= size
            batch.append(self.todo.pop())
        if not batch:
            return
        self.sent += batch
        try:
            self.conn.sock.sendall(b"".join(request for _, _, request in batch))
        except OSError as e:
            self.broken(e)

    def finish(self):
        """Read every answer, sending the rest of the requests as room frees up."""
        while self.sent or self.todo:
            if self.conn is None or not self.sent:
                self.send()
                continue
            try:
                status, body, keep = self.conn.answer()
            except (OSError, ValueError) as e:
                self.broken(e)
                continue
            i, path, _ = self.sent.pop(0)
            self.conn.used = True
            self.results[i] = self.outcome(path, status, body)
            if not keep:
                self.drop()
            elif self.todo and len(self.sent) <= self.window // 2:
                self.send()
        if self.conn is not None:
            self.volumes._give(self.host, self.conn)
            self.conn = None

    def outcome(self, path, status, body):
        if not self.up:   # it answers (a failure after this marks it down again)
            self.up = True
            self.volumes.mark_up(self.host)
        if status == 404:
            return []
        if status != 200:
            return VolumeError(f"volume {self.host} answered GET {path} with {status}")
        try:
            return json.loads(body.decode())   # a str skips json.loads' encoding guess
        except ValueError:
            return VolumeError(f"volume {self.host}: {path} is not a JSON listing")

    def drop(self):
        """Close the connection; what it did not answer is sent again on a new one."""
        self.conn.close()
        self.conn = None
        self.todo += self.sent[::-1]
        self.sent = []

    def broken(self, e):
        """The connection failed: try again on a new one, unless this one had
        answered nothing yet, or the server let it time out."""
        if not self.conn.used or isinstance(e, socket.timeout):
            self.fail(e)
        else:
            self.drop()

    def fail(self, e):
        """The server cannot be reached: every request not answered fails."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        error = self.volumes._down(self.host, e)
        for i, _, _ in self.sent + self.todo:
            self.results[i] = error
        self.sent, self.todo = [], []


def _header(head, needle):
    """The value of a header in an answer's header block (lower case, without
    its final blank line), found by `needle` (b"\\r\\nname:"); None if absent."""
    at = head.find(needle)
    if at < 0:
        return None
    end = head.find(b"\r\n", at + 2)
    return head[at + len(needle):end if end >= 0 else len(head)].strip()


def _unsent(sock):
    """Bytes sent on `sock` that the peer has not acknowledged yet (Linux's
    TIOCOUTQ); None where it cannot be asked."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return None


# what quote(path, safe="/=+") leaves as it is: hex, svXX and base64 folder names are
_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/=+"


def _target(volume, host, path):
    """The request target for `path` on `volume` (its subvolume folder
    first), percent-encoded as a volume expects, as bytes."""
    target = volume[len(host):] + path
    if target.strip(_SAFE):   # quote() only what needs it: it costs a few us
        target = quote(target, safe="/=+")
    return target.encode()


LANDED, UNKNOWN = "landed", "unknown"   # what a failed put() may have left at a volume's path


def upload_name(tmp, volume):
    """Path of a write's upload on `volume`'s server: TMP_DIR + tmp, and the
    subvolume, so that two replicas on one server never share an upload."""
    return TMP_DIR + tmp + volume[len(volume_host(volume)):].replace("/", ".")


def _reason(exc):
    """One line saying why a connection failed."""
    while getattr(exc, "reason", None) is not None and exc.reason is not exc:
        exc = exc.reason
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _nginx_reason(body: bytes):
    """The <title> of an nginx error page, or a short form of the body."""
    text = body.decode("latin-1", "replace")
    start = text.find("<title>")
    if start >= 0:
        end = text.find("</title>", start)
        return text[start + 7:end].strip()
    return text.strip()[:200] or "no reason given"


# ---------------------------------------------------------------- the store

class Prober:
    """Which volumes a GET may send a client to, known without a request per
    GET: every PROBE_EVERY seconds, one thread (a greenlet in the master)
    asks each volume for its identity (GET /.id, MKV_VOLTIMEOUT). A volume
    is a redirect target while its last answer is under PROBE_FRESH seconds
    old and its identity is the one the index recorded (the first seen is
    recorded): a wiped or replaced disk is not, until rebalance.py has
    filled it and recorded its new identity."""

    def __init__(self, index, volumes, hosts, every=PROBE_EVERY):
        self.index, self.volumes, self.hosts, self.every = index, volumes, list(hosts), every
        self._answered = {}      # host -> time.monotonic() of its last good answer
        self.replaced = set()    # hosts that answer with an identity the index does not know
        self._seen = set()       # hosts that answered once
        self._thread = None

    def start(self):
        """One look now (so the first GETs know), then one every `every` seconds."""
        self.look()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")
        self._thread.start()
        return self

    def _run(self):
        while True:
            time.sleep(self.every)
            try:
                self.look()
            except Exception:   # the index busy, say: the next look will do
                log.exception("probing the volumes failed")

    def look(self, hosts=None):
        asked = list(hosts or self.hosts)
        # a host that did not answer is not vouched for, and not marked down
        # either: a look that a busy worker made late is no proof it is down
        found = {host: ident for host, ident in zip(asked, self.volumes.identities(asked, mark=False))
                 if not isinstance(ident, Exception)}
        for host in asked:
            if host not in found and self._answered.pop(host, None) is not None:
                log.warning("volume %s did not answer the prober: reads go to the other replicas", host)
        known = self.index.volume_ids()
        for host, ident in found.items():
            if host not in known:
                self.index.record_volume_id(host, ident)
                known[host] = self.index.volume_ids().get(host, ident)
            if known[host] != ident:
                if host not in self.replaced:
                    log.warning("volume %s is not the disk the index knows (identity %r, recorded %r): "
                                "no reads go to it until rebalance.py has filled it", host, ident, known[host])
                self.replaced.add(host)
                continue
            if host in self.replaced:
                log.warning("volume %s is the disk the index knows again", host)
                self.replaced.discard(host)
            elif host not in self._answered and host in self._seen:
                log.warning("volume %s answers the prober again", host)
            self._seen.add(host)
            self._answered[host] = time.monotonic()

    def servable(self, host):
        """True if a GET may send a client to `host` now. A host not watched
        yet (a volume removed from MKV_VOLUMES that records still name, until
        rebalance.py has moved its copies) is looked at now and watched."""
        if host not in self.hosts:
            self.hosts.append(host)
            self.look([host])
        return (time.monotonic() - self._answered.get(host, -PROBE_FRESH) < PROBE_FRESH
                and not self.volumes.known_down(host))


class Store:
    """What the master does with a key, over the index and the volumes.

    Opened lazily per process, so that each gunicorn worker has its own SQLite
    connection and HTTP pools, made after the fork."""

    def __init__(self, settings: Settings, offload=None):
        self.settings = settings
        self.index = Index(settings.db)
        self.volumes = Volumes(timeout=settings.voltimeout, secret=settings.secret, offload=offload)
        self.prober = Prober(self.index, self.volumes, settings.volumes).start()

    def placement(self, key):
        s = self.settings
        return key2volume(key, s.volumes, s.replicas, s.subvolumes)

    def locate(self, key):
        """(url to redirect to, record or None). KeyMissing if the key is not live
        and there is no fallback; Unavailable if no replica answers with the file."""
        rec = self.index.get(key)
        if rec is None or rec.state != LIVE:
            if self.settings.fallback:
                return "http://" + self.settings.fallback + fallback_path(key), rec
            raise KeyMissing("no such key")
        order = list(rec.volumes)
        random.shuffle(order)   # spread reads over the replicas
        if not self.settings.get_check:
            # the prober vouches for the volume: up a moment ago, and the disk the index knows
            for volume in order:
                if self.prober.servable(volume_host(volume)):
                    return "http://" + volume + key2path(key), rec
            # none vouched for (all down, or this worker too busy to look lately): ask them now
        path = key2path(key)
        missing = []
        for volume in order:
            host = volume_host(volume)
            if host in self.prober.replaced or not self.volumes.usable(host):
                continue
            try:
                if self.volumes.has(volume, path):
                    return "http://" + volume + path, rec
                missing.append(volume)
            except VolumeError:
                continue
        if missing and len(missing) == len(order):
            now = self.index.get(key)
            if now is None or now.state != LIVE:
                raise KeyMissing("no such key")    # deleted while we looked
            raise Unavailable("no replica of this key is on its volumes (run rebuild.py --check)")
        raise Unavailable("no volume holding this key can be reached")

    def put(self, key, chunks, length=None):
        """Write a new key: every replica, then the index. Returns (md5, size).

        The key is claimed before the first byte of the body is read, so a
        second PUT of it meanwhile is 409 however slow this client is."""
        check_storable(key)
        rec = self.index.get(key)
        if rec is not None and rec.state == LIVE:
            raise KeyExists("key exists: DELETE it first (PUT does not overwrite)")
        volumes = self.placement(key)
        path = key2path(key)
        owner, tmp = new_owner("put-"), new_tmp()
        claim = self.index.start_put(key, volumes, owner, tmp=tmp)
        with Lease(self.index, key, owner) as lease:
            try:
                chunks = iter(chunks)
                first = next((c for c in chunks if c), None)
                if first is None:
                    raise EmptyValue("empty value: a PUT needs a body")
                for v in volumes:
                    if not self.reachable(v):
                        raise VolumeDown(f"volume {volume_host(v)} is down: cannot write all replicas")
                md5, size = self.volumes.put(volumes, path, lease.guard(_chain(first, chunks)), length,
                                             tmp=tmp, fence=lambda md5, size: self.fence(key, owner))
            except BaseException as e:
                self._abandon(key, owner, path, tmp, claim, getattr(e, "outcomes", {}), lease)
                raise
            # copies that the replaced record or failed writes left outside the placement
            resolved = self.volumes.remove_all({v: t for v, t in claim.notes.items() if v not in volumes}, path)
            if not self.index.finish_put(key, owner, md5, size, resolved):
                raise KeyBusy("lost the lock on the key while writing it; try again")
        return md5, size

    def reachable(self, volume, always_ask=False):
        """Whether to send a volume a value or a DELETE now: yes if the prober
        heard from it a moment ago. Otherwise it is asked now (one HEAD,
        MKV_VOLTIMEOUT: a hung volume costs that, not a transfer's timeout);
        while it stays down, once per DOWN_RETRY only, unless `always_ask`
        (a DELETE: rare, and right after the volume's return it must work)."""
        host = volume_host(volume)
        if self.prober.servable(host):
            return True
        return (always_ask or self.volumes.usable(host)) and self.volumes.probe(volume)

    def fence(self, key, owner):
        """Right before a write's bytes land on their paths: the lock must be
        ours still, renewed a whole lease ahead, so that a writer that was
        paused or cut off for longer than its lease lands nothing."""
        if not self.index.renew(key, owner):
            raise KeyBusy("lost the lock on the key while writing it (stalled longer than the "
                          f"{LOCK_LEASE:.0f} s lease); nothing was stored")

    def _abandon(self, key, owner, path, tmp, claim, outcomes, lease):
        """A claimed PUT failed: undo what it can, and leave every copy that
        may remain either in a record or noted (rebalance.py removes those)."""
        if lease.lost:
            return   # the key is another request's now: our notes stay, its record is its own
        if not outcomes:
            # no path was touched: the replaced record, if any, vouches for its copies again
            if claim.old is not None:
                undo = lambda: self.index.restore(key, owner, claim.old, resolved=claim.added)  # noqa: E731
            else:
                undo = lambda: self.index.abandon_put(key, owner, resolved=claim.added)  # noqa: E731
        else:
            removed = self.volumes.remove_all({v: tmp for v in outcomes}, path)
            old = set(claim.old.volumes) if claim.old is not None else set()
            # untouched paths are as they were: clean, unless the replaced record had a copy there
            resolved = [v for v in claim.added if v in removed or (v not in outcomes and v not in old)]
            undo = lambda: self.index.abandon_put(key, owner, resolved=resolved)  # noqa: E731
        try:
            undo()
        except (sqlite3.Error, IndexBusy):
            # the index cannot be written now (its disk full, say): the key
            # would stay locked until the lease ends; tried again meanwhile
            Lease.later(undo, LOCK_LEASE)
            raise

    def delete(self, key):
        """Remove a key: invisible at once, then its replicas, then its record.
        If a volume fails the key stays invisible and a retry finishes it."""
        owner = new_owner("del-")
        rec = self.index.start_delete(key, owner, protect=self.settings.protect)
        path = key2path(key)
        with Lease(self.index, key, owner):
            # a volume remembered down is asked again now: it may be back
            failed = {v: f"volume {volume_host(v)} is down" for v in rec.volumes
                      if not self.reachable(v, always_ask=True)}
            failed.update(self.volumes.delete_all([v for v in rec.volumes if v not in failed], path))
        if failed:
            self.index.release(key, owner)
            raise DeleteIncomplete("could not remove every replica, DELETE again to finish: "
                                   + "; ".join(failed.values()))
        self.index.finish_delete(key, owner)
        return rec

    def unlink(self, key):
        self.index.unlink(key)


def _chain(first, rest):
    yield first
    yield from rest
