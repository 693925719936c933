"""Per-key locks kept alive while their holder works: the clock they are
kept by, owner tokens, and one renewer per process for every lease held.
The lock itself is a column of the index (mkvlib.index); a Lease renews it
through any object with renew(key, owner, lease)."""
import logging
import os
import socket
import sqlite3
import threading
import time

from mkvlib.errors import IndexBusy, KeyBusy
from mkvlib.placement import unique_hex

log = logging.getLogger("mkv")

LOCK_LEASE = 30.0          # seconds a per-key lock lives unless renewed
FENCE_FRESH = 1.0          # seconds a lock just taken or renewed needs no renewal before a request
_LOCK_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def lock_clock() -> float:
    """Seconds on the clock leases are kept by: CLOCK_BOOTTIME, one clock for
    every process of the machine (the index is on one machine), which neither
    NTP nor an operator can step. The wall clock can jump, and a jump would
    expire every lease at once, or keep dead ones for hours."""
    return time.clock_gettime(_LOCK_CLOCK)


def boot_id() -> str:
    """Which boot of this machine we are in: lock_clock() starts again at each."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# this process's id and the "host:pid:" of its lock owners, kept up to date
# by a fork hook: os.getpid() and the host name are system calls
_PROCESS = {}


def _this_process():
    _PROCESS.update(pid=os.getpid(), owner=f"{socket.gethostname()}:{os.getpid()}:")


_this_process()
os.register_at_fork(after_in_child=_this_process)


def new_owner(tag="") -> str:
    """A lock owner token (host:pid:tag+unique); says who holds a lock when
    someone looks at the index, and lets the tools tell a dead holder. No
    system call: the host and pid are this process's, kept since its start."""
    return f"{_PROCESS['owner']}{tag}{unique_hex()}"


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

    def __init__(self, index, key, owner, lease=LOCK_LEASE, since=None):
        """`since`: the lock_clock() time the lock was taken (default: now)."""
        self.index, self.key, self.owner, self.lease = index, key, owner, lease
        self.lost = False
        self.renewed = lock_clock() if since is None else since   # the lock runs a lease from here

    def check(self):
        if self.lost:
            raise KeyBusy("lost the lock on the key (the index was busy too long); try again")

    def guard(self, chunks):
        """`chunks`, stopping with KeyBusy as soon as the lock is lost."""
        for chunk in chunks:
            self.check()
            yield chunk

    def __enter__(self):
        Lease._held[id(self)] = self
        Lease._start_renewer()
        return self

    def __exit__(self, *exc):
        Lease._held.pop(id(self), None)
        return False

    @staticmethod
    def later(undo, within):
        """Call undo() (an index write that failed: the release of a lock, the
        undoing of a claim) every TICK until it gets through, for `within`
        seconds at most: by then the lock has expired by itself."""
        Lease._start_renewer()
        Lease._later.append((undo, time.monotonic() + within))

    @staticmethod
    def _start_renewer():
        if Lease._renewer_pid != _PROCESS["pid"]:
            with Lease._start:
                if Lease._renewer_pid != _PROCESS["pid"]:
                    Lease._renewer_pid = _PROCESS["pid"]
                    Lease._later.clear()   # a fork's parent's: not ours to do
                    threading.Thread(target=Lease._renew_all, daemon=True, name="leases").start()

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
            if lease.lost or lock_clock() - lease.renewed < lease.lease / 6:
                continue
            try:
                started = lock_clock()    # the new lease runs from before the renewal, never after
                if lease.index.renew(lease.key, lease.owner, lease.lease):
                    lease.renewed = started
                else:
                    lease.lost = True
            except (sqlite3.Error, IndexBusy):
                pass   # busy now; the next renewal comes long before the lease runs out
