"""S3 multipart uploads over the store.

Each part is an ordinary mkv key under PARTS_PREFIX ('/.s3-parts/ID/NNNNN',
outside every bucket: a bucket's name cannot start with '.'), written like
any object (replicated, fenced, atomic when a part is sent again); the
upload and its parts' md5s and sizes are rows of s3_uploads and s3_parts in
the index. So an upload in progress survives a restart of the gateway or of
the master: all of it is in the index and on the volumes.

Completing streams the parts, in order, into the object's key (bounded
memory): the object is then an ordinary key in the original's format, one
file per replica. Its ETag is S3's: md5 of the parts' md5s, '-N'. The
upload's row stays 'completed' with that ETag (a second Complete answers as
the first), and its parts go.

An upload abandoned for UPLOAD_AGE seconds (from its last part) is removed
by rebalance.py (expire()): its part keys are marked 'deleting', which
rebalance.py purges in the same run, as it does a DELETE a volume failed.
Part keys that no upload names (an index rebuilt from the volumes, an
abort whose deletes failed) go the same way.
"""
import hashlib
import json
import time
import uuid

from mkvlib.errors import KeyBusy, KeyMissing, MkvError
from mkvlib.index import prefix_end
from mkvlib.volumes import CHUNK

PARTS_PREFIX = b"/.s3-parts/"
PART_MIN = 5 << 20           # bytes: the smallest part but the last, as S3 has it
PART_NUMBER_MAX = 10_000
UPLOAD_AGE = 7 * 24 * 3600   # seconds an upload may sit untouched before rebalance.py removes it
COMPLETING_LEASE = 3600.0    # seconds a Complete may run before another may take the upload over

SCHEMA = """
CREATE TABLE IF NOT EXISTS s3_uploads (
    id      TEXT PRIMARY KEY,
    key     BLOB NOT NULL,             -- the object's mkv key
    created REAL NOT NULL,             -- unix time
    touched REAL NOT NULL,             -- unix time of its last part (or of its completion)
    headers TEXT NOT NULL,             -- JSON: the object's headers, from CreateMultipartUpload
    state   TEXT NOT NULL,             -- 'open', 'completing', 'completed'
    etag    TEXT                       -- the object's ETag, once completed
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS s3_uploads_by_key ON s3_uploads (key, id);
CREATE TABLE IF NOT EXISTS s3_parts (
    id      TEXT NOT NULL,
    number  INTEGER NOT NULL,
    md5     TEXT NOT NULL,
    size    INTEGER NOT NULL,
    mtime   REAL NOT NULL,
    PRIMARY KEY (id, number)
) WITHOUT ROWID;
"""


class NoSuchUpload(MkvError):
    """No upload in progress of that id (aborted, completed elsewhere, or never)."""


class PartError(MkvError):
    """CompleteMultipartUpload's parts are wrong: S3's `code` (a 400)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def part_key(upload_id: str, number: int) -> bytes:
    return PARTS_PREFIX + b"%s/%05d" % (upload_id.encode(), number)


def multipart_etag(md5s):
    """S3's ETag of an object made of parts: md5 of their binary md5s, '-N'."""
    return hashlib.md5(b"".join(bytes.fromhex(m) for m in md5s)).hexdigest() + f"-{len(md5s)}"


