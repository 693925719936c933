"""The S3 gateway (s3.py) against a real cluster, through boto3 and plain
HTTP: buckets, objects, overwrite, listings, errors, and the one key space
it shares with the native API. One cluster and one gateway for the module."""
import hashlib
import os
import re
import threading
import xml.etree.ElementTree as ET

import pytest
import requests
from botocore.exceptions import ClientError

from conftest import TIMEOUT
from s3util import boto3_client, cluster_with_gateway

BUCKET = "photos"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from cluster_with_gateway(str(tmp_path_factory.mktemp("s3")), BUCKET, MKV_S3_DOMAIN="s3.test")


@pytest.fixture(scope="module")
def s3(gw):
    return boto3_client(gw.url)


def code_of(call, *args, **kw):
    with pytest.raises(ClientError) as info:
        call(*args, **kw)
    return info.value.response["Error"]["Code"], info.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_put_then_get_returns_bytes_type_and_metadata(s3):
    s3.put_object(Bucket=BUCKET, Key="a.txt", Body=b"hello", ContentType="text/plain",
                  CacheControl="max-age=60", Metadata={"owner": "ann"})
    got = s3.get_object(Bucket=BUCKET, Key="a.txt")
    assert got["Body"].read() == b"hello"
    assert (got["ContentType"], got["CacheControl"], got["Metadata"]) == ("text/plain", "max-age=60", {"owner": "ann"})
    assert got["ETag"] == '"%s"' % hashlib.md5(b"hello").hexdigest()


def test_zero_byte_object_is_stored(s3):
    s3.put_object(Bucket=BUCKET, Key="empty", Body=b"")
    got = s3.get_object(Bucket=BUCKET, Key="empty")
    assert (got["Body"].read(), got["ContentLength"]) == (b"", 0)


def test_overwrite_replaces_value_and_metadata(s3, gw):
    s3.put_object(Bucket=BUCKET, Key="over", Body=b"first", ContentType="text/a")
    s3.put_object(Bucket=BUCKET, Key="over", Body=b"second value", ContentType="text/b")
    got = s3.get_object(Bucket=BUCKET, Key="over")
    assert (got["Body"].read(), got["ContentType"]) == (b"second value", "text/b")


def test_overwrite_leaves_no_old_copy_or_note(s3, gw):
    key = b"/photos/leak"
    s3.put_object(Bucket=BUCKET, Key="leak", Body=b"old" * 1000)
    s3.put_object(Bucket=BUCKET, Key="leak", Body=b"new" * 10)
    import sqlite3
    db = sqlite3.connect(gw.cluster.db())
    volumes, = db.execute("SELECT volumes FROM keys WHERE key = ?", (key,)).fetchone()
    assert db.execute("SELECT COUNT(*) FROM pending_deletes WHERE key = ?", (key,)).fetchone() == (0,)
    for v in volumes.split(","):
        with open(gw.cluster.file_of(v, key), "rb") as f:
            assert f.read() == b"new" * 10
    tmp_files = [f for d in gw.cluster.volume_dirs for f in os.listdir(os.path.join(d, ".tmp"))]
    assert tmp_files == []


def test_readers_during_overwrites_see_one_whole_value(s3, gw):
    values = [bytes([65 + i]) * 1000 for i in range(8)]   # one size: only the ETag tells them apart
    s3.put_object(Bucket=BUCKET, Key="race", Body=values[0])
    seen, bad, done = [], [], threading.Event()

    def reader():
        session = requests.Session()
        while not done.is_set():
            r = session.get(f"{gw.url}/photos/race", timeout=TIMEOUT)
            if r.status_code != 200 or r.content not in values or \
                    r.headers["ETag"] != '"%s"' % hashlib.md5(r.content).hexdigest() or \
                    int(r.headers["Content-Length"]) != len(r.content):
                bad.append((r.status_code, r.content[:20], r.headers.get("ETag")))
            seen.append(r.content)
    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for value in values[1:] * 6:
            s3.put_object(Bucket=BUCKET, Key="race", Body=value)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert bad == []
    assert len(set(seen)) > 1     # the readers did see the value change


