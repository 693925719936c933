"""What rebuild.py and rebalance.py share: their settings flags, the per-key
lock with take-over from dead tools, the progress display and the summary.

The tools run with plain threads (no gevent); mkvlib's Index and Volumes are
safe to share between them.
"""
import argparse
import os
import queue
import socket
import sys
import threading
import time

from mkvlib import progress as published
from mkvlib.errors import KeyBusy, SettingsError
from mkvlib.index import Index
from mkvlib.lease import FENCE_FRESH, LOCK_LEASE, lock_clock
from mkvlib.settings import Settings
from mkvlib.volumes import LATE_MAX, Volumes

STATUS_EVERY = 5.0      # seconds between status lines when stderr is not a terminal
VOLUME_TIMEOUT = 10.0   # seconds the tools wait at least for a volume to connect or answer


# ---------------------------------------------------------------- settings

def add_common_args(parser: argparse.ArgumentParser, workers=8):
    parser.add_argument("--volumes", metavar="H:P,H:P,...",
                        help="volume servers, comma-separated (default: $MKV_VOLUMES)")
    parser.add_argument("--db", metavar="FILE", help="the SQLite index file (default: $MKV_DB)")
    parser.add_argument("--replicas", metavar="N", help="copies of each key (default: $MKV_REPLICAS or 3)")
    parser.add_argument("--subvolumes", metavar="N",
                        help="svXX folders per volume (default: $MKV_SUBVOLUMES or 10)")
    parser.add_argument("--workers", metavar="N", type=int, default=workers,
                        help=f"keys or folders worked on at once (default: {workers})")


def settings_from_args(prog, args) -> Settings:
    """Flags over MKV_*; a bad setting is one line on stderr and exit status 2."""
    try:
        if args.workers < 1 or args.workers > 256:
            raise SettingsError(f"--workers: {args.workers} is out of range (1 to 256)")
        return Settings.from_env(volumes=args.volumes, db=args.db, replicas=args.replicas,
                                        subvolumes=args.subvolumes)
    except SettingsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)


def open_volumes(settings, workers) -> Volumes:
    """The tools' volume client. MKV_VOLTIMEOUT is tuned for the master, which
    must answer a GET quickly; a tool would rather wait than fail a key, so
    it waits at least VOLUME_TIMEOUT seconds for a volume to answer."""
    return Volumes(timeout=max(settings.voltimeout, VOLUME_TIMEOUT), maxsize=max(64, workers * 4),
                   secret=settings.secret, offload=hash_aside)


_HASHERS_LOCK = threading.Lock()
_HASHERS = []          # the pool of hash_aside, made on first use (most values are hashed whole)


def hash_aside(fn, arg):
    """Volumes' offload for the tools: fn(arg) (an md5 update of a large
    chunk, which lets go of the GIL) in another thread while the chunk is
    sent; returns the function that waits for it (as the master's PUT does)."""
    if not _HASHERS:
        with _HASHERS_LOCK:
            if not _HASHERS:
                from concurrent.futures import ThreadPoolExecutor
                _HASHERS.append(ThreadPoolExecutor(2, thread_name_prefix="md5"))
    return _HASHERS[0].submit(fn, arg).result


FEED = 2   # items a worker of each_in_threads takes at a time: few, or the last ones make a tail


