"""What the master does when volumes, workers or clients fail: real servers, real faults."""
import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

from mkvlib.health import DOWN_RETRY, PROBE_FRESH
from mkvlib.index import DELETING, Index
from mkvlib.lease import new_owner
from mkvlib.placement import key2path, key2volume
from mkvlib.prober import PROBE_EVERY
from conftest import ROOT, Http, wait_until


def placement(cluster, key, replicas=3, subvolumes=10):
    return key2volume(key.encode(), cluster.volume_names(), replicas, subvolumes)


def file_of(cluster, key, volume):
    host, _, sub = volume.partition("/")
    i = cluster.volume_names().index(host)
    return os.path.join(cluster.volume_dirs[i], sub, key2path(key.encode()).lstrip("/"))


def index_of(cluster):
    return Index(os.path.join(cluster.workdir, "index.sqlite3"))


# ---------------------------------------------------------------- volumes down

def test_with_get_check_a_get_never_redirects_to_a_killed_volume(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1, voltimeout=0.5, get_check="on")
    http, keys, dead = put_keys_and_kill_a_volume(c)
    assert_reads_avoid(c, http, keys, dead)


def put_keys_and_kill_a_volume(c):
    """20 keys, each its own name as value, then the first volume SIGKILLed."""
    http = Http()
    keys = [f"/k{i}" for i in range(20)]
    for k in keys:
        assert http.put(c.url(k), data=k.encode()).status_code == 201
    c.volumes[0].kill()
    return http, keys, c.volume_names()[0]


def assert_reads_avoid(c, http, keys, dead):
    """Every key's GET redirects to another volume than `dead`, where its value is."""
    for k in keys:
        r = http.get(c.url(k))
        assert r.status_code == 302, r.text
        assert dead not in r.headers["Location"]
        assert requests.get(r.headers["Location"], timeout=10).content == k.encode()


def test_a_killed_volume_leaves_the_redirect_set_within_seconds(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1, voltimeout=0.5)
    http, keys, dead = put_keys_and_kill_a_volume(c)
    time.sleep(PROBE_FRESH + 0.5)     # no answer from it since: out of every worker's redirect set
    assert_reads_avoid(c, http, keys * 3, dead)


def test_a_frozen_volume_leaves_the_redirect_set_within_seconds(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5)
    http = Http()
    keys = [f"/f{i}" for i in range(10)]
    for k in keys:
        assert http.put(c.url(k), data=b"v").status_code == 201
    frozen = c.volume_names()[0]
    c.volumes[0].pause()
    try:
        time.sleep(PROBE_FRESH + 0.5)
        for k in keys * 3:
            r = http.get(c.url(k))
            assert r.status_code == 302 and frozen not in r.headers["Location"]
    finally:
        c.volumes[0].resume()


def test_a_wiped_volume_gets_no_reads_until_rebalance_has_filled_it(private_cluster):
    c = private_cluster(n_volumes=3, replicas=2, subvolumes=1, voltimeout=0.5)
    http = Http()
    keys = {f"/w{i}": b"value %d" % i for i in range(20)}
    for k, v in keys.items():
        assert http.put(c.url(k), data=v).status_code == 201
    wiped = c.volume_names()[0]
    c.volumes[0].stop()
    shutil.rmtree(c.volume_dirs[0])          # a new, empty disk in its place
    c.volumes[0].start()
    time.sleep(PROBE_EVERY * 2 + 0.5)  # every worker has looked at it since
    for k, v in list(keys.items()) * 3:
        r = http.get(c.url(k))
        assert r.status_code == 302 and wiped not in r.headers["Location"], k
    p = subprocess.run([sys.executable, "rebalance.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MKV_VOLUMES=",".join(c.volume_names()), MKV_DB=c.db(),
                                MKV_REPLICAS="2", MKV_SUBVOLUMES="1"))
    assert p.returncode == 0 and f"{wiped} is filled" in p.stderr, p.stdout + p.stderr
    on_wiped = [k for k in keys if any(v.startswith(wiped) for v in placement(c, k, 2, 1))]
    assert on_wiped
    for k in on_wiped:                       # the copies are back
        with open(file_of(c, k, next(v for v in placement(c, k, 2, 1) if v.startswith(wiped))), "rb") as f:
            assert f.read() == keys[k]
    wait_until(lambda: any(wiped in http.get(c.url(k)).headers["Location"] for k in on_wiped * 5),
               10, "reads to go to the filled volume again")


