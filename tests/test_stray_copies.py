"""A stray, stale or late copy never becomes a key's value.

The rule: a volume that the index names for a key holds that key's recorded
value. Nothing adds a copy to a record unless it is the record's value;
nothing lands a key's bytes without holding the key's lock at that moment;
a write whose outcome is unknown is noted until it is cleaned up.

Each test makes, on real volumes and a real master, a file that is not the
key's value sit where a key's copy would (planted as a crash, an old disk or a
late write leaves one), runs what an operator runs, and checks what a GET
serves."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from mkvlib.errors import KeyBusy, VolumeDown
from mkvlib.index import Index, LIVE, WRITING
from mkvlib.lease import lock_clock
from mkvlib.placement import TMP_DIR, key2path, key2volume
from mkvlib.settings import Settings
from mkvlib.store import Store
from mkvlib.upload import put
from mkvlib.volumes import OP_TIMEOUT, Volumes
from conftest import TIMEOUT, Http, wait_until
from test_tools import run_tool, summary


def index_of(c):
    return Index(c.db())


def placement(c, key: bytes, volumes=None, replicas=2, subvolumes=1):
    return key2volume(key, volumes or c.volume_names(), replicas, subvolumes)


def served(c, key: str, tries=12):
    """Every value a GET of the key can be sent to (redirects are random over the replicas)."""
    got = set()
    with requests.Session() as s:
        for _ in range(tries):
            r = s.get(c.url(key), timeout=TIMEOUT)
            assert r.status_code == 200, (key, r.status_code, r.text)
            got.add(r.content)
    return got


def recorded_copies(c, key: bytes):
    """The bytes of each copy the index names for the key, read off the disks."""
    rec = index_of(c).get(key)
    out = {}
    for v in rec.volumes:
        with open(c.file_of(v, key), "rb") as f:
            out[v] = f.read()
    return out


def uploads_on(c, volume):
    """Uploads left under a volume's TMP_DIR."""
    folder = os.path.join(c.folder_of(volume), TMP_DIR.strip("/"))
    return os.listdir(folder) if os.path.isdir(folder) else []


# ---------------------------------------------------------------- rebalance never adopts

