"""rebuild.py and rebalance.py, run as a user runs them, against real nginx
volumes and a real gunicorn master that keeps serving meanwhile."""
import base64
import hashlib
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from mkvlib.errors import BadKey
from mkvlib.index import DELETING, Index, Record, WRITING
from mkvlib.lease import new_owner
from mkvlib.placement import check_storable, key2path, key2volume, volume_host
from mkvlib.settings import Settings
from mkvlib.upload import put
from mkvlib.volumes import Volumes
import rebuild
import tools
from conftest import ROOT, Http, wait_until

TOOL_TIMEOUT = 120


# ---------------------------------------------------------------- helpers

def run_tool(tool, volumes, db, *args, replicas=3, subvolumes=10, timeout=TOOL_TIMEOUT):
    env = dict(os.environ, MKV_VOLUMES=",".join(volumes), MKV_DB=db,
               MKV_REPLICAS=str(replicas), MKV_SUBVOLUMES=str(subvolumes))
    return subprocess.run([sys.executable, tool, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def quoted(key):
    return requests.utils.quote(key, safe="/")


def make_keys(n, prefix, seed=1, big=0):
    """n storable keys, some with '/' in their base64 file name, with values
    of 1 KB to 300 KB (and `big` of 2 MB)."""
    rnd = random.Random(seed)
    data = {}
    i = 0
    while len(data) < n:
        key = f"/{prefix}/{i}" + "?>~"[i % 3] * (i % 4)
        i += 1
        try:
            check_storable(key.encode())
        except BadKey:
            continue
        size = 2_000_000 if len(data) < big else rnd.randint(1_000, 300_000)
        data[key] = rnd.randbytes(size)
    assert any("/" in base64.b64encode(k.encode()).decode() for k in data)
    return data


def put_all(cluster, data):
    with requests.Session() as s:
        for key, value in data.items():
            r = s.put(cluster.url(quoted(key)), data=value, timeout=30)
            assert r.status_code == 201, (key, r.status_code, r.text)


def rows(db):
    """{key: (state, volumes, size, md5)} of an index file."""
    with sqlite3.connect(db) as c:
        return {bytes(k): (st, v, size, md5)
                for k, st, v, size, md5 in c.execute("SELECT key, state, volumes, size, md5 FROM keys")}


def disk_path(cluster, volume, key):
    """The file of `key` on a replica named 'host:port[/svXX]'."""
    host, _, sub = volume.partition("/")
    port = int(host.rsplit(":", 1)[1])
    folder = next(d for v, d in zip(cluster.volumes, cluster.volume_dirs) if v.port == port)
    return os.path.join(folder, sub, key2path(key.encode()).lstrip("/"))


def data_files(folder):
    """Files of a volume folder, the launcher's own (.mkv, .tmp, .id) left out."""
    out = []
    for top, dirs, files in os.walk(folder):
        if top == folder:
            dirs[:] = [d for d in dirs if d not in (".mkv", ".tmp")]
            files = [f for f in files if f != ".id"]
        out += [os.path.join(top, f) for f in files]
    return out


def assert_converged(cluster, data, volumes, removed=(), replicas=3, subvolumes=10):
    """Every key reads back byte-exact through the master, its record names its
    placement, its files sit there; removed volumes hold no data files."""
    index = rows(cluster.db())
    with requests.Session() as s:
        for key, value in data.items():
            r = s.get(cluster.url(quoted(key)), timeout=30)
            assert r.status_code == 200 and r.content == value, (key, r.status_code)
            placement = key2volume(key.encode(), volumes, replicas, subvolumes)
            assert index[key.encode()][1] == ",".join(placement), key
            for v in placement:
                assert os.path.getsize(disk_path(cluster, v, key)) == len(value), (key, v)
    for folder in removed:
        assert data_files(folder) == []
    with sqlite3.connect(cluster.db()) as c:
        assert c.execute("SELECT COUNT(*) FROM pending_deletes").fetchone()[0] == 0


class Reader(threading.Thread):
    """GETs random keys through the master (following the redirect) until
    stopped; keeps the reads that did not return the value: (key, why, when)."""

    def __init__(self, cluster, data):
        super().__init__(daemon=True)
        self.cluster, self.data = cluster, data
        self.stop = threading.Event()
        self.reads, self.failures = 0, []

    def run(self):
        keys = list(self.data)
        rnd = random.Random(7)
        with requests.Session() as s:
            while not self.stop.is_set():
                key = rnd.choice(keys)
                try:
                    r = s.get(self.cluster.url(quoted(key)), timeout=30)
                    ok = r.status_code == 200 and r.content == self.data[key]
                    why = r.status_code
                except requests.RequestException as e:
                    ok, why = False, repr(e)
                self.reads += 1
                if not ok:
                    self.failures.append((key, why, time.monotonic()))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(timeout=60)


def summary(out, tool):
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{tool}: ") and " keys seen" in ln)
    counts = {}
    for part in line.split(": ", 1)[1].split(", "):
        n, _, name = part.partition(" ")
        if n.isdigit():
            counts[name.replace("keys ", "")] = int(n)
    return counts


# ---------------------------------------------------------------- the original's rtest, online

def test_rtest_rebuild_and_rebalance_from_5_to_3_to_5_volumes_while_the_master_serves(private_cluster, tmp_path):
    c = private_cluster(n_volumes=5, replicas=3)
    five = c.volume_names()
    data = make_keys(240, "rt", big=2)
    put_all(c, data)

    fresh = str(tmp_path / "fresh.sqlite3")
    p = run_tool("rebuild.py", five, fresh, "--md5")
    assert p.returncode == 0, p.stderr + p.stdout
    assert rows(fresh) == rows(c.db())   # state, replicas in order, size, md5: all the same

    three = five[:3]
    c.restart_master(volumes=three)
    with Reader(c, data) as reader:
        p = run_tool("rebalance.py", three, c.db())
    assert p.returncode == 0, p.stderr + p.stdout
    assert reader.failures == [] and reader.reads > 0
    assert summary(p.stdout, "rebalance")["moved"] > 0
    assert_converged(c, data, three, removed=c.volume_dirs[3:])

    c.restart_master(volumes=five)
    with Reader(c, data) as reader:
        p = run_tool("rebalance.py", five, c.db())
    assert p.returncode == 0, p.stderr + p.stdout
    assert reader.failures == [] and reader.reads > 0
    assert_converged(c, data, five)

    again = str(tmp_path / "again.sqlite3")
    p = run_tool("rebuild.py", five, again)
    assert p.returncode == 0, p.stderr + p.stdout
    live = rows(c.db())
    assert {k: r[:3] for k, r in rows(again).items()} == {k: r[:3] for k, r in live.items()}
    assert all(r[3] is None for r in rows(again).values())   # no --md5: not read


# ---------------------------------------------------------------- rebuild

def test_rebuild_of_a_correct_live_index_changes_nothing(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2)
    data = make_keys(40, "same")
    put_all(c, data)
    before = rows(c.db())
    p = run_tool("rebuild.py", c.volume_names(), c.db(), replicas=2)
    assert p.returncode == 0, p.stderr + p.stdout
    assert summary(p.stdout, "rebuild")["unchanged"] == 40
    assert rows(c.db()) == before


def test_rebuild_restores_lost_records_while_the_master_serves_and_keeps_unlinked_keys_unlinked(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2)
    data = make_keys(30, "lost")
    put_all(c, data)
    soft = next(iter(data))
    assert requests.request("UNLINK", c.url(quoted(soft)), timeout=10).status_code == 204
    before = rows(c.db())
    gone = [k.encode() for k in list(data)[10:20]]
    with sqlite3.connect(c.db()) as db:   # the index loses records behind the master's back
        db.executemany("DELETE FROM keys WHERE key = ?", [(k,) for k in gone])
    p = run_tool("rebuild.py", c.volume_names(), c.db(), replicas=2)
    assert p.returncode == 0, p.stderr + p.stdout
    after = rows(c.db())
    assert {k: r[:3] for k, r in after.items()} == {k: r[:3] for k, r in before.items()}
    assert after[soft.encode()][0] == "unlinked"
    for key in list(data)[10:20]:
        assert requests.get(c.url(quoted(key)), timeout=10).content == data[key]


def test_rebuild_against_the_live_index_neither_resurrects_deleted_keys_nor_loses_new_ones(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2)
    data = make_keys(150, "race", seed=3)
    put_all(c, data)
    doomed = list(data)[::2]
    newer = make_keys(60, "race-new", seed=4)
    errors = []

    def churn():
        with requests.Session() as s:
            for old, (new, value) in zip(doomed, newer.items()):
                for r in (s.delete(c.url(quoted(old)), timeout=30),
                          s.put(c.url(quoted(new)), data=value, timeout=30)):
                    if r.status_code not in (201, 204):
                        errors.append((r.request.method, r.status_code, r.text))
    t = threading.Thread(target=churn)
    t.start()
    p = run_tool("rebuild.py", c.volume_names(), c.db(), "--workers", "4", replicas=2)
    t.join(timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    assert errors == []
    deleted = set(doomed[:len(newer)])
    with requests.Session() as s:
        for key, value in list(data.items()) + list(newer.items()):
            r = s.get(c.url(quoted(key)), timeout=10)
            if key in deleted:
                assert r.status_code == 404, key
            else:
                assert r.status_code == 200 and r.content == value, key
    assert {r[0] for r in rows(c.db()).values()} == {"live"}


def test_rebuild_reads_the_go_original_on_disk_format_flat_and_with_subvolumes(private_cluster, tmp_path):
    """Files laid out by hand exactly as Go minikeyvalue writes them: a volume
    with svXX folders, and volumes in the flat layout (subvolumes=1)."""
    c = private_cluster(n_volumes=3, replicas=2)
    names = c.volume_names()
    data = make_keys(25, "go", seed=5)
    for subvolumes in (1, 10):
        for key, value in data.items():
            for v in key2volume(key.encode(), names, 2, subvolumes):
                path = disk_path(c, v, key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(value)
    # things that are not key files: skipped, not fatal
    os.makedirs(os.path.join(c.volume_dirs[0], "zz"))
    with open(os.path.join(c.volume_dirs[0], "junk"), "wb") as f:
        f.write(b"x")
    for subvolumes in (1, 10):
        db = str(tmp_path / f"go-{subvolumes}.sqlite3")
        p = run_tool("rebuild.py", names, db, replicas=2, subvolumes=subvolumes)
        assert p.returncode == 0, p.stderr + p.stdout
        got = rows(db)
        assert set(got) == {k.encode() for k in data}
        for key, value in data.items():
            state, volumes, size, _ = got[key.encode()]
            placement = key2volume(key.encode(), names, 2, subvolumes)
            other = key2volume(key.encode(), names, 2, 11 - subvolumes)
            assert state == "live" and size == len(value)
            # both layouts hold a copy: the placement's first, in order, then the others
            assert volumes.split(",")[:2] == placement
            assert sorted(volumes.split(",")[2:]) == sorted(other)
        assert summary(p.stdout, "rebuild")["skipped"] >= 2


# ---------------------------------------------------------------- rebuild --check

def test_check_reports_a_deleted_replica_an_orphan_and_a_misplaced_file_and_changes_nothing(private_cluster):
    c = private_cluster(n_volumes=4, replicas=2)
    names = c.volume_names()
    data = make_keys(20, "chk", seed=6)
    put_all(c, data)
    keys = list(data)
    # a deleted replica
    short = keys[0]
    os.remove(disk_path(c, key2volume(short.encode(), names, 2, 10)[1], short))
    # an orphan: a file for a key the index does not have
    orphan = "/chk/orphan"
    orphan_on = key2volume(orphan.encode(), names, 2, 10)[0]
    os.makedirs(os.path.dirname(disk_path(c, orphan_on, orphan)))
    with open(disk_path(c, orphan_on, orphan), "wb") as f:
        f.write(b"nobody's")
    # a misplaced file: a copy on a volume outside the key's placement
    moved = keys[1]
    elsewhere = next(v for v in names if v not in [p.split("/")[0] for p in
                                                     key2volume(moved.encode(), names, 2, 10)])
    wrong = elsewhere + "/sv03"
    os.makedirs(os.path.dirname(disk_path(c, wrong, moved)), exist_ok=True)
    with open(disk_path(c, wrong, moved), "wb") as f:
        f.write(data[moved])
    before = rows(c.db())

    p = run_tool("rebuild.py", names, c.db(), "--check", replicas=2)
    assert p.returncode == 1, p.stderr + p.stdout
    lines = p.stdout.splitlines()
    assert f"under-replicated {short} 1 of 2 replicas ({key2volume(short.encode(), names, 2, 10)[0]})" in lines
    assert f"orphan {orphan} {orphan_on}" in lines
    assert f"misplaced {moved} {wrong}" in lines
    assert "rebuild --check: 0 missing, 1 under-replicated, 1 misplaced, 1 orphan, 0 wrong-size, 0 wrong-md5" in lines
    assert rows(c.db()) == before


def test_check_reports_a_key_with_no_file_anywhere(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2)
    names = c.volume_names()
    data = make_keys(10, "none", seed=8)
    put_all(c, data)
    key = list(data)[3]
    for v in key2volume(key.encode(), names, 2, 10):
        os.remove(disk_path(c, v, key))
    p = run_tool("rebuild.py", names, c.db(), "--check", replicas=2)
    assert p.returncode == 1
    assert f"missing {key} {','.join(key2volume(key.encode(), names, 2, 10))}" in p.stdout.splitlines()
    assert "rebuild --check: 1 missing, 0 under-replicated, 0 misplaced, 0 orphan, 0 wrong-size, 0 wrong-md5" in p.stdout


def test_check_of_a_sound_cluster_finds_nothing_and_exits_0(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2)
    put_all(c, make_keys(20, "fine", seed=9))
    p = run_tool("rebuild.py", c.volume_names(), c.db(), "--check", replicas=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rebuild --check: 0 missing, 0 under-replicated, 0 misplaced, 0 orphan, 0 wrong-size, 0 wrong-md5" in p.stdout
    counts = summary(p.stdout, "rebuild")
    assert counts["seen"] == 20 and counts["unchanged"] == 20, p.stdout     # the summary adds up


def test_check_of_an_index_that_does_not_exist_is_a_settings_error(tmp_path):
    p = run_tool("rebuild.py", ["127.0.0.1:1"], str(tmp_path / "nope.sqlite3"), "--check", replicas=1)
    assert p.returncode == 2 and "does not exist" in p.stderr
    assert not os.path.exists(tmp_path / "nope.sqlite3")


# ---------------------------------------------------------------- rebalance

def test_rebalance_copies_back_a_replica_that_vanished(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2)
    names = c.volume_names()
    data = make_keys(20, "wipe", seed=10)
    put_all(c, data)
    key = list(data)[5]
    victim = key2volume(key.encode(), names, 2, 10)[0]
    os.remove(disk_path(c, victim, key))
    p = run_tool("rebalance.py", names, c.db(), replicas=2)
    assert p.returncode == 0, p.stderr + p.stdout
    counts = summary(p.stdout, "rebalance")
    assert counts["repaired"] == 1 and counts["moved"] == 0 and counts["failed"] == 0
    with open(disk_path(c, victim, key), "rb") as f:
        assert f.read() == data[key]


def test_rebalance_finishes_what_a_dead_put_and_a_failed_delete_left(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    names = c.volume_names()
    index = Index(c.db())
    volumes = Volumes()
    left = {}
    for key, state in ((b"/dead-put", WRITING), (b"/failed-delete", DELETING)):
        placement = key2volume(key, names, 2, 1)
        index.start_put(key, placement, "gone", lease=0.01)       # a PUT that died mid-way
        put(volumes, placement[:1], key2path(key), [b"half"], 4)   # one replica reached disk
        if state == DELETING:
            index.abandon_put(key, "gone", leftovers=placement)
        left[key] = disk_path(c, placement[0], key.decode())
    held = b"/being-written"
    index.start_put(held, key2volume(held, names, 2, 1), "alive")   # a live PUT: not ours
    time.sleep(0.05)
    p = run_tool("rebalance.py", names, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stderr + p.stdout
    assert summary(p.stdout, "rebalance")["purged"] == 2
    for key, path in left.items():
        assert index.get(key) is None and not os.path.exists(path)
    assert index.get(held).state == WRITING


def test_rebalance_forgets_a_removed_volume_that_is_gone_for_good(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1)
    data = make_keys(30, "dead", seed=12)
    put_all(c, data)
    names = c.volume_names()
    dead, alive = names[2], names[:2]
    c.volumes[2].kill()                  # the disk died: its copies are lost for good
    c.restart_master(volumes=alive, replicas=2, subvolumes=1)
    p = run_tool("rebalance.py", alive, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 1 and dead in p.stdout + p.stderr    # it cannot empty the dead volume
    # one line names the way out, not one line per key and "run again"
    assert [line for line in p.stderr.splitlines() if line.startswith("rebalance:") and dead in line] == [
        f"rebalance: {dead} is no longer in MKV_VOLUMES and does not answer: "
        f"{summary(p.stdout, 'rebalance')['failed']} key(s) keep a copy there, noted. Start it and run "
        f"rebalance.py again; or, if it is gone for good: rebalance.py --forget-volume {dead}"], p.stderr
    assert "run rebalance.py again" not in p.stderr.replace("and run rebalance.py again", "")
    p = run_tool("rebalance.py", alive, c.db(), "--forget-volume", dead, replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_converged(c, data, alive, replicas=2, subvolumes=1)
    assert Index(c.db()).all_notes() == []
    p = run_tool("rebalance.py", alive, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0 and summary(p.stdout, "rebalance")["moved"] == 0


def test_rebalance_refuses_to_forget_a_volume_in_use(tmp_path):
    p = run_tool("rebalance.py", ["127.0.0.1:9", "127.0.0.1:10"], str(tmp_path / "i.sqlite3"),
                 "--forget-volume", "127.0.0.1:9", replicas=1)
    assert p.returncode == 2 and "still in MKV_VOLUMES" in p.stderr


def test_rebalance_killed_halfway_and_run_again_converges_and_a_third_run_moves_nothing(private_cluster):
    c = private_cluster(n_volumes=5, replicas=2)
    five = c.volume_names()
    data = make_keys(200, "kill", seed=11)
    put_all(c, data)
    three = five[:3]
    c.restart_master(volumes=three, replicas=2)
    env = dict(os.environ, MKV_VOLUMES=",".join(three), MKV_DB=c.db(), MKV_REPLICAS="2")
    proc = subprocess.Popen([sys.executable, "rebalance.py", "--workers", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def placed():
        try:
            index = rows(c.db())
        except sqlite3.Error:
            return 0
        return sum(index[k.encode()][1] == ",".join(key2volume(k.encode(), three, 2, 10))
                   for k in data)
    already = placed()

    def moved_some():
        if placed() >= already + 20:
            # frozen the moment it is seen (batched runs are quick): the kill
            # below lands here, halfway, however busy the machine is
            proc.send_signal(signal.SIGSTOP)
            return True
        return proc.poll() is not None
    try:
        wait_until(moved_some, 60, "rebalance to move keys", every=0.005)
        assert proc.poll() is None, "rebalance finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert placed() < len(data)

    p = run_tool("rebalance.py", three, c.db(), replicas=2)
    assert p.returncode == 0, p.stderr + p.stdout
    assert_converged(c, data, three, removed=c.volume_dirs[3:], replicas=2)
    p = run_tool("rebalance.py", three, c.db(), replicas=2)
    assert p.returncode == 0, p.stderr + p.stdout
    counts = summary(p.stdout, "rebalance")
    assert counts["moved"] == 0 and counts["repaired"] == 0 and counts["unchanged"] == len(data)


def test_rebalance_streams_a_value_without_holding_it_in_memory(private_cluster):
    import psutil
    c = private_cluster(n_volumes=3, replicas=1)
    names = c.volume_names()
    size = 96 * 1024 * 1024
    key = "/stream/big"
    chunk = os.urandom(1024 * 1024)
    r = requests.put(c.url(key), data=iter([chunk] * (size // len(chunk))), timeout=120)
    assert r.status_code == 201, r.text
    placement = key2volume(key.encode(), names, 1, 10)[0]
    others = [v for v in names if v != volume_host(placement)]   # the key must move off its volume
    env = dict(os.environ, MKV_VOLUMES=",".join(others), MKV_DB=c.db(), MKV_REPLICAS="1")
    proc = subprocess.Popen([sys.executable, "rebalance.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=TOOL_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert summary(out, "rebalance")["moved"] == 1
    assert peak < 80 * 1024 * 1024, f"rebalance peaked at {peak >> 20} MB moving a {size >> 20} MB value"
    target = key2volume(key.encode(), others, 1, 10)[0]
    with open(disk_path(c, target, key), "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == hashlib.md5(chunk * (size // len(chunk))).hexdigest()


def test_rebalance_keeps_unlinked_keys_unlinked_and_moves_their_bytes(private_cluster):
    c = private_cluster(n_volumes=4, replicas=2)
    four = c.volume_names()
    data = make_keys(20, "soft", seed=12)
    put_all(c, data)
    for key in list(data)[:5]:
        assert requests.request("UNLINK", c.url(quoted(key)), timeout=10).status_code == 204
    three = four[:3]
    p = run_tool("rebalance.py", three, c.db(), replicas=2)
    assert p.returncode == 0, p.stderr + p.stdout
    index = rows(c.db())
    for key in list(data)[:5]:
        state, volumes, _, _ = index[key.encode()]
        assert state == "unlinked"
        assert volumes == ",".join(key2volume(key.encode(), three, 2, 10))
        for v in volumes.split(","):
            with open(disk_path(c, v, key), "rb") as f:
                assert f.read() == data[key]
    assert data_files(c.volume_dirs[3]) == []


def test_rebalance_leaves_a_key_locked_by_a_live_process_names_it_and_exits_1(private_cluster):
    c = private_cluster(n_volumes=4, replicas=2)
    four = c.volume_names()
    data = make_keys(10, "busy", seed=13)
    put_all(c, data)
    three = four[:3]
    key = next(k for k in data
               if key2volume(k.encode(), three, 2, 10) != key2volume(k.encode(), four, 2, 10))
    index = Index(c.db())
    owner = new_owner("test-")    # this test's own process: alive
    assert index.lock(key.encode(), owner) is not None
    before = index.get(key.encode()).volumes
    p = run_tool("rebalance.py", three, c.db(), replicas=2)
    # the key is not on its placement: an operator must not take the fourth volume away yet
    assert p.returncode == 1, p.stderr + p.stdout
    assert summary(p.stdout, "rebalance")["busy"] == 1
    assert f"{key}: busy" in p.stderr
    assert index.get(key.encode()).volumes == before
    index.release(key.encode(), owner)
    index.close()


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("tool", ["rebuild.py", "rebalance.py"])
def test_bad_settings_are_one_line_and_exit_2(tool, tmp_path):
    p = run_tool(tool, ["127.0.0.1:1", "127.0.0.1:2"], str(tmp_path / "i.sqlite3"), replicas=3)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "MKV_REPLICAS=3" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("tool", ["rebuild.py", "rebalance.py"])
def test_help_explains_every_flag(tool):
    p = subprocess.run([sys.executable, tool, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    for flag in ["--volumes", "--db", "--replicas", "--subvolumes", "--workers"]:
        assert flag in p.stdout


def test_flags_win_over_the_environment(private_cluster, tmp_path):
    c = private_cluster(n_volumes=3, replicas=2)
    put_all(c, make_keys(5, "flags", seed=14))
    db = str(tmp_path / "flags.sqlite3")
    env = dict(os.environ, MKV_VOLUMES="127.0.0.1:1", MKV_DB="/nonexistent/x", MKV_REPLICAS="9")
    p = subprocess.run([sys.executable, "rebuild.py", "--volumes", ",".join(c.volume_names()), "--db", db,
                        "--replicas", "2", "--subvolumes", "10", "--workers", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    assert p.returncode == 0, p.stderr + p.stdout
    assert len(rows(db)) == 5


# ---------------------------------------------------------------- pure logic

def test_replicas_are_ordered_placement_first_then_the_others_by_volume_order():
    settings = Settings.from_env({}, volumes="a:1,b:1,c:1,d:1", db="/tmp/x", replicas=2, subvolumes=1)
    key = b"/k"
    placement = key2volume(key, settings.volumes, 2, 1)
    others = [v for v in settings.volumes if v not in placement]
    holders = set(others) | {placement[1]}
    assert rebuild.order_replicas(key, holders, settings) == [placement[1]] + others


def test_classify_names_each_kind_of_problem():
    settings = Settings.from_env({}, volumes="a:1,b:1,c:1", db="/tmp/x", replicas=2, subvolumes=1)
    key = b"/k"
    placement = key2volume(key, settings.volumes, 2, 1)
    other = next(v for v in settings.volumes if v not in placement)
    rec = Record(key, "live", list(placement))
    assert rebuild.classify(key, rec, set(placement), settings) == []
    assert rebuild.classify(key, None, {other}, settings) == [("orphan", other)]
    assert rebuild.classify(key, rec, set(), settings) == [("missing", ",".join(placement))]
    assert [k for k, _ in rebuild.classify(key, rec, {placement[0]}, settings)] == ["under-replicated"]
    assert [k for k, _ in rebuild.classify(key, rec, set(placement) | {other}, settings)] == ["misplaced"]
    busy = Record(key, "writing", list(placement))
    assert rebuild.classify(key, busy, set(), settings) == []


def test_only_svXX_and_two_hex_digit_folders_are_walked():
    assert rebuild.is_subvolume_dir({"name": "sv0A", "type": "directory"})
    assert not rebuild.is_subvolume_dir({"name": "sv0a", "type": "directory"})
    assert not rebuild.is_subvolume_dir({"name": "sv0A", "type": "file"})
    assert rebuild.is_hex_dir({"name": "0f", "type": "directory"})
    assert not rebuild.is_hex_dir({"name": "zz", "type": "directory"})
    assert not rebuild.is_hex_dir({"name": "0F", "type": "directory"})


def test_a_lock_owner_is_dead_only_if_its_process_on_this_machine_is_gone():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = new_owner("x-").split(":")
    dead[1] = str(p.pid)
    assert tools.owner_is_dead(":".join(dead))
    assert not tools.owner_is_dead(new_owner("x-"))          # ourselves
    assert not tools.owner_is_dead(f"elsewhere:{p.pid}:x")          # another machine: cannot tell
    assert not tools.owner_is_dead("garbage")


def test_progress_prints_plain_status_lines_off_a_terminal():
    out = io.StringIO()
    progress = tools.Progress("rebalance", total=10, unit="keys", stream=out, every=0.05, tty=False)
    progress.add(done=4, keys=4, nbytes=4_000_000)
    wait_until(lambda: "rebalance: 4/10 keys (40%)" in out.getvalue(), 5, "a status line")
    progress.close()
    line = out.getvalue().splitlines()[0]
    assert "4 keys, 4.0 MB" in line and "keys/s" in line and "MB/s" in line and "left" in line


def test_progress_draws_a_bar_on_a_terminal():
    out = io.StringIO()
    progress = tools.Progress("rebuild", total=8, unit="folders", stream=out, tty=True)
    progress.add(done=2, keys=5, nbytes=2048)
    progress.close()
    assert "2/8" in out.getvalue() and "5 keys, 2.0 KB" in out.getvalue()


def test_summary_is_one_line_of_counts():
    progress = tools.Progress("rebalance", stream=io.StringIO(), every=0, tty=False)
    progress.count("seen", 312)
    progress.count("moved", 120)
    progress.add(nbytes=1_200_000_000)
    line = progress.summary(["seen", "moved", "failed"], "copied")
    assert line.startswith("rebalance: 312 keys seen, 120 moved, 0 failed, 1.2 GB copied in ")


def test_rebalance_dry_run_names_what_it_would_copy_and_remove_and_changes_nothing(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1)
    http = Http()
    keys = [f"/dry{i}" for i in range(30)]
    for k in keys:
        assert http.put(c.url(k), data=b"v").status_code == 201
    before = {k: http.get(c.url(k)).headers["Key-Volumes"] for k in keys}
    files = sorted(os.path.join(d, f) for v in c.volume_dirs for d, _, fs in os.walk(v) for f in fs)
    env = dict(os.environ, MKV_VOLUMES=",".join(c.volume_names()), MKV_DB=c.db(), MKV_REPLICAS="3",
               MKV_SUBVOLUMES="1")
    p = subprocess.run([sys.executable, "rebalance.py", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    copies = [line for line in p.stdout.splitlines() if line.startswith("would copy ")]
    assert sorted(line.split()[2].rstrip(":") for line in copies) == sorted(keys)   # a third copy each
    assert "30 keys seen, 30 would copy, 0 would remove" in p.stdout.splitlines()[-1]
    assert {k: http.get(c.url(k)).headers["Key-Volumes"] for k in keys} == before
    assert sorted(os.path.join(d, f) for v in c.volume_dirs for d, _, fs in os.walk(v) for f in fs) == files
