"""The S3 gateway when a volume fails under an overwrite: the old value
stays whole and served, nothing is left unnoted. One cluster of its own
(a volume is stopped and started again)."""
import sqlite3

import pytest
from botocore.exceptions import ClientError

from mkvlib.objects import object_key
from mkvlib.settings import Settings
from conftest import wait_until
from s3util import boto3_client, cluster_with_gateway

BUCKET = "fail"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from cluster_with_gateway(str(tmp_path_factory.mktemp("s3f")), BUCKET, MKV_VOLTIMEOUT="0.5")


def key_on(gw, volume_index, prefix="k"):
    """A name whose placement includes the cluster's volume number `volume_index`."""
    c = gw.cluster
    host = c.volume_names()[volume_index]
    settings = Settings(volumes=tuple(c.volume_names()), db=c.db(), replicas=2)
    for i in range(1000):
        if any(v.startswith(host) for v in settings.placement(object_key(BUCKET, f"{prefix}{i}"))):
            return f"{prefix}{i}"
    raise AssertionError("no key placed there")


def put_ok(s3, name):
    try:
        s3.put_object(Bucket=BUCKET, Key=name, Body=b"x")
        return True
    except ClientError:
        return False


def test_concurrent_overwrites_all_succeed_and_one_value_stays(gw):
    # first in the module: the gateway skips a volume for DOWN_RETRY seconds after the next test
    import threading
    values = [bytes([97 + i]) * 5000 for i in range(6)]
    errors = []

    def writer(value):
        client = boto3_client(gw.url)
        for _ in range(4):
            try:
                client.put_object(Bucket=BUCKET, Key="contended", Body=value)
            except ClientError as e:
                errors.append(e.response["Error"]["Code"])
    threads = [threading.Thread(target=writer, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = boto3_client(gw.url).get_object(Bucket=BUCKET, Key="contended")
    body = got["Body"].read()
    assert body in values
    import hashlib
    assert got["ETag"] == '"%s"' % hashlib.md5(body).hexdigest()


def test_overwrite_with_a_volume_down_fails_and_keeps_the_old_value(gw):
    s3 = boto3_client(gw.url)
    name = key_on(gw, 0)
    s3.put_object(Bucket=BUCKET, Key=name, Body=b"old value")
    gw.cluster.volumes[0].stop()
    try:
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket=BUCKET, Key=name, Body=b"new value")
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert s3.get_object(Bucket=BUCKET, Key=name)["Body"].read() == b"old value"
    finally:
        gw.cluster.volumes[0].start()
    # the gateway takes writes to it again once it has heard from it (its prober, within seconds);
    # the next tests write there, so wait for a key that lands on it, through every worker
    after = key_on(gw, 0, prefix="after-")
    wait_until(lambda: all(put_ok(s3, after) for _ in range(6)), 15,
               "the gateway to write to the restarted volume", every=0.3)
    db = sqlite3.connect(gw.cluster.db())
    key = object_key(BUCKET, name)
    assert db.execute("SELECT lock_owner FROM keys WHERE key = ?", (key,)).fetchone() == (None,)
    assert db.execute("SELECT COUNT(*) FROM pending_deletes WHERE key = ?", (key,)).fetchone() == (0,)


def replace_cut_off(gw, key, new, commit):
    """Run mkvlib.replace's steps on `key` up to its first MOVE (and the
    commit, if `commit`), then stop as a killed worker would: no more
    requests, the lock given up (as it would expire)."""
    from mkvlib.lease import Lease, new_owner
    from mkvlib.objects import Objects, meta_row
    from mkvlib.replace import Replace
    from mkvlib.store import Store
    c = gw.cluster
    store = Store(Settings(volumes=tuple(c.volume_names()), db=c.db(), replicas=2))
    objects = Objects(store)
    owner = new_owner("s3rep-")
    rec = store.index.lock(key, owner)
    with Lease(store.index, key, owner) as lease:
        step = Replace(objects, key, owner, rec, lease)
        md5, size = step.upload([new], len(new), lambda md5, size: None)
        first, rest = step.targets[0], step.targets[1:]
        step._out_of_record(first)
        assert step.move(first) is None
        if commit:
            step._commit(first, md5, size, rest, meta_row(key, md5, size, None, {}))
    store.index.release(key, owner)
    return rec.volumes


@pytest.mark.parametrize("commit", [False, True], ids=["before-commit", "after-commit"])
def test_a_replace_cut_off_mid_swap_serves_one_value_and_rebalance_repairs_it(gw, commit):
    from test_tools import run_tool
    s3 = boto3_client(gw.url)
    name, old, new = f"cut-{commit}", b"old" * 1000, b"new" * 1000
    s3.put_object(Bucket=BUCKET, Key=name, Body=old)
    key = object_key(BUCKET, name)
    replace_cut_off(gw, key, new, commit)
    want = new if commit else old
    for _ in range(5):    # whichever replica a read picks
        assert s3.get_object(Bucket=BUCKET, Key=name)["Body"].read() == want
    c = gw.cluster
    p = run_tool("rebalance.py", c.volume_names(), c.db(), replicas=2)
    assert p.returncode == 0, p.stderr
    db = sqlite3.connect(c.db())
    volumes, = db.execute("SELECT volumes FROM keys WHERE key = ?", (key,)).fetchone()
    assert len(volumes.split(",")) == 2
    for v in volumes.split(","):
        with open(c.file_of(v, key), "rb") as f:
            assert f.read() == want
    assert db.execute("SELECT COUNT(*) FROM pending_deletes WHERE key = ?", (key,)).fetchone() == (0,)
