"""mkv's S3 gateway: a Falcon WSGI app on the same core as the master
(mkv.py), over the same index and volumes, speaking S3's path-style dialect.

    MKV_VOLUMES=... MKV_DB=... gunicorn -w 4 -b :9000 s3:app

Object `k` of bucket `b` is the mkv key `/b/k` (mkvlib.objects). Reads are
served through the gateway, streamed (S3 clients follow no redirect).
Every error is S3's XML with its status (ERRORS), and a request id.
"""
import logging
import os
import sqlite3
import sys
import time
import uuid
from urllib.parse import parse_qsl

import falcon

from mkv import VALUE_MAX, in_a_thread, read_body
from mkvlib import s3req, s3xml, sigv4
from mkvlib.errors import MkvError, SettingsError
from mkvlib.localread import LocalVolumes
from mkvlib.metrics import counted
from mkvlib.multipart import Multipart
from mkvlib.objects import DEFAULT_TYPE, Objects, object_key
from mkvlib.payload import Payload
from mkvlib.relay import RelayBody
from mkvlib.s3errors import S3Error, not_implemented, s3_error_of
from mkvlib.s3req import (check_body_md5, check_copy_conditions, check_read_conditions, copy_range, copy_source,
                          decode_token, digest_check, encode_token, parse_max, part_range, request_range,
                          split_path, stored_headers)
from mkvlib.settings import S3Settings, Settings
from mkvlib.store import Store
from mkvlib.volumes import CHUNK

log = logging.getLogger("mkv.s3")

DELETE_MAX = 1000          # keys one DeleteObjects may name
LIST_MAX = 1000            # keys one listing page may hold
DELETE_BODY_MAX = 2 << 20  # bytes of a DeleteObjects request

class Headers:
    """header(name) -> value or None, and .names: the request's header names, lowercase."""

    def __init__(self, req):
        self.req = req
        self.names = [n.lower() for n in req.headers]

    def __call__(self, name):
        return self.req.get_header(name)

    def items(self):
        return ((name.lower(), value) for name, value in self.req.headers.items())


class Request:
    """What a handler needs of one request, read once."""

    def __init__(self, req, request_id, domain=None):
        self.req, self.id = req, request_id
        self.headers = Headers(req)
        self.signed = None      # sigv4.Signed once verified (with MKV_S3_KEYS set)
        self.method = req.method
        self.path = (req.env.get("PATH_INFO") or "/").encode("latin-1")
        self.params = dict(parse_qsl(req.query_string or "", keep_blank_values=True))
        bucket = virtual_bucket(req.get_header("host") or "", domain)
        if bucket is not None:      # virtual-host style: the path is the key
            self.bucket, self.key = bucket, self.path[1:] or None
        else:
            self.bucket, self.key = split_path(self.path) if self.path != b"/" else ("", None)

    def header(self, name):
        return self.req.get_header(name)

    @property
    def resource(self):
        return self.path.decode("latin-1")