def test_rebalance_copies_over_a_stray_file_at_a_new_placement_path_instead_of_adopting_it(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1)
    names = c.volume_names()
    c.restart_master(volumes=names[:2], replicas=2, subvolumes=1)
    http = Http()
    keys = {f"/stray/{i}": b"the value %d " % i * 40 for i in range(40)}
    for k, v in keys.items():
        assert http.put(c.url(k), data=v).status_code == 201
    # what a crash leaves: a file of the same size, other bytes, where the third volume would hold a copy
    planted = 0
    for k, v in keys.items():
        for vol in placement(c, k.encode(), names):
            if vol.startswith(names[2]):
                c.plant(vol, k.encode(), b"X" * len(v))
                planted += 1
    assert planted > 5
    p = run_tool("rebalance.py", names, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    c.restart_master(volumes=names, replicas=2, subvolumes=1)
    for k, v in keys.items():
        assert served(c, k, tries=4) == {v}, k
        assert set(recorded_copies(c, k.encode()).values()) == {v}, k


def test_rebalance_rolled_back_after_a_kill_in_its_grace_period_serves_the_new_values(private_cluster):
    # A rebalance from A to B was killed before it removed A's old copies (they stay noted);
    # the keys were deleted and PUT anew on B; the settings go back to A and rebalance runs.
    c = private_cluster(n_volumes=3, replicas=1, subvolumes=1)
    a, b = c.volume_names()[:2], c.volume_names()[1:]
    index = index_of(c)
    keys = {}
    for i in range(30):
        k = f"/rollback/{i}"
        on_a, on_b = placement(c, k.encode(), a, 1)[0], placement(c, k.encode(), b, 1)[0]
        if on_a != on_b:
            keys[k] = on_a
    assert len(keys) > 5
    c.restart_master(volumes=b, replicas=1, subvolumes=1)
    http = Http()
    for k, old_home in keys.items():
        c.plant(old_home, k.encode(), b"the deleted value")
        index.note(k.encode(), [old_home])            # what the killed run left noted
        assert http.put(c.url(k), data=b"the new value of " + k.encode()).status_code == 201
    c.restart_master(volumes=a, replicas=1, subvolumes=1)
    p = run_tool("rebalance.py", a, c.db(), replicas=1, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    for k in keys:
        assert served(c, k, tries=2) == {b"the new value of " + k.encode()}, k
    assert index.all_notes() == []


def test_a_forgotten_volume_back_with_its_old_disk_never_serves_its_old_values(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1)
    names = c.volume_names()
    http = Http()
    keys = [f"/forgotten/{i}" for i in range(30)]
    keys = [k for k in keys if any(v.startswith(names[2]) for v in placement(c, k.encode()))]
    for k in keys:
        assert http.put(c.url(k), data=b"old " + k.encode()).status_code == 201
    old_disk = {k: c.file_of(next(v for v in placement(c, k.encode()) if v.startswith(names[2])), k.encode())
                for k in keys}
    c.volumes[2].pause()                           # the volume is gone: forgotten for good
    c.restart_master(volumes=names[:2], replicas=2, subvolumes=1)
    p = run_tool("rebalance.py", names[:2], c.db(), "--forget-volume", names[2], replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    for k in keys:                                 # deleted and written anew meanwhile
        assert http.delete(c.url(k)).status_code == 204
        assert http.put(c.url(k), data=b"new " + k.encode()).status_code == 201
    c.volumes[2].resume()                          # ... and it comes back with its old disk
    assert all(os.path.exists(f) for f in old_disk.values())
    c.restart_master(volumes=names, replicas=2, subvolumes=1)
    p = run_tool("rebalance.py", names, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    for k in keys:
        assert served(c, k, tries=6) == {b"new " + k.encode()}, k


# ---------------------------------------------------------------- rebuild never adopts

@pytest.mark.parametrize("stray", [b"an older value, longer than the new one", b"same-size value!"])
def test_rebuild_into_the_live_index_does_not_add_a_copy_of_another_value(private_cluster, stray):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1)
    http = Http()
    key = "/rebuild/stray"
    assert http.put(c.url(key), data=b"same-size value?").status_code == 201
    other = next(v for v in c.volume_names() if v not in index_of(c).get(key.encode()).volumes)
    c.plant(other, key.encode(), stray)
    before = index_of(c).get(key.encode()).volumes
    p = run_tool("rebuild.py", c.volume_names(), c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert index_of(c).get(key.encode()).volumes == before
    assert served(c, key) == {b"same-size value?"}


def test_rebuild_into_the_live_index_adds_a_copy_that_is_the_value(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1)
    http = Http()
    key = "/rebuild/good"
    assert http.put(c.url(key), data=b"the value").status_code == 201
    other = next(v for v in c.volume_names() if v not in index_of(c).get(key.encode()).volumes)
    c.plant(other, key.encode(), b"the value")
    p = run_tool("rebuild.py", c.volume_names(), c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0 and summary(p.stdout, "rebuild")["updated"] == 1, p.stdout + p.stderr
    assert other in index_of(c).get(key.encode()).volumes


def test_rebuild_into_a_fresh_index_reports_copies_that_disagree_and_adds_neither(private_cluster, tmp_path):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    names = c.volume_names()
    c.plant(names[0], b"/fresh/conflict", b"one value")
    c.plant(names[1], b"/fresh/conflict", b"another value")
    c.plant(names[0], b"/fresh/fine", b"agreed")
    c.plant(names[1], b"/fresh/fine", b"agreed")
    fresh = str(tmp_path / "fresh.sqlite3")
    p = run_tool("rebuild.py", names, fresh, replicas=2, subvolumes=1)
    assert p.returncode == 1
    assert "/fresh/conflict: conflict" in p.stderr and "9 bytes" in p.stderr and "13 bytes" in p.stderr
    index = Index(fresh)
    assert index.get(b"/fresh/conflict") is None and index.get(b"/fresh/fine").state == LIVE


def test_rebuild_md5_into_a_fresh_index_reports_same_size_copies_that_differ(private_cluster, tmp_path):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    names = c.volume_names()
    c.plant(names[0], b"/fresh/samesize", b"value A")
    c.plant(names[1], b"/fresh/samesize", b"value B")
    fresh = str(tmp_path / "fresh.sqlite3")
    p = run_tool("rebuild.py", names, fresh, "--md5", replicas=2, subvolumes=1)
    assert p.returncode == 1 and "/fresh/samesize: conflict" in p.stderr
    assert Index(fresh).get(b"/fresh/samesize") is None


def test_rebuild_check_reports_a_recorded_copy_of_the_wrong_size_and_rebuild_then_rebalance_repair_it(
        private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    http = Http()
    key = "/check/wrong"
    assert http.put(c.url(key), data=b"the value").status_code == 201
    bad = index_of(c).get(key.encode()).volumes[1]
    c.plant(bad, key.encode(), b"an older, longer value")
    p = run_tool("rebuild.py", c.volume_names(), c.db(), "--check", replicas=2, subvolumes=1)
    assert p.returncode == 1
    assert f"wrong-size {key} {bad} (22 bytes, recorded 9)" in p.stdout
    p = run_tool("rebuild.py", c.volume_names(), c.db(), replicas=2, subvolumes=1)
    assert bad not in index_of(c).get(key.encode()).volumes, p.stdout + p.stderr
    assert served(c, key) == {b"the value"}
    p = run_tool("rebalance.py", c.volume_names(), c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert set(recorded_copies(c, key.encode()).values()) == {b"the value"}
    assert len(index_of(c).get(key.encode()).volumes) == 2


def test_rebuild_check_md5_reports_a_recorded_copy_of_the_same_size_with_other_bytes(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    http = Http()
    key = "/check/samesize"
    assert http.put(c.url(key), data=b"the value").status_code == 201
    bad = index_of(c).get(key.encode()).volumes[0]
    c.plant(bad, key.encode(), b"THE VALUE")
    p = run_tool("rebuild.py", c.volume_names(), c.db(), "--check", "--md5", replicas=2, subvolumes=1)
    assert p.returncode == 1 and f"wrong-md5 {key} {bad}" in p.stdout


# ---------------------------------------------------------------- fencing: a writer that lost its lock lands nothing

def test_a_writer_whose_lease_ran_out_cannot_land_its_bytes_after_another_took_the_key(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    key = b"/fenced"
    volumes = placement(c, key)
    path = key2path(key)
    index, client = index_of(c), Volumes()
    stalled = threading.Event()
    go_on = threading.Event()

    def slow_body():       # a writer paused (SIGSTOP, a stalled worker) in the middle of its value
        yield b"stale " * 1000
        stalled.set()
        go_on.wait(TIMEOUT)
        yield b"end"
    index.start_put(key, volumes, "paused-writer", lease=0.5, tmp="paused")
    result = {}

    def paused_writer():
        try:
            put(client, volumes, path, slow_body(), tmp="paused",
                       fence=lambda md5, size: index.renew(key, "paused-writer", 0.5) or
                       (_ for _ in ()).throw(KeyBusy("lost the lock")))
            result["landed"] = True
        except KeyBusy:
            result["landed"] = False
    t = threading.Thread(target=paused_writer)
    t.start()
    assert stalled.wait(TIMEOUT)
    time.sleep(0.6)                                        # its lease runs out; another writer takes the key
    claim = index.start_put(key, volumes, "next-writer", tmp="next")
    md5, size = put(client, volumes, path, [b"the new value"], tmp="next",
                           fence=lambda md5, size: index.renew(key, "next-writer"))
    assert index.finish_put(key, "next-writer", md5, size)
    assert claim.old.lock_owner == "paused-writer"
    go_on.set()                                            # the paused writer wakes up and goes on
    t.join(TIMEOUT)
    assert result == {"landed": False}
    for v in volumes:
        with open(c.file_of(v, key), "rb") as f:
            assert f.read() == b"the new value"


def test_a_move_onto_a_path_that_holds_a_file_replaces_it_only_by_the_lock_holder(private_cluster):
    # Overwrite: F: a late MOVE fails on the holder's file; the holder removes a foreign file first
    c = private_cluster(n_volumes=1, replicas=1, subvolumes=1)
    volume = c.volume_names()[0]
    key, path = b"/moved", key2path(b"/moved")
    client = Volumes()
    c.plant(volume, key, b"a stray file")
    put(client, [volume], path, [b"the value"], tmp="holder")
    with open(c.file_of(volume, key), "rb") as f:
        assert f.read() == b"the value"


# ---------------------------------------------------------------- writes whose outcome is unknown

def test_a_put_that_a_volume_froze_under_is_503_quickly_and_never_comes_back(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, workers=1)
    http = Http()
    assert http.put(c.url(key + "-warm"), data=b"v").status_code == 201   # the volume answered just now
    frozen = c.volumes[1]
    frozen.pause()
    try:
        r = http.put(c.url(key), data=b"a value" * 1000, timeout=15)
        assert r.status_code == 503, r.text
    finally:
        frozen.resume()
    time.sleep(1)                              # whatever the volume had queued is done now
    assert http.get(c.url(key)).status_code == 404
    p = run_tool("rebuild.py", c.volume_names(), c.db(), replicas=2, subvolumes=1)
    assert index_of(c).get(key.encode()) is None, p.stdout + p.stderr
    for v in placement(c, key.encode()):
        assert not os.path.exists(c.file_of(v, key.encode()))


class FrozenBeforeMove(Store):
    """The master's Store, with one volume frozen (SIGSTOP) between the end of
    the uploads and their MOVEs: the MOVE is queued in the frozen volume,
    which wakes once the MOVE has timed out (the volume is down, to this
    store) and before its deadline, until the MOVE has landed, then freezes
    again: the MOVE lands, its answer comes too late, and the volume cannot
    be asked to remove the copy."""

    def __init__(self, settings, server, landed):
        super().__init__(settings)
        self.server, self.landed = server, landed
        self.wake = None

    def fence(self, key, owner, lease, doing="writing it", fresh_ok=True):
        super().fence(key, owner, lease, doing, fresh_ok)
        if self.wake is None:
            self.server.pause()
            self.wake = threading.Thread(target=self.blink)
            self.wake.start()

    def blink(self):
        host = f"127.0.0.1:{self.server.port}"
        wait_until(lambda: self.volumes.health.down(host), 2 * OP_TIMEOUT, "the MOVE to time out", every=0.005)
        self.server.resume()
        try:
            wait_until(self.landed, OP_TIMEOUT, "the late MOVE", every=0.005)
        finally:
            self.server.pause()


def test_a_move_whose_answer_never_came_is_noted_never_added_and_removed_by_rebalance(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    names = c.volume_names()
    settings = Settings.from_env(volumes=names, db=c.db(), replicas=2, subvolumes=1, voltimeout=0.5)
    key = b"/unknown-move"
    frozen_volume = next(v for v in placement(c, key) if v.startswith(names[1]))
    store = FrozenBeforeMove(settings, c.volumes[1], lambda: os.path.exists(c.file_of(frozen_volume, key)))
    try:
        with pytest.raises(VolumeDown):
            store.put(key, [b"a value whose MOVE hangs"])
    finally:
        if store.wake is not None:
            store.wake.join()
        c.volumes[1].resume()
    # the queued MOVE landed while the volume ran: a file no record vouches for
    wait_until(lambda: os.path.exists(c.file_of(frozen_volume, key)), 10, "the late MOVE")
    index = index_of(c)
    assert index.get(key) is None and frozen_volume in index.notes(key)
    p = run_tool("rebuild.py", names, c.db(), replicas=2, subvolumes=1)
    assert index.get(key) is None, p.stdout + p.stderr      # a noted copy is never added
    p = run_tool("rebalance.py", names, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not os.path.exists(c.file_of(frozen_volume, key)) and index.notes(key) == {}


def test_a_master_killed_mid_put_over_an_unlinked_key_leaves_its_old_copies_noted(private_cluster):
    c = private_cluster(n_volumes=3, replicas=1, subvolumes=1, workers=1)
    names = c.volume_names()
    key = next(f"/unlinked/{i}" for i in range(100)
               if placement(c, f"/unlinked/{i}".encode(), names[:2], 1) != placement(c, f"/unlinked/{i}".encode(),
                                                                                       names[1:], 1))
    old_home = placement(c, key.encode(), names[:2], 1)[0]
    c.restart_master(volumes=names[:2], replicas=1, subvolumes=1)
    http = Http()
    assert http.put(c.url(key), data=b"the unlinked value").status_code == 201
    assert http.request("UNLINK", c.url(key)).status_code == 204
    c.restart_master(volumes=names[1:], replicas=1, subvolumes=1)   # the volumes changed since
    started = threading.Event()

    def slow():
        yield b"x" * 1000
        started.set()
        time.sleep(TIMEOUT)
    t = threading.Thread(target=lambda: _quiet_put(c.url(key), slow()), daemon=True)
    t.start()
    assert started.wait(TIMEOUT)
    wait_until(lambda: index_of(c).get(key.encode()).state == WRITING, 10, "the PUT's claim")
    c.master.kill()                                               # mid-PUT, no cleanup
    assert old_home in index_of(c).notes(key.encode())
    p = run_tool("rebalance.py", names[1:], c.db(), replicas=1, subvolumes=1)
    assert not os.path.exists(c.file_of(old_home, key.encode())), p.stdout + p.stderr
    p = run_tool("rebuild.py", names, c.db(), replicas=1, subvolumes=1)
    assert index_of(c).get(key.encode()) is None or index_of(c).get(key.encode()).state != LIVE


def _quiet_put(url, body):
    try:
        requests.put(url, data=body, timeout=TIMEOUT)
    except requests.RequestException:
        pass


# ---------------------------------------------------------------- the tools' exit status and the PUT's claim

def test_a_rerun_takes_over_the_locks_of_a_killed_rebalance_whose_process_is_a_zombie(private_cluster):
    c = private_cluster(n_volumes=3, replicas=1, subvolumes=1)
    names = c.volume_names()
    c.restart_master(volumes=names[:2], replicas=1, subvolumes=1)
    http = Http()
    key = next(f"/zombie/{i}" for i in range(100)
               if placement(c, f"/zombie/{i}".encode(), names[:2], 1) != placement(c, f"/zombie/{i}".encode(), names, 1))
    assert http.put(c.url(key), data=b"v").status_code == 201
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    wait_until(lambda: open(f"/proc/{dead.pid}/stat").read().split(")")[-1].split()[0] == "Z", 5, "a zombie")
    try:                                    # not reaped: kill(pid, 0) still succeeds
        assert index_of(c).lock(key.encode(), f"{socket.gethostname()}:{dead.pid}:rebalance-x") is not None
        p = run_tool("rebalance.py", names, c.db(), replicas=1, subvolumes=1)
        assert p.returncode == 0 and summary(p.stdout, "rebalance")["moved"] == 1, p.stdout + p.stderr
        assert index_of(c).get(key.encode()).volumes == placement(c, key.encode(), names, 1)
    finally:
        dead.wait()


def test_a_slow_upload_holds_its_key_from_the_first_byte(cluster, http, key):
    started = threading.Event()
    release = threading.Event()

    def slow():
        yield b"x" * 10_000                 # far less than a chunk: the master is still reading
        started.set()
        release.wait(TIMEOUT)
        yield b"y"
    t = threading.Thread(target=lambda: _quiet_put(cluster.url(key), slow()), daemon=True)
    t.start()
    try:
        assert started.wait(TIMEOUT)
        wait_until(lambda: index_of(cluster).get(key.encode()) is not None, 10, "the claim")
        assert http.put(cluster.url(key), data=b"second").status_code == 409
    finally:
        release.set()
        t.join(TIMEOUT)
    assert http.get(cluster.url(key), follow=True).content == b"x" * 10_000 + b"y"


def test_a_delete_right_after_a_volume_returns_succeeds(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5, workers=1)
    http = Http()
    assert http.put(c.url(key), data=b"v").status_code == 201
    c.volumes[1].kill()
    assert http.delete(c.url(key)).status_code == 500
    c.volumes[1].start()
    assert http.delete(c.url(key)).status_code == 204      # within DOWN_RETRY of its failure


def test_a_delete_with_a_frozen_volume_fails_within_seconds(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, workers=1)
    http = Http()
    assert http.put(c.url(key), data=b"v").status_code == 201
    c.volumes[1].pause()
    try:
        r = http.delete(c.url(key), timeout=15)          # not TRANSFER_TIMEOUT (30 s)
        assert r.status_code == 500 and c.volume_names()[1] in r.text
    finally:
        c.volumes[1].resume()
    assert http.delete(c.url(key)).status_code == 204


def test_the_lock_clock_is_not_the_wall_clock():
    # leases are compared on CLOCK_BOOTTIME: stepping the wall clock moves no lease
    assert abs(lock_clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1
    assert abs(lock_clock() - time.time()) > 3600


def test_an_index_from_an_earlier_boot_drops_its_locks(tmp_path):
    path = str(tmp_path / "i.sqlite3")
    index = Index(path)
    index.start_put(b"/k", ["v:1"], "someone")
    index.db.connection.execute("UPDATE meta SET value = 'another boot' WHERE name = 'boot_id'")
    index.close()
    assert Index(path).get(b"/k").lock_owner is None


def test_rebalance_waits_for_its_own_delete_of_a_noted_copy_instead_of_calling_the_key_busy(private_cluster):
    """A key whose record left a wrong copy (noted long ago, so due at once)
    needs that volume's copy rewritten: rebalance's deleter holds the key
    while its (slow) DELETE runs, and the main pass must wait for it, not
    report its own lock as another request's and exit 1."""
    from test_late_requests import behind_proxy
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    proxy, names = behind_proxy(c, 1)
    http = Http()
    for i in range(20):   # keys scanned first: the deleter takes the key before the main pass
        assert http.put(c.url(f"/a/{i}"), data=b"x").status_code == 201
    key = "/check/own"
    assert http.put(c.url(key), data=b"the value").status_code == 201
    c.plant(proxy.name, key.encode(), b"an older, longer value")
    assert run_tool("rebuild.py", names, c.db(), replicas=2, subvolumes=1).returncode == 0
    index = index_of(c)
    assert proxy.name not in index.get(key.encode()).volumes
    with index.db.write() as db:   # noted a minute ago: due at once
        db.execute("UPDATE pending_deletes SET since = since - 60")
    proxy.hold(rb"^DELETE ", 2.0)
    p = run_tool("rebalance.py", names, c.db(), replicas=2, subvolumes=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert set(recorded_copies(c, key.encode()).values()) == {b"the value"}
    assert len(index_of(c).get(key.encode()).volumes) == 2
