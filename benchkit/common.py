"""The bench cluster's settings, logging, and running a command or an mkv tool."""
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo

MB = 1 << 20
SUBVOLUMES = 10
REPLICAS = 3
WORKERS = 2


def worker_class():
    """The master's worker class: gunicorn.conf.py's `worker_class` (bench.py's
    servers run it, as `gunicorn mkv:app` from the repo does)."""
    with open(os.path.join(ROOT, "gunicorn.conf.py")) as f:
        return re.search(r'^worker_class = "([^"]+)"', f.read(), re.M).group(1)


def say(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


def conftest():
    """tests/conftest.py: Server, start_volume, start_master (bounded waits,
    terminate -> wait -> kill, logs of each server in a file)."""
    import conftest as c
    return c


def http(method, url, data=None, timeout=30):
    import requests
    return requests.request(method, url, data=data, timeout=timeout, allow_redirects=False)


def timed(argv, env=None, timeout=600):
    """(seconds, CompletedProcess) of a command run from the repo."""
    start = time.monotonic()
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return time.monotonic() - start, p


def timed_tool(script, names, db):
    """(seconds, CompletedProcess) of `python SCRIPT --db DB` over the volume
    servers `names`, with the bench's replicas and subvolumes."""
    env = dict(os.environ, MKV_VOLUMES=",".join(names), MKV_DB=db,
               MKV_REPLICAS=str(REPLICAS), MKV_SUBVOLUMES=str(SUBVOLUMES))
    return timed([sys.executable, script, "--db", db], env=env)


def failure(what, p):
    """The error of a command `what` that failed: its exit code, output and
    the end of its stderr."""
    return RuntimeError(f"{what}: exit {p.returncode}\n{p.stdout}{p.stderr[-3000:]}")


def peak_rss(pid):
    """VmHWM of a process, in bytes (as tests/test_failures.py reads it)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def remove_tree(path):
    """rm -rf: a volume that served the thrasher holds ~100,000 empty folders,
    which shutil.rmtree took minutes to remove on a busy machine."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


def ensure_curl():
    if not shutil.which("curl"):
        raise SystemExit("bench: curl is missing (apt-get install curl)")
