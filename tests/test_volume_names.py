"""A volume is its disk, whatever it is called: renaming volumes (the master
restarted with 127.0.0.1:P where it had localhost:P, the same servers) and
rebalancing loses nothing, and one disk named twice is refused."""
import os
import signal
import subprocess

from conftest import ROOT, TIMEOUT, Http, master_server
from test_tools import run_tool

KEYS = 150


def test_renamed_volumes_rebalanced_keep_every_replica_of_every_key(private_cluster):
    c = private_cluster(n_volumes=3, replicas=3)
    http = Http()
    values = {f"/rename/{i}": os.urandom(64) + b"%d" % i for i in range(KEYS)}
    for key, value in values.items():
        assert http.put(c.url(key), data=value).status_code == 201
    renamed = [f"localhost:{v.port}" for v in c.volumes]
    c.restart_master(volumes=renamed)
    p = run_tool("rebalance.py", renamed, c.db())
    assert p.returncode == 0, p.stdout + p.stderr
    for key, value in values.items():
        r = http.get(c.url(key))
        assert r.status_code == 302, (key, r.text)
        replicas = r.headers["Key-Volumes"].split(",")
        assert len(replicas) == 3 and all(v.startswith("localhost:") for v in replicas)
        for volume in replicas:
            with open(c.file_of(volume, key.encode()), "rb") as f:
                assert f.read() == value, (key, volume)
    p = run_tool("rebuild.py", renamed, c.db(), "--check")
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_second_rebalance_after_a_rename_moves_nothing(private_cluster):
    c = private_cluster(n_volumes=3, replicas=3)
    http = Http()
    for i in range(20):
        assert http.put(c.url(f"/rename2/{i}"), data=b"v%d" % i).status_code == 201
    renamed = [f"localhost:{v.port}" for v in c.volumes]
    c.restart_master(volumes=renamed)
    assert run_tool("rebalance.py", renamed, c.db()).returncode == 0
    p = run_tool("rebalance.py", renamed, c.db())
    assert p.returncode == 0 and " 0 moved" in p.stdout, p.stdout


def test_a_master_given_one_disk_under_two_names_does_not_start(private_cluster):
    c = private_cluster(n_volumes=2, replicas=1)
    port = c.volumes[0].port
    twice = [f"127.0.0.1:{port}", f"localhost:{port}"]
    c.master.stop()
    server = master_server(c.workdir, twice, workers=1, replicas=1)
    p = subprocess.Popen(server.argv, env=server.env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)     # it started: the arbiter and its workers
        p.communicate()
        raise AssertionError("the master started with one disk named twice") from None
    assert p.returncode == 1
    assert f"MKV_VOLUMES names one disk twice: 127.0.0.1:{port} and localhost:{port}" in err


def test_rebalance_given_one_disk_under_two_names_exits_2(private_cluster):
    c = private_cluster(n_volumes=2, replicas=1)
    port = c.volumes[0].port
    twice = [f"127.0.0.1:{port}", f"localhost:{port}"]
    p = run_tool("rebalance.py", twice, c.db(), replicas=1)
    assert p.returncode == 2 and "names one disk twice" in p.stderr, p.stderr
