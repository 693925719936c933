"""An atomic overwrite of a live key (S3's PutObject over an object): the
native PUT refuses a live key, this replaces its value while it stays
readable, last writer wins, keeping docs/reliability.md's rules.

1. Lock the key (Index.lock: it stays live, native and S3 reads go on),
   stream the new value into an upload on each placement volume
   (volumes.Upload), check it (digests), fence.
2. Swap, one volume at a time, the record always telling the truth:
   a. the first target leaves the record and is noted with its upload
      (its path may hold either value from now on); the key's generation
      (s3_gens) goes up;
   b. its upload is MOVEd over the old file (Overwrite: T, one rename);
   c. commit: the record holds the new md5/size on that one volume, the
      S3 row changes with it, every other old copy and every other target
      is noted;
   d. each other target: MOVE over, then it joins the record, unnoted;
   e. old copies outside the placement are deleted, then unnoted.
   Every MOVE and DELETE is fenced and carries its deadline (Volumes).
   A writer cut off anywhere leaves a record that names only copies of its
   value, and notes on every other copy: rebalance.py rewrites or removes
   those (a noted copy is never a source), as it does a failed PUT's.
3. A reader through the gateway (Objects.open) opens a file on a volume
   the record names, then looks again: the same md5, size, generation and
   that volume still named, or it looks again from the start. So it serves
   the old value or the new one, whole, never a 404 in between.
"""
import time

from mkvlib.errors import KeyBusy, MoveUnknown, VolumeDown, VolumeError
from mkvlib.index import LIVE
from mkvlib.lease import Lease, lock_clock, new_owner
from mkvlib.placement import key2path, new_tmp, upload_name, volume_host
from mkvlib.upload import Upload


