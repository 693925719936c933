"""What no record vouches for, removed: the copies a rebalance run no longer
uses (Deleters: each key's noted copies, under its lock, once due) and the
uploads of writes that died before their MOVE (sweep). rebalance.py runs both.

Every copy it removes is noted in the index (pending_deletes) until it is
gone, so a run killed at any moment leaves the next run the same work."""
import contextlib
import queue
import sqlite3
import threading
import time

from mkvlib import pipelined
from mkvlib.errors import KeyBusy, MkvError, VolumeError
from mkvlib.index import DELETING, WRITING
from mkvlib.lease import Lease, lock_clock
from mkvlib.placement import TMP_DIR, key2path, upload_name, volume_host
import tools

PROG = "rebalance"
BUSY_WAIT = 5.0       # seconds the deletes of busy keys are retried at the end
BATCH = 64            # keys a deleter removes the copies of at once, at most
GATHER = 0.05         # seconds a deleter waits for more ready keys to join its batch
_NONE = object()
SWEEP_AGE = 3600.0    # seconds after which an upload under TMP_DIR is a dead write's: removed


def sweep(volumes, hosts, progress):
    """Remove uploads under TMP_DIR older than SWEEP_AGE: writes that died
    between their upload and its MOVE. A MOVE still queued somewhere can
    then never land."""
    import email.utils    # here: most runs find no upload to date, and it is a tenth of the start-up
    for host in hosts:
        try:
            entries = volumes.listdir(host, TMP_DIR)
        except VolumeError as e:
            progress.message(f"{PROG}: cannot list {host}{TMP_DIR}: {e}")
            continue
        for e in entries:
            try:
                age = time.time() - email.utils.parsedate_to_datetime(e.get("mtime", "")).timestamp()
            except (TypeError, ValueError):
                continue
            if e.get("type") == "file" and age > SWEEP_AGE:
                try:
                    volumes.delete(host, TMP_DIR + e["name"])
                except VolumeError:
                    pass   # the next run sweeps it


