"""docs/operations.md's procedures, followed as written (the commands are
read from the page itself)."""
import http.client
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse

import requests

from conftest import ROOT, Http, free_port, volume_server, wait_until
from test_admin import volume_states
from test_tools import Reader, assert_converged, data_files, make_keys, put_all, quoted, run_tool, summary

DOC = os.path.join(ROOT, "docs", "operations.md")


def commands_under(heading):
    """The first ```sh block below `heading` in docs/operations.md."""
    with open(DOC) as f:
        text = f.read()
    section = text[text.index(heading):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_online_backup_copies_every_key_while_puts_go_on(cluster, tmp_path):
    http = Http()
    keys = [f"/backup-{i}" for i in range(50)]
    for k in keys:
        assert http.put(cluster.url(k), data=b"v").status_code == 201
    stop = threading.Event()

    def more_puts():
        i = 0
        while not stop.is_set():
            Http().put(cluster.url(f"/backup-during-{i}"), data=b"v")
            i += 1
    writer = threading.Thread(target=more_puts)
    writer.start()
    try:
        script = commands_under("### Backing up the index while it serves").replace(
            "/backup/index.sqlite3", str(tmp_path / "index.sqlite3"))
        p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=dict(os.environ, MKV_DB=cluster.db()),
                           capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        writer.join()
    assert p.returncode == 0, p.stderr
    backup = sqlite3.connect(tmp_path / "index.sqlite3")
    assert backup.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    found = {bytes(k) for (k,) in backup.execute("SELECT key FROM keys WHERE state = 'live'")}
    assert {k.encode() for k in keys} <= found


# ---------------------------------------------------------------- the volume procedures, step by step

def ops_cluster(private_cluster, n_volumes):
    """A cluster with the admin listener, 2 replicas, 2 subvolumes, and keys."""
    c = private_cluster(n_volumes=n_volumes, replicas=2, subvolumes=2, admin_port=free_port())
    c.admin = f"http://127.0.0.1:{c.settings['admin_port']}"
    data = make_keys(60, "ops")
    put_all(c, data)
    return c, data


def page_states(c):
    """{volume: up|down} as the status page (plain HTML) shows them."""
    return volume_states(requests.get(c.admin + "/", timeout=10).text)


def page_says(c, volume, text):
    """The status page's row of `volume` holds `text`."""
    html = requests.get(c.admin + "/", timeout=10).text
    row = re.search(rf'<tr data-volume="{re.escape(volume)}".*?</tr>', html, re.S)
    return row is not None and text in row.group(0)


def rebalance(c, volumes, *args):
    p = run_tool("rebalance.py", volumes, c.db(), *args, replicas=2, subvolumes=2)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_adding_a_volume(private_cluster, tmp_path):
    c, data = ops_cluster(private_cluster, 3)
    # 1. start it: PORT=... python volume DIR (a new, empty folder)
    new = volume_server(str(tmp_path / "volume4")).start()
    c.volumes.append(new)
    c.volume_dirs.append(str(tmp_path / "volume4"))
    four = c.volume_names()
    # 2. add it to MKV_VOLUMES and restart the master: the page shows it up within 2 s
    c.restart_master(volumes=four)
    wait_until(lambda: page_states(c).get(four[-1]) == "up", 2 + 1, "the new volume up on the page")
    # 3. rebalance.py: reads go on from the old copies meanwhile
    with Reader(c, data) as reader:
        p = rebalance(c, four)
    assert reader.failures == [] and reader.reads > 0
    assert summary(p.stdout, "rebalance")["moved"] > 0
    assert data_files(c.volume_dirs[-1]) != []
    assert_converged(c, data, four, replicas=2, subvolumes=2)


def test_removing_a_volume_that_still_runs(private_cluster):
    c, data = ops_cluster(private_cluster, 4)
    three, leaving = c.volume_names()[:3], c.volume_dirs[3]
    assert data_files(leaving) != []
    # 1. remove it from MKV_VOLUMES and restart the master; keep the volume running
    c.restart_master(volumes=three)
    # 2. rebalance.py copies its keys to their new placement, then empties it
    with Reader(c, data) as reader:
        rebalance(c, three)
    assert reader.failures == [] and reader.reads > 0
    # 3. once it exits 0, stop the volume: its folder holds no value mkv needs
    c.volumes[3].stop()
    assert_converged(c, data, three, removed=[leaving], replicas=2, subvolumes=2)


def test_replacing_a_dead_disk_with_a_new_empty_one_at_the_same_address(private_cluster, tmp_path):
    c, data = ops_cluster(private_cluster, 3)
    volumes, dead = c.volume_names(), c.volume_names()[0]
    c.volumes[0].kill()
    # the new disk: an empty folder, the same port
    c.volume_dirs[0] = str(tmp_path / "new-disk")
    c.volumes[0] = volume_server(c.volume_dirs[0], port=c.volumes[0].port).start()
    # it answers with a new identity: the page says so, and no reads go to it
    wait_until(lambda: page_says(c, dead, "replaced disk"), 2 + 3, "the page to show a replaced disk")
    with Reader(c, data) as reader:
        rebalance(c, volumes)
    assert reader.failures == [] and reader.reads > 0
    wait_until(lambda: page_states(c).get(dead) == "up", 2 + 3, "the new disk up on the page")
    assert_converged(c, data, volumes, replicas=2, subvolumes=2)


def test_replacing_a_dead_disk_gone_for_good(private_cluster):
    c, data = ops_cluster(private_cluster, 4)
    dead = c.volume_names()[3]
    c.volumes[3].kill()
    # remove it from MKV_VOLUMES, restart the master, rebalance.py --forget-volume H:P
    three = c.volume_names()[:3]
    c.restart_master(volumes=three)
    with Reader(c, data) as reader:
        p = rebalance(c, three, "--forget-volume", dead)
    assert reader.failures == [] and reader.reads > 0
    assert summary(p.stdout, "rebalance")["moved"] > 0
    assert_converged(c, data, three, replicas=2, subvolumes=2)


def test_rebuilding_the_index_after_its_loss(private_cluster):
    c, data = ops_cluster(private_cluster, 3)
    volumes = c.volume_names()
    # 1. stop the master; move the broken index away (MKV_DB, -wal, -shm)
    c.master.stop()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(c.db() + suffix):
            os.rename(c.db() + suffix, c.db() + suffix + ".broken")
    # 2. rebuild.py: a fresh index from the volumes
    p = run_tool("rebuild.py", volumes, c.db(), replicas=2, subvolumes=2)
    assert p.returncode == 0, p.stdout + p.stderr
    # 3. start the master, then rebalance.py
    c.master.start()
    rebalance(c, volumes)
    assert_converged(c, data, volumes, replicas=2, subvolumes=2)


def test_restoring_a_backup_then_rebuilding_while_the_master_serves(private_cluster, tmp_path):
    c, data = ops_cluster(private_cluster, 3)
    volumes, backup = c.volume_names(), str(tmp_path / "backup.sqlite3")
    script = commands_under("### Backing up the index while it serves").replace("/backup/index.sqlite3", backup)
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=dict(os.environ, MKV_DB=c.db()),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # after the backup: new keys, and deleted ones
    newer = make_keys(30, "ops-newer", seed=2)
    put_all(c, newer)
    deleted = list(data)[:5]
    for key in deleted:
        assert Http().delete(c.url(quoted(key))).status_code == 204
    # the backup restored: copied to MKV_DB with no -wal or -shm beside it
    c.master.stop()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(c.db() + suffix):
            os.remove(c.db() + suffix)
    shutil.copy(backup, c.db())
    c.master.start()
    # rebuild.py while the master serves adds the newer keys from the volumes
    with Reader(c, {k: v for k, v in data.items() if k not in deleted}) as reader:
        p = run_tool("rebuild.py", volumes, c.db(), replicas=2, subvolumes=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert reader.failures == [] and reader.reads > 0
    for key, value in newer.items():
        assert Http().get(c.url(quoted(key)), follow=True).content == value
    # --check names the keys deleted since the backup: DELETE those
    p = run_tool("rebuild.py", volumes, c.db(), "--check", replicas=2, subvolumes=2)
    assert p.returncode == 1
    named = [key for key in data if key.encode().hex() in p.stdout or key in p.stdout]
    assert sorted(named) == sorted(deleted), p.stdout[-3000:]
    for key in deleted:
        assert Http().delete(c.url(quoted(key))).status_code == 204
    p = run_tool("rebuild.py", volumes, c.db(), "--check", replicas=2, subvolumes=2)
    assert p.returncode == 0, p.stdout[-3000:]


def test_upgrading_mkv(private_cluster, tmp_path):
    c, data = ops_cluster(private_cluster, 3)
    # restart the master: kill -TERM waits for the requests in flight
    slow = SlowUpload(c.url("/ops-upgrade-in-flight"), 4 << 20)
    slow.started.wait(10)
    os.killpg(c.master.proc.pid, signal.SIGTERM)
    slow.join(30)
    assert slow.status == 201
    c.master.proc.wait(timeout=40)
    c.master.start()
    # then the volumes one at a time: a short down on the page; reads go to
    # the other replicas once it shows (before, a GET may be sent to it)
    windows = []
    with Reader(c, data) as reader:
        for v, name in zip(c.volumes, c.volume_names()):
            stopped = time.monotonic()
            v.stop()
            wait_until(lambda: page_states(c).get(name) == "down", 2 + 3, f"{name} down on the page")
            windows.append((stopped, time.monotonic()))
            v.start()
            wait_until(lambda: page_states(c).get(name) == "up", 2 + 3, f"{name} up on the page")
    assert reader.reads > 0
    late = [(key, why) for key, why, when in reader.failures
            if not any(start <= when <= end + 0.5 for start, end in windows)]
    assert late == []
    assert_converged(c, data | {"/ops-upgrade-in-flight": slow.value}, c.volume_names(), replicas=2, subvolumes=2)


class SlowUpload(threading.Thread):
    """A PUT of `size` bytes sent in 20 pieces over about 2 s; .status once done."""

    def __init__(self, url, size):
        super().__init__(daemon=True)
        self.url, self.value = url, os.urandom(size)
        self.started, self.status = threading.Event(), None
        self.start()

    def run(self):
        url = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.putrequest("PUT", url.path)
        conn.putheader("Content-Length", str(len(self.value)))
        conn.endheaders()
        step = len(self.value) // 20
        for at in range(0, len(self.value), step):
            self.started.set()
            time.sleep(0.1)
            conn.send(self.value[at:at + step])
        self.status = conn.getresponse().status
        conn.close()