def test_with_get_check_a_hung_volume_costs_one_timeout_now_and_then_not_per_request(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5, workers=1, get_check="on")
    http = Http()
    keys = [f"/h{i}" for i in range(5)]
    for k in keys:
        http.put(c.url(k), data=b"v")
    hung = c.volume_names()[0]
    c.volumes[0].pause()
    try:
        for _ in range(10):
            for k in keys:
                r = http.get(c.url(k))
                assert r.status_code == 302 and hung not in r.headers["Location"]
    finally:
        c.volumes[0].resume()
    # 50 reads, half of which would have tried the hung volume first: the
    # master timed out on it only when it first saw it, and on retries
    # DOWN_RETRY seconds apart (the reads take far less than 3 retries' time)
    down_lines = [line for line in c.master.tail(200).splitlines() if f"volume {hung} is down" in line]
    assert 1 <= len(down_lines) <= 4, down_lines   # the prober's looks too, one per DOWN_RETRY


def hang_and_notice(c, http, key):
    """SIGSTOP the cluster's second volume and wait until the master has
    noticed (its prober, or a GET that asked the volume)."""
    hung = c.volume_names()[1]
    c.volumes[1].pause()
    wait_until(lambda: http.get(c.url(key)).status_code == 302 and (
        f"volume {hung} is down" in c.master.tail() or f"volume {hung} did not answer" in c.master.tail()),
        10, "the master to notice the hung volume")
    return hung


def test_a_put_to_a_hung_volume_due_for_a_retry_costs_one_voltimeout_not_a_transfer_timeout(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5, workers=1)
    http = Http()
    http.put(c.url(key), data=b"v")
    hung = hang_and_notice(c, http, key)
    try:
        time.sleep(DOWN_RETRY + 0.5)    # now due for a retry
        # the retry is a HEAD with MKV_VOLTIMEOUT, well inside this request's
        # 10 s timeout; streaming to the hung volume would wait TRANSFER_TIMEOUT (30 s)
        r = http.put(c.url(key + "-new"), data=b"v")
        assert r.status_code == 503 and hung in r.text
    finally:
        c.volumes[1].resume()


def test_a_put_to_a_hung_volume_never_seen_before_costs_one_voltimeout(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5, workers=1)
    hung = c.volume_names()[1]
    c.volumes[1].pause()      # before the master has said a word to it
    try:
        # probed with a HEAD (MKV_VOLTIMEOUT) before any byte is streamed: well
        # inside this request's 10 s timeout, where TRANSFER_TIMEOUT is 30 s
        r = Http().put(c.url(key), data=b"v")
        assert r.status_code == 503 and hung in r.text
    finally:
        c.volumes[1].resume()


def test_a_delete_with_a_volume_known_down_fails_at_once_and_a_retry_finishes_it(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5, workers=1)
    http = Http()
    http.put(c.url(key), data=b"v")
    hung = hang_and_notice(c, http, key)
    try:
        # known down: no 30 s wait on it, well inside this request's 10 s timeout
        r = http.delete(c.url(key))
        assert r.status_code == 500 and f"{hung} is down" in r.text
        assert http.get(c.url(key)).status_code == 404
    finally:
        c.volumes[1].resume()
    time.sleep(DOWN_RETRY + 0.5)
    assert http.delete(c.url(key)).status_code == 204
    for v in placement(c, key, 2, 1):
        assert not os.path.exists(file_of(c, key, v))


