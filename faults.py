"""Fault injection: a throwaway cluster on loopback under a mixed load, with a
volume or the master killed or frozen every few seconds, then repaired and
checked: nothing acknowledged is lost, nothing wrong is ever served.

    python faults.py [--seconds 60] [--every 3] [--clients 8] [--keys 40] [--seed N] [--fuzz N]

The load: each client owns its keys and does PUT, GET (following the
redirect), DELETE and UNLINK on them at random, keeping, per key, the values
it may hold: one after an acknowledged answer (201, 204), or several after a
request whose outcome is unknown (a 5xx, a broken connection: the master may
have been killed after it committed). Every GET during the run must serve one
of those values, or nothing if absence is one of them.

The faults, one at a time, every --every seconds: SIGKILL of the whole master
(restarted on the same index), SIGKILL of one gunicorn worker, SIGKILL of a
volume (restarted a moment later), SIGSTOP of a volume (SIGCONT a moment
later), SIGSTOP of one nginx worker of a volume for longer than OP_TIMEOUT
(its requests run late, the other worker serves). Never more than one volume
down (replicas 3 over 3 volumes).

At the end every server runs again, rebalance.py runs until it exits 0, and
every key is read back: `lost` counts acknowledged values not served,
`wrong` counts values served that the key never held. rebuild.py --check
then lists what the kills left on the disks. The run prints a markdown table
of faults injected and operations acknowledged, lost and wrong; the exit
status is 0 only when nothing was lost or wrong. With --fuzz N, the fuzz
tests (tests/test_fuzz.py) run too, with N examples each, and the number of
inputs they sent is added to the table.
"""
import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tests"))

import conftest  # noqa: E402  (the tests' server harness: bounded waits, terminate -> wait -> kill)
from mkvlib.index import Index  # noqa: E402
from mkvlib.lease import LOCK_LEASE  # noqa: E402
from mkvlib.volumes import OP_TIMEOUT  # noqa: E402

TIMEOUT = 10          # seconds: every request
REPLICAS = 3
FAULTS = ["master killed", "worker killed", "volume killed", "volume frozen", "volume worker stalled"]
ABSENT = None         # a key's possible value: no value at all


def say(*args):
    print("faults:", *args, file=sys.stderr, flush=True)


class Keys:
    """What each key may hold, as the clients saw it acknowledged."""

    def __init__(self):
        self.possible = {}                 # key -> set of values (bytes, or ABSENT)
        self.counts = collections.Counter()
        self.lock = threading.Lock()

    def count(self, name, n=1):
        with self.lock:
            self.counts[name] += n

    def settle(self, key, value):
        """An acknowledged answer: the key holds `value` now."""
        self.possible[key] = {value}

    def maybe(self, key, value):
        """An answer that did not say: the key holds `value`, or what it held."""
        self.possible[key] = self.possible.get(key, {ABSENT}) | {value}


class Client(threading.Thread):
    """One client: its own keys, one request at a time, each answer checked."""

    def __init__(self, cluster, model, keys, seed, stop):
        super().__init__(daemon=True)
        self.cluster, self.model, self.keys, self.stop = cluster, model, keys, stop
        self.rnd = random.Random(seed)
        self.http = requests.Session()
        for k in keys:
            model.possible[k] = {ABSENT}

    def run(self):
        n = 0
        while not self.stop.is_set():
            key = self.rnd.choice(self.keys)
            op = self.rnd.choice(["put", "put", "get", "get", "delete", "unlink"])
            try:
                getattr(self, op)(key, n)
            except requests.RequestException:
                self.model.count("no answer")
            n += 1

    def url(self, key):
        return self.cluster.url(key)

    def put(self, key, n):
        value = f"{key} #{n} ".encode() * self.rnd.randint(1, 400)
        try:
            r = self.http.put(self.url(key), data=value, timeout=TIMEOUT)
        except requests.RequestException:
            self.model.maybe(key, value)
            raise
        if r.status_code == 201:
            self.model.settle(key, value)
            self.model.count("acknowledged")
        elif r.status_code >= 500:
            self.model.maybe(key, value)     # e.g. killed after its commit: it may be there
            self.model.count("refused (5xx)")
        else:
            self.model.count("refused (4xx)")   # 403 exists, 409 busy: nothing changed

    def delete(self, key, n, method="DELETE"):
        try:
            r = self.http.request(method, self.url(key), timeout=TIMEOUT)
        except requests.RequestException:
            self.model.maybe(key, ABSENT)
            raise
        if r.status_code == 204:
            self.model.settle(key, ABSENT)   # UNLINK: invisible, a PUT may write it anew
            self.model.count("acknowledged")
        elif r.status_code == 404:
            if ABSENT not in self.model.possible[key]:
                self.model.count("lost")
                say(f"{method} {key}: 404, but it held {self.model.possible[key]}")
            self.model.settle(key, ABSENT)
        elif r.status_code >= 500:
            self.model.maybe(key, ABSENT)    # invisible at once: the record says deleting
            self.model.count("refused (5xx)")
        else:
            self.model.count("refused (4xx)")

    def unlink(self, key, n):
        self.delete(key, n, method="UNLINK")

    def get(self, key, n):
        served = read(self.http, self.url(key))
        if served == "unavailable":
            return self.model.count("unavailable")
        check(self.model, key, served)


