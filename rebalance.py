"""Move every key's replicas to where the current settings place them, and
put back replicas that vanished. Runs while the master serves.

    python rebalance.py [--volumes H:P,...] [--db FILE] [--replicas N] [--subvolumes N] [--workers N]
                        [--forget-volume H:P] [--dry-run] [--s3-upload-age S]

A record that a dead request left behind (a PUT whose worker was killed, a
DELETE whose volume failed) is finished as a retried DELETE would: its files
are removed, then the record. For each live or unlinked key, under the same
per-key lock as the master's PUT and DELETE:

  1. look (HEAD, at once) at which recorded volumes have its file;
  2. copy it from a recorded copy to each placement volume that the record
     does not vouch for (a value of up to WHOLE_COPY read whole, a larger
     one chunk by chunk, never whole in memory): into an upload, checked
     against the record's md5 and size, then MOVEd over whatever sat there.
     A file found at a placement path is never adopted: a stray, stale or
     late copy of an older value looks the same;
  3. in one transaction, point the index at the placement only and note the
     copies it no longer uses (the index's pending_deletes table);
  4. GRACE (half a second) later (a redirect given out just before the switch
     may still be on its way to its client), remove those copies and their
     notes, a key's copies at once, several keys at a time. At once instead
     when no other process had the index open, neither right before the
     switch nor when the copies come due: then no one could have handed out
     a redirect to them (mkvlib.openers).

Plain moves go a batch at a time (movebatch.py), by the same rules.

Every copy that exists is always either in the key's record or noted in
pending_deletes (noted before a byte is sent), so a run killed at any moment
leaves nothing behind that the next run does not finish; a second run finds
nothing to do. Reads never fail because of a move: the index names only
copies that are complete, and no copy is removed while the index still sends
reads to it. The exit status is 0 only when every key sits on its placement
and every noted copy is gone.
"""
import argparse
import contextlib
import functools
import sqlite3
import sys
import threading
import time

from mkvlib import multipart
from mkvlib import progress as published
from mkvlib.errors import KeyBusy, MkvError, SettingsError, VolumeError
from mkvlib.index import DELETING, LIVE, UNLINKED, WRITING
from mkvlib.lease import FENCE_FRESH, LOCK_LEASE, Lease, lock_clock, new_owner
from mkvlib.openers import others_have_open
from mkvlib.placement import check_named_once, disk_of, key2path, new_tmp, volume_host
from mkvlib.upload import put, put_whole
from mkvlib.volumes import CHUNK
from cleanup import Deleters, sweep
from movebatch import WHOLE_COPY, Batches, CopyFailed, batches
import tools

PROG = "rebalance"
# seconds from the index leaving a copy to the copy's delete: for a redirect
# handed out just before the switch, which its client follows at once (a
# round trip on a LAN); it was 2 s, most of a small run's time (the last
# switch's grace cannot overlap any work). Not waited when no other process
# has the index open (alone()): nothing can have handed out such a redirect.
GRACE = 0.5
SUMMARY = ["seen", "moved", "repaired", "purged", "unchanged", "skipped", "busy", "failed"]
DRY_SUMMARY = ["seen", "would copy", "would remove", "would purge", "unchanged", "failed"]


