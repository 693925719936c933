"""rebalance.py's batches (movebatch.py): plain moves go several keys at a
time, their requests pipelined per volume and their index writes shared;
the one-key path's rules hold for each key of a batch. Real nginx volumes,
a real index; the batch path is driven directly where a test must change
the index between the read of a record and its lock."""
import hashlib
import os
import subprocess
import sys

import pytest

from mkvlib import pipelined
from mkvlib.index import Index
from mkvlib.placement import key2path, key2volume
from mkvlib.settings import Settings
from mkvlib.upload import put_whole_many
from mkvlib.volumes import Volumes
from cleanup import Deleters
from movebatch import Batches
from rebalance import Rebalance
import tools
from conftest import ROOT, Cluster

REPLICAS, SUBVOLUMES = 2, 10


@pytest.fixture
def four(tmp_path):
    """4 volumes; the master (not used) over the first 3."""
    c = Cluster(str(tmp_path / "c"), n_volumes=4, replicas=REPLICAS)
    yield c
    c.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Volumes for the tests of one call each (their keys their own)."""
    c = Cluster(str(tmp_path_factory.mktemp("batches")), n_volumes=3, replicas=REPLICAS)
    yield c
    c.kill()


def plant(c, names, n, prefix):
    """n keys planted on their placement over `names`, and recorded live: {key: value}."""
    index = Index(c.db())
    data = {}
    for i in range(n):
        key = f"/{prefix}/{i}".encode()
        value = os.urandom(1000 + 997 * i)
        for v in key2volume(key, names, REPLICAS, SUBVOLUMES):
            c.plant(v, key, value)
        data[key] = value
    index.insert_live([(k, key2volume(k, names, REPLICAS, SUBVOLUMES), hashlib.md5(v).hexdigest(), len(v))
                       for k, v in data.items()])
    index.close()
    return data


def job_over(c, names):
    """A Rebalance over `names` as rebalance.py makes it, its deleters running."""
    settings = Settings.from_env(volumes=",".join(names), db=c.db(), replicas=str(REPLICAS),
                                 subvolumes=str(SUBVOLUMES))
    index = Index(c.db())
    job = Rebalance(settings, index, tools.open_volumes(settings, 4),
                    tools.Progress("rebalance", stream=open(os.devnull, "w"), every=0, tty=False))
    job.identify()
    job.deletes = Deleters(job, 1)
    return job


def on_placement(c, names, key):
    """{volume: its file's bytes or None} over the key's placement on `names`."""
    found = {}
    for v in key2volume(key, names, REPLICAS, SUBVOLUMES):
        try:
            with open(c.file_of(v, key), "rb") as f:
                found[v] = f.read()
        except FileNotFoundError:
            found[v] = None
    return found


def test_a_key_written_anew_after_its_batch_read_it_is_moved_with_its_new_value(four):
    names = four.volume_names()
    data = plant(four, names[:3], 12, "anew")
    job = job_over(four, names)
    records = list(job.index.scan())
    moving = [r for r in records if r.volumes != job.placement(r.key)]
    key = moving[0].key
    # written anew meanwhile (as a DELETE and a PUT would leave it): new bytes, new md5
    new = os.urandom(5000)
    for v in moving[0].volumes:
        four.plant(v, key, new)
    job.index.db.connection.execute("UPDATE keys SET md5 = ?, size = ? WHERE key = ?",
                                    (hashlib.md5(new).hexdigest(), len(new), key))
    Batches(job).look(records)
    job.deletes.finish()
    assert job.progress.counts.get("failed", 0) == 0, job.progress.counts
    assert set(on_placement(four, names, key).values()) == {new}
    for k in data:
        if k != key:
            assert set(on_placement(four, names, k).values()) == {data[k]}, k
    assert job.index.get(key).volumes == job.placement(key)
    assert job.index.all_notes() == []


def test_a_batch_whose_source_copy_vanished_copies_from_another_and_puts_it_back(four):
    names = four.volume_names()
    data = plant(four, names[:3], 12, "vanished")
    index = Index(four.db())
    placement = {k: key2volume(k, names, REPLICAS, SUBVOLUMES) for k in data}
    # a key that moves and keeps a copy: the batch reads that kept copy without asking first
    key = next(k for k in data if set(index.get(k).volumes) & set(placement[k])
               and index.get(k).volumes != placement[k])
    source = next(v for v in index.get(key).volumes if v in placement[key])
    os.remove(four.file_of(source, key))
    env = dict(os.environ, MKV_VOLUMES=",".join(names), MKV_DB=four.db(), MKV_REPLICAS=str(REPLICAS),
               MKV_SUBVOLUMES=str(SUBVOLUMES))
    p = subprocess.run([sys.executable, "rebalance.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert " 1 repaired," in p.stdout and " 0 failed," in p.stdout, p.stdout
    for k, value in data.items():
        assert set(on_placement(four, names, k).values()) == {value}, k


def test_pipelined_heads_say_of_each_file_whether_it_is_there_in_order(shared):
    volume = shared.volume_names()[0] + "/sv01"
    there = [b"/heads/%d" % i for i in range(0, 40, 2)]
    for k in there:
        shared.plant(volume, k, b"x")
    asked = [(volume, key2path(b"/heads/%d" % i)) for i in range(40)]
    assert pipelined.has_many(Volumes(), asked) == [i % 2 == 0 for i in range(40)]


def test_uploads_and_moves_of_many_paths_pipelined_land_each_value_replace_a_stray_and_skip_a_refused_one(shared):
    volume = shared.volume_names()[1] + "/sv02"
    keys = [b"/many/%d" % i for i in range(6)]
    shared.plant(volume, keys[2], b"a stray")      # its MOVE meets a file: deleted, moved again

    def refuse(md5, size):
        raise RuntimeError("not this one")
    items = [([volume], key2path(k), b"value %d" % i, None, refuse if i == 4 else None) for i, k in enumerate(keys)]
    results = put_whole_many(Volumes(), items)
    assert isinstance(results[4], RuntimeError) and results[4].outcomes == {}
    for i, k in enumerate(keys):
        path = shared.file_of(volume, k)
        if i == 4:
            assert not os.path.exists(path)
        else:
            assert results[i][1] == len(b"value %d" % i)
            with open(path, "rb") as f:
                assert f.read() == b"value %d" % i


def test_pipelined_deletes_remove_each_file_and_take_a_missing_one_as_gone(shared):
    volume = shared.volume_names()[2] + "/sv03"
    keys = [b"/gone/%d" % i for i in range(30)]
    for k in keys[::3]:
        shared.plant(volume, k, b"old copy")
    fenced = []
    results = pipelined.delete_many(Volumes(), [(volume, key2path(k)) for k in keys], fence=lambda: fenced.append(1))
    assert results == [None] * 30 and fenced == [1]
    assert not any(os.path.exists(shared.file_of(volume, k)) for k in keys)


def test_rebalance_starts_without_importing_gevent():
    p = subprocess.run([sys.executable, "-c", "import sys, rebalance; print('gevent' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stdout + p.stderr