def test_ranged_get_serves_the_part(s3):
    s3.put_object(Bucket=BUCKET, Key="digits", Body=b"0123456789")
    got = s3.get_object(Bucket=BUCKET, Key="digits", Range="bytes=2-5")
    assert (got["Body"].read(), got["ContentRange"]) == (b"2345", "bytes 2-5/10")
    assert s3.get_object(Bucket=BUCKET, Key="digits", Range="bytes=-3")["Body"].read() == b"789"
    assert s3.get_object(Bucket=BUCKET, Key="digits", Range="bytes=8-")["Body"].read() == b"89"


def test_range_past_the_end_is_invalid_range(s3):
    s3.put_object(Bucket=BUCKET, Key="short", Body=b"abc")
    assert code_of(s3.get_object, Bucket=BUCKET, Key="short", Range="bytes=5-9") == ("InvalidRange", 416)


def test_conditional_get_answers_304_and_412(s3, gw):
    etag = s3.put_object(Bucket=BUCKET, Key="cond", Body=b"x")["ETag"]
    url = f"{gw.url}/photos/cond"
    assert requests.get(url, headers={"If-None-Match": etag}, timeout=TIMEOUT).status_code == 304
    r = requests.get(url, headers={"If-Match": '"nope"'}, timeout=TIMEOUT)
    assert r.status_code == 412 and b"<Code>PreconditionFailed</Code>" in r.content
    assert requests.get(url, headers={"If-Match": etag}, timeout=TIMEOUT).content == b"x"
    later = "Fri, 01 Jan 2100 00:00:00 GMT"
    assert requests.get(url, headers={"If-Modified-Since": later}, timeout=TIMEOUT).status_code == 304
    assert requests.get(url, headers={"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"},
                        timeout=TIMEOUT).status_code == 412


def test_response_overrides_set_headers(s3):
    s3.put_object(Bucket=BUCKET, Key="over.bin", Body=b"x", ContentType="a/b")
    got = s3.get_object(Bucket=BUCKET, Key="over.bin", ResponseContentType="text/html",
                        ResponseContentDisposition="attachment; filename=x")
    assert (got["ContentType"], got["ContentDisposition"]) == ("text/html", "attachment; filename=x")


def test_head_object_gives_size_and_etag_without_body(s3):
    s3.put_object(Bucket=BUCKET, Key="head", Body=b"12345")
    got = s3.head_object(Bucket=BUCKET, Key="head")
    assert (got["ContentLength"], got["ETag"]) == (5, '"%s"' % hashlib.md5(b"12345").hexdigest())


def test_missing_key_is_no_such_key_and_missing_bucket_no_such_bucket(s3):
    assert code_of(s3.get_object, Bucket=BUCKET, Key="never") == ("NoSuchKey", 404)
    assert code_of(s3.get_object, Bucket="no-such-bucket", Key="x") == ("NoSuchBucket", 404)
    assert code_of(s3.put_object, Bucket="no-such-bucket", Key="x", Body=b"1") == ("NoSuchBucket", 404)


def test_error_body_is_xml_with_the_request_id_of_the_header(gw):
    r = requests.get(f"{gw.url}/photos/never", timeout=TIMEOUT)
    root = ET.fromstring(r.content)
    assert root.tag == "Error" and root.findtext("Code") == "NoSuchKey"
    assert root.findtext("RequestId") == r.headers["x-amz-request-id"]
    assert root.findtext("Resource") == "/photos/never"


def test_key_too_long_is_key_too_long_error(s3):
    assert code_of(s3.put_object, Bucket=BUCKET, Key="k" * 1100, Body=b"1") == ("KeyTooLongError", 400)


def test_delete_object_answers_204_also_when_missing(s3):
    s3.put_object(Bucket=BUCKET, Key="gone", Body=b"1")
    assert s3.delete_object(Bucket=BUCKET, Key="gone")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert s3.delete_object(Bucket=BUCKET, Key="gone")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert code_of(s3.head_object, Bucket=BUCKET, Key="gone")[1] == 404


def test_delete_objects_deletes_each_and_quiet_lists_none(s3):
    for k in ("m/1", "m/2", "m/3"):
        s3.put_object(Bucket=BUCKET, Key=k, Body=b"1")
    got = s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "m/1"}, {"Key": "m/missing"}]})
    assert sorted(d["Key"] for d in got["Deleted"]) == ["m/1", "m/missing"]
    got = s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "m/2"}, {"Key": "m/3"}], "Quiet": True})
    assert "Deleted" not in got
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="m/")["KeyCount"] == 0