def read(http, url):
    """What a GET serves: the bytes behind its redirect, ABSENT for a 404, or
    'unavailable' (a 503, a volume that died after the redirect was given)."""
    r = http.get(url, timeout=TIMEOUT, allow_redirects=False)
    if r.status_code == 404:
        return ABSENT
    if r.status_code != 302:
        return "unavailable"
    try:
        v = http.get(r.headers["Location"], timeout=TIMEOUT)
    except requests.RequestException:
        return "unavailable"
    return v.content if v.status_code == 200 else "unavailable"


def check(model, key, served):
    possible = model.possible[key]
    if served in possible:
        model.count("reads checked")
    elif served is ABSENT:
        model.count("lost")
        say(f"GET {key}: 404, but it held {sorted(map(repr, possible))[:2]}")
    else:
        model.count("wrong")
        say(f"GET {key}: served {served[:40]!r}..., which it never held")


class Faults(threading.Thread):
    """One fault every `every` seconds, each undone before the next."""

    def __init__(self, cluster, every, seed, stop, kinds=FAULTS):
        super().__init__(daemon=True)
        self.cluster, self.every, self.stop, self.kinds = cluster, every, stop, list(kinds)
        self.rnd = random.Random(seed)
        self.injected = collections.Counter()

    def run(self):
        while not self.stop.wait(self.every):
            fault = self.rnd.choice(self.kinds)
            try:
                getattr(self, fault.replace(" ", "_"))()
                self.injected[fault] += 1
            except Exception as e:   # a server that would not come back is the run's failure
                say(f"{fault}: {e!r}")
                self.injected[f"{fault} (failed to recover)"] += 1

    def master_killed(self):
        self.cluster.master.kill()
        self.cluster.master.start()

    def worker_killed(self):
        workers = self.cluster.master.pids()[1:]
        if workers:
            os.kill(self.rnd.choice(workers), signal.SIGKILL)

    def volume_killed(self):
        v = self.rnd.choice(self.cluster.volumes)
        v.kill()
        time.sleep(self.rnd.uniform(0.5, 2))
        v.start()

    def volume_frozen(self):
        v = self.rnd.choice(self.cluster.volumes)
        v.pause()
        time.sleep(self.rnd.uniform(0.5, 3))
        v.resume()

    def volume_worker_stalled(self):
        """One nginx worker of a volume stopped for longer than OP_TIMEOUT
        (a disk that blocks it does the same), the others serving: the
        requests in its sockets reach nginx late, after their senders gave up."""
        import psutil
        v = self.rnd.choice(self.cluster.volumes)
        workers = []
        for pid in v.pids():
            try:
                if "worker process" in " ".join(psutil.Process(pid).cmdline()):
                    workers.append(pid)
            except psutil.NoSuchProcess:
                pass
        if len(workers) < 2:   # one worker (one core): stopping it freezes the whole volume
            raise RuntimeError(f"volume :{v.port} runs {len(workers)} nginx worker(s); this fault needs 2")
        pid = self.rnd.choice(workers)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(self.rnd.uniform(OP_TIMEOUT + 1, OP_TIMEOUT + 5))
        finally:
            os.kill(pid, signal.SIGCONT)