class Multipart:
    """Uploads in progress, over an Objects (mkvlib.objects)."""

    def __init__(self, objects):
        self.objects, self.db = objects, objects.db

    def _upload(self, upload_id, key=None):
        rows = self.db.read("SELECT key, created, headers, state, etag FROM s3_uploads WHERE id = ?", (upload_id,))
        if not rows or (key is not None and bytes(rows[0][0]) != key):
            raise NoSuchUpload("The specified upload does not exist. The upload ID may be invalid, "
                               "or the upload may have been aborted or completed.")
        key, created, headers, state, etag = rows[0]
        return bytes(key), created, json.loads(headers), state, etag

    def create(self, key: bytes, headers: dict) -> str:
        upload_id = uuid.uuid4().hex
        now = time.time()
        with self.db.write() as db:
            db.execute("INSERT INTO s3_uploads (id, key, created, touched, headers, state) VALUES (?, ?, ?, ?, ?, 'open')",
                       (upload_id, key, now, now, json.dumps(headers, sort_keys=True)))
        return upload_id

    def upload_part(self, upload_id, key, number, chunks, length, check):
        """Store one part (again: the last one sent wins); returns its md5."""
        if not 1 <= number <= PART_NUMBER_MAX:
            raise PartError("InvalidArgument", f"Part number must be an integer between 1 and {PART_NUMBER_MAX}")
        if self._upload(upload_id, key)[3] != "open":
            raise NoSuchUpload("The specified upload is being completed or was completed.")
        obj = self.objects.put(part_key(upload_id, number), chunks, length, {}, check)
        now = time.time()
        with self.db.write() as db:
            db.execute("INSERT OR REPLACE INTO s3_parts (id, number, md5, size, mtime) VALUES (?, ?, ?, ?, ?)",
                       (upload_id, number, obj.md5, obj.size, now))
            db.execute("UPDATE s3_uploads SET touched = ? WHERE id = ?", (now, upload_id))
        return obj.md5

    def parts(self, upload_id, after=0, limit=PART_NUMBER_MAX):
        """[(number, md5, size, mtime)] of an upload's parts past `after`, at most `limit`."""
        return self.db.read("SELECT number, md5, size, mtime FROM s3_parts WHERE id = ? AND number > ?"
                            " ORDER BY number LIMIT ?", (upload_id, after, limit))

    def uploads(self, prefix: bytes, key_marker: bytes = None, id_marker="", limit=1000):
        """[(key, id, created)] of the uploads in progress under `prefix`, in key then id order."""
        high = prefix_end(prefix)
        low = key_marker if key_marker is not None and key_marker >= prefix else prefix
        rows = self.db.read("SELECT key, id, created FROM s3_uploads WHERE state != 'completed' AND key >= ?"
                            + (" AND key < ?" if high is not None else "") + " ORDER BY key, id LIMIT ?",
                            (low, high, limit + 200) if high is not None else (low, limit + 200))
        out = [(bytes(k), i, c) for k, i, c in rows
               if key_marker is None or bytes(k) > key_marker or (bytes(k) == key_marker and i > id_marker)]
        return out[:limit], len(out) > limit

    def complete(self, upload_id, key, asked):
        """Make the object of `asked` [(number, etag)]: returns its ETag."""
        _, _, headers, state, etag = self._upload(upload_id, key)
        if state == "completed":
            return etag                  # completed already: answered as the first time
        parts = self._check_parts(upload_id, asked)
        etag = multipart_etag([md5 for _, md5, _ in parts])
        self._start_completing(upload_id)
        try:
            total = sum(size for _, _, size in parts)
            chunks = self._concat([n for n, _, _ in parts], upload_id)
            self.objects.put(key, chunks, total, headers, etag=etag, parts=[size for _, _, size in parts])
        except BaseException:
            with self.db.write() as db:
                db.execute("UPDATE s3_uploads SET state = 'open' WHERE id = ? AND state = 'completing'", (upload_id,))
            raise
        with self.db.write() as db:
            db.execute("UPDATE s3_uploads SET state = 'completed', etag = ?, touched = ? WHERE id = ?",
                       (etag, time.time(), upload_id))
        self._drop_parts(upload_id)
        return etag

    def _check_parts(self, upload_id, asked):
        """[(number, md5, size)] of the parts asked for, as S3 checks them."""
        if not asked:
            raise PartError("MalformedXML", "The XML you provided was not well-formed or did not validate "
                            "against our published schema.")
        numbers = [n for n, _ in asked]
        if numbers != sorted(set(numbers)):
            raise PartError("InvalidPartOrder", "The list of parts was not in ascending order. The parts list "
                            "must be specified in order by part number.")
        have = {n: (md5, size) for n, md5, size, _ in self.parts(upload_id)}
        parts = []
        for n, etag in asked:
            if n not in have or etag.strip('"') != have[n][0]:
                raise PartError("InvalidPart", "One or more of the specified parts could not be found. The part "
                                "may not have been uploaded, or the specified entity tag may not match the part's "
                                "entity tag.")
            parts.append((n,) + have[n])
        for _, _, size in parts[:-1]:
            if size < PART_MIN:
                raise PartError("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed "
                                "object size (each part but the last must be at least 5 MB).")
        return parts

    def _start_completing(self, upload_id):
        now = time.time()
        with self.db.write() as db:
            row = db.execute("SELECT state, touched FROM s3_uploads WHERE id = ?", (upload_id,)).fetchone()
            if row is None:
                raise NoSuchUpload("The specified upload does not exist.")
            if row[0] == "completing" and now - row[1] < COMPLETING_LEASE:
                raise KeyBusy("this upload is being completed by another request")
            db.execute("UPDATE s3_uploads SET state = 'completing', touched = ? WHERE id = ?", (now, upload_id))

    def _concat(self, numbers, upload_id):
        """The bytes of the parts, in order, streamed from the volumes."""
        for n in numbers:
            try:
                _, download = self.objects.open(part_key(upload_id, n))
            except KeyMissing:
                raise PartError("InvalidPart", f"part {n} is gone from the volumes") from None
            try:
                yield from download.stream(CHUNK)
            finally:
                download.close()

    def abort(self, upload_id, key):
        self._upload(upload_id, key)
        with self.db.write() as db:
            db.execute("DELETE FROM s3_uploads WHERE id = ?", (upload_id,))
        self._drop_parts(upload_id)

    def _drop_parts(self, upload_id):
        """Delete an upload's part keys and rows; a key that stays (a volume
        down) no upload names any more: expire() finds it later."""
        numbers = [n for n, _, _, _ in self.parts(upload_id)]
        with self.db.write() as db:
            db.execute("DELETE FROM s3_parts WHERE id = ?", (upload_id,))
        for n in numbers:
            try:
                self.objects.delete(part_key(upload_id, n))
            except MkvError:
                pass