def test_get_is_503_when_no_replica_can_be_reached(private_cluster, key):
    c = private_cluster(n_volumes=1, replicas=1, subvolumes=1, voltimeout=0.5)
    http = Http()
    http.put(c.url(key), data=b"v")
    c.volumes[0].kill()
    wait_until(lambda: http.get(c.url(key)).status_code == 503, PROBE_FRESH + 5, "a 503")
    assert http.get(c.url(key)).text.strip()


def test_with_get_check_a_get_skips_a_replica_whose_file_is_gone(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, get_check="on")
    http = Http()
    http.put(c.url(key), data=b"v")
    lost = placement(c, key, 2, 1)[0]
    os.remove(file_of(c, key, lost))
    for _ in range(10):
        r = http.get(c.url(key))
        assert r.status_code == 302 and not r.headers["Location"].startswith(f"http://{lost}/")


def test_put_with_a_volume_down_fails_and_leaves_nothing(private_cluster, key):
    c = private_cluster(n_volumes=3, replicas=3, subvolumes=1, voltimeout=0.5)
    http = Http()
    c.volumes[1].kill()
    r = http.put(c.url(key), data=os.urandom(3_000_000))
    assert r.status_code == 503 and c.volume_names()[1] in r.text
    assert http.get(c.url(key)).status_code == 404
    assert index_of(c).get(key.encode()) is None
    for v in placement(c, key, 3, 1):
        assert not os.path.exists(file_of(c, key, v))
    # known down now: the next PUT is refused at once with the same reason
    r = http.put(c.url(key), data=b"v")
    assert r.status_code == 503 and "down" in r.text


def test_put_succeeds_again_once_the_volume_is_back(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5)
    http = Http()
    c.volumes[0].kill()
    assert http.put(c.url(key), data=b"v").status_code == 503
    c.volumes[0].start()
    wait_until(lambda: http.put(c.url(key), data=b"v").status_code == 201, 15,
               "a PUT to succeed after the volume came back")
    assert http.get(c.url(key), follow=True).content == b"v"


def test_put_that_a_volume_refuses_is_an_error_and_removes_the_other_replicas(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    http = Http()
    refusing = placement(c, key, 2, 1)[1]
    # a plain file where the volume needs a folder: nginx answers the PUT with an error
    target = file_of(c, key, refusing)
    os.makedirs(os.path.dirname(os.path.dirname(target)), exist_ok=True)
    open(os.path.dirname(target), "w").close()
    r = http.put(c.url(key), data=b"value")
    assert r.status_code == 502 and refusing in r.text
    assert http.get(c.url(key)).status_code == 404
    assert index_of(c).get(key.encode()) is None
    assert not os.path.exists(file_of(c, key, placement(c, key, 2, 1)[0]))


def test_delete_with_a_volume_down_is_500_and_a_retry_finishes_it(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5)
    http = Http()
    http.put(c.url(key), data=b"v")
    c.volumes[1].kill()
    r = http.delete(c.url(key))
    assert r.status_code == 500 and c.volume_names()[1] in r.text
    assert http.get(c.url(key)).status_code == 404          # invisible at once
    assert index_of(c).get(key.encode()).state == DELETING
    c.volumes[1].start()
    wait_until(lambda: http.delete(c.url(key)).status_code == 204, 15, "the retried DELETE")
    assert index_of(c).get(key.encode()) is None
    for v in placement(c, key, 2, 1):
        assert not os.path.exists(file_of(c, key, v))


# ---------------------------------------------------------------- locks

def test_a_lock_held_by_a_tool_makes_delete_409(cluster, http, key):
    http.put(cluster.url(key), data=b"v")
    index = index_of(cluster)
    owner = new_owner("test-")
    assert index.lock(key.encode(), owner) is not None
    r = http.delete(cluster.url(key))
    assert r.status_code == 409 and r.text.strip()
    index.release(key.encode(), owner)
    assert http.delete(cluster.url(key)).status_code == 204


def test_a_lock_left_by_a_killed_process_expires_by_itself(cluster, http, key):
    http.put(cluster.url(key), data=b"v")
    index = index_of(cluster)
    index.lock(key.encode(), "a-process-that-died", lease=1.0)   # never released
    assert http.delete(cluster.url(key)).status_code == 409
    wait_until(lambda: http.delete(cluster.url(key)).status_code == 204, 10, "the lock to expire")


def test_a_put_killed_mid_value_leaves_the_key_writable_after_the_lease(private_cluster, key):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1)
    index = index_of(c)
    # a PUT whose worker died: the record it left, with a lock that has run out
    index.start_put(key.encode(), placement(c, key, 2, 1), "dead-worker", lease=0.5)
    http = Http()
    assert http.put(c.url(key), data=b"v").status_code == 409
    wait_until(lambda: http.put(c.url(key), data=b"v").status_code == 201, 10, "the dead PUT's lock to expire")
    assert http.get(c.url(key), follow=True).content == b"v"