def test_list_v2_with_delimiter_pages_keys_and_prefixes(s3):
    for k in ("l/a", "l/b/1", "l/b/2", "l/c", "l/d/1"):
        s3.put_object(Bucket=BUCKET, Key=k, Body=b"1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="l/", Delimiter="/",
                                                           PaginationConfig={"PageSize": 2})
    keys, prefixes = [], []
    for page in pages:
        assert page["KeyCount"] <= 2
        keys += [c["Key"] for c in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    assert (keys, prefixes) == (["l/a", "l/c"], ["l/b/", "l/d/"])


def test_list_v1_pages_with_marker_and_next_marker(s3):
    for k in ("v1/a", "v1/b", "v1/c"):
        s3.put_object(Bucket=BUCKET, Key=k, Body=b"12")
    first = s3.list_objects(Bucket=BUCKET, Prefix="v1/", MaxKeys=2)
    assert ([c["Key"] for c in first["Contents"]], first["IsTruncated"], first["NextMarker"]) == \
        (["v1/a", "v1/b"], True, "v1/b")
    rest = s3.list_objects(Bucket=BUCKET, Prefix="v1/", Marker="v1/b")
    assert ([c["Key"] for c in rest["Contents"]], rest["IsTruncated"], "NextMarker" in rest) == (["v1/c"], False, False)
    assert rest["Contents"][0]["Size"] == 2 and rest["Contents"][0]["ETag"] == '"%s"' % hashlib.md5(b"12").hexdigest()


def test_list_with_encoding_type_url_encodes_space_as_percent_20(gw, s3):
    s3.put_object(Bucket=BUCKET, Key="enc/a b", Body=b"1")
    r = requests.get(f"{gw.url}/photos?list-type=2&prefix=enc/&encoding-type=url", timeout=TIMEOUT)
    assert b"<Key>enc/a%20b</Key>" in r.content
    assert [c["Key"] for c in s3.list_objects_v2(Bucket=BUCKET, Prefix="enc/")["Contents"]] == ["enc/a b"]


def test_list_with_max_keys_zero_lists_nothing(s3):
    s3.put_object(Bucket=BUCKET, Key="zero/a", Body=b"1")
    got = s3.list_objects_v2(Bucket=BUCKET, Prefix="zero/", MaxKeys=0)
    assert got["KeyCount"] == 0 and "Contents" not in got


def test_list_object_versions_gives_each_object_as_null_version(s3):
    s3.put_object(Bucket=BUCKET, Key="ver/a", Body=b"1")
    got = s3.list_object_versions(Bucket=BUCKET, Prefix="ver/")
    assert [(v["Key"], v["VersionId"], v["IsLatest"]) for v in got["Versions"]] == [("ver/a", "null", True)]


def test_create_bucket_twice_is_200_and_bad_name_is_invalid_bucket_name(s3):
    assert s3.create_bucket(Bucket="twice")["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert s3.create_bucket(Bucket="twice")["ResponseMetadata"]["HTTPStatusCode"] == 200
    for bad in ("ab", "Upper", "a..b", "192.168.1.1", "-dash"):
        assert code_of(s3.create_bucket, Bucket=bad)[0] == "InvalidBucketName"


def test_delete_bucket_with_objects_is_bucket_not_empty(s3):
    s3.create_bucket(Bucket="full")
    s3.put_object(Bucket="full", Key="x", Body=b"1")
    assert code_of(s3.delete_bucket, Bucket="full") == ("BucketNotEmpty", 409)
    s3.delete_object(Bucket="full", Key="x")
    s3.delete_bucket(Bucket="full")
    assert code_of(s3.head_bucket, Bucket="full")[1] == 404


def test_list_buckets_pages_with_max_buckets(s3):
    for name in ("page-a", "page-b", "page-c"):
        s3.create_bucket(Bucket=name)
    first = s3.list_buckets(MaxBuckets=2, Prefix="page-")
    assert [b["Name"] for b in first["Buckets"]] == ["page-a", "page-b"]
    rest = s3.list_buckets(MaxBuckets=2, Prefix="page-", ContinuationToken=first["ContinuationToken"])
    assert [b["Name"] for b in rest["Buckets"]] == ["page-c"] and "ContinuationToken" not in rest


def test_get_bucket_location_answers_the_region(s3):
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] is None   # us-east-1


def test_object_written_by_s3_is_read_by_native_api(s3, gw):
    s3.put_object(Bucket=BUCKET, Key="dir/both ways", Body=b"from s3")
    r = requests.get(gw.cluster.url("/photos/dir/both%20ways"), timeout=TIMEOUT)
    assert r.content == b"from s3"


def test_key_written_by_native_api_is_read_by_s3(s3, gw):
    r = requests.put(gw.cluster.url("/photos/native/k1"), data=b"from mkv", timeout=TIMEOUT)
    assert r.status_code == 201
    got = s3.get_object(Bucket=BUCKET, Key="native/k1")
    assert (got["Body"].read(), got["ContentType"]) == (b"from mkv", "binary/octet-stream")
    assert "native/k1" in [c["Key"] for c in s3.list_objects_v2(Bucket=BUCKET, Prefix="native/")["Contents"]]


def test_bucket_of_native_keys_exists_and_is_listed(s3, gw):
    requests.put(gw.cluster.url("/nativebucket/k"), data=b"1", timeout=TIMEOUT)
    s3.head_bucket(Bucket="nativebucket")
    assert "nativebucket" in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_options_is_403_not_a_server_error(gw):
    r = requests.options(f"{gw.url}/photos/x", timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>" in r.content


def test_unknown_subresource_is_not_implemented_by_name(gw):
    r = requests.get(f"{gw.url}/photos?lifecycle", timeout=TIMEOUT)
    assert r.status_code == 501 and b"<Code>NotImplemented</Code>" in r.content and b"lifecycle" in r.content


def test_object_subresource_not_implemented_is_named(gw, s3):
    s3.put_object(Bucket=BUCKET, Key="acl", Body=b"1")
    r = requests.get(f"{gw.url}/photos/acl?tagging", timeout=TIMEOUT)
    assert r.status_code == 501 and b"tagging" in r.content


def test_the_null_version_is_the_object(s3):
    s3.put_object(Bucket=BUCKET, Key="nullver", Body=b"v")
    assert s3.get_object(Bucket=BUCKET, Key="nullver", VersionId="null")["Body"].read() == b"v"
    s3.delete_object(Bucket=BUCKET, Key="nullver", VersionId="null")
    assert code_of(s3.head_object, Bucket=BUCKET, Key="nullver")[1] == 404


def test_large_object_streams_with_bounded_memory(s3, gw):
    import psutil
    size = 48 << 20
    block = os.urandom(1 << 20)
    value = block * (size >> 20)

    def rss():
        return max(psutil.Process(p).memory_info().rss for p in gw.pids()[1:])
    before = rss()
    s3.put_object(Bucket=BUCKET, Key="big", Body=value)
    got = s3.get_object(Bucket=BUCKET, Key="big")["Body"].read()
    assert hashlib.md5(got).digest() == hashlib.md5(value).digest()
    assert rss() - before < 32 << 20


def test_content_md5_mismatch_is_bad_digest_and_nothing_is_stored(gw, s3):
    import base64
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    r = requests.put(f"{gw.url}/photos/digest", data=b"value", headers={"Content-MD5": wrong}, timeout=TIMEOUT)
    assert r.status_code == 400 and b"<Code>BadDigest</Code>" in r.content
    assert code_of(s3.head_object, Bucket=BUCKET, Key="digest")[1] == 404
    r = requests.put(f"{gw.url}/photos/digest", data=b"value", headers={"Content-MD5": "bad"}, timeout=TIMEOUT)
    assert r.status_code == 400 and b"<Code>InvalidDigest</Code>" in r.content


def test_request_ids_differ(gw):
    ids = {requests.get(f"{gw.url}/", timeout=TIMEOUT).headers["x-amz-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9A-F]{16}", i) for i in ids)


# -- multipart uploads

MiB = 1 << 20


def start_upload(s3, key, parts):
    """An upload of `key` with `parts` (values) sent; returns (upload id, [(number, etag)])."""
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key, ContentType="video/x")["UploadId"]
    sent = []
    for n, value in enumerate(parts, 1):
        etag = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=n, Body=value)["ETag"]
        sent.append((n, etag))
    return upload, sent


