"""Real servers for the tests: nginx volumes started through `python volume`,
and the master under gunicorn with gevent workers, on free loopback ports.

Every wait is bounded, every request has a timeout, a server is stopped
terminate -> wait -> kill (a cluster's teardown kills at once: nothing is
checked after the test), and a failing test shows the servers' logs.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TIMEOUT = 10          # seconds: every HTTP request the tests make
START_TIMEOUT = 20    # seconds: a server must answer within this after starting

_running = []         # every Server started, for the logs of a failing test


def free_port():
    return free_ports(1)[0]


def free_ports(n):
    """n different free ports (each socket held until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def enough_open_files(n):
    """This process may open n more sockets (the soft limit raised towards the hard one)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        pytest.skip(f"ulimit -n allows fewer than {want} open files here")


def wait_until(predicate, timeout, what, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """One server process, its log in a file, stopped terminate -> wait -> kill."""

    def __init__(self, name, argv, env, log_path, port, stop_signal=signal.SIGTERM, children=0):
        """children: processes it runs when started (gunicorn's workers); a
        test that compares pids() before and after must see them all."""
        self.name, self.argv, self.env, self.log_path, self.port = name, argv, env, log_path, port
        self.stop_signal = stop_signal
        self.children = children
        self.proc = None

    def start(self):
        return self.spawn().wait_answering()

    def spawn(self):
        """Start the process; wait_answering() waits for its first answer
        (several servers spawned first start side by side)."""
        self.log = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _running.append(self)
        return self

    def wait_answering(self):
        try:
            wait_until(self._answers, START_TIMEOUT, f"{self.name} on port {self.port}", every=0.01)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            requests.get(f"http://127.0.0.1:{self.port}/", timeout=1, allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout):   # a loaded machine: ask again
            return False
        # one worker answers while the next may still be forking
        return len(self.pids()) > self.children

    def stop(self, sig=None):
        if self.proc is None or self.proc.poll() is not None:
            return
        sig = sig or self.stop_signal
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()

    def kill(self):
        """SIGKILL the whole process group at once: no cleanup, as in a crash."""
        self.stop(signal.SIGKILL)

    def pause(self):
        """SIGSTOP: the kernel still accepts connections, nobody answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.proc.pid, signal.SIGCONT)

    def restart(self):
        self.stop()
        return self.start()

    def pids(self):
        """The server process and its children (gunicorn's workers, nginx's)."""
        import psutil
        parent = psutil.Process(self.proc.pid)
        return [parent.pid] + [c.pid for c in parent.children(recursive=True)]

    def tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""


def plant_file(folder, path, value, made=None, owner=None):
    """Write `value` at `path` ('/'-separated) under a volume's folder, making
    the folders on the way, all owned like the volume's folder: nginx's
    workers (nobody, when started as root) add and remove files there later.
    `made`: a set of the folders known to exist, kept up to date (many files)."""
    owner = owner or os.stat(folder)
    *dirs, name = [p for p in path.split("/") if p]
    full = folder
    for d in dirs:
        full = os.path.join(full, d)
        if made is not None and full in made:
            continue
        if not os.path.isdir(full):
            os.mkdir(full)
            os.chown(full, owner.st_uid, owner.st_gid)
        if made is not None:
            made.add(full)
    full = os.path.join(full, name)
    with open(full, "wb") as f:
        f.write(value)
    os.chown(full, owner.st_uid, owner.st_gid)
    return full


def start_volume(folder, port=None, **env_vars):
    return volume_server(folder, port, **env_vars).start()


def volume_server(folder, port=None, **env_vars):
    """A volume's Server, not started yet."""
    port = port or free_port()
    env = dict(os.environ, PORT=str(port), **env_vars)
    os.makedirs(folder, exist_ok=True)
    return Server(f"volume :{port}", [sys.executable, "volume", folder], env,
                  os.path.join(os.path.dirname(folder), f"volume-{port}.log"), port)


def start_master(workdir, volumes, port=None, workers=2, worker_class=None, **settings):
    """gunicorn mkv:app; settings are MKV_* names without the prefix, lowercased."""
    return master_server(workdir, volumes, port, workers, worker_class, **settings).start()


def master_server(workdir, volumes, port=None, workers=2, worker_class=None, **settings):
    """The master's Server, not started yet: gunicorn.conf.py's worker
    (worker.py's), or `-k worker_class` ("gevent": gunicorn's own)."""
    port = port or free_port()
    env = dict(os.environ, MKV_VOLUMES=",".join(volumes),
               MKV_DB=os.path.join(workdir, "index.sqlite3"))
    env.update({f"MKV_{k.upper()}": str(v) for k, v in settings.items()})
    argv = [sys.executable, "-m", "gunicorn", *(["-k", worker_class] if worker_class else []),
            "-w", str(workers), "-b", f"127.0.0.1:{port}", "mkv:app"]
    # SIGINT: gunicorn's quick shutdown (SIGTERM would wait for idle keep-alive clients)
    return Server(f"master :{port}", argv, env, os.path.join(workdir, f"master-{port}.log"), port,
                  stop_signal=signal.SIGINT, children=workers)


class Cluster:
    """n volumes and a master over them; url() for keys."""

    def __init__(self, workdir, n_volumes=3, workers=2, volume_dirs=None, **settings):
        """volume_dirs: the volumes' folders (default workdir/volumeN), e.g.
        mount points a test made; db= (MKV_DB) puts the index elsewhere than
        workdir/index.sqlite3."""
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)   # the master's log, when no volume folder is in it
        self.settings = settings
        self.workers = workers
        self.volume_dirs = list(volume_dirs or [os.path.join(workdir, f"volume{i}") for i in range(n_volumes)])
        self.volumes, self.master = [], None
        self.aliases = {}     # port of a proxy in front of a volume -> the volume's port
        try:
            # a volume refuses writes without the master's MKV_SECRET
            secret = {"MKV_SECRET": str(settings["secret"])} if settings.get("secret") else {}
            # every server starts at once: the master asks its volumes nothing
            # before its first request (mkv.Master opens its Store on first
            # use), and the first is ours, once every volume answers
            ports = free_ports(len(self.volume_dirs) + 1)
            for d, port in zip(self.volume_dirs, ports):
                self.volumes.append(volume_server(d, port, **secret).spawn())
            self.master = master_server(workdir, self.volume_names(), ports[-1], workers, **settings).spawn()
            for server in self.volumes + [self.master]:
                server.wait_answering()
        except BaseException:
            self.stop()
            raise

    def volume_names(self):
        return [f"127.0.0.1:{v.port}" for v in self.volumes]

    def url(self, key):
        return f"http://127.0.0.1:{self.master.port}{key}"

    def restart_master(self, volumes=None, **settings):
        """Restart the master (same port and index); `volumes`: the volume names
        it is given now (default: all), while every volume keeps running."""
        self.master.stop()
        self.settings = settings or self.settings
        self.master = start_master(self.workdir, volumes or self.volume_names(), port=self.master.port,
                                   workers=self.workers, **self.settings)

    def db(self):
        return str(self.settings.get("db") or os.path.join(self.workdir, "index.sqlite3"))

    def folder_of(self, volume):
        """The folder of a volume named 'host:port[/svXX]' (or a proxy's port, see aliases)."""
        port = int(volume.split("/", 1)[0].rsplit(":", 1)[1])
        port = self.aliases.get(port, port)
        return next(d for v, d in zip(self.volumes, self.volume_dirs) if v.port == port)

    def file_of(self, volume, key: bytes):
        """Where a key's file lies on the disk of a volume 'host:port[/svXX]'."""
        from mkvlib.placement import key2path
        sub = volume.partition("/")[2]
        return os.path.join(self.folder_of(volume), sub, key2path(key).lstrip("/"))

    def plant(self, volume, key: bytes, value: bytes):
        """Write a key's file straight onto a volume's disk, as a crash, an old
        disk or the original Go mkv leaves one."""
        from mkvlib.placement import key2path
        return plant_file(self.folder_of(volume), volume.partition("/")[2] + key2path(key), value)

    def stop(self):
        if self.master:
            self.master.stop()
        for v in self.volumes:
            v.stop()

    def kill(self):
        """SIGKILL every server, and return once all their processes have
        exited (files closed: a mount under them can be undone): a test's
        teardown, where nothing is left to check (a graceful stop of the
        master costs half a second)."""
        import psutil
        servers = [s for s in [self.master] + self.volumes if s and s.proc and s.proc.poll() is None]
        members = []
        for server in servers:
            try:
                members += [psutil.Process(pid) for pid in server.pids()]
            except psutil.NoSuchProcess:   # a worker that exited meanwhile
                pass
            server.kill()

        def exited(process):
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        wait_until(lambda: all(exited(p) for p in members), 10, "the cluster's processes to exit", every=0.005)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The shared cluster: 4 volumes, 3 replicas, 10 subvolumes, 2 gevent workers.
    Tests that stop servers make their own cluster instead."""
    c = Cluster(str(tmp_path_factory.mktemp("cluster")), n_volumes=4, replicas=3)
    yield c
    c.kill()


@pytest.fixture
def private_cluster(tmp_path):
    """A cluster of this test's own, for tests that kill or restart servers."""
    clusters = []

    def make(**kw):
        c = Cluster(str(tmp_path / f"c{len(clusters)}"), **kw)
        clusters.append(c)
        return c
    yield make
    for c in clusters:
        c.kill()


class Http(requests.Session):
    """Every call has a timeout and shows the master's answer itself: redirects
    are followed only when asked with follow=True."""

    def request(self, method, url, follow=False, **kw):
        kw.setdefault("timeout", TIMEOUT)
        kw["allow_redirects"] = follow
        return super().request(method, url, **kw)


@pytest.fixture
def http():
    with Http() as s:
        yield s


_counter = [0]


@pytest.fixture
def key(request):
    """A key no other test uses."""
    _counter[0] += 1
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"/{name}-{os.getpid()}-{_counter[0]}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.start_time = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        for server in _running:
            if server.proc is not None and (server.proc.poll() is None or server.started > item.start_time):
                report.sections.append((f"log of {server.name}", server.tail()))
    return report