def tool(cluster, name, *args):
    """Run rebuild.py or rebalance.py with the cluster's settings."""
    env = dict(os.environ, MKV_VOLUMES=",".join(cluster.volume_names()), MKV_DB=cluster.db(),
               MKV_REPLICAS=str(cluster.settings.get("replicas", REPLICAS)),
               MKV_SUBVOLUMES=str(cluster.settings.get("subvolumes", 10)))
    return subprocess.run([sys.executable, os.path.join(HERE, name), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def repair(cluster):
    """Every server up, then rebalance until it has nothing left (locks of
    killed workers are taken over; those of live ones expire in a lease)."""
    for v in cluster.volumes:
        if v.proc.poll() is not None:
            v.start()
        else:
            v.resume()
    if cluster.master.proc.poll() is not None:
        cluster.master.start()
    deadline = time.monotonic() + 3 * LOCK_LEASE
    while True:
        p = tool(cluster, "rebalance.py")
        if p.returncode == 0 or time.monotonic() > deadline:
            return p
        time.sleep(2)


def verify(cluster, model):
    """Every key read back at the end: lost and wrong counted."""
    with requests.Session() as http:
        for key in sorted(model.possible):
            served = read(http, cluster.url(key))
            if served == "unavailable":
                model.count("lost")
                say(f"GET {key} at the end: unavailable")
            else:
                check(model, key, served)
                model.count("keys verified")


def thrash(cluster, seconds, every=3.0, clients=8, keys=40, seed=None, kinds=FAULTS, at_least=0):
    """The whole run on a cluster of 3 volumes and replicas 3, with faults of
    `kinds`, for `seconds` and until `at_least` faults were injected (three
    times `seconds` at the most); returns the model's counts, the faults
    injected, and the repair's and check's output."""
    seed = random.randrange(1 << 30) if seed is None else seed
    say(f"seed {seed}: {clients} clients x {keys} keys, a fault every {every} s for {seconds} s")
    model, stop = Keys(), threading.Event()
    workers = [Client(cluster, model, [f"/thrash/{c}/{k}" for k in range(keys)], seed + c, stop)
               for c in range(clients)]
    faults = Faults(cluster, every, seed, stop, kinds)
    for t in workers + [faults]:
        t.start()
    time.sleep(seconds)
    deadline = time.monotonic() + 2 * seconds
    while sum(faults.injected.values()) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in workers + [faults]:
        t.join(TIMEOUT * 3)
    rebalanced = repair(cluster)
    verify(cluster, model)
    index = Index(cluster.db())
    model.count("locks held at the end", sum(1 for rec in index.scan() if rec.locked()))
    model.count("notes left at the end", len(index.all_notes()))
    index.close()
    checked = tool(cluster, "rebuild.py", "--check")
    return model.counts, faults.injected, rebalanced, checked


def fuzz(examples):
    """The fuzz tests with `examples` each; returns (inputs sent, passed?)."""
    with tempfile.NamedTemporaryFile("r", suffix=".count") as count:
        env = dict(os.environ, MKV_FUZZ_EXAMPLES=str(examples), MKV_FUZZ_COUNT_FILE=count.name)
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            os.path.join(HERE, "tests", "test_fuzz.py")], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=3600)
        text = count.read().strip()
    sys.stderr.write(p.stdout[-2000:])
    return int(text or 0), p.returncode == 0


def table(counts, injected, fuzzed=None):
    rows = ["| fault | injected |", "| --- | --- |"]
    rows += [f"| {f} | {injected.get(f, 0)} |" for f in FAULTS]
    rows += [f"| {f} | {n} |" for f, n in injected.items() if f not in FAULTS]
    rows += ["", "| operations | count |", "| --- | --- |"]
    for name in ["acknowledged", "reads checked", "keys verified", "refused (4xx)", "refused (5xx)",
                 "no answer", "unavailable", "lost", "wrong", "locks held at the end", "notes left at the end"]:
        rows.append(f"| {name} | {counts.get(name, 0)} |")
    if fuzzed is not None:
        rows.append(f"| fuzzed inputs | {fuzzed} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="faults.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the load and faults run (60)")
    parser.add_argument("--every", type=float, default=3, help="seconds between faults (3)")
    parser.add_argument("--clients", type=int, default=8, help="clients at once, each with its own keys (8)")
    parser.add_argument("--keys", type=int, default=40, help="keys per client (40)")
    parser.add_argument("--seed", type=int, help="the random seed (printed, to replay a run)")
    parser.add_argument("--fuzz", type=int, metavar="N", help="also run the fuzz tests with N examples each")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="mkv-faults-")
    cluster = conftest.Cluster(folder, n_volumes=3, replicas=REPLICAS, voltimeout=0.5)
    try:
        counts, injected, rebalanced, checked = thrash(cluster, args.seconds, args.every, args.clients,
                                                       args.keys, args.seed)
    finally:
        cluster.stop()
    fuzzed = ok_fuzz = None
    if args.fuzz:
        fuzzed, ok_fuzz = fuzz(args.fuzz)
    print(table(counts, injected, fuzzed))
    print()
    print("rebalance at the end: exit", rebalanced.returncode, "-", rebalanced.stdout.strip().splitlines()[-1:])
    print("rebuild --check at the end:", (checked.stdout.strip().splitlines() or ["?"])[-1])
    bad = counts.get("lost", 0) + counts.get("wrong", 0)
    return 1 if bad or rebalanced.returncode or ok_fuzz is False else 0


if __name__ == "__main__":
    sys.exit(main())
