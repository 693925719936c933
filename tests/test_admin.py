"""The admin listener (admin.py) of a real master: health checks, /metrics
after known traffic, a killed volume, a tool's progress; the key space of
the master's own port stays the users'."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests

from mkvlib.health import PROBE_FRESH
from mkvlib.runfolder import run_folder
from conftest import ROOT, Http, free_port, wait_until


@pytest.fixture(scope="module")
def admin_cluster(tmp_path_factory):
    """3 volumes, 3 replicas, the admin listener on a free port."""
    from conftest import Cluster
    c = Cluster(str(tmp_path_factory.mktemp("admin")), n_volumes=3, replicas=3, subvolumes=2,
                admin_port=free_port(), voltimeout=0.5)
    c.admin = f"http://127.0.0.1:{c.settings['admin_port']}"
    yield c
    c.kill()


def scrape(c):
    """{(name, frozen labels): value} of one /metrics answer."""
    from prometheus_client.parser import text_string_to_metric_families
    r = requests.get(c.admin + "/metrics", timeout=10)
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_live_and_ready_answer_on_the_admin_port_only(admin_cluster):
    c = admin_cluster
    assert requests.get(c.admin + "/health/live", timeout=10).text == "live\n"
    wait_until(lambda: requests.get(c.admin + "/health/ready", timeout=10).status_code == 200, 10, "ready")
    assert requests.get(c.admin + "/health/ready", timeout=10).text == "ready\n"
    # on the master's port these are keys like any other
    assert Http().get(c.url("/health/ready")).status_code == 404
    assert Http().get(c.url("/metrics")).status_code == 404


def test_a_scrape_after_known_traffic_shows_exactly_that_traffic(admin_cluster):
    c, http = admin_cluster, Http()
    wait_until(lambda: scrape(c) is not None, 5, "a scrape")
    time.sleep(1.2)      # the workers' last counts handed over (mkvlib.metrics.FLUSH_EVERY)
    before = scrape(c)
    for i in range(5):
        assert http.put(c.url(f"/traffic{i}"), data=b"x" * 100).status_code == 201
    for i in range(3):
        assert http.get(c.url(f"/traffic{i}")).status_code == 302
    assert http.get(c.url("/no-such-traffic")).status_code == 404
    assert http.delete(c.url("/traffic0")).status_code == 204
    assert http.put(c.url("/traffic-empty"), data=b"").status_code == 411
    # a chunked body (no Content-Length) counts the bytes read
    assert http.put(c.url("/traffic-chunked"), data=iter([b"y" * 200, b"z" * 100])).status_code == 201
    # a request gunicorn cannot parse never reaches the app: counted all the same
    with socket.create_connection(("127.0.0.1", c.master.port), timeout=10) as s:
        s.sendall(b"get /traffic1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")

    expected = {("mkv_requests_total", "PUT", "put", "201"): 6, ("mkv_requests_total", "GET", "redirect", "302"): 3,
                ("mkv_requests_total", "GET", "404", "404"): 1, ("mkv_requests_total", "DELETE", "delete", "204"): 1,
                ("mkv_requests_total", "PUT", "put", "411"): 1, ("mkv_requests_total", "-", "server", "400"): 1}

    def deltas(after):
        got = {(n, m, k, s): value(after, n, method=m, kind=k, status=s) - value(before, n, method=m, kind=k, status=s)
               for n, m, k, s in expected}
        return got, value(after, "mkv_bytes_received_total") - value(before, "mkv_bytes_received_total")
    # each worker hands its counts over once a second: wait for both
    wait_until(lambda: deltas(scrape(c)) == (expected, 800), 5, "the traffic in a scrape")
    after = scrape(c)

    def d(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert d("mkv_request_duration_seconds_count", kind="put") == 7
    assert d("mkv_request_duration_seconds_count", kind="redirect") == 3
    assert value(after, "mkv_keys") == value(before, "mkv_keys") + 5
    assert value(after, "mkv_value_bytes") == value(before, "mkv_value_bytes") + 700
    assert all(value(after, "mkv_volume_keys", volume=v) == value(after, "mkv_keys") for v in c.volume_names())
    assert value(after, "mkv_locks_held") == 0 and value(after, "mkv_index_bytes") > 0
    assert all(value(after, "mkv_volume_up", volume=v) == 1 for v in c.volume_names())


def test_the_s3_gateway_counts_its_operations_into_the_masters_metrics(admin_cluster):
    """gunicorn s3:app on the master's index joins its run folder: each S3
    operation is a kind of its own (s3:NAME), and a failure is one log line
    with S3's code and message, not its XML."""
    from s3util import gateway_server
    c, http = admin_cluster, Http()
    gateway = gateway_server(c).start()
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        assert http.put(url + "/counted").status_code == 200
        for i in range(2):
            assert http.put(f"{url}/counted/o{i}", data=b"x").status_code == 200
        assert http.get(url + "/counted/missing").status_code == 404
        assert http.get(url + "/nosuchbucket/o").status_code == 404
        assert http.put(url + "/Not_A_Bucket").status_code == 400
        wanted = {("PUT", "s3:CreateBucket", "200"): 1, ("PUT", "s3:PutObject", "200"): 2,
                  ("GET", "s3:GetObject", "404"): 2, ("PUT", "s3:CreateBucket", "400"): 1}

        def counted():
            after = scrape(c)
            return {k: value(after, "mkv_requests_total", method=k[0], kind=k[1], status=k[2]) for k in wanted}
        wait_until(lambda: counted() == wanted, 10, f"the gateway's requests in a scrape ({counted()})")
        assert "InvalidBucketName: The specified bucket is not valid." in gateway.tail()
        assert "<Error>" not in gateway.tail()
    finally:
        gateway.stop()
    assert Http().get(c.url("/counted/o0")).status_code == 302    # one store: the native API reads it


