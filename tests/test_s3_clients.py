"""Real S3 clients against the gateway with MKV_S3_KEYS set (SigV4 on):
boto3 (signed requests, presigned URLs, wrong keys), the AWS CLI, rclone,
s3cmd and pyarrow. One cluster and one gateway for the module."""
import os
import subprocess
import sys
import time

import pytest
import requests
from botocore.exceptions import ClientError

from conftest import TIMEOUT
from s3util import ACCESS, SECRET, boto3_client, cluster_with_gateway, gateway_server

BUCKET = "clients"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from cluster_with_gateway(str(tmp_path_factory.mktemp("s3c")), BUCKET,
                                    MKV_S3_KEYS=f"{ACCESS}:{SECRET},second:secondsecret", MKV_S3_REGION="eu-north-7")


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


def make_tree(root):
    """A small tree of files (names with spaces, nesting, an empty file); {relative path: bytes}."""
    files = {"a.txt": b"alpha\n", "dir/b c.bin": os.urandom(70_000), "dir/sub/deep.txt": b"deep\n" * 100,
             "empty": b"", "ünï.txt": "ünïcode".encode()}
    for rel, value in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value)
    return files


def read_tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def client_env(**extra):
    """This environment without AWS_* (a CA bundle of the machine's, say), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra)
    return env


def aws_env(gw, tmp_path):
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n")
    return client_env(AWS_ACCESS_KEY_ID=ACCESS, AWS_SECRET_ACCESS_KEY=SECRET, AWS_CONFIG_FILE=str(config),
                AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")


def run(argv, env=None):
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{argv[0]} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def test_aws_cli_sync_up_and_back_is_byte_equal(gw, tmp_path):
    files = make_tree(tmp_path / "up")
    files["big.bin"] = os.urandom(9 << 20)   # over the CLI's 8 MB threshold: a multipart upload, ranged GETs
    (tmp_path / "up" / "big.bin").write_bytes(files["big.bin"])
    aws = [os.path.join(os.path.dirname(sys.executable), "aws"), "--endpoint-url", gw.url]
    env = aws_env(gw, tmp_path)
    run(aws + ["s3", "sync", str(tmp_path / "up"), f"s3://{BUCKET}/awstree"], env)
    run(aws + ["s3", "sync", f"s3://{BUCKET}/awstree", str(tmp_path / "down")], env)
    assert read_tree(tmp_path / "down") == files
    assert boto3_client(gw.url).head_object(Bucket=BUCKET, Key="awstree/big.bin")["ETag"].endswith('-2"')


def rclone_env(gw):
    return client_env(RCLONE_CONFIG_MKV_TYPE="s3", RCLONE_CONFIG_MKV_PROVIDER="Other",
                RCLONE_CONFIG_MKV_ENDPOINT=gw.url, RCLONE_CONFIG_MKV_ACCESS_KEY_ID=ACCESS,
                RCLONE_CONFIG_MKV_SECRET_ACCESS_KEY=SECRET, RCLONE_CONFIG_MKV_REGION="us-east-1",
                RCLONE_CONFIG_MKV_FORCE_PATH_STYLE="true", RCLONE_CONFIG="/dev/null")


def test_rclone_sync_then_check_finds_no_difference(gw, tmp_path):
    files = make_tree(tmp_path / "up")
    env = rclone_env(gw)
    run(["rclone", "sync", str(tmp_path / "up"), f"mkv:{BUCKET}/rc"], env)
    run(["rclone", "check", str(tmp_path / "up"), f"mkv:{BUCKET}/rc"], env)
    run(["rclone", "copy", f"mkv:{BUCKET}/rc", str(tmp_path / "down")], env)
    assert read_tree(tmp_path / "down") == files


def test_s3cmd_put_ls_get(gw, tmp_path):
    config = tmp_path / "s3cfg"
    host = gw.url.split("//")[1]
    config.write_text(f"[default]\naccess_key = {ACCESS}\nsecret_key = {SECRET}\nhost_base = {host}\n"
                      f"host_bucket = {host}\nuse_https = False\nsignature_v2 = False\nbucket_location = us-east-1\n")
    source = tmp_path / "s3cmd.bin"
    source.write_bytes(os.urandom(100_000))
    s3cmd = ["s3cmd", "-c", str(config)]
    run(s3cmd + ["put", str(source), f"s3://{BUCKET}/s3cmd/file.bin"])
    assert "s3cmd/file.bin" in run(s3cmd + ["ls", f"s3://{BUCKET}/s3cmd/"]).stdout
    run(s3cmd + ["get", f"s3://{BUCKET}/s3cmd/file.bin", str(tmp_path / "back.bin")])
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_pyarrow_writes_and_reads_a_parquet_dataset(gw):
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    s3fs = pafs.S3FileSystem(access_key=ACCESS, secret_key=SECRET, endpoint_override=gw.url.split("//")[1],
                             scheme="http", region="us-east-1", allow_bucket_creation=True)
    table = pa.table({"n": list(range(1000)), "part": [i % 3 for i in range(1000)],
                      "s": [f"row {i}" for i in range(1000)]})
    ds.write_dataset(table, f"{BUCKET}/parquet", format="parquet", filesystem=s3fs, partitioning=["part"])
    back = ds.dataset(f"{BUCKET}/parquet", format="parquet", filesystem=s3fs, partitioning=["part"]).to_table()
    assert sorted(back.column("n").to_pylist()) == list(range(1000))


def test_gateway_with_malformed_keys_does_not_start(gw):
    import signal
    bad = gateway_server(gw.cluster, workers=1, MKV_S3_KEYS="no-colon-here")
    bad.spawn()
    try:
        assert bad.proc.wait(timeout=20) != 0
        assert "MKV_S3_KEYS" in bad.tail()
    finally:
        bad.stop(signal.SIGKILL)