class Replace:
    """One overwrite of `key` (live, its record `rec`) by `store`, under
    the lock `owner` took; run() does it all."""

    def __init__(self, objects, key, owner, rec, lease):
        self.objects, self.store, self.index = objects, objects.store, objects.store.index
        self.key, self.owner, self.rec, self.lease = key, owner, rec, lease
        self.path = key2path(key)
        self.targets = self.store.placement(key)
        self.tmp = new_tmp()
        self.names = {v: upload_name(self.tmp, v) for v in self.targets}
        self.pending = set(self.targets)   # uploads not moved (nor known gone)

    def fence(self):
        self.store.fence(self.key, self.owner, self.lease, "replacing it")

    def upload(self, chunks, length, check):
        """Step 1: (md5, size) once every upload is complete and checked."""
        for v in self.targets:
            if not self.store.health.may_write(volume_host(v)):
                raise VolumeDown(f"volume {volume_host(v)} is down: cannot write all replicas")
        md5, size = Upload(self.store.volumes, self.targets, self.names, length).run(self.lease.guard(chunks))
        try:
            check(md5, size)
            self.fence()
        except BaseException:
            self.drop_uploads()
            raise
        return md5, size

    def drop_uploads(self):
        if self.pending:
            self.store.volumes.delete_uploads({v: self.names[v] for v in self.pending})
            self.pending.clear()

    def move(self, volume):
        """MOVE one upload over the path: None if landed, else the error."""
        try:
            self.store.volumes.move_over(volume, self.names[volume], self.path, fence=self.fence)
        except MoveUnknown as e:
            self.pending.discard(volume)   # it cannot land later; its note stays
            return e
        except VolumeError as e:
            return e
        self.pending.discard(volume)
        return None

    def run(self, chunks, length, check, meta_row):
        """The whole overwrite; returns (md5, size). meta_row(md5, size):
        the S3 row of the new value, written in the commit's transaction."""
        md5, size = self.upload(chunks, length, check)
        first, rest = self.targets[0], self.targets[1:]
        try:
            added = self._out_of_record(first)
            error = self.move(first)
            if error is not None:
                self._first_failed(first, added, error)
                raise error
            self._commit(first, md5, size, rest, meta_row(md5, size))
            failed = {}
            for v in rest:
                error = self.move(v)
                if error is None:
                    self._join(v)
                else:
                    failed[v] = error
            self._drop_old_copies()
        finally:
            self.drop_uploads()
        if failed:
            raise next(iter(failed.values()))
        return md5, size

    # -- the index steps, each one transaction that checks the lock

    def _locked(self, db):
        row = db.execute("SELECT lock_owner FROM keys WHERE key = ? AND state = ?", (self.key, LIVE)).fetchone()
        if row is None or row[0] != self.owner:
            raise KeyBusy("lost the lock on the key while replacing it; try again")

    def _out_of_record(self, first):
        """Step a; returns whether the note on `first` is ours (added now)."""
        vols = [v for v in self.rec.volumes if v != first]
        with self.index.db.write() as db:
            self._locked(db)
            added = self.index._note(db, self.key, [first], self.tmp)
            db.execute("UPDATE keys SET volumes = ? WHERE key = ?", (",".join(vols), self.key))
            db.execute("INSERT INTO s3_gens (key, gen) VALUES (?, 1)"
                       " ON CONFLICT (key) DO UPDATE SET gen = gen + 1", (self.key,))
        return bool(added)

    def _first_failed(self, first, added, error):
        """The first MOVE failed: refused, the old copy is intact and joins
        the record again; unanswered, it stays noted (either value)."""
        if isinstance(error, MoveUnknown):
            return
        with self.index.db.write() as db:
            self._locked(db)
            db.execute("UPDATE keys SET volumes = ? WHERE key = ?", (",".join(self.rec.volumes), self.key))
            if added:
                self.index._unnote(db, self.key, [first])

    def _commit(self, first, md5, size, rest, row):
        """Step c: the new value is the key's, on `first` alone for now."""
        with self.index.db.write() as db:
            self._locked(db)
            self.index._note(db, self.key, [v for v in self.rec.volumes if v != first and v not in rest])
            for v in rest:
                self.index._note(db, self.key, [v], self.tmp)
            db.execute("UPDATE keys SET md5 = ?, size = ?, volumes = ? WHERE key = ?", (md5, size, first, self.key))
            self.index._unnote(db, self.key, [first])
            db.execute("INSERT OR REPLACE INTO s3_objects (key, md5, size, etag, mtime, headers, parts)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        self.volumes_now = [first]

    def _join(self, volume):
        """Step d: a target holds the new value: it joins the record."""
        self.volumes_now.append(volume)
        order = [v for v in self.targets if v in self.volumes_now]
        with self.index.db.write() as db:
            self._locked(db)
            db.execute("UPDATE keys SET volumes = ? WHERE key = ?", (",".join(order), self.key))
            self.index._unnote(db, self.key, [volume])

    def _drop_old_copies(self):
        """Step e: old copies outside the placement go (or stay noted)."""
        old = {v: None for v in self.rec.volumes if v not in self.targets}
        if not old:
            return
        failed = self.store.volumes.delete_copies(old, self.path, fence=self.fence)
        gone = [v for v in old if v not in failed]
        with self.index.db.write() as db:
            self._locked(db)
            self.index._unnote(db, self.key, gone)


def replace(objects, key, chunks, length, check, meta_row):
    """Overwrite live `key`: (md5, size); None if the key is not live (the
    caller writes it as a new key); KeyBusy if another request holds it."""
    index = objects.store.index
    owner, since = new_owner("s3rep-"), lock_clock()
    rec = index.lock(key, owner)
    if rec is None:
        return None
    try:
        if rec.state != LIVE:
            return None
        with Lease(index, key, owner, since=since) as lease:
            try:
                return Replace(objects, key, owner, rec, lease).run(chunks, length, check, meta_row)
            finally:
                objects.store.volumes.settle()   # a write cut off unanswered may still run: keep the lock
    finally:
        index.release(key, owner)


def wait_pause(tries):
    """Seconds to wait before the next try at a busy key (20 ms, doubling, at most 0.5 s)."""
    return min(0.5, 0.02 * (2 ** tries))


def sleep_busy(tries):
    time.sleep(wait_pause(tries))