def complete(s3, key, upload, sent):
    return s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": e} for n, e in sent]})


def test_multipart_by_hand_makes_one_object_with_s3s_etag(s3, gw):
    parts = [os.urandom(5 * MiB), b"tail"]
    upload, sent = start_upload(s3, "mp/hand", parts)
    assert [p["Size"] for p in s3.list_parts(Bucket=BUCKET, Key="mp/hand", UploadId=upload)["Parts"]] == [5 * MiB, 4]
    assert upload in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=BUCKET, Prefix="mp/")["Uploads"]]
    etag = complete(s3, "mp/hand", upload, sent)["ETag"]
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-2"
    assert etag == f'"{want}"'
    got = s3.get_object(Bucket=BUCKET, Key="mp/hand")
    assert (got["Body"].read() == b"".join(parts), got["ETag"], got["ContentType"]) == (True, etag, "video/x")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET, Prefix="mp/hand")
    assert requests.get(gw.cluster.url("/photos/mp/hand"), timeout=TIMEOUT).content == b"".join(parts)


def test_completing_again_answers_as_the_first_time(s3):
    upload, sent = start_upload(s3, "mp/again", [b"only part"])
    first = complete(s3, "mp/again", upload, sent)["ETag"]
    assert complete(s3, "mp/again", upload, sent)["ETag"] == first