class Listings:
    """ListBuckets, ListObjects (v1, v2, versions), DeleteObjects: a part of Gateway."""

    def list_buckets(self, r, resp):
        buckets = self.objects.buckets()
        prefix = r.params.get("prefix") or ""
        buckets = [b for b in buckets if b[0].startswith(prefix)]
        token = r.params.get("continuation-token")
        if token:
            buckets = [b for b in buckets if b[0] > token]
        limit = parse_max(r.params.get("max-buckets"), 10000, "max-buckets")
        more = len(buckets) > limit
        buckets = buckets[:limit]
        self.send_xml(resp, s3xml.list_buckets(buckets, buckets[-1][0] if more else None, prefix or None))

    def list_objects(self, r, resp):
        p = r.params
        url = p.get("encoding-type")
        if url not in (None, "url"):
            raise S3Error(400, "InvalidArgument", "Invalid Encoding Method specified in Request")
        url = url == "url"
        base = object_key(r.bucket, "")
        prefix = base + p.get("prefix", "").encode("utf-8", "surrogateescape")
        delimiter = p.get("delimiter", "").encode("utf-8", "surrogateescape") or None
        max_keys = parse_max(p.get("max-keys"), LIST_MAX, "max-keys")
        versions = "versions" in p
        v2 = p.get("list-type") == "2"
        if versions:
            start = p.get("key-marker")
        elif v2:
            token = p.get("continuation-token")
            start = decode_token(token) if token is not None else p.get("start-after")
        else:
            start = p.get("marker")
        after = base + start.encode("utf-8", "surrogateescape") if start else None
        page = self.objects.list(prefix, after, delimiter, max_keys)
        objects, prefixes, truncated, last = page
        enc = (lambda s: s3xml.name(s.encode("utf-8", "surrogateescape"), url)) if True else None
        common = [("Name", r.bucket)]
        if versions:
            fields = common + [("Prefix", s3xml.text(p.get("prefix", ""))), ("KeyMarker", enc(p.get("key-marker", ""))),
                               ("VersionIdMarker", s3xml.text(p.get("version-id-marker", ""))),
                               ("MaxKeys", max_keys), ("Delimiter", enc(p["delimiter"]) if "delimiter" in p else None),
                               ("EncodingType", "url" if url else None)]
            return self.send_xml(resp, s3xml.version_listing(page, len(base), url, fields))
        if v2:
            nxt = encode_token(last[len(base):]) if truncated else None
            fields = common + [("Prefix", enc(p.get("prefix", ""))), ("MaxKeys", max_keys),
                               ("Delimiter", enc(p["delimiter"]) if "delimiter" in p else None),
                               ("EncodingType", "url" if url else None), ("KeyCount", len(objects) + len(prefixes)),
                               ("ContinuationToken", s3xml.text(p["continuation-token"])
                                if "continuation-token" in p else None),
                               ("NextContinuationToken", nxt),
                               ("StartAfter", enc(p["start-after"]) if "start-after" in p else None)]
            if p.get("fetch-owner") == "true":
                fields.append(("FetchOwner", ""))
            body = s3xml.listing(page, len(base), url, True, fields)
            return self.send_xml(resp, body.replace(b"<FetchOwner></FetchOwner>", b""))
        fields = common + [("Prefix", s3xml.text(p.get("prefix", ""))), ("Marker", enc(p.get("marker", ""))),
                           ("NextMarker", s3xml.name(last[len(base):], url) if truncated else None),
                           ("MaxKeys", max_keys), ("Delimiter", enc(p["delimiter"]) if "delimiter" in p else None),
                           ("EncodingType", "url" if url else None)]
        self.send_xml(resp, s3xml.listing(page, len(base), url, False, fields))

    def delete_objects(self, r, resp):
        self.objects.need_bucket(r.bucket)
        body = self.small_body(r)
        try:
            keys, quiet = s3xml.parse_delete(body)
        except s3xml.BadXML as e:
            raise S3Error(400, "MalformedXML", str(e)) from None
        if len(keys) > DELETE_MAX:
            raise S3Error(400, "MalformedXML", f"a DeleteObjects names at most {DELETE_MAX} keys")
        deleted, errors = [], []
        base = object_key(r.bucket, "")
        for name in keys:
            try:
                self.objects.delete(base + name.encode("utf-8", "surrogateescape"))
                deleted.append(name)
            except MkvError as e:
                err = s3_error_of(e)
                errors.append((name, err.code, err.message))
        self.send_xml(resp, s3xml.delete_result(deleted, errors, quiet))


