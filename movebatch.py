"""rebalance.py's batches: the keys of a plain move (every recorded copy
the placement keeps is there, a value of up to WHOLE_COPY bytes, nothing
noted) are moved several at a time, with what a key costs shared by the
batch: their HEADs go pipelined on one connection per volume, as do the
GETs of their values and the uploads and MOVEs of the copies; one
transaction locks them, one notes the copies about to be written, one
switches them and releases them. The rules are the one-key path's
(Rebalance.move), step for step: each key is locked before its record is
trusted, its copies are noted before a byte is sent, each value is checked
against its record (md5 and size) before it is sent, each MOVE is sent
right after its key's fence, the switch names only copies that landed.
A key that is not plain, or whose record changed since it was read, or
that anything goes wrong for, takes the one-key path, which says what
went wrong."""
import contextlib
import sqlite3

from mkvlib import pipelined
from mkvlib.errors import MkvError
from mkvlib.index import LIVE, UNLINKED
from mkvlib.lease import Lease, lock_clock
from mkvlib.placement import key2path, new_tmp, volume_host
from mkvlib.upload import put_whole_many

BATCH = 16                # keys looked at together
BATCH_BYTES = 4 << 20     # bytes of values a batch may hold at once
# bytes of a value read whole before it is sent (here and in
# rebalance.send_copy): held in memory, and one round trip a target instead of two
WHOLE_COPY = 1 << 20


class CopyFailed(MkvError):
    pass


def batches(records, n=BATCH, nbytes=BATCH_BYTES):
    """The records in lists of at most n, whose recorded sizes add up to at
    most nbytes (a list of one may be larger)."""
    batch, held = [], 0
    for rec in records:
        size = rec.size or 0
        if batch and (len(batch) == n or held + size > nbytes):
            yield batch
            batch, held = [], 0
        batch.append(rec)
        held += size
    if batch:
        yield batch


class Move:
    """One key of a batch: its record, placement, the copy read, the
    copies to write and to drop, the upload name."""

    def __init__(self, rec, placement, source, targets, dropped):
        self.rec, self.placement, self.targets, self.dropped = rec, placement, targets, dropped
        self.source = source        # the recorded copy the value is read from
        self.path, self.tmp = key2path(rec.key), new_tmp()
        self.lease = None
        self.value = None
        self.switched = False


