"""The master's run folder: what its processes share besides the index, and
what the tools (rebuild.py, rebalance.py) show it while they run. Made empty
by the master's start (gunicorn.conf.py), in RAM (/dev/shm) where there is one:
a full disk must not stop the counting (prometheus_client's files are mmap'd,
a write into a file a full disk cannot grow is a SIGBUS). Found from MKV_DB,
so that a tool started by hand finds its master's.

    health/    one row of times per volume (mkvlib.health.Table)
    metrics/   prometheus_client's multiprocess files (every worker, the tools)
    pid        the arbiter's pid and start time: a later start removes the
               folder of a master that died without removing it (SIGKILL),
               and refuses to start beside one that runs
"""
import hashlib
import os
import shutil
import tempfile

from mkvlib.health import SHARED_ENV

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"   # prometheus_client reads it when it is imported


def run_folder(db):
    """The run folder of the master whose index is `db`."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    digest = hashlib.sha1(os.path.abspath(db).encode()).hexdigest()[:16]
    return os.path.join(base, f"mkv-{digest}")


def started_at(pid):
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's
    22nd field), None if it does not run (a zombie does not): with the pid,
    it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def alive(pid):
    """True if process `pid` runs (not a zombie)."""
    return started_at(pid) is not None


def pid_file(folder):
    """(pid, start time or None: a pid file of an older mkv) of the master
    that made `folder`; None if it has no pid file it can read."""
    try:
        with open(os.path.join(folder, "pid")) as f:
            words = f.read().split()
        return int(words[0]), (words[1] if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def owner(folder):
    """The pid of the running master that made `folder`, else None."""
    made_by = pid_file(folder)
    if made_by is None:
        return None
    pid, started = made_by
    now = started_at(pid)
    return pid if now is not None and started in (None, now) else None


class MasterRunning(Exception):
    """Another master runs on this index: its run folder is not ours to empty."""

    def __init__(self, pid):
        super().__init__(pid)
        self.pid = pid


def remove_dead(base):
    """Remove the run folders under `base` of masters that are gone."""
    for name in os.listdir(base):
        folder = os.path.join(base, name)
        # a pid file that does not read (being written, say) is left alone
        if name.startswith("mkv-") and pid_file(folder) is not None and owner(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)


def prepare(db, env=os.environ):
    """Empty the run folder (what a master that stopped left there) and make
    it anew; set the variables its workers find it by. Returns the folder.
    MasterRunning if a master that still runs made it: a second master on
    one index (a mistake, or gunicorn's USR2 upgrade) would take the running
    one's view of its volumes and its counts away (its page said every
    volume down, and so did its readiness)."""
    folder = run_folder(db)
    running = owner(folder)
    if running is not None and running != os.getpid():
        raise MasterRunning(running)
    shutil.rmtree(folder, ignore_errors=True)
    remove_dead(os.path.dirname(folder))
    for sub in ("health", "metrics"):
        os.makedirs(os.path.join(folder, sub), mode=0o700)
    with open(os.path.join(folder, "pid.new"), "w") as f:      # whole or not there: another
        f.write(f"{os.getpid()} {started_at(os.getpid())}")     # master's start may read it
    os.replace(os.path.join(folder, "pid.new"), os.path.join(folder, "pid"))
    env[SHARED_ENV] = os.path.join(folder, "health")
    env[METRICS_ENV] = os.path.join(folder, "metrics")
    return folder


def remove(db):
    """Remove this master's run folder (not another's that runs on `db`)."""
    folder = run_folder(db)
    if owner(folder) in (os.getpid(), None):
        shutil.rmtree(folder, ignore_errors=True)


def join_master(db, env=os.environ):
    """For a tool: count into the running master's metrics (before
    prometheus_client is imported). False if no master runs on `db`."""
    metrics = os.path.join(run_folder(db), "metrics")
    if not os.path.isdir(metrics):
        return False
    env[METRICS_ENV] = metrics
    return True


def join_health(db, env=os.environ):
    """For the S3 gateway: one view of volume health with the running
    master (a volume one of them heard from is up for both). False if no
    master runs on `db`."""
    folder = os.path.join(run_folder(db), "health")
    if not os.path.isdir(folder):
        return False
    env[SHARED_ENV] = folder
    return True
