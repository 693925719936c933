"""S3 objects and buckets over the store (the S3 gateway, s3.py, is their
HTTP face): object `k` of bucket `b` is the mkv key `/b/k`, its bytes the
key's one value on the volumes, in the original's format.

What S3 adds to a key lives in the index file, in tables of its own (made
here, next to mkvlib.index's; an index of an earlier mkv opens as it was):

- s3_objects: an object's headers (Content-Type, x-amz-meta-*, ...), ETag
  and Last-Modified. A row applies to the key's value only while its md5
  and size are the record's: a key written or rewritten through the native
  API shows no stale metadata, and a rebuilt index (rebuild.py knows only
  the volumes) serves every object with its bytes, size and md5 ETag, as
  binary/octet-stream, Last-Modified unknown (LAST_MODIFIED_UNKNOWN).
- s3_gens: a counter per key, raised by each atomic replace (mkvlib.replace)
  before it changes a path: a reader checks it did not move (open()).
- s3_buckets: the buckets made by CreateBucket. A bucket also exists while
  a live key starts with its '/name/' (keys the native API wrote, a rebuilt
  index), so rebuild.py restores every bucket that holds an object.
"""
import dataclasses
import json
import random
import re
import time

from mkvlib.errors import KeyBusy, KeyExists, KeyMissing, MkvError, Unavailable, VolumeError
from mkvlib.index import LIVE, prefix_end
from mkvlib.multipart import SCHEMA as MULTIPART_SCHEMA
from mkvlib.placement import check_storable, key2path, volume_host
from mkvlib.replace import replace, sleep_busy

SCHEMA = """
CREATE TABLE IF NOT EXISTS s3_buckets (
    name    TEXT PRIMARY KEY,
    created REAL NOT NULL              -- unix time
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS s3_objects (
    key     BLOB PRIMARY KEY,
    md5     TEXT NOT NULL,             -- the value this row describes: md5 and size
    size    INTEGER NOT NULL,
    etag    TEXT NOT NULL,             -- without quotes: the md5, or md5-N of a multipart upload
    mtime   REAL NOT NULL,             -- unix time: Last-Modified
    headers TEXT NOT NULL,             -- JSON {lowercase header name: value}
    parts   TEXT                       -- JSON [size of each part] of a multipart object, else NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS s3_gens (
    key     BLOB PRIMARY KEY,
    gen     INTEGER NOT NULL           -- raised before a replace changes one of the key's paths
) WITHOUT ROWID;
"""

LAST_MODIFIED_UNKNOWN = 0.0   # unix time given for a key that has no S3 row (written natively)
READ_TRIES = 20               # looks at a key whose value changes under a reader
READ_PAUSE = 0.05             # seconds between two looks while a one-replica replace moves
STORED_HEADERS = ("content-type", "content-encoding", "content-disposition", "content-language",
                  "cache-control", "expires")
DEFAULT_TYPE = "binary/octet-stream"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
IP_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")
BUSY_TRIES = 30               # tries at a key another request holds (about 12 s in all)
LIST_BATCH = 1000             # rows read at once by a listing, at most
LIST_FIRST = 16               # rows its first read takes (then 4 times more each time)

OBJECT_SQL = ("SELECT k.state, k.volumes, k.md5, k.size, k.lock_owner, o.md5, o.size, o.etag, o.mtime,"
              " o.headers, o.parts, g.gen FROM keys k LEFT JOIN s3_objects o ON o.key = k.key"
              " LEFT JOIN s3_gens g ON g.key = k.key WHERE k.key = ?")


class BucketMissing(KeyMissing):
    """No bucket of that name."""


class BucketNotEmpty(MkvError):
    """DeleteBucket of a bucket that holds objects."""


class BadBucketName(MkvError):
    """A name S3's bucket-naming rules refuse."""