def test_get_with_part_number_serves_that_part(s3):
    parts = [b"a" * (5 * MiB), b"bcd"]
    upload, sent = start_upload(s3, "mp/part", parts)
    complete(s3, "mp/part", upload, sent)
    got = s3.get_object(Bucket=BUCKET, Key="mp/part", PartNumber=2)
    assert (got["Body"].read(), got["PartsCount"]) == (b"bcd", 2)


def test_upload_file_and_download_file_round_trip(s3, tmp_path):
    from boto3.s3.transfer import TransferConfig
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(11 * MiB + 5))
    s3.upload_file(str(source), BUCKET, "mp/file", Config=config)
    assert s3.head_object(Bucket=BUCKET, Key="mp/file")["ETag"].endswith('-3"')
    s3.download_file(BUCKET, "mp/file", str(tmp_path / "down.bin"), Config=config)
    assert (tmp_path / "down.bin").read_bytes() == source.read_bytes()


def test_parts_out_of_order_are_invalid_part_order(s3):
    upload, sent = start_upload(s3, "mp/order", [b"1" * (5 * MiB), b"2"])
    assert code_of(complete, s3, "mp/order", upload, sent[::-1]) == ("InvalidPartOrder", 400)


def test_a_wrong_part_etag_is_invalid_part(s3):
    upload, sent = start_upload(s3, "mp/wrong", [b"1"])
    assert code_of(complete, s3, "mp/wrong", upload, [(1, '"' + "0" * 32 + '"')]) == ("InvalidPart", 400)


def test_a_small_part_but_the_last_is_entity_too_small(s3):
    upload, sent = start_upload(s3, "mp/small", [b"1", b"2"])
    assert code_of(complete, s3, "mp/small", upload, sent) == ("EntityTooSmall", 400)


def test_aborted_upload_is_no_such_upload_and_its_parts_go(s3, gw):
    upload, sent = start_upload(s3, "mp/abort", [b"1"])
    s3.abort_multipart_upload(Bucket=BUCKET, Key="mp/abort", UploadId=upload)
    assert code_of(s3.list_parts, Bucket=BUCKET, Key="mp/abort", UploadId=upload) == ("NoSuchUpload", 404)
    r = requests.get(gw.cluster.url(f"/.s3-parts/{upload}/?list"), timeout=TIMEOUT)
    assert r.json()["keys"] == []


def test_upload_survives_a_restart_of_the_gateway(s3, gw):
    upload, sent = start_upload(s3, "mp/restart", [b"r" * (5 * MiB)])
    gw.restart()
    n2 = s3.upload_part(Bucket=BUCKET, Key="mp/restart", UploadId=upload, PartNumber=2, Body=b"end")["ETag"]
    complete(s3, "mp/restart", upload, sent + [(2, n2)])
    assert s3.get_object(Bucket=BUCKET, Key="mp/restart")["Body"].read() == b"r" * (5 * MiB) + b"end"


def test_rebalance_removes_abandoned_uploads(s3, gw):
    from test_tools import run_tool
    upload, sent = start_upload(s3, "mp/abandoned", [b"1", b"2"])
    c = gw.cluster
    p = run_tool("rebalance.py", c.volume_names(), c.db(), "--s3-upload-age", "0", replicas=2)
    assert p.returncode == 0, p.stderr
    assert code_of(s3.list_parts, Bucket=BUCKET, Key="mp/abandoned", UploadId=upload)[0] == "NoSuchUpload"
    assert requests.get(c.url(f"/.s3-parts/{upload}/?list"), timeout=TIMEOUT).json()["keys"] == []
    from mkvlib.multipart import part_key
    from mkvlib.placement import key2path
    leftovers = [d for d in c.volume_dirs for sv in os.listdir(d) if sv.startswith("sv")
                 if os.path.exists(os.path.join(d, sv, key2path(part_key(upload, 1)).lstrip("/")))]
    assert leftovers == []


