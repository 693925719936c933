"""What an S3 read asks beyond the key: a Range, the conditional headers
(If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, and the
x-amz-copy-source-if-* of a copy), the response-* overrides. Pure
functions over header values; the gateway (s3.py) maps the errors."""
import base64
import binascii
import hashlib
import re
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_to_bytes

from mkvlib.objects import LAST_MODIFIED_UNKNOWN, STORED_HEADERS
from mkvlib.s3errors import S3Error, not_implemented

META_MAX = 2048            # bytes of x-amz-meta-* names and values, as S3 allows
RANGE = re.compile(r"bytes=(\d*)-(\d*)")
OVERRIDES = {"response-content-type": "Content-Type", "response-content-language": "Content-Language",
             "response-expires": "Expires", "response-cache-control": "Cache-Control",
             "response-content-disposition": "Content-Disposition",
             "response-content-encoding": "Content-Encoding"}


class RangeNotSatisfiable(ValueError):
    """A Range with no byte in the object (416 InvalidRange)."""


class NotModified(Exception):
    """A GET whose If-None-Match or If-Modified-Since holds: 304."""


class PreconditionFailed(Exception):
    """If-Match or If-Unmodified-Since does not hold: 412."""


def byte_range(header, size):
    """(first, last) inclusive of a Range header over `size` bytes; None for
    the whole object (no header, or one S3 ignores: several ranges, not
    bytes=); RangeNotSatisfiable if it selects nothing."""
    if not header:
        return None
    m = RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:                       # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable("The requested range is not satisfiable")
        return max(0, size - n), size - 1
    first = int(first)
    if last and int(last) < first:
        return None                     # not a range at all: S3 serves the whole object
    if first >= size:
        raise RangeNotSatisfiable("The requested range is not satisfiable")
    return first, min(int(last), size - 1) if last else size - 1


def _date(value):
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _etags(value):
    return [t.strip() for t in value.split(",")]


def etag_matches(value, quoted_etag):
    """If-Match / If-None-Match list against an ETag ('*' matches any)."""
    for t in _etags(value):
        if t == "*" or t == quoted_etag or t.strip('"') == quoted_etag.strip('"') or t == "W/" + quoted_etag:
            return True
    return False


def check_conditions(get, quoted_etag, mtime, read=True):
    """Raise NotModified or PreconditionFailed as S3 does (RFC 7232's order:
    If-Match, then If-Unmodified-Since unless If-Match was given, then
    If-None-Match, then If-Modified-Since unless If-None-Match was given).
    get(name) -> header value or None. `read`: a GET/HEAD (304), else a copy
    source (412 for the 'not modified' cases too). `mtime` None: not known
    (a key the native API wrote): the date conditions hold."""
    failed = "At least one of the pre-conditions you specified did not hold"
    if_match, if_none = get("if-match"), get("if-none-match")
    if if_match is not None:
        if not etag_matches(if_match, quoted_etag):
            raise PreconditionFailed(failed)
    elif _changed_since(get("if-unmodified-since"), mtime):
        raise PreconditionFailed(failed)
    same = NotModified("Not Modified") if read else PreconditionFailed(failed)
    if if_none is not None:
        if etag_matches(if_none, quoted_etag):
            raise same
    elif get("if-modified-since") is not None and _date(get("if-modified-since")) is not None \
            and mtime is not None and not _changed_since(get("if-modified-since"), mtime):
        raise same


def _changed_since(value, mtime):
    """True if the object changed after the date `value` (False if either is unknown)."""
    since = _date(value) if value is not None else None
    return since is not None and mtime is not None and int(mtime) > since


def overrides(params):
    """{header: value} of the response-* query parameters."""
    return {OVERRIDES[k]: v for k, v in params.items() if k in OVERRIDES}


def parse_max(value, ceiling, name):
    if value is None or value == "":
        return ceiling
    if not (value.isascii() and value.isdigit()):
        raise S3Error(400, "InvalidArgument", f"{name} must be a whole number from 0")
    return min(int(value), ceiling)


def encode_token(last: bytes) -> str:
    return base64.urlsafe_b64encode(last).decode("ascii")


def decode_token(token: str) -> str:
    try:
        return base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode(
            "utf-8", "surrogateescape")
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise S3Error(400, "InvalidArgument", "The continuation token provided is incorrect") from None