class ObjectRequests:
    """Get/Head/Put/CopyObject: a part of Gateway."""

    def get_object(self, r, resp):
        self.objects.need_bucket(r.bucket)
        key = object_key(r.bucket, "") + r.key
        head = r.method == "HEAD"
        obj = self.objects.head(key)
        check_read_conditions(r, obj)
        rng = part_range(r, obj) if "partNumber" in r.params else request_range(r, obj.size)
        download = None
        if not head and obj.size > 0:
            obj, download = self.objects.open(key, rng)
            if rng is None:
                check_read_conditions(r, obj)   # the value may have changed since the first look
            want = rng[1] - rng[0] + 1 if rng else obj.size
            if download.length != want:
                download.close()
                raise S3Error(503, "ServiceUnavailable", "a replica's size is not the index's: try again")
        object_headers(resp, obj, r.params)
        resp.set_header("Accept-Ranges", "bytes")
        if getattr(r, "parts_count", None):
            resp.set_header("x-amz-mp-parts-count", str(r.parts_count))
        if rng:
            resp.status = falcon.HTTP_206
            resp.set_header("Content-Range", "bytes %d-%d/%d" % (rng[0], rng[1], obj.size))
            resp.content_length = rng[1] - rng[0] + 1
        else:
            resp.content_length = obj.size
        if download is not None:   # sent past Python where the server allows (mkvlib.relay), else streamed
            resp.stream = RelayBody(download, r.req.env, self.settings.send_timeout, CHUNK)

    def put_object(self, r, resp):
        self.objects.need_bucket(r.bucket)
        key = object_key(r.bucket, "") + r.key
        length = r.req.content_length
        if length is None and r.header("transfer-encoding") is None:
            raise S3Error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
        if length is not None and length > VALUE_MAX:
            raise S3Error(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed object size.")
        headers = stored_headers(r)
        payload = Payload(r.headers, r.signed)
        obj = self.objects.put(key, payload.chunks(read_body(r.req.stream, length)), payload.length(length),
                               headers, digest_check(r, payload))
        resp.set_header("ETag", obj.quoted_etag)
        resp.content_length = 0

    def copy_object(self, r, resp):
        """CopyObject: the source's bytes streamed into the target (within or
        across buckets), its headers kept (COPY) or the request's (REPLACE)."""
        bucket, name = copy_source(r.header("x-amz-copy-source"))
        self.objects.need_bucket(bucket)
        self.objects.need_bucket(r.bucket)
        source, target = object_key(bucket, "") + name, object_key(r.bucket, "") + r.key
        directive = (r.header("x-amz-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error(400, "InvalidArgument", "Unknown metadata directive.")
        if source == target and directive == "COPY":
            raise S3Error(400, "InvalidRequest", "This copy request is illegal because it is trying to copy an "
                          "object to itself without changing the object's metadata, storage class, website "
                          "redirect location or encryption attributes.")
        obj, chunks, size = self.copy_source_bytes(r, source)
        headers = obj.headers if directive == "COPY" else stored_headers(r)
        try:
            new = self.objects.put(target, iter(chunks), size, headers)
        finally:
            chunks.close()
        self.send_xml(resp, s3xml.copy_result(new.quoted_etag, new.mtime))

    def copy_source_bytes(self, r, source, rng=None):
        """(Obj, Streamed, length) of a copy's source (bytes `rng` of it),
        once its x-amz-copy-source-if-* hold."""
        obj = self.objects.head(source)
        check_copy_conditions(r, obj)
        if rng is None and obj.size == 0:
            return obj, Streamed(None), 0
        obj, download = self.objects.open(source, rng)
        size = rng[1] - rng[0] + 1 if rng else obj.size
        if download.length != size:
            download.close()
            raise S3Error(503, "ServiceUnavailable", "a replica's size is not the index's: try again")
        return obj, Streamed(download), size


class Uploads:
    """Multipart uploads: a part of Gateway."""

    def multipart_request(self, r, resp):
        self.objects.need_bucket(r.bucket)
        key = object_key(r.bucket, "") + r.key
        name = r.key.decode("utf-8", "surrogateescape")
        upload_id = r.params.get("uploadId")
        if r.method == "POST" and "uploads" in r.params:
            upload_id = self.multipart.create(key, stored_headers(r))
            return self.send_xml(resp, s3xml.initiate(r.bucket, name, upload_id))
        if upload_id is None:
            raise not_implemented(f"{r.method} with ?uploads")
        if r.method == "PUT":
            number = parse_max(r.params.get("partNumber"), 1 << 30, "partNumber")
            if r.header("x-amz-copy-source"):
                return self.upload_part_copy(r, resp, key, upload_id, number)
            payload = Payload(r.headers, r.signed)
            length = r.req.content_length
            md5 = self.multipart.upload_part(upload_id, key, number, payload.chunks(read_body(r.req.stream, length)),
                                             payload.length(length), digest_check(r, payload))
            resp.set_header("ETag", f'"{md5}"')
            resp.content_length = 0
            return
        if r.method == "POST":
            return self.complete_upload(r, resp, key, name, upload_id)
        if r.method == "DELETE":
            self.multipart.abort(upload_id, key)
            resp.status = falcon.HTTP_204
            return
        if r.method == "GET":
            return self.list_parts(r, resp, key, name, upload_id)
        raise S3Error(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")

    def upload_part_copy(self, r, resp, key, upload_id, number):
        """UploadPartCopy: a part made of an object's bytes (x-amz-copy-source-range: some of them)."""
        bucket, name = copy_source(r.header("x-amz-copy-source"))
        self.objects.need_bucket(bucket)
        source = object_key(bucket, "") + name
        rng = copy_range(r.header("x-amz-copy-source-range"), self.objects.head(source).size)
        _, chunks, size = self.copy_source_bytes(r, source, rng)
        try:
            md5 = self.multipart.upload_part(upload_id, key, number, iter(chunks), size, lambda md5, size: None)
        finally:
            chunks.close()
        self.send_xml(resp, s3xml.copy_result(f'"{md5}"', time.time(), "CopyPartResult"))

    def complete_upload(self, r, resp, key, name, upload_id):
        body = self.small_body(r)
        try:
            parts = s3xml.parse_complete(body)
        except s3xml.BadXML as e:
            raise S3Error(400, "MalformedXML", str(e)) from None
        etag = self.multipart.complete(upload_id, key, parts)
        self.send_xml(resp, s3xml.complete_result(f"/{r.bucket}/{name}", r.bucket, name, etag))

    def list_parts(self, r, resp, key, name, upload_id):
        self.multipart._upload(upload_id, key)
        marker = parse_max(r.params.get("part-number-marker") or "0", 1 << 30, "part-number-marker")
        limit = parse_max(r.params.get("max-parts"), 1000, "max-parts")
        parts = self.multipart.parts(upload_id, marker, limit + 1)
        self.send_xml(resp, s3xml.list_parts(r.bucket, name, upload_id, parts[:limit], marker, limit,
                                             len(parts) > limit))

    def list_uploads(self, r, resp):
        p = r.params
        base = object_key(r.bucket, "")
        marker = p.get("key-marker")
        limit = parse_max(p.get("max-uploads"), 1000, "max-uploads")
        uploads, truncated = self.multipart.uploads(
            base + p.get("prefix", "").encode("utf-8", "surrogateescape"),
            base + marker.encode("utf-8", "surrogateescape") if marker else None, p.get("upload-id-marker", ""), limit)
        fields = [("KeyMarker", s3xml.text(marker or "")), ("UploadIdMarker", s3xml.text(p.get("upload-id-marker", ""))),
                  ("Prefix", s3xml.text(p.get("prefix", ""))), ("MaxUploads", limit)]
        self.send_xml(resp, s3xml.list_uploads(r.bucket, uploads, len(base), fields, truncated))

    def small_body(self, r):
        """The whole body of a request that carries a small XML document, checked."""
        length = r.req.content_length
        if length is None or length > DELETE_BODY_MAX:
            raise S3Error(400, "MalformedXML", "The XML you provided was not well-formed or did not validate "
                          "against our published schema.")
        payload = Payload(r.headers, r.signed)
        body = b"".join(payload.chunks(read_body(r.req.stream, length)))
        payload.check(None, len(body))
        check_body_md5(r, body)
        return body


class Gateway(Listings, ObjectRequests, Uploads):
    """The S3 face of the store. One per process; the Store opens on first
    use, after gunicorn forks."""

    def __init__(self, settings: Settings, s3: S3Settings):
        self.settings, self.s3 = settings, s3
        self._objects, self._pid = None, None

    @property
    def objects(self) -> Objects:
        if self._pid != os.getpid():
            store = Store(self.settings, offload=in_a_thread)
            dirs = self.s3.volume_dirs
            local = LocalVolumes(dirs, store.volumes, self.settings.volumes) if dirs else None
            self._objects, self._pid = Objects(store, local), os.getpid()
            self._multipart = Multipart(self._objects)
        return self._objects

    @property
    def multipart(self) -> Multipart:
        return self.objects and self._multipart

    def __call__(self, req, resp, **kwargs):
        rid = uuid.uuid4().hex[:16].upper()
        resp.set_header("x-amz-request-id", rid)
        resp.set_header("x-amz-id-2", rid)
        r = None
        # the metrics' kind (mkvlib.metrics): which S3 operation this is, once known
        req.env["mkv.kind"] = "s3:Other"
        try:
            r = Request(req, rid, self.s3.domain)
            req.env["mkv.kind"] = "s3:" + operation(r.method, r.bucket, r.key, r.params,
                                                    bool(r.header("x-amz-copy-source")))
            self.dispatch(r, resp)
        except Exception as e:   # every failure is S3's XML, never a traceback
            self.answer_error(req, resp, e, r, rid)

    def answer_error(self, req, resp, exc, r, rid):
        if isinstance(exc, S3Error):
            err = exc
        elif isinstance(exc, MkvError):
            err = s3_error_of(exc)
        elif isinstance(exc, sqlite3.Error):
            log.exception("index error on %s %r", req.method, req.env.get("PATH_INFO"))
            err = S3Error(503, "ServiceUnavailable", f"index error (MKV_DB): {' '.join(str(exc).split())[:200]}")
        else:
            log.exception("unexpected error on %s %r", req.method, req.env.get("PATH_INFO"))
            err = S3Error(500, "InternalError", f"internal error ({type(exc).__name__}); see the gateway's log")
        resp.status = falcon.code_to_http_status(err.status)
        resp.stream = None
        resp.content_type = "application/xml"
        resource = r.resource if r is not None else (req.env.get("PATH_INFO") or "/")
        body = s3xml.error(err.code, err.message, resource, rid)
        if req.method == "HEAD" or err.status == 304:
            resp.data = None
            resp.content_length = 0 if req.method != "HEAD" else len(body)
        else:
            resp.data = body

    # -- routing

    def authenticate(self, r):
        """With MKV_S3_KEYS set, every request is signed (SigV4, header or
        presigned) by one of them; with none set, the gateway is open."""
        if self.s3.keys:
            r.signed = sigv4.check(r.method, r.path, r.req.query_string or "", r.headers, self.s3.keys, time.time())

    def dispatch(self, r, resp):
        self.authenticate(r)
        if r.method == "OPTIONS":
            raise S3Error(403, "CORSResponse", "CORS is not enabled for this bucket.")
        if not r.bucket:
            if r.method == "GET":
                return self.list_buckets(r, resp)
            raise S3Error(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        if r.key is None:
            return self.bucket_request(r, resp)
        return self.object_request(r, resp)

    BUCKET_QUERIES = {"location", "versions", "list-type", "prefix", "delimiter", "marker", "max-keys",
                      "encoding-type", "continuation-token", "start-after", "fetch-owner", "key-marker",
                      "version-id-marker", "delete", "x-id", "uploads", "upload-id-marker",
                      "max-uploads"}

    def bucket_request(self, r, resp):
        unknown = [p for p in r.params if p not in self.BUCKET_QUERIES and not is_presign(p)]
        if unknown:
            raise not_implemented(f"?{unknown[0]}")
        objects = self.objects
        if r.method == "PUT":
            objects.create_bucket(r.bucket)
            resp.set_header("Location", "/" + r.bucket)
            return
        if r.method == "HEAD":
            objects.need_bucket(r.bucket)
            resp.set_header("x-amz-bucket-region", self.s3.region)
            return
        if r.method == "DELETE":
            objects.delete_bucket(r.bucket)
            resp.status = falcon.HTTP_204
            return
        if r.method == "POST" and "delete" in r.params:
            return self.delete_objects(r, resp)
        if r.method != "GET":
            raise S3Error(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        objects.need_bucket(r.bucket)
        if "location" in r.params:
            return self.send_xml(resp, s3xml.location(self.s3.region))
        if "uploads" in r.params:
            return self.list_uploads(r, resp)
        return self.list_objects(r, resp)

    OBJECT_QUERIES = {"uploadId", "uploads", "partNumber", "versionId", "x-id"} | set(s3req.OVERRIDES)

    def object_request(self, r, resp):
        unknown = [p for p in r.params if p not in self.OBJECT_QUERIES and not is_presign(p)]
        if unknown:
            raise not_implemented(f"?{unknown[0]}")
        if r.params.get("versionId", "null") != "null":
            raise S3Error(404, "NoSuchVersion", "The specified version does not exist (objects have one "
                          "version: null).")
        if "uploadId" in r.params or "uploads" in r.params:
            return self.multipart_request(r, resp)
        if r.method in ("GET", "HEAD"):
            return self.get_object(r, resp)
        if r.method == "PUT":
            if r.header("x-amz-copy-source"):
                return self.copy_object(r, resp)
            return self.put_object(r, resp)
        if r.method == "DELETE":
            self.objects.need_bucket(r.bucket)
            self.objects.delete(object_key(r.bucket, "") + r.key)
            resp.status = falcon.HTTP_204
            return
        raise S3Error(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")

    @staticmethod
    def send_xml(resp, body):
        resp.content_type = "application/xml"
        resp.data = body


def operation(method, bucket, key, params, copied=False):
    """The name of the S3 operation a request is (as dispatch routes it;
    'Other' for what it refuses), for the metrics."""
    if not bucket:
        return "ListBuckets" if method == "GET" else "Other"
    if key is None:
        if method == "GET":
            for param, name in (("location", "GetBucketLocation"), ("uploads", "ListMultipartUploads"),
                                ("versions", "ListObjectVersions")):
                if param in params:
                    return name
            return "ListObjectsV2" if params.get("list-type") == "2" else "ListObjects"
        if method == "POST":
            return "DeleteObjects" if "delete" in params else "Other"
        return {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, "Other")
    if "uploadId" in params:
        return {"PUT": "UploadPartCopy" if copied else "UploadPart", "POST": "CompleteMultipartUpload",
                "DELETE": "AbortMultipartUpload", "GET": "ListParts"}.get(method, "Other")
    if "uploads" in params:
        return "CreateMultipartUpload" if method == "POST" else "Other"
    if method == "PUT":
        return "CopyObject" if copied else "PutObject"
    return {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, "Other")


def virtual_bucket(host, domain):
    """The bucket of a virtual-host style request ('bucket.DOMAIN[:port]'), None if not one."""
    name = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else ""
    if domain and name.endswith("." + domain):
        return name[:-len(domain) - 1]
    return None


def is_presign(param):
    """A query parameter of a presigned URL (X-Amz-Signature and the others)."""
    return param.lower().startswith("x-amz-")


class Streamed:
    """A Download as a WSGI body: closed when the server is done with it,
    whether it was read or not."""

    def __init__(self, download):
        self.download = download

    def __iter__(self):
        return iter(self.download.stream(CHUNK) if self.download is not None else ())

    def close(self):
        if self.download is not None:
            self.download.close()


def object_headers(resp, obj, params):
    """An object's headers on GET and HEAD, the response-* overrides last."""
    resp.set_header("ETag", obj.quoted_etag)
    resp.set_header("Last-Modified", s3xml.http_date(obj.mtime))
    resp.content_type = obj.headers.get("content-type", DEFAULT_TYPE)
    for name, value in obj.headers.items():
        if name != "content-type":
            resp.set_header(name, value)
    for name, value in s3req.overrides(params).items():
        if name == "Content-Type":
            resp.content_type = value
        else:
            resp.set_header(name, value)


def create_app(settings: Settings, s3: S3Settings) -> falcon.App:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    if not s3.keys:
        log.warning("MKV_S3_KEYS is empty: the S3 gateway is open, anyone who reaches it may read, "
                    "write and delete every object")
    app = falcon.App(media_type="application/xml")
    app.req_options.strip_url_path_trailing_slash = False
    app.req_options.auto_parse_qs_csv = False
    app.add_sink(Gateway(settings, s3), prefix="/")
    return app


def _app_from_env():
    try:
        # every request counted into the master's metrics (its run folder, when
        # one runs on this index: gunicorn.conf.py), each failure logged
        return counted(create_app(Settings.from_env(), S3Settings.from_env()))
    except SettingsError as e:
        print(f"mkv s3: {e}", file=sys.stderr)
        sys.exit(3)


def __getattr__(name):
    """`s3:app` is built on first access (gunicorn's import of it)."""
    if name == "app":
        globals()["app"] = _app_from_env()
        return globals()["app"]
    raise AttributeError(f"module 's3' has no attribute {name!r}")