# -- CopyObject

def test_copy_within_bucket_keeps_bytes_and_metadata(s3):
    s3.put_object(Bucket=BUCKET, Key="cp/src", Body=b"copied", ContentType="text/x", Metadata={"a": "1"})
    s3.copy_object(Bucket=BUCKET, Key="cp/dst", CopySource={"Bucket": BUCKET, "Key": "cp/src"})
    got = s3.get_object(Bucket=BUCKET, Key="cp/dst")
    assert (got["Body"].read(), got["ContentType"], got["Metadata"]) == (b"copied", "text/x", {"a": "1"})


def test_copy_across_buckets_with_replace_takes_new_metadata(s3):
    s3.create_bucket(Bucket="copies")
    s3.put_object(Bucket=BUCKET, Key="cp/x y", Body=b"across", ContentType="text/x")
    s3.copy_object(Bucket="copies", Key="dst", CopySource={"Bucket": BUCKET, "Key": "cp/x y"},
                   MetadataDirective="REPLACE", ContentType="text/y", Metadata={"b": "2"})
    got = s3.get_object(Bucket="copies", Key="dst")
    assert (got["Body"].read(), got["ContentType"], got["Metadata"]) == (b"across", "text/y", {"b": "2"})


def test_copy_onto_itself_needs_replace(s3):
    s3.put_object(Bucket=BUCKET, Key="cp/self", Body=b"me", ContentType="text/old")
    assert code_of(s3.copy_object, Bucket=BUCKET, Key="cp/self",
                   CopySource={"Bucket": BUCKET, "Key": "cp/self"}) == ("InvalidRequest", 400)
    s3.copy_object(Bucket=BUCKET, Key="cp/self", CopySource={"Bucket": BUCKET, "Key": "cp/self"},
                   MetadataDirective="REPLACE", ContentType="text/new")
    got = s3.get_object(Bucket=BUCKET, Key="cp/self")
    assert (got["Body"].read(), got["ContentType"]) == (b"me", "text/new")


def test_copy_source_conditions_are_412(s3):
    s3.put_object(Bucket=BUCKET, Key="cp/cond", Body=b"c")
    assert code_of(s3.copy_object, Bucket=BUCKET, Key="cp/cond2", CopySource={"Bucket": BUCKET, "Key": "cp/cond"},
                   CopySourceIfMatch='"0000"') == ("PreconditionFailed", 412)


def test_copy_of_a_missing_source_is_no_such_key(s3):
    assert code_of(s3.copy_object, Bucket=BUCKET, Key="cp/to",
                   CopySource={"Bucket": BUCKET, "Key": "cp/never"}) == ("NoSuchKey", 404)


# -- malformed requests: S3's 4xx, never a 5xx