def stored_headers(r):
    """The headers of a PutObject that the object keeps: STORED_HEADERS and x-amz-meta-*."""
    kept, meta_size = {}, 0
    for name, value in r.headers.items():
        low = name.lower()
        if low == "content-encoding":   # aws-chunked frames this request's body, not the object
            value = ",".join(v.strip() for v in value.split(",") if v.strip().lower() != "aws-chunked")
            if not value:
                continue
        if low in STORED_HEADERS or low.startswith("x-amz-meta-"):
            kept[low] = value
            if low.startswith("x-amz-meta-"):
                meta_size += len(low) - len("x-amz-meta-") + len(value)
    if meta_size > META_MAX:
        raise S3Error(400, "MetadataTooLarge", f"Your metadata headers exceed the maximum allowed metadata size "
                      f"({META_MAX} bytes)")
    return kept


def content_md5(r):
    """The Content-MD5 header as hex, None if absent; InvalidDigest if malformed."""
    value = r.headers("content-md5")
    if value is None:
        return None
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise S3Error(400, "InvalidDigest", "The Content-MD5 you specified was not valid.")
    return raw.hex()


def check_body_md5(r, body):
    want = content_md5(r)
    if want is not None and hashlib.md5(body).hexdigest() != want:
        raise S3Error(400, "BadDigest", "The Content-MD5 you specified did not match what we received.")


def digest_check(r, payload):
    """check(md5, size) for Objects.put: the body's digests, and the Content-MD5 if sent."""
    want = content_md5(r)

    def check(md5, size):
        payload.check(md5, size)
        if want is not None and md5 != want:
            raise S3Error(400, "BadDigest", "The Content-MD5 you specified did not match what we received.")
    return check


def split_path(path: bytes):
    """(bucket, key bytes or None) of a path-style request path."""
    bucket, slash, key = path.lstrip(b"/").partition(b"/")
    try:
        name = bucket.decode("ascii")
    except UnicodeDecodeError:
        raise S3Error(400, "InvalidBucketName", "The specified bucket is not valid.") from None
    return name, (key if slash and key else None)


def part_range(r, obj):
    """(first, last) of part ?partNumber=N of a multipart object (N=1: all of another)."""
    number = parse_max(r.params.get("partNumber"), 1 << 30, "partNumber")
    sizes = obj.parts or [obj.size]
    if not 1 <= number <= len(sizes):
        raise S3Error(416, "InvalidPartNumber", "The requested partnumber is not satisfiable")
    first = sum(sizes[:number - 1])
    if obj.parts:
        r.parts_count = len(sizes)
    return (first, first + sizes[number - 1] - 1) if sizes[number - 1] else None


def request_range(r, size):
    try:
        return byte_range(r.header("range"), size)
    except RangeNotSatisfiable as e:
        raise S3Error(416, "InvalidRange", str(e)) from None


def copy_source(value):
    """(bucket, key bytes) of x-amz-copy-source: 'bucket/key', percent-encoded, a leading '/' allowed."""
    path, _, query = value.partition("?")
    if query and query != "versionId=null":
        raise not_implemented("a versionId in x-amz-copy-source")
    bucket, key = split_path(unquote_to_bytes(path))
    if not bucket or key is None:
        raise S3Error(400, "InvalidArgument", "Copy Source must mention the source bucket and key: "
                      "sourcebucket/sourcekey")
    return bucket, key


def known_mtime(obj):
    """The object's Last-Modified, None if not known (a key the native API wrote)."""
    return None if obj.mtime == LAST_MODIFIED_UNKNOWN else obj.mtime


def check_copy_conditions(r, obj):
    try:
        check_conditions(lambda name: r.header("x-amz-copy-source-" + name), obj.quoted_etag,
                               known_mtime(obj), read=False)
    except PreconditionFailed as e:
        raise S3Error(412, "PreconditionFailed", str(e)) from None


def check_read_conditions(r, obj):
    try:
        check_conditions(r.header, obj.quoted_etag, known_mtime(obj))
    except NotModified:
        raise S3Error(304, "NotModified", "Not Modified") from None
    except PreconditionFailed as e:
        raise S3Error(412, "PreconditionFailed", str(e)) from None


def copy_range(value, size):
    """(first, last) of an x-amz-copy-source-range 'bytes=first-last' within `size` bytes; None if absent."""
    if value is None:
        return None
    m = RANGE.fullmatch(value.strip())
    if not m or not m.group(1) or not m.group(2) or int(m.group(2)) < int(m.group(1)):
        raise S3Error(400, "InvalidArgument", "The x-amz-copy-source-range value must be of the form "
                      "bytes=first-last where first and last are the zero-based offsets of the first and last bytes "
                      "to copy")
    first, last = int(m.group(1)), int(m.group(2))
    if last >= size:
        raise S3Error(400, "InvalidRange", "The requested range is not satisfiable")
    return first, last
