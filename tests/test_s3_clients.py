"""Real S3 clients against the gateway with MKV_S3_KEYS set (SigV4 on):
boto3 (signed requests, presigned URLs, wrong keys), the AWS CLI, rclone,
s3cmd and pyarrow. One cluster and one gateway for the module."""
import hashlib
import os
import time

import pytest
import requests
from botocore.exceptions import ClientError

from conftest import TIMEOUT, Cluster
from s3util import ACCESS, SECRET, boto3_client, gateway_server

BUCKET = "clients"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    cluster = Cluster(str(tmp_path_factory.mktemp("s3c")), n_volumes=3, replicas=2)
    server = gateway_server(cluster, MKV_S3_KEYS=f"{ACCESS}:{SECRET},second:secondsecret",
                            MKV_S3_REGION="eu-north-7").start()
    server.cluster = cluster
    server.url = f"http://127.0.0.1:{server.port}"
    try:
        boto3_client(server.url).create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()
        cluster.kill()


@pytest.fixture(scope="module")
def s3(gw):
    return boto3_client(gw.url)


def error_of(call, **kw):
    with pytest.raises(ClientError) as info:
        call(**kw)
    return info.value.response["Error"]["Code"], info.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_signed_put_get_and_list(s3):
    s3.put_object(Bucket=BUCKET, Key="dir/a b+c.txt", Body=b"signed", Metadata={"k": "v"})
    assert s3.get_object(Bucket=BUCKET, Key="dir/a b+c.txt")["Body"].read() == b"signed"
    assert [c["Key"] for c in s3.list_objects_v2(Bucket=BUCKET, Prefix="dir/")["Contents"]] == ["dir/a b+c.txt"]


def test_second_key_pair_works_too(gw):
    client = boto3_client(gw.url, access="second", secret="secondsecret")
    client.put_object(Bucket=BUCKET, Key="second", Body=b"2")
    assert client.get_object(Bucket=BUCKET, Key="second")["Body"].read() == b"2"


def test_wrong_secret_is_signature_does_not_match(gw):
    client = boto3_client(gw.url, secret="not-the-secret")
    assert error_of(client.get_object, Bucket=BUCKET, Key="x") == ("SignatureDoesNotMatch", 403)


def test_unknown_access_key_is_invalid_access_key_id(gw):
    client = boto3_client(gw.url, access="nobody")
    assert error_of(client.list_buckets) == ("InvalidAccessKeyId", 403)


def test_unsigned_request_is_access_denied(gw):
    r = requests.get(f"{gw.url}/{BUCKET}/x", timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content


def test_presigned_get_and_put_work_without_keys(s3):
    url = s3.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": "pre"}, ExpiresIn=60)
    assert requests.put(url, data=b"presigned", timeout=TIMEOUT).status_code == 200
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "pre"}, ExpiresIn=60)
    assert requests.get(url, timeout=TIMEOUT).content == b"presigned"


def test_expired_presigned_url_is_403(s3):
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "pre"}, ExpiresIn=1)
    time.sleep(1.1)   # the URL is dated in whole seconds: past its second now
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 403 and b"expired" in r.content


def test_region_is_mkv_s3_region(s3):
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] == "eu-north-7"


def test_boto3_ranged_get_and_head(s3):
    s3.put_object(Bucket=BUCKET, Key="ranged", Body=b"abcdefghij")
    assert s3.get_object(Bucket=BUCKET, Key="ranged", Range="bytes=3-4")["Body"].read() == b"de"
    assert s3.head_object(Bucket=BUCKET, Key="ranged")["ContentLength"] == 10


def test_boto3_checksum_mismatch_is_refused(gw, s3):
    import base64
    import zlib
    wrong = base64.b64encode(zlib.crc32(b"other").to_bytes(4, "big")).decode()
    assert error_of(s3.put_object, Bucket=BUCKET, Key="crc", Body=b"value", ChecksumCRC32=wrong)[0] == "BadDigest"
    right = base64.b64encode(zlib.crc32(b"value").to_bytes(4, "big")).decode()
    s3.put_object(Bucket=BUCKET, Key="crc", Body=b"value", ChecksumCRC32=right)
