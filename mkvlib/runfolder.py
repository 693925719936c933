"""The master's run folder: what its processes share besides the index, and
what the tools (rebuild.py, rebalance.py) show it while they run. Made empty
by the master's start (gunicorn.conf.py), in RAM (/dev/shm) where there is one:
a full disk must not stop the counting (prometheus_client's files are mmap'd,
a write into a file a full disk cannot grow is a SIGBUS). Found from MKV_DB,
so that a tool started by hand finds its master's.

    health/    one row of times per volume (mkvlib.health.Table)
    metrics/   prometheus_client's multiprocess files (every worker, the tools)
    pid        the arbiter's pid: a later start removes the folder of a master
               that died without removing it (SIGKILL)
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


def alive(pid):
    """True if process `pid` runs (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_dead(base):
    """Remove the run folders under `base` of masters that are gone."""
    for name in os.listdir(base):
        pid_file = os.path.join(base, name, "pid")
        if name.startswith("mkv-") and os.path.isfile(pid_file):
            try:
                with open(pid_file) as f:
                    pid = int(f.read())
            except (OSError, ValueError):
                continue
            if not alive(pid):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def prepare(db, env=os.environ):
    """Empty the run folder (what a master that stopped left there) and make
    it anew; set the variables its workers find it by. Returns the folder."""
    folder = run_folder(db)
    shutil.rmtree(folder, ignore_errors=True)
    remove_dead(os.path.dirname(folder))
    for sub in ("health", "metrics"):
        os.makedirs(os.path.join(folder, sub), mode=0o700)
    with open(os.path.join(folder, "pid"), "w") as f:
        f.write(str(os.getpid()))
    env[SHARED_ENV] = os.path.join(folder, "health")
    env[METRICS_ENV] = os.path.join(folder, "metrics")
    return folder


def remove(db):
    shutil.rmtree(run_folder(db), ignore_errors=True)


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