class Rebalance:
    def __init__(self, settings, index, volumes, progress, forget=(), upload_age=multipart.UPLOAD_AGE):
        self.settings, self.index, self.volumes, self.progress = settings, index, volumes, progress
        self.forget = set(forget)       # hosts gone for good: their copies count as lost
        self.owner = new_owner("rebalance-")
        self.deletes = None             # Deleters, during run()
        self.again = []                 # keys busy or failed on the first try: one more at the end
        self._again_lock = threading.Lock()
        self.noted = set()              # keys with notes when the run began
        self.replaced = {}              # host -> identity of a disk the index does not know yet
        self.ids = None                 # host -> identity of its disk, as the index knows it (identify)
        self._disks = {}                # volume name -> disk_of(it, self.ids)
        self.upload_age = upload_age    # seconds: S3 multipart uploads untouched longer are removed
        self.unreachable_removed = {}   # host no longer in MKV_VOLUMES that did not answer -> keys left there
        # a key's placement is asked for twice (first_look, move): hashed once
        self._placements = functools.lru_cache(maxsize=4096)(settings.placement)

    ask_leaving = False    # decide(): HEAD the recorded copies the placement leaves too

    def placement(self, key):
        return self._placements(key)

    def fail(self, key, why):
        self.progress.count("failed")
        self.progress.message(f"{PROG}: {tools.show(key)}: {why}")

    def busy(self, key, why):
        self.progress.count("busy")
        self.progress.message(f"{PROG}: {tools.show(key)}: busy ({why}); run rebalance again")

    # -- the run

    def run(self, workers):
        self.progress.set_total(self.index.count())
        if self.ids is None:
            self.identify()
        sweep(self.volumes, self.settings.volumes, self.progress)
        self.expire_uploads()
        self.deletes = Deleters(self, max(1, workers // 2))
        for key, volume, since in self.index.all_notes():   # a killed run's, failed writes'
            if volume_host(volume) in self.forget:
                self.index.unnote(key, volume)    # nothing left to delete there
            else:
                self.noted.add(key)
                self.deletes.put(since + GRACE, key, [volume])
        # a batch at a time: plain moves together (movebatch), the others one by one
        tools.each_in_threads(batches(self.index.scan()), Batches(self).look, workers, feed=1)
        for key in self.again:    # once more, now that the others are done
            rec = self.index.get(key)
            if rec is not None:
                self.lock_and_move(rec, final=True)
        for key, volumes in self.deletes.finish():
            rec = self.index.get(key)
            if rec is not None and rec.state == WRITING and rec.locked():
                self.progress.count("skipped")   # a PUT in flight: its own notes, the master's to settle
            else:
                self.busy(key, f"its copies on {','.join(volumes)} stay noted for the next run")
        if self.replaced and not (self.progress.counts.get("failed") or self.progress.counts.get("busy")):
            for host, ident in self.replaced.items():   # every copy it should hold is on it now
                self.index.record_volume_id(host, ident, replace=True)
                self.progress.message(f"{PROG}: {host} is filled: reads go to it again")

    def identify(self):
        """Which volumes are not the disk the index knows (wiped, replaced):
        their copies are not trusted, and rewritten, this run. And which
        names are one disk (a volume renamed: the index knows its old name
        and its new one by one identity): see same()."""
        known = self.index.volume_ids()
        for host in self.settings.volumes:
            try:
                ident = self.volumes.identity(host)
            except VolumeError:
                continue    # the keys it holds say so
            if host not in known:
                self.index.record_volume_id(host, ident)
            elif known[host] != ident:
                self.replaced[host] = ident
                self.progress.message(f"{PROG}: {host} is not the disk the index knows "
                                      "(wiped or replaced): copying every replica it should hold")
        self.ids = {h: i for h, i in self.index.volume_ids().items() if h not in self.replaced}
        self._disks = {}
        check_named_once(self.settings.volumes, self.ids)

    def alone(self):
        """True if no other process has the index open now: none can hand
        out a redirect, none has one it read before now on its way."""
        return not others_have_open(self.index.path)

    def same(self, a, b):
        """True if volume names a and b are one folder of one disk."""
        return a == b or self.disk(a) == self.disk(b)

    def disk(self, volume):
        """disk_of(volume), worked out once per name (self.ids is set once, by identify())."""
        found = self._disks.get(volume)
        if found is None:
            found = self._disks[volume] = disk_of(volume, self.ids)
        return found

    @contextlib.contextmanager
    def looking(self, rec):
        """Counts a key seen, and done at the end; one key's trouble never stops the run."""
        self.progress.count("seen")
        self.progress.add(keys=1)
        try:
            yield
        except Exception as e:
            self.fail(rec.key, f"{type(e).__name__}: {e}")
        finally:
            self.progress.add(done=1)

    def first_look(self, rec):
        with self.looking(rec):
            if rec.state not in (LIVE, UNLINKED):
                if rec.locked() and rec.lock_owner != self.owner and not tools.owner_is_dead(rec.lock_owner):
                    return self.progress.count("skipped")   # being written or deleted: the master's
                return self.purge(rec)   # a dead request's (its lock is taken over), or ours: a deleter's
            if rec.key not in self.noted and rec.volumes == self.placement(rec.key) \
                    and not any(volume_host(v) in self.replaced for v in rec.volumes) \
                    and self.all_there(rec.key, rec.volumes):
                return self.progress.count("unchanged")
            self.lock_and_move(rec)

    def all_there(self, key, volumes):
        path = key2path(key)
        # an error is no: the locked path looks again and says what is wrong
        return all(found is True for found in self.volumes.has_many([(v, path) for v in volumes]))

    def lock(self, key, final=False):
        """tools.lock_key; on the final try it waits while the holder is this
        run itself (a deleter, removing noted copies of the same key: fenced
        deletes, done within LOCK_LEASE) instead of calling the key busy."""
        deadline = time.monotonic() + LOCK_LEASE
        while True:
            try:
                return tools.lock_key(self.index, key, self.owner)
            except KeyBusy:
                held = self.index.get(key)
                if not final or time.monotonic() > deadline or \
                        (held is not None and held.lock_owner != self.owner):
                    raise
                time.sleep(0.05)

    def lock_and_move(self, rec, final=False):
        since = lock_clock()     # the lease runs from before the lock was taken, never after
        try:
            rec = self.lock(rec.key, final)
        except KeyBusy as e:
            if final:
                return self.busy(rec.key, str(e))
            return self.later(rec.key)
        if rec is None:
            return self.progress.count("unchanged")   # deleted meanwhile
        self.move_locked(rec, since, final)

    def move_locked(self, rec, since, final=False):
        """move() of a key this run locked at lock_clock() `since`; released at the end."""
        released = False
        try:
            with Lease(self.index, rec.key, self.owner, since=since) as lease:
                released = self.move(rec, lease)
        except (MkvError, sqlite3.Error) as e:
            if final:
                self.fail(rec.key, str(e))
            else:   # a volume may have been slow or restarting: one more try at the end
                self.later(rec.key)
        finally:
            if not released:
                self.index.release(rec.key, self.owner)

    def purge(self, rec):
        """Finish what a dead request left: a PUT whose worker died ('writing',
        lock expired) or a DELETE whose volume failed ('deleting', unlocked).
        Neither is visible; both may have left files on the record's volumes.
        Remove those (and a dead write's uploads), then the record, as a
        retried DELETE would."""
        since = lock_clock()
        try:
            rec = self.lock(rec.key, final=True)   # waits while a deleter of this run holds it
        except KeyBusy:
            return self.progress.count("skipped")   # someone took the key up meanwhile
        if rec is None:
            return self.progress.count("unchanged")
        try:
            if rec.state not in (WRITING, DELETING):
                return self.progress.count("skipped")
            with Lease(self.index, rec.key, self.owner, since=since) as lease:
                notes = self.index.notes(rec.key)
                copies = {v: notes.get(v) for v in rec.volumes}
                failed = self.volumes.delete_copies(copies, key2path(rec.key), fence=self.fence(rec.key, lease))
                if failed:
                    return self.fail(rec.key, "could not remove the files of a dead write or delete on "
                                     + ",".join(v for v in copies if v in failed))
                for v in copies:     # while the key is ours: a new PUT's notes are its own
                    if v in notes:
                        self.index.unnote(rec.key, v)
            self.index.finish_delete(rec.key, self.owner)
            self.progress.count("purged")
        finally:
            self.index.release(rec.key, self.owner)   # a no-op once the record is gone

    def fence(self, key, lease=None):
        """A fence for requests that change `key`'s paths: the lock must
        still be this run's, renewed a whole lease ahead (the run may have
        been paused for longer than a lease since it last looked). As the
        master's (Store.fence): a `lease` taken or renewed under FENCE_FRESH
        seconds ago needs no renewal; without one (undoing a failed copy)
        the lock is always renewed."""
        def check():
            if lease is not None and not lease.lost and lock_clock() - lease.renewed < FENCE_FRESH:
                return
            started = lock_clock()
            if not self.index.renew(key, self.owner):
                raise KeyBusy("lost the lock on the key (paused longer than a lease?)")
            if lease is not None:
                lease.renewed = started
        return check

    def later(self, key):
        with self._again_lock:
            self.again.append(key)

    # -- one key, locked

    def decide(self, rec, placement):
        """(vouched, targets, have): the copies the record vouches for, the
        placement volumes to copy to, and which recorded volumes have the
        file (None: did not answer); CopyFailed if it cannot be done. A
        placement volume the record does not name gets a copy whatever sits
        there (never adopted), so it is not asked. Nor is a recorded copy
        the placement leaves (unless ask_leaving): it can only be a source,
        and the GET from it says whether it is there (copy() goes on to the
        next source if not); it counts as there, after the copies seen."""
        path, notes = key2path(rec.key), self.index.notes(rec.key)
        leaving = [] if self.ask_leaving else [v for v in rec.volumes if not any(self.same(v, p) for p in placement)]
        have, down = holders(self.volumes, self.forget, [v for v in rec.volumes if v not in leaving], path)
        have.update({v: volume_host(v) not in self.forget for v in leaving})
        # only what the record vouches for is a copy of the value, and only on the disk it was written to
        vouched = [v for v in rec.volumes if have[v] and v not in notes
                   and volume_host(v) not in self.replaced]
        vouched.sort(key=lambda v: v in leaving)   # seen first
        if not vouched:
            why = "; ".join(down) if down else f"no copy on {','.join(rec.volumes)}"
            raise CopyFailed(f"lost: no readable copy ({why})")
        # a placement volume that is a vouched copy under another name has it
        targets = [v for v in placement if not any(self.same(v, u) for u in vouched)]
        unreachable = [v for v in targets
                       if have.get(v) is None and (v in have or self.volumes.health.down(volume_host(v)))]
        if unreachable:
            raise CopyFailed(f"cannot copy to {','.join(unreachable)}: " + "; ".join(down or ["down"]))
        return vouched, targets, have

    def dropped(self, rec, placement, have):
        """The recorded copies the placement no longer uses (never one of
        its own under another name)."""
        return [v for v in rec.volumes if v not in placement and have.get(v, True) is not False
                and not any(self.same(v, p) for p in placement)]

    def move(self, rec, lease):
        """Copy, then switch the record and release its lock at once; True
        if it did (the lock is released), False if nothing was to switch."""
        if rec.state not in (LIVE, UNLINKED):
            self.progress.count("skipped")
            return False
        key, path = rec.key, key2path(rec.key)
        placement = self.placement(key)
        vouched, targets, have = self.decide(rec, placement)
        if targets:
            self.copy(rec, vouched, targets, path, lease)
        switch = rec.volumes != placement or bool(targets)
        if switch:
            dropped = self.dropped(rec, placement, have)
            quiet = self.alone()    # no one to read the record the switch replaces
            if not self.index.switch_volumes(key, self.owner, placement, dropped, written=targets, release=True):
                raise KeyBusy("lost the lock on the key while moving it")
            if dropped:   # after the release: the deleter takes the lock in turn
                self.drop_later(key, dropped, quiet)
        self.count_move(rec, placement, targets)
        return switch

    def drop_later(self, key, dropped, quiet):
        """The copies `dropped` of a key just switched go GRACE from now (at
        once if `quiet`, no other process had the index open, and still none has)."""
        self.deletes.put(time.time() + GRACE, key, dropped, quiet=quiet)

    def count_move(self, rec, placement, targets):
        repaired = any(v in rec.volumes for v in targets)   # a recorded copy had vanished or was noted
        moved = set(rec.volumes) != set(placement)
        for name, yes in (("repaired", repaired), ("moved", moved), ("unchanged", not (repaired or moved))):
            if yes:
                self.progress.count(name)

    def copy(self, rec, sources, targets, path, lease):
        """Stream the value from the first source that gives a good copy to
        every target: noted first, uploaded, checked against the record, and
        only then MOVEd over whatever sat at the targets' paths. Each source
        is tried with uploads of its own name: a late upload of a failed try
        never takes the place of a checked one."""

        def fence(md5, size):
            if rec.md5 and md5 != rec.md5:
                raise CopyFailed(f"{src} holds a copy whose md5 {md5} is not the recorded {rec.md5}")
            if rec.size is not None and size != rec.size:
                raise CopyFailed(f"{src} holds {size} bytes, not the recorded {rec.size}")
            self.fence(rec.key, lease)()

        last = None
        for src in sources:
            try:
                r = self.volumes.open(src, path)
            except VolumeError as e:
                last = e
                continue
            if r is None:
                last = f"{src} lost the file"
                continue
            ok, tmp = False, new_tmp()
            self.index.note(rec.key, targets, tmp)   # switch_volumes drops these notes
            try:
                md5, size = send_copy(self.volumes, targets, path, r, tmp, fence)
                ok = True
            except KeyBusy:
                raise
            except Exception as e:
                last = f"from {src}: {e}"
                outcomes = getattr(e, "outcomes", {})
                if self.volumes.delete_copies({v: tmp for v in outcomes}, path, fence=self.fence(rec.key)):
                    raise CopyFailed(f"could not copy to {','.join(targets)} ({last}), and could not "
                                     "remove what landed: it stays noted for the next run") from None
            finally:
                r.close()   # the connection is kept only if the whole file was read
            if ok:
                self.progress.add(nbytes=size * len(targets))
                return
        raise CopyFailed(f"could not copy to {','.join(targets)}: {last}")

    # -- the copies no record vouches for

    def expire_uploads(self):
        """S3 multipart uploads untouched for upload_age seconds (and parts no
        upload names) go: their part keys are marked deleting, purged below."""
        marked = multipart.expire(self.index.db, self.upload_age)
        if marked:
            self.progress.message(f"{PROG}: {marked} part(s) of abandoned S3 multipart uploads to remove")


def send_copy(volumes, targets, path, download, tmp, fence):
    """put() of what `download` reads to `targets`: (md5, size). A value of
    up to WHOLE_COPY bytes is read whole, checked by fence(md5, size) before
    a byte is sent, and sent with its MOVE behind it (put_whole: one round
    trip a volume instead of two); a larger one is streamed (put: checked
    once its uploads are complete, before their MOVEs)."""
    if download.length is not None and download.length <= WHOLE_COPY:
        value = b"".join(download.stream(CHUNK))
        if len(value) != download.length:   # the volume closed early: what came is not the file
            raise CopyFailed(f"read {len(value)} bytes of {download.length}")
        return put_whole(volumes, targets, path, value, tmp=tmp, fence=fence)
    return put(volumes, targets, path, download.stream(CHUNK), download.length, tmp=tmp, fence=fence)


def holders(volumes, forget, names, path):
    """({name: True if it has the file, False if not, None if it did not
    answer}, [reasons of those that did not]) of the volumes `names`, asked
    at once by the client `volumes`; a host in `forget` has nothing."""
    asked = [v for v in dict.fromkeys(names) if volume_host(v) not in forget]
    have = {v: False for v in names}
    down = []
    for v, found in zip(asked, volumes.has_many([(v, path) for v in asked])):
        have[v] = None if isinstance(found, VolumeError) else found
        if isinstance(found, VolumeError):
            down.append(str(found))
    return have, down


class DryRun(Rebalance):
    """--dry-run: what a run would copy, switch and remove, one line per key
    on stdout, changing nothing (no lock, no note, no record of a disk's
    identity). A key a PUT or DELETE changes meanwhile may differ in the run."""

    ask_leaving = True     # it says what it sees: every recorded copy is asked

    def identify(self):
        known = self.index.volume_ids()
        for host in self.settings.volumes:
            try:
                ident = self.volumes.identity(host)
            except VolumeError:
                continue
            if host in known and known[host] != ident:
                self.replaced[host] = ident
        self.ids = {h: i for h, i in known.items() if h not in self.replaced}
        self._disks = {}
        check_named_once(self.settings.volumes, self.ids)

    def run(self, workers):
        self.progress.set_total(self.index.count())
        if self.ids is None:
            self.identify()
        for key, volume, _ in self.index.all_notes():
            if volume_host(volume) not in self.forget:
                self.say("remove", key, f"noted copy on {volume}")
                self.noted.add(key)
        tools.each_in_threads(self.index.scan(), self.look_at, workers)

    def look_at(self, rec):
        try:
            self.look(rec)
        finally:
            self.progress.add(done=1)

    def say(self, what, key, detail):
        self.progress.count(f"would {what}")
        self.progress.message(f"would {what} {tools.show(key)}: {detail}", stream=sys.stdout)

    def look(self, rec):
        self.progress.count("seen")
        self.progress.add(keys=1)
        if rec.state not in (LIVE, UNLINKED):
            if not rec.locked() or tools.owner_is_dead(rec.lock_owner):
                self.say("purge", rec.key, f"a dead {rec.state} record, its files on {','.join(rec.volumes)}")
            return
        placement = self.placement(rec.key)
        try:
            vouched, targets, have = self.decide(rec, placement)
        except CopyFailed as e:
            return self.fail(rec.key, str(e))
        if targets:
            self.say("copy", rec.key, f"from {vouched[0]} to {','.join(targets)}")
        dropped = self.dropped(rec, placement, have) if rec.volumes != placement or targets else []
        if dropped:
            self.say("remove", rec.key, f"copies on {','.join(dropped)} once its record names {','.join(placement)}")
        if not targets and not dropped:
            self.progress.count("unchanged")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="rebalance.py",
        description="Move every key's replicas to where the current volumes, replicas and subvolumes "
                    "place them, and copy back replicas that vanished. Safe while the master serves; "
                    "safe to kill and run again.",
        epilog="Settings not given as flags come from MKV_VOLUMES, MKV_DB, MKV_REPLICAS, MKV_SUBVOLUMES. "
               "Exit status: 0 every key on its placement, 1 some key failed or stayed busy (named on stderr), "
               "2 bad settings.")
    tools.add_common_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="change nothing: print what a run would copy, remove and purge, one line each")
    parser.add_argument("--forget-volume", metavar="H:P", action="append", default=[],
                        help="a volume removed from MKV_VOLUMES that is gone for good (dead disk): "
                             "its copies count as lost and are not deleted; may be given more than once")
    parser.add_argument("--s3-upload-age", metavar="SECONDS", type=float, default=multipart.UPLOAD_AGE,
                        help="remove S3 multipart uploads untouched for this long "
                             f"(default {multipart.UPLOAD_AGE:.0f}: 7 days)")
    args = parser.parse_args(argv)
    settings = tools.settings_from_args(PROG, args)
    in_use = [h for h in args.forget_volume if h in settings.volumes]
    if in_use:
        print(f"{PROG}: --forget-volume {in_use[0]} is still in MKV_VOLUMES; remove it there first",
              file=sys.stderr)
        return 2
    index, volumes, progress = tools.open_all(PROG, settings, args.workers, unit="keys")
    job = (DryRun if args.dry_run else Rebalance)(settings, index, volumes, progress, forget=args.forget_volume,
                                                   upload_age=args.s3_upload_age)
    try:
        job.identify()
    except SettingsError as e:
        progress.close()
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if not tools.run(PROG, job, args.workers, progress):
        return 1
    if args.dry_run:
        print(progress.summary(DRY_SUMMARY, "copied (none: a dry run)"), flush=True)
        return 1 if progress.counts.get("failed", 0) else 0
    print(progress.summary(SUMMARY, "copied"), flush=True)
    left = progress.counts.get("failed", 0) + progress.counts.get("busy", 0)
    for host, n in job.unreachable_removed.items():
        print(f"{PROG}: {host} is no longer in MKV_VOLUMES and does not answer: {n} key(s) keep a copy "
              f"there, noted. Start it and run rebalance.py again; or, if it is gone for good: "
              f"rebalance.py --forget-volume {host}", file=sys.stderr)
    if left > sum(job.unreachable_removed.values()):
        print(f"{PROG}: {left} key(s) not done (named above); run rebalance.py again", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(published.exit_status_of(main))   # the master's status page shows it