def test_a_rebalance_shows_its_progress_in_a_scrape_while_it_runs(admin_cluster):
    c, http = admin_cluster, Http()
    for i in range(300):
        assert http.put(c.url(f"/progress{i}"), data=b"v").status_code == 201
    env = dict(os.environ, MKV_VOLUMES=",".join(c.volume_names()), MKV_DB=c.db(), MKV_REPLICAS="3",
               MKV_SUBVOLUMES="2")
    published = os.path.join(run_folder(c.db()), "tool-rebalance.json")
    if os.path.exists(published):
        os.unlink(published)
    p = subprocess.Popen([sys.executable, "rebalance.py", "--workers", "1"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # a run takes a fraction of a second: it is frozen while the scrapes look,
    # once it has said it runs (the file it publishes, written first thing)
    wait_until(lambda: os.path.exists(published) or p.poll() is not None, 30, "rebalance to publish", every=0.002)
    seen = []
    os.kill(p.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            s = scrape(c)
            if value(s, "mkv_tool_running", tool="rebalance") == 1:
                seen.append(value(s, "mkv_tool_keys_done", tool="rebalance"))
    finally:
        os.kill(p.pid, signal.SIGCONT)
    p.wait(timeout=120)
    assert p.returncode == 0, p.stderr.read()
    assert seen, "no scrape saw rebalance running"
    done = scrape(c)
    assert value(done, "mkv_tool_running", tool="rebalance") == 0
    assert value(done, "mkv_tool_last_exit_status", tool="rebalance") == 0
    assert value(done, "mkv_tool_keys_done", tool="rebalance") >= 300


def test_a_killed_volume_is_down_and_not_ready_within_seconds_and_back_after_its_return(admin_cluster):
    c = admin_cluster
    dead = c.volume_names()[0]
    c.volumes[0].kill()
    try:
        wait_until(lambda: value(scrape(c), "mkv_volume_up", volume=dead) == 0, PROBE_FRESH + 3, "up 0")
        r = requests.get(c.admin + "/health/ready", timeout=10)
        assert r.status_code == 503
        assert r.text == f"not ready: 2 of 3 volumes up, MKV_REPLICAS=3 needs 3; down: {dead}\n"
    finally:
        c.volumes[0].start()
    wait_until(lambda: value(scrape(c), "mkv_volume_up", volume=dead) == 1, PROBE_FRESH + 3, "up 1")
    assert requests.get(c.admin + "/health/ready", timeout=10).status_code == 200


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args):
    """Debian's chromium, headless, with a fresh profile; its stdout."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is missing: ./install.sh installs it")
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")
    p = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def volume_states(dom):
    """{volume: up|down} as the page shows them."""
    return dict(re.findall(r'data-volume="([^"]+)" data-state="(up|down)"', dom))


def test_the_status_page_shows_every_volume_and_marks_a_killed_one_down_within_seconds(admin_cluster, tmp_path):
    c = admin_cluster
    dom = chromium(tmp_path, "--dump-dom", c.admin + "/")
    assert "<title>mkv status</title>" in dom
    assert volume_states(dom) == {v: "up" for v in c.volume_names()}
    dead = c.volume_names()[2]
    c.volumes[2].kill()
    try:
        wait_until(lambda: volume_states(chromium(tmp_path, "--dump-dom", c.admin + "/")).get(dead) == "down",
                   PROBE_FRESH + 8, "the page to show the volume down")
        shot = tmp_path / "status-page.png"
        chromium(tmp_path, f"--screenshot={shot}", "--window-size=1100,900", "--hide-scrollbars", c.admin + "/")
        assert shot.stat().st_size > 1000
    finally:
        c.volumes[2].start()
    wait_until(lambda: value(scrape(c), "mkv_volume_up", volume=dead) == 1, PROBE_FRESH + 3, "up again")


def test_a_taken_admin_port_stops_the_start_with_one_line(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        env = dict(os.environ, MKV_VOLUMES=f"127.0.0.1:{free_port()}", MKV_DB=str(tmp_path / "index.sqlite3"),
                   MKV_REPLICAS="1", MKV_ADMIN_PORT=str(taken.getsockname()[1]))
        p = subprocess.run([sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b",
                            f"127.0.0.1:{free_port()}", "mkv:app"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    finally:
        taken.close()
    assert p.returncode == 1
    lines = [line for line in p.stderr.splitlines() if line.startswith("mkv:")]
    assert lines == [f"mkv: MKV_ADMIN_PORT {env['MKV_ADMIN_PORT']} "
                     f"on 127.0.0.1: Address already in use"], p.stderr


FORK_DURING_A_READINESS_CHECK = r"""
import os, sqlite3, sys, threading, time
import admin
db = sys.argv[1]
admin.hold_forks_while_the_index_is_open()          # what listen() does in the arbiter
opened, done = threading.Event(), threading.Event()

def readiness_check():                              # the listener's thread, its write held a while
    with admin.index_connection(db, isolation_level=None) as c:
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('ready_check', '1')")
        opened.set()
        time.sleep(0.5)
        c.execute("COMMIT")
threading.Thread(target=readiness_check).start()
opened.wait()
pid = os.fork()                                     # the arbiter forks a worker meanwhile
if pid == 0:
    c = sqlite3.connect(db, isolation_level=None, timeout=3)
    try:
        c.execute("BEGIN IMMEDIATE")
        c.execute("COMMIT")
        os._exit(0)
    except sqlite3.Error as e:
        print("the worker cannot write the index:", e, flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_worker_forked_during_a_readiness_check_can_write_the_index(tmp_path):
    # SQLite's state of an open file is per process: a fork while the listener
    # held the index copied it, and the worker waited out its busy timeout
    from mkvlib.index import Index
    db = str(tmp_path / "index.sqlite3")
    Index(db).close()
    p = subprocess.run([sys.executable, "-c", FORK_DURING_A_READINESS_CHECK, db], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr


def second_master(c, *flags):
    """gunicorn mkv:app on c's index and volumes, another port: (exit status, stderr)."""
    env = dict(os.environ, MKV_VOLUMES=",".join(c.volume_names()), MKV_DB=c.db(), MKV_REPLICAS="3",
               MKV_SUBVOLUMES="2", MKV_ADMIN_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{free_port()}", *flags,
                        "mkv:app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr


def still_sees_its_volumes(c):
    """The running master's page and readiness still see every volume up."""
    time.sleep(PROBE_FRESH + 0.5)      # what a lost view of the volumes would show by now
    assert requests.get(c.admin + "/health/ready", timeout=10).status_code == 200
    assert all(value(scrape(c), "mkv_volume_up", volume=v) == 1 for v in c.volume_names())


def test_a_second_master_on_the_same_index_is_refused_and_the_first_keeps_its_view(admin_cluster):
    c = admin_cluster
    code, stderr = second_master(c)
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.startswith("mkv:")]
    assert len(lines) == 1 and f"a master (pid {c.master.proc.pid}) already runs on MKV_DB" in lines[0], stderr
    still_sees_its_volumes(c)


def test_gunicorns_usr2_upgrade_is_refused_with_one_line_and_the_master_keeps_its_view(private_cluster):
    from conftest import master_server
    c = private_cluster(n_volumes=3, replicas=3, subvolumes=2, admin_port=free_port())
    c.admin = f"http://127.0.0.1:{c.settings['admin_port']}"
    c.master.stop()
    # USR2 re-executes the arbiter's argv: `python -m gunicorn` would come back with gunicorn's
    # own folder first on sys.path (its http package hides the standard one), so the script
    master = master_server(c.workdir, c.volume_names(), c.master.port, workers=1, **c.settings)
    master.argv = [os.path.join(os.path.dirname(sys.executable), "gunicorn")] + master.argv[3:]
    c.master = master.start()
    still_sees_its_volumes(c)
    os.kill(c.master.proc.pid, signal.SIGUSR2)

    def refused():
        with open(c.master.log_path, "rb") as f:
            return b"already runs on MKV_DB" in f.read()
    wait_until(refused, 30, "the new arbiter to refuse the start")
    still_sees_its_volumes(c)
    assert Http().put(c.url("/after-usr2"), data=b"v").status_code == 201
