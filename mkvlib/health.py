"""What the master knows of each volume server, and the one place every
path asks "may I send this volume a read, a write, now?".

One view for every operation and every process of a master: each volume has
a row of times (RowTimes) in a Table, which under gunicorn is a small shared
file per volume in the master's run folder (mkvlib.runfolder), so that every
worker, the admin listener and the status page read the same row. Without
one (a tool, an in-process test) the table is this process's own.

Two sources feed it: every request to a volume (an answer marks it up for
every operation at once, a failure marks it down for DOWN_RETRY seconds),
and the prober (mkvlib.prober), which hears from every watched server each
PROBE_EVERY seconds and checks that it is the disk the index knows. No I/O
here but `ask`, the one request a write may make to a server not heard from
lately, and the table's files."""
import collections
import logging
import mmap
import os
import struct
import time
from bisect import bisect_left
from urllib.parse import quote

log = logging.getLogger("mkv")

DOWN_RETRY = 5.0           # seconds a volume that failed is skipped before one retry
PROBE_FRESH = 2.5          # seconds the prober's last good answer keeps a volume a redirect target

# A row: time.monotonic() (one clock for every process of the machine) of the
# volume's last answer, last failure, last good probe, last missed probe, and
# 1.0 while it answers with an identity the index does not know.
ANSWERED, FAILED, PROBED, MISSED, REPLACED = range(5)
ROW = struct.Struct("5d")
ANSWER_TIMES = struct.Struct("2d")   # a row's first two times: ANSWERED, FAILED
TIME = struct.Struct("d")
SHARED_ENV = "MKV_HEALTH_DIR"   # set by the master's start (gunicorn.conf.py) for its workers
COUNTS = collections.Counter()   # (host, answered?) -> requests since take_counts(), for the metrics
# seconds from a request's send to its answer's head: loopback nginx answers in
# about 0.1 ms, a LAN's in a few; the timeouts are 1 to 10 s
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
# host -> [answers, seconds, a count per latency bucket] since take_latency()
LATENCY = {}


def take_counts():
    """The requests to each volume since the last call: {(host, ok): n}."""
    taken = dict(COUNTS)
    COUNTS.clear()
    return taken


def took(host, seconds):
    """A volume answered `seconds` after the request was sent (a few plain
    adds: every request of a write comes here)."""
    row = LATENCY.get(host)
    if row is None:
        row = LATENCY[host] = [0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)
    row[0] += 1
    row[1] += seconds
    row[2 + bisect_left(LATENCY_BUCKETS, seconds)] += 1


def take_latency():
    """The answer times of each volume since the last call: {host: took()'s row}."""
    global LATENCY
    taken, LATENCY = LATENCY, {}
    return taken