def expire(db, age=UPLOAD_AGE, now=None):
    """Forget uploads untouched for `age` seconds and mark their part keys,
    and those no open upload names, 'deleting' (unlocked), for rebalance.py
    to purge. `db`: the index's mkvlib.db.Database. Returns how many part
    keys were marked."""
    from mkvlib.objects import SCHEMA as OBJECTS_SCHEMA   # it imports this module
    now = time.time() if now is None else now
    with db.write() as tx:
        for statement in (OBJECTS_SCHEMA + SCHEMA).split(";\n"):
            if statement.strip():
                tx.execute(statement)
        tx.execute("DELETE FROM s3_parts WHERE id IN (SELECT id FROM s3_uploads WHERE touched < ?)", (now - age,))
        tx.execute("DELETE FROM s3_uploads WHERE touched < ?", (now - age,))
        keep = {i for (i,) in tx.execute("SELECT id FROM s3_uploads WHERE state != 'completed'")}
        rows = tx.execute("SELECT key FROM keys WHERE key >= ? AND key < ? AND state = 'live'"
                          " AND lock_owner IS NULL", (PARTS_PREFIX, prefix_end(PARTS_PREFIX))).fetchall()
        orphans = [bytes(k) for (k,) in rows
                   if bytes(k)[len(PARTS_PREFIX):].split(b"/")[0].decode("ascii", "replace") not in keep]
        tx.executemany("UPDATE keys SET state = 'deleting' WHERE key = ? AND lock_owner IS NULL",
                       [(k,) for k in orphans])
        tx.executemany("DELETE FROM s3_objects WHERE key = ?", [(k,) for k in orphans])
    return len(orphans)
