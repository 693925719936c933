"""What the master does with a key: locate it for a GET, put it, delete
it, unlink it, over the index, the volumes and the prober."""
import dataclasses
import functools
import random
import sqlite3

from mkvlib.errors import (DeleteIncomplete, EmptyValue, IndexBusy, KeyBusy, KeyMissing,
                           Unavailable, VolumeDown, VolumeError)
from mkvlib.groupcommit import under_gevent
from mkvlib.index import LIVE, UNLINKED, Index
from mkvlib.lease import FENCE_FRESH, LOCK_LEASE, Lease, lock_clock, new_owner
from mkvlib.placement import check_storable, disk_of, fallback_path, key2path, new_tmp, volume_host
from mkvlib.prober import Prober
from mkvlib.settings import Settings
from mkvlib import upload
from mkvlib.upload import LANDED
from mkvlib.volumes import Volumes

PLACEMENTS_KEPT = 8192     # keys whose placement a Store keeps
MISSING = "missing"   # Store.find: no live key, and no MKV_FALLBACK to send the client to


class Store:
    """What the master does with a key, over the index and the volumes.

    Opened lazily per process, so that each gunicorn worker has its own SQLite
    connection and HTTP pools, made after the fork."""

    def __init__(self, settings: Settings, offload=None, group_commit=False):
        """`offload`: see Volumes; `group_commit`: this process is a gevent
        worker, whose concurrent index writes may share transactions
        (mkvlib.groupcommit)."""
        self.settings = settings
        # a key's placement depends on the key and the settings alone
        self._placement = functools.lru_cache(maxsize=PLACEMENTS_KEPT)(settings.placement)
        self.index = Index(settings.db)
        if group_commit:
            self.index.db.group = under_gevent(self.index.db)
        self.volumes = Volumes(timeout=settings.voltimeout, secret=settings.secret, offload=offload)
        self.health = self.volumes.health
        self.prober = Prober(self.index, self.volumes, settings.volumes).start()

    def placement(self, key):
        """The key's volumes, best first (a list its callers only read):
        hashed once for the last PLACEMENTS_KEPT keys, so that the GET after
        a PUT (Master.placement, for Key-Balance) does not hash it again."""
        return self._placement(key)

    def find(self, key):
        """A plain GET's answer in one index statement: (volumes as the index
        has them, md5, the volume to send the client to) of a live key, a
        replica drawn at random (as locate's shuffle, each alike) that the
        prober vouches for now; MISSING if no key is live and there is no
        MKV_FALLBACK. None if only locate() can tell: a fallback, MKV_GET_CHECK,
        or a drawn replica not vouched for (locate then tries every one, so a
        GET never goes to a volume the health view has down while another is up)."""
        row = self.index.live(key)
        if row is None:
            return None if self.settings.fallback else MISSING
        volumes, md5 = row
        if self.settings.get_check or not volumes:
            return None
        replicas = volumes.split(",")
        volume = replicas[int(random.random() * len(replicas))]
        if not self.health.may_read(volume_host(volume)):
            return None
        return volumes, md5, volume

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
                if self.health.may_read(volume_host(volume)):
                    return "http://" + volume + key2path(key), rec
            # none vouched for (all down, or this worker too busy to look lately): ask them now
        path = key2path(key)
        missing = []
        for volume in order:
            host = volume_host(volume)
            if host in self.health.replaced or not self.health.may_ask(host):
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

    def put(self, key, chunks, length=None, empty_ok=False, check=None):
        """Write a new key: every replica, then the index. Returns (md5, size).

        The key is claimed before the first byte of the body is read, so a
        second PUT of it meanwhile is 409 however slow this client is.
        `empty_ok`: an empty value is stored (S3's zero-byte objects);
        `check(md5, size)`: called once every upload is complete, before any
        lands: it may refuse the value by raising (the S3 gateway checks
        digests and records the object's metadata there)."""
        check_storable(key)
        volumes = self.placement(key)   # a live key is KeyExists in start_put's transaction
        path = key2path(key)
        owner, tmp = new_owner("put-"), new_tmp()
        since = lock_clock()
        claim = self.index.start_put(key, volumes, owner, tmp=tmp)
        with Lease(self.index, key, owner, since=since) as lease:
            try:
                chunks = iter(chunks)
                first = next((c for c in chunks if c), None)
                if first is None:
                    if not empty_ok:
                        raise EmptyValue("empty value: a PUT needs a body")
                    first = b""
                for v in volumes:
                    if not self.health.may_write(volume_host(v)):
                        raise VolumeDown(f"volume {volume_host(v)} is down: cannot write all replicas")
                fence = lambda md5, size: self._fence_put(key, owner, lease, md5, size, check)  # noqa: E731
                if length is not None and 0 < length == len(first) <= upload.WHOLE_MAX:
                    # the whole value in hand: each volume's upload and MOVE in one send
                    md5, size = upload.put_whole(self.volumes, volumes, path, first, tmp=tmp, fence=fence)
                else:
                    md5, size = upload.put(self.volumes, volumes, path, lease.guard(_chain(first, chunks)),
                                           length, tmp=tmp, fence=fence)
            except BaseException as e:
                self._abandon(key, owner, path, tmp, claim, getattr(e, "outcomes", {}), lease)
                raise
            try:
                # copies that the replaced record or failed writes left outside the placement
                strays = self._strays(claim.notes, volumes)
                failed = self.volumes.delete_copies(strays, path, fence=lambda: self.fence(key, owner, lease))
                # resolved: gone, or our own copy under another name of its disk
                resolved = [v for v in claim.notes if v not in volumes and v not in failed]
                done = self.index.finish_put(key, owner, md5, size, resolved)
            except BaseException:
                # every copy landed, but the value is not recorded (the index
                # failed, the lock was lost, the worker was stopped): take them back
                self._abandon(key, owner, path, tmp, claim, dict.fromkeys(volumes, LANDED), lease)
                raise
            if not done:
                raise KeyBusy("lost the lock on the key while writing it; try again")
        return md5, size

    def _strays(self, notes, volumes):
        """The noted copies {volume: upload} outside `volumes`, less those on
        the same disk under another name (deleting one would delete ours)."""
        strays = {v: t for v, t in notes.items() if v not in volumes}
        if strays:
            ids = self._disk_ids()
            ours = {disk_of(v, ids) for v in volumes}
            strays = {v: t for v, t in strays.items() if disk_of(v, ids) not in ours}
        return strays

    def _disk_ids(self):
        """{host: identity} of the disks the index knows, less those that
        answer with another one now (wiped or replaced: their name is theirs alone)."""
        return {h: i for h, i in self.index.volume_ids().items() if h not in self.health.replaced}

    def fence(self, key, owner, lease, doing="writing it", fresh_ok=True):
        """Right before a request that changes a key's path on a volume: the
        lock must be ours still, a whole lease ahead, so that a writer that
        was paused or cut off for longer than its lease changes nothing (its
        requests' deadlines are far shorter than a lease). A lock taken or
        renewed under FENCE_FRESH seconds ago is (a small write's case: no
        index write), if `fresh_ok`; else it is renewed now."""
        if fresh_ok and lock_clock() - lease.renewed < FENCE_FRESH and not lease.lost:
            return
        started = lock_clock()
        if not self.index.renew(key, owner):
            raise KeyBusy(f"lost the lock on the key while {doing} (stalled longer than the "
                          f"{LOCK_LEASE:.0f} s lease); try again")
        lease.renewed = started

    def _fence_put(self, key, owner, lease, md5, size, check):
        """fence() of a put, after check(md5, size) if given."""
        if check is not None:
            check(md5, size)
        self.fence(key, owner, lease)

    def _fence_undo(self, key, owner, lease):
        """fence() for the undoing of a failed write, which may fail because
        the index cannot be written: then the renewer's last renewal stands
        in, while it is under half a lease old."""
        try:
            self.fence(key, owner, lease, "undoing a write", fresh_ok=False)
        except (sqlite3.Error, IndexBusy):
            if lease.lost or lock_clock() - lease.renewed > LOCK_LEASE / 2:
                raise KeyBusy("the lock on the key could not be renewed") from None

    def _abandon(self, key, owner, path, tmp, claim, outcomes, lease):
        """A claimed PUT failed: undo what it can, and leave every copy that
        may remain either in a record or noted (rebalance.py removes those)."""
        if lease.lost:
            return   # the key is another request's now: our notes stay, its record is its own
        old = claim.old
        if not outcomes:
            # no path was touched: the replaced record, if any, vouches for its copies again
            if claim.old is not None:
                undo = lambda: self.index.restore(key, owner, claim.old, resolved=claim.added)  # noqa: E731
            else:
                undo = lambda: self.index.abandon_put(key, owner, resolved=claim.added)  # noqa: E731
        else:
            try:
                failed = self.volumes.delete_copies({v: tmp for v in outcomes}, path,
                                                    fence=lambda: self._fence_undo(key, owner, lease))
            except KeyBusy:
                return   # stalled past the lease: the key is another request's now; our notes stay
            removed = [v for v in outcomes if v not in failed]
            had = set(old.volumes) if old is not None else set()
            # untouched paths are as they were: clean, unless the replaced record had a copy there
            resolved = [v for v in claim.added if v in removed or (v not in outcomes and v not in had)]
            # an unlinked value keeps what is left of it: UNLINK promised to keep its bytes
            intact = []
            if old is not None and old.state == UNLINKED:
                ids = self._disk_ids()
                touched = {disk_of(v, ids) for v in outcomes}    # under any name of its disk
                intact = [v for v in old.volumes if disk_of(v, ids) not in touched]
            if intact:
                kept = dataclasses.replace(old, volumes=intact)
                resolved += [v for v in intact if v in claim.added and v not in resolved]
                undo = lambda: self.index.restore(key, owner, kept, resolved=resolved)  # noqa: E731
            else:
                undo = lambda: self.index.abandon_put(key, owner, resolved=resolved)  # noqa: E731
        self.volumes.settle()   # a write cut off unanswered may run until its deadline: keep the lock till then
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
        since = lock_clock()
        rec = self.index.start_delete(key, owner, protect=self.settings.protect)
        path = key2path(key)
        with Lease(self.index, key, owner, since=since) as lease:
            # a volume remembered down is asked again now: it may be back
            failed = {v: f"volume {volume_host(v)} is down" for v in rec.volumes
                      if not self.health.may_write(volume_host(v), always_ask=True)}
            failed.update(self.volumes.delete_copies({v: None for v in rec.volumes if v not in failed}, path,
                                                     fence=lambda: self.fence(key, owner, lease, "deleting it")))
        if failed:
            self.volumes.settle()
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