class Table:
    """Rows of times by volume host: in this process, or shared through one
    mmap'd file per host in `folder` (8-byte stores: a reader never sees half
    a time)."""

    def __init__(self, folder=None):
        self.folder = folder
        self._rows = {}

    @classmethod
    def for_process(cls):
        """The master's shared table in its workers, else one of this process."""
        folder = os.environ.get(SHARED_ENV)
        return cls(folder if folder and os.path.isdir(folder) else None)

    def row(self, host):
        buf = self._rows.get(host)
        if buf is None:
            buf = self._rows[host] = self._open(host)
        return buf

    def _open(self, host):
        if self.folder is None:
            return bytearray(ROW.size)
        fd = os.open(os.path.join(self.folder, quote(host, safe="")), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < ROW.size:
                os.ftruncate(fd, ROW.size)   # zeros: never heard of, never failed
            return mmap.mmap(fd, ROW.size)
        finally:
            os.close(fd)

    def get(self, host):
        return ROW.unpack_from(self._rows.get(host) or self.row(host))   # a GET asks: no call it can spare

    def set(self, host, field, value):
        struct.pack_into("d", self.row(host), field * 8, value)

    def answer_now(self, host, now):
        """Set the row's ANSWERED time to `now`; True if it had failed after
        its answer before (get() and set() in one step: every answer of a
        volume to every request comes here)."""
        buf = self._rows.get(host) or self.row(host)
        answered, failed = ANSWER_TIMES.unpack_from(buf)
        TIME.pack_into(buf, ANSWERED * 8, now)
        return failed > answered

    def hosts(self):
        """Every host a process of this master has a row for."""
        if self.folder is None:
            return list(self._rows)
        from urllib.parse import unquote
        return sorted(unquote(name) for name in os.listdir(self.folder))


def is_down(row, now, retry_after):
    """Failed after its last answer, less than `retry_after` seconds ago."""
    return row[FAILED] > row[ANSWERED] and now < row[FAILED] + retry_after


def is_up(row, now, fresh=PROBE_FRESH, retry_after=DOWN_RETRY):
    """A redirect target: the last look of the prober (of any process) had a
    good answer, a moment ago, from the disk the index knows, and no request
    failed since its last answer. What the page and the metrics show."""
    # is_down, inline: a GET asks this
    return (now - row[PROBED] < fresh and row[PROBED] > row[MISSED] and not row[REPLACED]
            and not (row[FAILED] > row[ANSWERED] and now < row[FAILED] + retry_after))


class Health:
    def __init__(self, retry_after=DOWN_RETRY, fresh=PROBE_FRESH, ask=None, table=None):
        self.retry_after, self.fresh = retry_after, fresh
        self.ask = ask           # ask(host): True if the server answers a request now
        self.look = None         # look([host]): the prober's look, set by the prober
        self.watched = []        # hosts the prober looks at
        self.replaced = set()    # hosts that answer with an identity the index does not know
        self.table = table if table is not None else Table.for_process()

    # -- what requests tell (the first process to see a change logs it)

    def failed(self, host, reason=""):
        now = time.monotonic()
        COUNTS[host, False] += 1
        if not is_down(self.table.get(host), now, self.retry_after):
            log.warning("volume %s is down, skipping it for %.0f s: %s", host, self.retry_after, reason)
        self.table.set(host, FAILED, now)

    def answered(self, host, seconds=None):
        """`host` answered a request, `seconds` after it was sent (if known)."""
        COUNTS[host, True] += 1
        if seconds is not None:
            took(host, seconds)
        if self.table.answer_now(host, time.monotonic()):
            log.warning("volume %s is back up", host)

    def answered_each(self, host, times):
        """`host` answered the pipelined requests of one connection, each
        after the seconds in `times`: counted as one answer, each timed."""
        for seconds in times:
            took(host, seconds)
        self.answered(host)

    # -- what the prober tells

    def heard(self, host):
        """The prober had a good answer: the volume is up for every operation.
        True if that is news: it had answered a look once, and the last look
        of any process had no answer (not for a volume that was not up yet
        when the master started)."""
        row = self.table.get(host)
        now = time.monotonic()
        self.table.set(host, PROBED, now)
        # answered(), but not counted again: the look's request was, where
        # its answer was read (Volumes._fan)
        if self.table.answer_now(host, now):
            log.warning("volume %s is back up", host)
        return row[MISSED] > row[PROBED] > 0

    def unheard(self, host):
        """The prober had no answer; True if that is news: the last look of
        any process had one."""
        row = self.table.get(host)
        self.table.set(host, MISSED, time.monotonic())
        return row[PROBED] > row[MISSED]

    def set_replaced(self, host, replaced):
        """Whether `host` answers with an identity the index does not know;
        True if that is news to every process."""
        (self.replaced.add if replaced else self.replaced.discard)(host)
        news = bool(self.table.get(host)[REPLACED]) != replaced
        if news:
            self.table.set(host, REPLACED, 1.0 if replaced else 0.0)
        return news

    # -- the answers

    def down(self, host):
        """True while `host` failed less than DOWN_RETRY seconds ago and has
        not answered since (in any process of this master)."""
        return is_down(self.table.get(host), time.monotonic(), self.retry_after)

    def may_read(self, host):
        """True if a GET may send a client to `host` now: the prober heard
        from it a moment ago (the disk the index knows), and no request has
        failed since. A host not watched yet (a volume removed from
        MKV_VOLUMES that records still name) is looked at now and watched."""
        if host not in self.watched:
            self.watched.append(host)
            if self.look is not None:
                self.look([host])
        return is_up(self.table.get(host), time.monotonic(), self.fresh, self.retry_after)

    def may_ask(self, host):
        """False while `host` is known down; after DOWN_RETRY, True once (a
        retry), and the others (every process) keep skipping it meanwhile."""
        row = self.table.get(host)
        if row[FAILED] <= row[ANSWERED]:
            return True
        now = time.monotonic()
        if now < row[FAILED] + self.retry_after:
            return False
        self.table.set(host, FAILED, now)
        return True

    def may_write(self, host, always_ask=False):
        """Whether to send `host` a value or a DELETE now: yes if the prober
        heard from it a moment ago. Otherwise it is asked now (ask(), one
        HEAD: a hung volume costs MKV_VOLTIMEOUT, not a transfer's timeout);
        while it stays down, once per DOWN_RETRY only, unless `always_ask`
        (a DELETE: rare, and right after the volume's return it must work).
        Any answer since its failure, to any process, ends its DOWN_RETRY."""
        if self.may_read(host):
            return True
        return (always_ask or self.may_ask(host)) and self.ask is not None and self.ask(host)
