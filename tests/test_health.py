"""One view of volume health: every worker of a master, every operation."""
import http.client
import os

import psutil

from mkvlib.health import Health, Table


def test_an_answer_in_one_process_ends_the_down_time_in_every_other(tmp_path):
    table = str(tmp_path)
    a, b = Health(table=Table(table)), Health(table=Table(table))
    a.failed("v:1", "refused")
    b.failed("v:1", "refused")
    assert a.down("v:1") and b.down("v:1") and not b.may_ask("v:1")
    a.answered("v:1")                     # a DELETE that worker a sent got its answer
    assert not b.down("v:1") and b.may_ask("v:1")


def test_a_failure_in_one_process_is_seen_by_every_other(tmp_path):
    a, b = Health(table=Table(str(tmp_path))), Health(table=Table(str(tmp_path)))
    b.heard("v:1")
    assert b.may_read("v:1")
    a.failed("v:1", "refused")
    assert not b.may_read("v:1") and not b.may_ask("v:1")


def connection_per_worker(c):
    """One kept-alive connection to each of the master's workers: new ones
    until each worker holds one (the kernel picks who accepts)."""
    workers = [p.pid for p in psutil.Process(c.master.proc.pid).children()]
    held = {}
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", c.master.port, timeout=10)
        request(conn, "GET", "/no-such-key")
        port = conn.sock.getsockname()[1]
        pid = next(pid for pid in workers for s in psutil.Process(pid).net_connections("tcp")
                   if s.raddr and s.raddr.port == port)
        if pid in held:
            conn.close()
        held.setdefault(pid, conn)
        if len(held) == len(workers):
            return list(held.values())
    raise AssertionError("the kernel gave every connection to one worker")


def request(conn, method, path, body=None):
    conn.request(method, path, body=body)
    r = conn.getresponse()
    return r.status, r.read()


def test_after_a_volume_returns_a_put_in_another_worker_than_the_good_delete_is_taken(private_cluster):
    c = private_cluster(n_volumes=3, replicas=3, subvolumes=1, voltimeout=0.5, workers=2)
    one, other = connection_per_worker(c)
    assert request(one, "PUT", "/old", b"v")[0] == 201
    c.volumes[0].kill()
    assert request(one, "PUT", "/while-down-1", b"v")[0] == 503    # each worker marks it down
    assert request(other, "PUT", "/while-down-2", b"v")[0] == 503
    c.volumes[0].start()
    assert request(one, "DELETE", "/old")[0] == 204
    status, body = request(other, "PUT", "/after", b"v")          # no sleep between
    assert status == 201, body


def test_a_start_removes_the_run_folder_of_a_master_that_died_and_keeps_a_live_ones(tmp_path):
    from mkvlib import runfolder
    base = tmp_path / "shm"
    dead, live = base / "mkv-dead", base / "mkv-live"
    for folder, pid in ((dead, 2 ** 22 + 1), (live, os.getpid())):   # above pid_max: never a process
        folder.mkdir(parents=True)
        (folder / "pid").write_text(str(pid))
    being_made = base / "mkv-being-made"     # its master has not written its pid yet
    being_made.mkdir()
    (being_made / "pid").write_text("")
    runfolder.remove_dead(str(base))
    assert not dead.exists() and live.exists() and being_made.exists()


def test_a_probers_look_counts_once_in_the_volumes_requests(tmp_path):
    from conftest import start_volume
    from mkvlib import health
    from mkvlib.index import Index
    from mkvlib.prober import Prober
    from mkvlib.volumes import Volumes
    v = start_volume(str(tmp_path / "v"))
    host = f"127.0.0.1:{v.port}"
    try:
        volumes = Volumes(timeout=5)
        prober = Prober(Index(str(tmp_path / "i.sqlite3")), volumes, [host])
        health.take_counts(), health.take_latency()
        prober.look()
        assert health.take_counts() == {(host, True): 1}
        assert health.take_latency()[host][0] == 1
    finally:
        v.stop()