class Deleters:
    """The threads that remove the copies a run no longer uses: put()
    (due, key, volumes) in due order, and each key's copies go together
    once due, under the key's lock; finish() ends them. A `quiet` put (no
    other process had the index open before the switch) goes at once if
    the job is still alone(): no redirect to those copies can be on its way.

    A deleter takes the items that are ready or come ready within GATHER
    seconds, up to BATCH keys, and removes their copies together
    (delete_batch): one transaction locks them, one fan of DELETEs removes
    the copies, one transaction drops the notes and the locks, instead of
    three transactions and a fan a key."""

    def __init__(self, job, n):
        self.job, self.queue, self.retry = job, queue.Queue(), []
        self._retry_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name="deleter", daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def put(self, due, key, volumes, quiet=False):
        self.queue.put((due, key, tuple(volumes), quiet))

    def ready(self, item):
        due, _, _, quiet = item
        return due <= time.time() or (quiet and self.job.alone())

    def _loop(self):
        head = _NONE        # an item taken from the queue that was not ready yet
        while True:
            item = self.queue.get() if head is _NONE else head
            head = _NONE
            if item is None:
                return
            if not self.ready(item):
                time.sleep(max(0.0, item[0] - time.time()))
            batch, until = [item], time.monotonic() + GATHER
            while len(batch) < BATCH:
                try:
                    more = self.queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if more is None or not self.ready(more):
                    head = more
                    break
                batch.append(more)
            busy = self.delete_batch([(key, volumes) for _, key, volumes, _ in batch])
            if busy:
                with self._retry_lock:
                    self.retry += busy

    def finish(self):
        """End the threads, then try the busy keys' deletes again for
        BUSY_WAIT seconds. Returns the (key, volumes) still busy."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        retry, deadline = self.retry, time.monotonic() + BUSY_WAIT
        while retry and time.monotonic() < deadline:
            time.sleep(0.2)
            retry = [(k, v) for k, v in retry if not self.delete_copy(k, v)]
        return retry

    def delete_batch(self, items):
        """delete_copy() of several keys [(key, volumes)] at once; a key the
        batch cannot lock (missing, busy, a dead tool's) goes on its own.
        Returns the (key, volumes) still busy."""
        wanted = {}
        for key, volumes in items:
            wanted.setdefault(key, []).extend(v for v in volumes if v not in wanted.get(key, ()))
        since = lock_clock()
        try:
            locked = self.job.index.lock_many(list(wanted), self.job.owner)
        except (MkvError, sqlite3.Error):
            locked = {}        # each on its own, below, says what is wrong
        busy = [(k, tuple(v)) for k, v in wanted.items() if k not in locked and not self.delete_copy(k, tuple(v))]
        if locked:
            self.delete_locked({k: wanted[k] for k in locked}, locked, since)
        return busy

    def delete_locked(self, wanted, locked, since):
        """Remove the noted copies {key: volumes} of keys this run locked
        ({key: (record, notes)}, from Index.lock_many), as delete_copy does
        for one key, then drop their notes and release them, at once."""
        job, index = self.job, self.job.index
        plan, unnoted = {}, []    # plan: {key: {volume: upload name}} to delete
        for key, volumes in wanted.items():
            rec, notes = locked[key]
            gone = [v for v in volumes if rec.state in (WRITING, DELETING)
                    or not any(job.same(v, r) for r in rec.volumes)]
            # the record's own copy, under another name of its disk
            unnoted += [(key, v) for v in volumes if v not in gone and v not in rec.volumes]
            plan[key] = {v: notes[v] for v in gone if v in notes}
        try:
            with contextlib.ExitStack() as stack:
                leases = {k: stack.enter_context(Lease(index, k, job.owner, since=since)) for k in plan}
                failed = delete_noted_copies(job.volumes, plan, lambda k: job.fence(k, leases[k]))
        except (MkvError, sqlite3.Error) as e:
            failed = {(k, v): str(e) for k, copies in plan.items() for v in copies}
        unnoted += [(k, v) for k, copies in plan.items() for v in copies if (k, v) not in failed]
        try:
            index.release_many(list(wanted), job.owner, unnoted)
        except (MkvError, sqlite3.Error) as e:   # the locks run out by themselves, the notes stay
            failed.update({(k, v): str(e) for k, copies in plan.items() for v in copies})
        for key in plan:
            reasons = [failed[(key, v)] for v in plan[key] if (key, v) in failed]
            if reasons:
                self.failed(key, [v for v in plan[key] if (key, v) in failed], "; ".join(reasons))

    def delete_copy(self, key, volumes):
        """Remove the noted copies of a key on `volumes` under the key's lock,
        unless the note is gone by now or the record names that volume (then
        the run's move() rewrites the copy there). False if the key is busy."""
        job, index, path = self.job, self.job.index, key2path(key)
        since = lock_clock()
        try:
            try:
                rec = tools.lock_key(index, key, job.owner)
            except KeyBusy:
                return False
            if rec is None:
                # no record: claim the key as a PUT would, so none writes it meanwhile
                if not index.claim(key, list(volumes), job.owner):
                    return False
                try:
                    self.delete_noted(key, volumes, path, since)
                finally:
                    index.abandon_put(key, job.owner)
                return True
            try:
                gone = [v for v in volumes if rec.state in (WRITING, DELETING)
                        or not any(job.same(v, r) for r in rec.volumes)]
                # the record's own copy, under another name of its disk
                ours = [v for v in volumes if v not in gone and v not in rec.volumes]
                if ours:
                    index.unnote(key, *ours)
                if gone:
                    self.delete_noted(key, gone, path, since)
            finally:
                index.release(key, job.owner)
            return True
        except (MkvError, sqlite3.Error) as e:
            self.failed(key, volumes, e)
            return True

    def failed(self, key, volumes, why):
        """The copies of `key` on `volumes` could not be removed: they stay noted."""
        job = self.job
        hosts = {volume_host(v) for v in volumes}
        if all(h not in job.settings.volumes and job.volumes.health.down(h) for h in hosts):
            # removed volumes that are down: one line for all their keys at the end (main)
            for host in hosts:
                job.progress.count("failed")
                job.unreachable_removed[host] = job.unreachable_removed.get(host, 0) + 1
            return
        job.fail(key, f"could not remove the copy on {','.join(volumes)} (noted for the next run): {why}")

    def delete_noted(self, key, volumes, path, since):
        """Delete the noted copies of a key locked by this run (each with the
        upload whose MOVE may still land it), at once, then their notes."""
        job, index = self.job, self.job.index
        with Lease(index, key, job.owner, since=since) as lease:
            notes = index.notes(key)
            noted = {v: notes[v] for v in volumes if v in notes}
            failed = job.volumes.delete_copies(noted, path, fence=job.fence(key, lease)) if noted else {}
            if len(failed) < len(noted):
                index.unnote(key, *[v for v in noted if v not in failed])
            if failed:
                raise VolumeError("; ".join(failed.values()))


def delete_noted_copies(volumes, plan, fence):
    """Volumes.delete_copies of many keys at once: `plan` {key: {volume:
    upload name or None}}; first every upload whose MOVE may still be on
    its way (a fan), then, once fence(key) of each key holds, every file
    (pipelined, one connection per volume). Returns {(key, volume): reason} of those not deleted for sure."""
    calls = [(k, v, tmp) for k, copies in plan.items() for v, tmp in copies.items()]
    failed = {(k, v): f"volume {volume_host(v)} is down" for k, v, _ in calls if volumes.health.down(volume_host(v))}
    uploads = [(k, v, tmp) for k, v, tmp in calls if tmp and (k, v) not in failed]
    if uploads:
        for (k, v, _), error in zip(uploads, volumes.delete_many([(volume_host(v), upload_name(tmp, v))
                                                                  for _, v, tmp in uploads])):
            if error is not None:
                failed[(k, v)] = str(error)
    asked = [(k, v) for k, v, _ in calls if (k, v) not in failed]

    def fences():
        for k in dict.fromkeys(k for k, _ in asked):
            fence(k)()
    for (k, v), error in zip(asked, pipelined.delete_many(volumes, [(v, key2path(k)) for k, v in asked], fences)):
        if error is not None:
            failed[(k, v)] = str(error)
    return failed