@dataclasses.dataclass
class Obj:
    """An object as a reader sees it: the record's value and what S3 adds."""
    key: bytes
    size: int
    md5: str
    etag: str
    mtime: float
    headers: dict
    volumes: list
    parts: list = None     # sizes of the parts of a multipart object
    gen: int = 0

    @property
    def quoted_etag(self):
        return f'"{self.etag}"'


def object_key(bucket: str, name: str) -> bytes:
    """The mkv key of object `name` in `bucket`."""
    return b"/" + bucket.encode() + b"/" + name.encode("utf-8", "surrogateescape")


def check_bucket_name(name: str) -> None:
    """S3's rules for a bucket's name (general purpose buckets)."""
    if (not BUCKET_NAME.fullmatch(name) or ".." in name or ".-" in name or "-." in name
            or IP_LIKE.fullmatch(name) or name.startswith(("xn--", "sthree-"))
            or name.endswith(("-s3alias", "--ol-s3"))):
        raise BadBucketName("The specified bucket is not valid.")


def obj_from_row(key, row):
    """The Obj of an OBJECT_SQL row, or None if the key is not live."""
    state, volumes, md5, size, _, omd5, osize, etag, mtime, headers, parts, gen = row
    if state != LIVE:
        return None
    vols = volumes.split(",") if volumes else []
    if omd5 is not None and omd5 == md5 and osize == size:
        return Obj(key, size, md5, etag, mtime, json.loads(headers), vols, json.loads(parts or "null"), gen or 0)
    return Obj(key, size, md5, md5 or "", LAST_MODIFIED_UNKNOWN, {}, vols, None, gen or 0)


def meta_row(key, md5, size, etag, headers, parts=None, mtime=None):
    """The s3_objects row of a value about to go live."""
    return (key, md5, size, etag or md5, mtime if mtime is not None else time.time(),
            json.dumps(headers, sort_keys=True), json.dumps(parts) if parts else None)