# ---------------------------------------------------------------- crashes and big values

def test_nothing_answered_201_is_lost_when_the_master_is_sigkilled(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, workers=2)
    http = Http()
    values = {f"/crash{i}": os.urandom(1000 + i) for i in range(30)}
    for k, v in values.items():
        assert http.put(c.url(k), data=v).status_code == 201
    c.master.kill()    # arbiter and workers, SIGKILL, no cleanup
    c.master.start()
    for k, v in values.items():
        r = http.get(c.url(k), follow=True)
        assert r.status_code == 200 and r.content == v


def test_a_worker_sigkilled_mid_put_loses_nothing_else(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, workers=2)
    http = Http()
    for i in range(10):
        http.put(c.url(f"/before{i}"), data=b"v%d" % i)
    workers = c.master.pids()[1:]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    # gunicorn starts new workers; every earlier key is still there
    wait_until(lambda: _answers(c), 20, "new workers")
    for i in range(10):
        assert http.get(c.url(f"/before{i}"), follow=True).content == b"v%d" % i


def _answers(c):
    try:
        return requests.get(c.url("/before0"), timeout=2, allow_redirects=False).status_code == 302
    except requests.RequestException:
        return False


class RandomBody:
    """size bytes of random data, read in pieces, never all in memory; md5 of what was read."""

    def __init__(self, size):
        self.size, self.left, self.md5 = size, size, hashlib.md5()

    def __len__(self):
        return self.size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = os.urandom(n)
        self.left -= n
        self.md5.update(data)
        return data


def peak_rss(pid):
    """The most resident memory the process ever had (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_256_mb_value_streams_through_the_master_in_bounded_memory(cluster, http, key):
    size = 256 << 20
    workers = cluster.master.pids()[1:]
    before = {pid: peak_rss(pid) for pid in workers}
    body = RandomBody(size)
    r = http.put(cluster.url(key), data=body, timeout=300)
    assert r.status_code == 201, r.text
    grown = max(peak_rss(pid) - before[pid] for pid in workers)
    assert grown < 64 << 20, f"a worker's peak memory grew by {grown >> 20} MB for a 256 MB value"
    assert r.headers["Content-Md5"] == body.md5.hexdigest()
    got = hashlib.md5()
    with http.get(cluster.url(key), follow=True, stream=True, timeout=300) as r:
        for chunk in r.iter_content(1 << 20):
            got.update(chunk)
    assert got.hexdigest() == body.md5.hexdigest()
    http.delete(cluster.url(key))


def test_a_restarted_volume_is_not_taken_for_down_on_the_next_get(private_cluster, key):
    # the master keeps sockets to volumes alive; a volume restart closes them
    c = private_cluster(n_volumes=1, replicas=1, subvolumes=1, workers=1)
    http = Http()
    http.put(c.url(key), data=b"v")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:   # several sockets at once
        codes = list(pool.map(lambda _: requests.get(c.url(key), allow_redirects=False, timeout=10).status_code,
                              range(64)))
    assert set(codes) == {302}
    c.volumes[0].restart()
    for _ in range(5):
        assert http.get(c.url(key)).status_code == 302
    assert "is down" not in c.master.tail(200)