MALFORMED = [
    ("GET", "/photos?max-keys=abc", {}, None, 400, "InvalidArgument"),
    ("GET", "/photos?list-type=2&continuation-token=!!!!", {}, None, 400, "InvalidArgument"),
    ("GET", "/photos?encoding-type=xml", {}, None, 400, "InvalidArgument"),
    ("GET", "/photos/bad-input", {"Range": "bytes=200-"}, None, 416, "InvalidRange"),
    ("GET", "/photos/bad-input?partNumber=0", {}, None, 416, "InvalidPartNumber"),
    ("GET", "/photos/bad-input?uploadId=nope", {}, None, 404, "NoSuchUpload"),
    ("PUT", "/photos/bad-input?partNumber=1&uploadId=nope", {}, b"x", 404, "NoSuchUpload"),
    ("POST", "/photos/bad-input?uploadId=nope", {}, b"<bad", 400, "MalformedXML"),
    ("POST", "/photos?delete", {}, b"<bad", 400, "MalformedXML"),
    ("POST", "/photos", {}, b"x", 405, "MethodNotAllowed"),
    ("PUT", "/photos/c", {"x-amz-copy-source": "/"}, None, 400, "InvalidArgument"),
    ("PUT", "/photos/d", {"x-amz-content-sha256": "zzz"}, b"x", 400, "InvalidArgument"),
    ("PUT", "/photos/d", {"x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                          "x-amz-decoded-content-length": "5"}, b"garbage", 400, "IncompleteBody"),
    ("PUT", "/photos/d", {"x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER"}, b"0\r\n\r\n",
     411, "MissingContentLength"),
    ("PUT", "/photos/d", {"x-amz-checksum-crc32": "!!"}, b"x", 400, "InvalidRequest"),
    ("PUT", "/photos/d", {"x-amz-checksum-md4": "AAAA"}, b"x", 400, "InvalidRequest"),
    ("PUT", "/photos/x", {"x-amz-meta-big": "v" * 3000}, b"x", 400, "MetadataTooLarge"),
    ("PUT", "/%FF/x", {}, b"x", 400, "InvalidBucketName"),
    ("GET", "/photos/bad-input?versionId=abc", {}, None, 404, "NoSuchVersion"),
    ("PATCH", "/photos/bad-input", {}, None, 405, "MethodNotAllowed"),
]


@pytest.mark.parametrize("method, path, headers, body, status, code", MALFORMED,
                         ids=[f"{m} {p[:40]} {c}" for m, p, _, _, _, c in MALFORMED])
def test_malformed_request_is_s3s_error(gw, s3, method, path, headers, body, status, code):
    s3.put_object(Bucket=BUCKET, Key="bad-input", Body=b"x" * 100)
    r = requests.request(method, gw.url + path, headers=headers, data=body, timeout=TIMEOUT)
    assert (r.status_code, ET.fromstring(r.content).findtext("Code")) == (status, code)


def test_date_conditions_hold_for_a_key_of_unknown_date(gw):
    requests.put(gw.cluster.url("/photos/native/dated"), data=b"native", timeout=TIMEOUT)
    url = f"{gw.url}/photos/native/dated"
    r = requests.get(url, headers={"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}, timeout=TIMEOUT)
    assert (r.status_code, r.content) == (200, b"native")
    r = requests.get(url, headers={"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}, timeout=TIMEOUT)
    assert r.status_code == 200


def test_virtual_host_style_names_the_bucket_in_the_host(gw, s3):
    s3.put_object(Bucket=BUCKET, Key="vhost/k", Body=b"virtual")
    host = {"Host": f"{BUCKET}.s3.test:{gw.port}"}
    assert requests.get(f"{gw.url}/vhost/k", headers=host, timeout=TIMEOUT).content == b"virtual"
    r = requests.get(f"{gw.url}/?list-type=2&prefix=vhost/", headers=host, timeout=TIMEOUT)
    assert b"<Key>vhost/k</Key>" in r.content


def test_managed_copy_of_a_large_object_uses_upload_part_copy(s3):
    from boto3.s3.transfer import TransferConfig
    value = os.urandom(11 * MiB)
    s3.put_object(Bucket=BUCKET, Key="cp/large", Body=value)
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3.copy({"Bucket": BUCKET, "Key": "cp/large"}, BUCKET, "cp/large-copy", Config=config)
    got = s3.get_object(Bucket=BUCKET, Key="cp/large-copy")
    assert got["ETag"].endswith('-3"') and got["Body"].read() == value


@pytest.mark.parametrize("method,bucket,key,params,copied,name", [
    ("GET", "", None, {}, False, "ListBuckets"),
    ("PUT", "b", None, {}, False, "CreateBucket"),
    ("GET", "b", None, {"list-type": "2"}, False, "ListObjectsV2"),
    ("GET", "b", None, {"versions": ""}, False, "ListObjectVersions"),
    ("POST", "b", None, {"delete": ""}, False, "DeleteObjects"),
    ("PUT", "b", "k", {}, True, "CopyObject"),
    ("HEAD", "b", "k", {}, False, "HeadObject"),
    ("POST", "b", "k", {"uploads": ""}, False, "CreateMultipartUpload"),
    ("PUT", "b", "k", {"uploadId": "u", "partNumber": "1"}, False, "UploadPart"),
    ("POST", "b", "k", {"uploadId": "u"}, False, "CompleteMultipartUpload"),
    ("PATCH", "b", "k", {}, False, "Other"),
])
def test_each_request_is_named_by_its_s3_operation_for_the_metrics(method, bucket, key, params, copied, name):
    from s3 import operation
    assert operation(method, bucket, key, params, copied) == name
