"""What no record vouches for, removed: the copies a rebalance run no longer
uses (Deleters: each key's noted copies, under its lock, once due) and the
uploads of writes that died before their MOVE (sweep). rebalance.py runs both.

Every copy it removes is noted in the index (pending_deletes) until it is
gone, so a run killed at any moment leaves the next run the same work."""
import email.utils
import queue
import sqlite3
import threading
import time

from mkvlib.errors import KeyBusy, MkvError, VolumeError
from mkvlib.index import DELETING, WRITING
from mkvlib.lease import Lease, lock_clock
from mkvlib.placement import TMP_DIR, key2path, volume_host
import tools

PROG = "rebalance"
BUSY_WAIT = 5.0       # seconds the deletes of busy keys are retried at the end
SWEEP_AGE = 3600.0    # seconds after which an upload under TMP_DIR is a dead write's: removed


def sweep(volumes, hosts, progress):
    """Remove uploads under TMP_DIR older than SWEEP_AGE: writes that died
    between their upload and its MOVE. A MOVE still queued somewhere can
    then never land."""
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
    once due, under the key's lock (delete_copy); finish() ends them. A
    `quiet` put (no other process had the index open before the switch)
    goes at once if the job is still alone(): no redirect to those copies
    can be on its way."""

    def __init__(self, job, n):
        self.job, self.queue, self.retry = job, queue.Queue(), []
        self._retry_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name="deleter", daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def put(self, due, key, volumes, quiet=False):
        self.queue.put((due, key, tuple(volumes), quiet))

    def _loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            due, key, volumes, quiet = item
            if not (quiet and self.job.alone()):
                time.sleep(max(0.0, due - time.time()))
            if not self.delete_copy(key, volumes):
                with self._retry_lock:
                    self.retry.append((key, volumes))

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
            hosts = {volume_host(v) for v in volumes}
            if all(h not in job.settings.volumes and job.volumes.health.down(h) for h in hosts):
                # removed volumes that are down: one line for all their keys at the end (main)
                for host in hosts:
                    job.progress.count("failed")
                    job.unreachable_removed[host] = job.unreachable_removed.get(host, 0) + 1
                return True
            job.fail(key, f"could not remove the copy on {','.join(volumes)} (noted for the next run): {e}")
            return True

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