class Batches:
    """look(records): the batch path of a Rebalance `job`."""

    def __init__(self, job):
        self.job = job

    def plain(self, rec):
        """A record the batch may handle: visible, nothing noted, on no
        replaced or forgotten volume."""
        job = self.job
        return (rec.state in (LIVE, UNLINKED) and rec.volumes and rec.key not in job.noted
                and not any(volume_host(v) in job.replaced or volume_host(v) in job.forget for v in rec.volumes))

    def look(self, recs):
        job = self.job
        plain = [rec for rec in recs if self.plain(rec)]
        for rec in recs:
            if not self.plain(rec):
                job.first_look(rec)
        asks = []
        for rec in plain:
            placement = job.placement(rec.key)
            disks = {job.disk(p) for p in placement}   # job.same(a, b): a's disk is b's
            kept = [v for v in rec.volumes if job.disk(v) in disks]
            # a mover's value is read from a kept copy (else any): that GET,
            # under the lock, says that copy is there; the other kept ones are asked
            source = None if rec.volumes == placement else (kept or rec.volumes)[0]
            asks.append((rec, placement, source, [v for v in kept if v != source]))
        try:
            found = iter(pipelined.has_many(job.volumes, [(v, key2path(rec.key)) for rec, _, _, asked in asks
                                                          for v in asked]))
        except Exception:    # whatever it was, the one-key path says it
            for rec in plain:
                job.first_look(rec)
            return
        moves = []
        for rec, placement, source, asked in asks:
            there = all([next(found) is True for _ in asked])
            move = self.plan(rec, placement, source) if there and source is not None else None
            if move is not None:
                moves.append(move)
            elif there and source is None:
                with job.looking(rec):
                    job.progress.count("unchanged")
            else:   # a copy missing or a volume silent, or not a plain copy: the one-key path
                job.first_look(rec)
        if moves:
            self.move(moves)

    def plan(self, rec, placement, source):
        """The Move of a record whose other kept copies are all there, read
        from `source`, or None if it is not a plain copy of a small value
        to volumes that are up."""
        job = self.job
        disks = {job.disk(v) for v in rec.volumes}
        targets = [p for p in placement if job.disk(p) not in disks]
        if not targets or rec.md5 is None or rec.size is None or rec.size > WHOLE_COPY \
                or any(job.volumes.health.down(volume_host(t)) for t in targets):
            return None
        disks = {job.disk(p) for p in placement}
        dropped = [v for v in rec.volumes if job.disk(v) not in disks]
        return Move(rec, placement, source, targets, dropped)

    def move(self, moves):
        """Lock, note, read, copy, switch: each key ends switched, on the
        one-key path, or left for the retry at the end (Rebalance.later)."""
        job = self.job
        since = lock_clock()
        try:
            locked = job.index.lock_many([m.rec.key for m in moves], job.owner)
        except (MkvError, sqlite3.Error):
            locked = {}
        mine = []
        for m in moves:
            got = locked.get(m.rec.key)
            if got is None:
                job.first_look(m.rec)     # busy, gone, a dead tool's: the one-key path says which
            elif got[1] or not same_record(m.rec, got[0]):
                with job.looking(m.rec):  # written or noted since it was read
                    job.move_locked(got[0], since)
            else:
                mine.append(m)
        if not mine:
            return
        with contextlib.ExitStack() as stack:
            for m in mine:
                m.lease = stack.enter_context(Lease(job.index, m.rec.key, job.owner, since=since))
            try:
                switched = self.copy_and_switch(mine)
            except Exception:             # never the run's end: each on the one-key path, which says what is wrong
                switched = {m.rec.key for m in mine if m.switched}
            except BaseException:
                for m in mine:   # a no-op for those switched
                    job.index.release(m.rec.key, job.owner)
                raise
        for m in mine:
            if m.rec.key not in switched:
                with job.looking(m.rec):   # what went wrong is the one-key path's to say
                    job.move_locked(m.rec, since)

    def copy_and_switch(self, mine):
        """The keys of `mine` (locked) copied and switched (and released)."""
        job = self.job
        job.index.note_many([(m.rec.key, m.targets, m.tmp) for m in mine])   # before a byte is sent
        values = pipelined.read_many(job.volumes, [(m.source, m.path) for m in mine])
        for m, value in zip(mine, values):
            m.value = value if isinstance(value, bytes) else None
        sending = [m for m in mine if m.value is not None]
        results = put_whole_many(job.volumes, [(m.targets, m.path, m.value, m.tmp, self.fence(m)) for m in sending])
        landed = []
        for m, result in zip(sending, results):
            m.value = None
            if isinstance(result, Exception):
                self.undo(m, result)
            else:
                landed.append(m)
                job.progress.add(nbytes=result[1] * len(m.targets))
        if not landed:
            return set()
        quiet = job.alone()    # no one to read the records the switch replaces
        switched = set(job.index.switch_many([(m.rec.key, m.placement, m.dropped, m.targets) for m in landed],
                                             job.owner))
        for m in landed:
            m.switched = m.rec.key in switched
        for m in landed:
            if m.switched:
                with job.looking(m.rec):
                    if m.dropped:
                        job.drop_later(m.rec.key, m.dropped, quiet)
                    job.count_move(m.rec, m.placement, m.targets)
        return switched

    def fence(self, m):
        """put_whole's fence of one key: the value is the record's, the lock still ours."""
        def check(md5, size):
            if md5 != m.rec.md5 or size != m.rec.size:
                raise CopyFailed(f"{m.source} holds {size} bytes of md5 {md5}, "
                                 f"not the recorded {m.rec.size} of {m.rec.md5}")
            self.job.fence(m.rec.key, m.lease)()
        return check

    def undo(self, m, error):
        """A copy of the batch that failed: what may have landed is removed
        (as Rebalance.copy does); the one-key path tries again."""
        job = self.job
        outcomes = getattr(error, "outcomes", {})
        try:
            job.volumes.delete_copies({v: m.tmp for v in outcomes}, m.path, fence=job.fence(m.rec.key))
        except (MkvError, sqlite3.Error):
            pass       # noted: the one-key path overwrites it, or the next run removes it


def same_record(a, b):
    """The record read and the record locked say the same of the value and its copies."""
    return (a.state, a.volumes, a.md5, a.size) == (b.state, b.volumes, b.md5, b.size)