class Objects:
    """Buckets and objects over one Store (one per gateway process)."""

    def __init__(self, store, local=None):
        self.store, self.index, self.db = store, store.index, store.index.db
        self.local = local       # a localread.LocalVolumes: the volumes' folders on this host, if any
        with self.db.write() as db:   # an index of an earlier mkv gets the S3 tables once
            for statement in (SCHEMA + MULTIPART_SCHEMA).split(";\n"):
                if statement.strip():
                    db.execute(statement)

    # -- buckets

    def bucket_exists(self, name: str) -> bool:
        if self.db.read("SELECT 1 FROM s3_buckets WHERE name = ?", (name,)):
            return True
        keys, _ = self.index.list(b"/" + name.encode() + b"/", limit=1)
        return bool(keys)

    def need_bucket(self, name: str) -> None:
        if not self.bucket_exists(name):
            raise BucketMissing("The specified bucket does not exist")

    def create_bucket(self, name: str) -> None:
        check_bucket_name(name)
        with self.db.write() as db:
            db.execute("INSERT OR IGNORE INTO s3_buckets (name, created) VALUES (?, ?)", (name, time.time()))

    def delete_bucket(self, name: str) -> None:
        self.need_bucket(name)
        keys, _ = self.index.list(b"/" + name.encode() + b"/", limit=1)
        if keys:
            raise BucketNotEmpty("The bucket you tried to delete is not empty")
        with self.db.write() as db:
            db.execute("DELETE FROM s3_buckets WHERE name = ?", (name,))

    def buckets(self):
        """[(name, created)] of every bucket, by name: those made by
        CreateBucket and those a live key names (created unknown: 0)."""
        found = dict(self.db.read("SELECT name, created FROM s3_buckets"))
        start = b"/"
        while True:
            # the next key in a folder; keys without one ('/k', the native API's) are passed over in SQLite
            rows = self.db.read("SELECT key FROM keys WHERE state = 'live' AND key >= ? AND key < ?"
                                " AND instr(substr(key, 2), X'2F') > 0 ORDER BY key LIMIT 1", (start, b"0"))
            if not rows:
                break
            key = bytes(rows[0][0])
            slash = key.find(b"/", 1)
            try:
                name = key[1:slash].decode()
                check_bucket_name(name)
                found.setdefault(name, 0.0)
            except (UnicodeDecodeError, BadBucketName):
                pass
            start = key[:slash] + b"0"    # '0' follows '/': past every key of this bucket
        return sorted(found.items())

    # -- reading

    def head(self, key: bytes) -> Obj:
        """The live object at `key`; KeyMissing if there is none."""
        rows = self.db.read(OBJECT_SQL, (key,))
        obj = obj_from_row(key, rows[0]) if rows else None
        if obj is None:
            raise KeyMissing("The specified key does not exist.")
        return obj

    def open(self, key: bytes, rng=None):
        """(Obj, Download or LocalFile) of the object's bytes (rng=(first,
        last): those), from a replica, checked against a replace that runs
        meanwhile: once the file is open, the record must still name that
        replica with the same value and generation, else the file may be the
        next value (a replace moves it in place) and the look starts again."""
        path = key2path(key)
        for _ in range(READ_TRIES):
            obj = self.head(key)
            if not obj.volumes:           # a one-replica replace is moving its value: a moment
                time.sleep(READ_PAUSE)
                continue
            got = self._open_any(obj, path, rng)
            if got is None:
                time.sleep(READ_PAUSE)
                continue
            volume, download = got
            again = self.head(key)
            if (again.md5, again.size, again.gen) == (obj.md5, obj.size, obj.gen) and volume in again.volumes:
                return again if again.etag != obj.etag else obj, download
            download.close()
        raise Unavailable("the object kept changing while it was read; try again")

    def _open_any(self, obj, path, rng):
        """(volume, Download or LocalFile) from the first replica that has the
        file, one on this host's vouched disks first (self.local:
        MKV_S3_VOLUME_DIRS); None if none had it (a replace or delete moved
        on); Unavailable if none answered."""
        health = self.store.health
        order = list(obj.volumes)
        random.shuffle(order)
        order.sort(key=lambda v: not health.may_read(volume_host(v)))   # those vouched for first
        if self.local is not None:
            for volume in order:   # only a disk the prober vouches for, as a read over HTTP would go first
                got = self.local.open(volume, path, rng) if health.may_read(volume_host(volume)) else None
                if got:
                    return volume, got
        headers = b"Range: bytes=%d-%d\r\n" % rng if rng else b""
        errors = []
        for volume in order:
            try:
                download = self.store.volumes.open(volume, path, headers)
            except VolumeError as e:
                errors.append(str(e))
                continue
            if download is not None:
                return volume, download
        if errors and len(errors) == len(order):
            raise Unavailable("no volume holding this object can be reached: " + "; ".join(errors))
        return None

    # -- writing what S3 adds

    def record_meta(self, row):
        """Insert or replace an object's s3_objects row (meta_row())."""
        with self.db.write() as db:
            db.execute("INSERT OR REPLACE INTO s3_objects (key, md5, size, etag, mtime, headers, parts)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def forget_meta(self, key, md5, size):
        """Drop the row of a value deleted (s3_gens stay: a generation never goes back)."""
        with self.db.write() as db:
            db.execute("DELETE FROM s3_objects WHERE key = ? AND md5 = ? AND size = ?", (key, md5, size))

    # -- writing and deleting objects

    def put(self, key, chunks, length, headers, check=None, etag=None, parts=None):
        """Write object `key`: a new key, or an atomic replace of a live one
        (mkvlib.replace); last writer wins. check(md5, size) may refuse the
        value (a digest) before it lands. Returns its Obj."""
        check_storable(key)
        body = Body(chunks)
        got = {}

        def checked(md5, size):
            if check is not None:
                check(md5, size)
            got["row"] = meta_row(key, md5, size, etag, headers, parts)
            return got["row"]

        def new_key_check(md5, size):
            self.record_meta(checked(md5, size))   # before it lands: the row matches once it is live

        for tries in range(BUSY_TRIES):
            try:
                done = replace(self, key, body, length, checked, lambda md5, size: got["row"])
                if done is None:
                    self.store.put(key, body, length, empty_ok=True, check=new_key_check)
                _, md5, size, etag_, mtime, _, _ = got["row"]
                return Obj(key, size, md5, etag_, mtime, headers, [], parts)
            except (KeyBusy, KeyExists):
                if body.started:
                    raise
                sleep_busy(tries)
        raise KeyBusy("another request kept writing or deleting this key; try again")

    def delete(self, key):
        """Delete object `key` (a missing one is fine); waits for a writer that holds it."""
        for tries in range(BUSY_TRIES):
            try:
                rec = self.store.delete(key)
            except KeyMissing:
                return
            except KeyBusy:
                sleep_busy(tries)
                continue
            self.forget_meta(key, rec.md5, rec.size)
            return
        raise KeyBusy("another request kept writing this key; try again")


    # -- listing

    def scan(self, prefix: bytes, after: bytes = None, strict=True, first=LIST_BATCH):
        """Every live Obj whose key starts with `prefix` and is past `after`
        (or from `after` on, if not `strict`), in byte order; read `first`
        rows at first, then four times more each time (up to LIST_BATCH)."""
        high = prefix_end(prefix)
        low = after if after is not None and after >= prefix else prefix
        strict = strict and low == after
        batch = first
        while True:
            sql = ("SELECT k.key, k.state, k.volumes, k.md5, k.size, k.lock_owner, o.md5, o.size, o.etag,"
                   " o.mtime, o.headers, o.parts, NULL FROM keys k LEFT JOIN s3_objects o ON o.key = k.key"
                   f" WHERE k.state = 'live' AND k.key {'>' if strict else '>='} ?"
                   + (" AND k.key < ?" if high is not None else "") + " ORDER BY k.key LIMIT ?")
            params = (low, high, batch) if high is not None else (low, batch)
            rows = self.db.read(sql, params)
            for row in rows:
                obj = obj_from_row(bytes(row[0]), row[1:])
                if obj is not None:
                    yield obj
            if len(rows) < batch:
                return
            low, strict, batch = bytes(rows[-1][0]), True, min(LIST_BATCH, batch * 4)

    def list(self, prefix: bytes, after: bytes = None, delimiter: bytes = None, max_keys=1000):
        """One page of a bucket's listing under `prefix` (bucket's '/name/'
        included), from past `after`: (objects, common prefixes, truncated,
        last key or prefix given). max_keys counts both kinds together; the
        keys under a common prefix are skipped over, not read."""
        objects, prefixes, last = [], [], None
        if max_keys == 0:
            return objects, prefixes, False, last   # as S3 answers it: nothing, and no next page
        start, strict, first = after, True, min(LIST_BATCH, max_keys + 1)
        while True:
            jumped = False
            for obj in self.scan(prefix, start, strict, first):
                common = None
                if delimiter:
                    at = obj.key.find(delimiter, len(prefix))
                    if at >= 0:
                        common = obj.key[:at + len(delimiter)]
                if common is not None and after is not None and common <= after:
                    pass          # `after` was this prefix (a marker, a token): given already
                elif len(objects) + len(prefixes) == max_keys:
                    return objects, prefixes, True, last
                elif common is not None:
                    prefixes.append(common)
                    last = common
                else:
                    objects.append(obj)
                    last = obj.key
                    continue
                start, strict = prefix_end(common), False
                first = LIST_FIRST     # past a common prefix: often one key of the next run is all we need
                jumped = start is not None
                break
            if not jumped:
                return objects, prefixes, False, last


class Body:
    """A request body's chunks, once: says whether reading has started (a
    busy key may be tried again only before)."""

    def __init__(self, chunks):
        self.chunks, self.started = iter(chunks), False

    def __iter__(self):
        return self

    def __next__(self):
        self.started = True
        return next(self.chunks)