def each_in_threads(items, fn, workers, feed=FEED):
    """fn(item) for every item of the iterable `items`, in `workers`
    threads, each taking `feed` items at a time from a bounded queue (at
    most 2 * workers * feed items read ahead: bounded memory). Cheaper per
    item than an executor's future each. Returns once every item is done;
    if the caller is interrupted (Ctrl-C), once the items the threads hold
    are done, the others dropped. The first exception fn raises is raised
    here, once the threads are done (the items after it are not run)."""
    work = queue.Queue(maxsize=2 * workers)
    errors = []

    def worker():
        while (batch := work.get()) is not None:
            for item in batch:
                if not errors:
                    try:
                        fn(item)
                    except BaseException as e:
                        errors.append(e)
    threads = [threading.Thread(target=worker, name="worker", daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == feed:
                work.put(batch)
                batch = []
        if batch:
            work.put(batch)
    except BaseException:
        try:
            while True:            # interrupted: what no thread took yet is dropped
                work.get_nowait()
        except queue.Empty:
            pass
        raise
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def open_index(prog, path) -> Index:
    try:
        return Index(path)
    except SettingsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)


def open_all(prog, settings, workers, unit):
    """(index, volume client, progress display) of a tool's run; its
    progress is shown to a master running on the same index (mkvlib.progress)."""
    progress = Progress(prog, unit=unit)
    published.publish(prog.removesuffix(".py"), settings.db, progress)
    return open_index(prog, settings.db), open_volumes(settings, workers), progress


def run(prog, job, workers, progress) -> bool:
    """job.run(workers), then the progress display closed; False if Ctrl-C stopped it."""
    try:
        job.run(workers)
    except KeyboardInterrupt:
        progress.close()
        print(f"{prog}: interrupted; run it again to finish", file=sys.stderr)
        return False
    progress.close()
    return True


def show(key: bytes) -> str:
    """A key for a message: as text where it is UTF-8, escaped where it is not."""
    return key.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- locks

def owner_is_dead(owner: str) -> bool:
    """True if a lock owner token (mkvlib.lease.new_owner: host:pid:...) names a
    process of this machine that no longer exists."""
    try:
        host, pid, _ = owner.split(":", 2)
        pid = int(pid)
    except (AttributeError, ValueError):
        return False
    if host != socket.gethostname() or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """A killed process whose parent has not reaped it yet: kill(pid, 0)
    still succeeds, but it will never run again (state Z in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses
    return stat[stat.rfind(")") + 2:stat.rfind(")") + 3] == "Z"


def lock_key(index: Index, key: bytes, owner: str):
    """Index.lock, but a lock left by a killed process of this machine is
    taken over instead of waiting for its lease to run out (once its requests
    can no longer run: LATE_MAX after its last renewal).
    Returns the record (None: no such key); KeyBusy if someone live holds it."""
    try:
        return index.lock(key, owner)
    except KeyBusy:
        rec = index.get(key)
        if rec is not None and rec.lock_owner and owner_is_dead(rec.lock_owner):
            taken = index.take_over(key, rec.lock_owner, owner)
            if taken is not None:
                # a MOVE or DELETE the dead holder sent (within FENCE_FRESH of
                # its last renewal) may run until its deadline: touch nothing
                # of the key's until then (at once for a holder long dead)
                last_renewal = (rec.lock_until or 0) - LOCK_LEASE
                time.sleep(max(0.0, last_renewal + FENCE_FRESH + LATE_MAX - lock_clock()))
                return taken
        raise


# ---------------------------------------------------------------- progress

def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def human_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Counters of a run, shown as it goes and summed up at the end.

    `done`/`total` count the units the time left is computed from (folders
    for rebuild, keys for rebalance); `keys` and `bytes` are shown beside
    them. On a terminal it is a tqdm bar; otherwise one plain line every few
    seconds on stderr. Thread-safe."""

    def __init__(self, prog, total=None, unit="keys", stream=None, every=STATUS_EVERY, tty=None):
        self.prog, self.total, self.unit = prog, total, unit
        self.stream = stream or sys.stderr
        self.every = every
        self.counts = {}
        self.done = 0
        self.keys = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._thread = None
        tty = self.stream.isatty() if tty is None else tty
        if tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit=" " + unit, desc=prog, file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)
        elif every:
            self._thread = threading.Thread(target=self._lines, daemon=True, name="progress")
            self._thread.start()

    def count(self, name, n=1):
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def add(self, done=0, keys=0, nbytes=0):
        with self._lock:
            self.done += done
            self.keys += keys
            self.bytes += nbytes
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self.keys} keys, {human_bytes(self.bytes)}", refresh=False)
                if done:
                    self._bar.update(done)

    def set_total(self, total):
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def status(self):
        elapsed = max(time.monotonic() - self.started, 1e-6)
        parts = [f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / max(self.total, 1):.0f}%)"
        parts.append(f"{self.keys} keys, {human_bytes(self.bytes)}")
        parts.append(f"{self.keys / elapsed:.0f} keys/s, {human_bytes(self.bytes / elapsed)}/s")
        if self.total and self.done:
            left = elapsed * (self.total - self.done) / self.done
            parts.append(f"{human_time(left)} left")
        return f"{self.prog}: " + ", ".join(parts)

    def _lines(self):
        while not self._stop.wait(self.every):
            print(self.status(), file=self.stream, flush=True)

    def message(self, text, stream=None):
        """A line of its own (on `stream`, default the display's), that does not break the bar."""
        with self._lock:    # lines from several threads stay whole
            if self._bar is not None:
                self._bar.write(text, file=stream or self.stream)
            else:
                print(text, file=stream or self.stream, flush=True)

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()

    def elapsed(self):
        return time.monotonic() - self.started

    def summary(self, names, byte_word):
        """One line: 'prog: 312 keys seen, 120 moved, ..., 1.2 GB copied in 14.2 s'."""
        parts = [f"{self.counts.get(n, 0)} {n}" for n in names]
        parts[0] = parts[0].replace(" ", " keys ", 1)
        return (f"{self.prog}: " + ", ".join(parts)
                + f", {human_bytes(self.bytes)} {byte_word} in {self.elapsed():.1f} s")
