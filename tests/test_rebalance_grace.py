"""rebalance.py's grace before it removes the copies a switch dropped: kept
while another process (a master) has the index open, since a redirect it
handed out just before the switch may still be on its way; not waited when
no other process has the index open (mkvlib.openers)."""
import os
import subprocess
import sys

from mkvlib.index import Index
from mkvlib.openers import others_have_open
from mkvlib.placement import key2volume
from conftest import ROOT, Http, wait_until

# GRACE set so long that a run that waits it cannot finish within the test's timeout
SLOW_GRACE = 600


def rebalance_with_grace(c, volumes, grace, replicas=1, subvolumes=1):
    """rebalance.py over `volumes` with its GRACE set to `grace` seconds, started."""
    env = dict(os.environ, MKV_VOLUMES=",".join(volumes), MKV_DB=c.db(),
               MKV_REPLICAS=str(replicas), MKV_SUBVOLUMES=str(subvolumes))
    code = f"import sys, rebalance; rebalance.GRACE = {grace}; sys.exit(rebalance.main())"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def moving_keys(c, old, new, n=40):
    """Keys PUT through the master over `old` whose one replica moves to another volume of `new`:
    {key: its volume under `old`}."""
    http = Http()
    keys = {}
    for i in range(n):
        key = f"/grace/{i}"
        before, after = key2volume(key.encode(), old, 1, 1)[0], key2volume(key.encode(), new, 1, 1)[0]
        if before != after:
            assert http.put(c.url(key), data=b"value of " + key.encode()).status_code == 201
            keys[key] = before
    assert len(keys) > 5
    return keys


def test_another_process_with_the_index_open_is_seen_and_this_ones_own_connection_is_not(tmp_path):
    db = str(tmp_path / "index.sqlite3")
    index = Index(db)
    assert not others_have_open(db)
    opener = subprocess.Popen([sys.executable, "-c", "import sys; from mkvlib.index import Index; "
                               f"Index({db!r}).count(); print('open', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert opener.stdout.readline() == "open\n"
        assert others_have_open(db)
    finally:
        opener.communicate("", timeout=30)
    assert not others_have_open(db)
    index.close()


def test_a_rebalance_alone_on_the_index_removes_the_old_copies_without_waiting_the_grace(private_cluster):
    c = private_cluster(n_volumes=3, replicas=1, subvolumes=1)
    names = c.volume_names()
    c.restart_master(volumes=names[:2], replicas=1, subvolumes=1)
    keys = moving_keys(c, names[:2], names)
    c.master.stop()                       # no one else has the index open
    p = rebalance_with_grace(c, names, SLOW_GRACE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    for key, old in keys.items():
        assert not os.path.exists(c.file_of(old, key.encode())), key
    assert Index(c.db()).all_notes() == []


def test_a_rebalance_keeps_the_old_copies_for_the_grace_while_the_master_has_the_index_open(private_cluster):
    c = private_cluster(n_volumes=3, replicas=1, subvolumes=1)
    names = c.volume_names()
    c.restart_master(volumes=names[:2], replicas=1, subvolumes=1)
    keys = moving_keys(c, names[:2], names)
    index = Index(c.db())
    p = rebalance_with_grace(c, names, SLOW_GRACE)
    try:
        wait_until(lambda: all(index.get(k.encode()).volumes != [old] for k, old in keys.items()),
                   60, "every key switched")
        # switched, and within the grace: a redirect handed out just before still finds its file
        for key, old in keys.items():
            with open(c.file_of(old, key.encode()), "rb") as f:
                assert f.read() == b"value of " + key.encode(), key
        assert p.poll() is None, "the run ended without waiting the grace"
    finally:
        p.kill()
        p.communicate()
