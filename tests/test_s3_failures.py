"""The S3 gateway when a volume fails under an overwrite: the old value
stays whole and served, nothing is left unnoted. One cluster of its own
(a volume is stopped and started again)."""
import sqlite3

import pytest
from botocore.exceptions import ClientError

from mkvlib.objects import object_key
from mkvlib.settings import Settings
from s3util import boto3_client, cluster_with_gateway

BUCKET = "fail"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from cluster_with_gateway(str(tmp_path_factory.mktemp("s3f")), BUCKET, MKV_VOLTIMEOUT="0.5")


def key_on(gw, volume_index):
    """A name whose placement includes the cluster's volume number `volume_index`."""
    c = gw.cluster
    host = c.volume_names()[volume_index]
    settings = Settings(volumes=tuple(c.volume_names()), db=c.db(), replicas=2)
    for i in range(1000):
        if any(v.startswith(host) for v in settings.placement(object_key(BUCKET, f"k{i}"))):
            return f"k{i}"
    raise AssertionError("no key placed there")


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
    db = sqlite3.connect(gw.cluster.db())
    key = object_key(BUCKET, name)
    assert db.execute("SELECT lock_owner FROM keys WHERE key = ?", (key,)).fetchone() == (None,)
    assert db.execute("SELECT COUNT(*) FROM pending_deletes WHERE key = ?", (key,)).fetchone() == (0,)
