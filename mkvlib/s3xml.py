"""S3's XML: the documents the gateway answers with, and the ones it reads
(DeleteObjects, CompleteMultipartUpload). Pure functions, no HTTP."""
import time
import xml.etree.ElementTree as ET
from email.utils import formatdate
from urllib.parse import quote
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
OWNER = "<Owner><ID>mkv</ID><DisplayName>mkv</DisplayName></Owner>"


class BadXML(ValueError):
    """A request body that is not the XML document asked for."""


def iso8601(t: float) -> str:
    """S3's timestamps in listings: 2009-10-12T17:50:30.000Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def http_date(t: float) -> str:
    return formatdate(int(t), usegmt=True)


def text(value) -> str:
    """XML text of a str (or bytes, read as UTF-8; other bytes escaped, never lost)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    # characters XML 1.0 cannot hold at all: as S3 does, the client should ask encoding-type=url
    return escape("".join(c if c >= " " or c in "\t\n\r" else "\ufffd" for c in value))


def name(value: bytes, url: bool) -> str:
    """A key or prefix as a listing gives it: percent-encoded with encoding-type=url."""
    return quote(value, safe="/") if url else text(value)


def tag(label, value) -> str:
    return f"<{label}>{value}</{label}>"


def document(root, inner: str) -> bytes:
    return (HEAD + f'<{root} xmlns="{NS}">{inner}</{root}>').encode("utf-8")


def error(code, message, resource, request_id) -> bytes:
    return (HEAD + "<Error>" + tag("Code", code) + tag("Message", text(message)) + tag("Resource", text(resource))
            + tag("RequestId", request_id) + "</Error>").encode("utf-8")


def list_buckets(buckets, token=None, prefix=None) -> bytes:
    items = "".join("<Bucket>" + tag("Name", n) + tag("CreationDate", iso8601(c)) + "</Bucket>" for n, c in buckets)
    more = tag("ContinuationToken", text(token)) if token else ""
    more += tag("Prefix", text(prefix)) if prefix else ""
    return document("ListAllMyBucketsResult", OWNER + tag("Buckets", items) + more)


def location(region) -> bytes:
    # us-east-1 is the empty constraint, as S3 answers it
    return document("LocationConstraint", "" if region == "us-east-1" else text(region))


def contents(obj, strip: int, url: bool, owner: bool) -> str:
    return ("<Contents>" + tag("Key", name(obj.key[strip:], url)) + tag("LastModified", iso8601(obj.mtime))
            + tag("ETag", text(obj.quoted_etag)) + tag("Size", obj.size) + (OWNER if owner else "")
            + tag("StorageClass", "STANDARD") + "</Contents>")


def listing(page, strip, url, v2, params) -> bytes:
    """ListBucketResult of one page (Objects.list): params are the fields
    given back as sent, in S3's order, [(label, value or None)]."""
    objects, prefixes, truncated, last = page
    fields = "".join(tag(label, value) for label, value in params if value is not None)
    body = fields + tag("IsTruncated", "true" if truncated else "false")
    body += "".join(contents(o, strip, url, owner=not v2 or params_has(params, "FetchOwner")) for o in objects)
    body += "".join("<CommonPrefixes>" + tag("Prefix", name(p[strip:], url)) + "</CommonPrefixes>"
                    for p in prefixes)
    return document("ListBucketResult", body)


def params_has(params, label):
    return any(lab == label and value is not None for lab, value in params)


def version_listing(page, strip, url, params) -> bytes:
    """ListVersionsResult: every object is its one 'null' version."""
    objects, prefixes, truncated, last = page
    body = "".join(tag(label, value) for label, value in params if value is not None)
    body += tag("IsTruncated", "true" if truncated else "false")
    if truncated and last is not None:
        body += tag("NextKeyMarker", name(last[strip:], url)) + tag("NextVersionIdMarker", "null")
    for o in objects:
        body += ("<Version>" + tag("Key", name(o.key[strip:], url)) + tag("VersionId", "null")
                 + tag("IsLatest", "true") + tag("LastModified", iso8601(o.mtime)) + tag("ETag", text(o.quoted_etag))
                 + tag("Size", o.size) + OWNER + tag("StorageClass", "STANDARD") + "</Version>")
    body += "".join("<CommonPrefixes>" + tag("Prefix", name(p[strip:], url)) + "</CommonPrefixes>"
                    for p in prefixes)
    return document("ListVersionsResult", body)


def _children(root, label):
    return [c for c in root if c.tag.rsplit("}", 1)[-1] == label]


def parse(body: bytes, root_label):
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise BadXML("The XML you provided was not well-formed or did not validate against our published schema.") from None
    if root.tag.rsplit("}", 1)[-1] != root_label:
        raise BadXML(f"expected a {root_label} document")
    return root


def child_text(node, label):
    found = _children(node, label)
    return (found[0].text or "") if found else None


def parse_delete(body: bytes):
    """(keys, quiet) of a DeleteObjects request."""
    root = parse(body, "Delete")
    keys = []
    for obj in _children(root, "Object"):
        key = child_text(obj, "Key")
        if key is None:
            raise BadXML("an Object without a Key")
        keys.append(key)
    quiet = (child_text(root, "Quiet") or "").strip().lower() == "true"
    return keys, quiet


def delete_result(deleted, errors, quiet) -> bytes:
    """deleted: [key]; errors: [(key, code, message)]."""
    body = "" if quiet else "".join("<Deleted>" + tag("Key", text(k)) + "</Deleted>" for k in deleted)
    body += "".join("<Error>" + tag("Key", text(k)) + tag("Code", c) + tag("Message", text(m)) + "</Error>"
                    for k, c, m in errors)
    return document("DeleteResult", body)


def copy_result(etag, mtime, root="CopyObjectResult") -> bytes:
    return document(root, tag("LastModified", iso8601(mtime)) + tag("ETag", text(etag)))


def initiate(bucket, key, upload_id) -> bytes:
    return document("InitiateMultipartUploadResult", tag("Bucket", bucket) + tag("Key", text(key))
                    + tag("UploadId", upload_id))


def complete_result(location, bucket, key, etag) -> bytes:
    return document("CompleteMultipartUploadResult", tag("Location", text(location)) + tag("Bucket", bucket)
                    + tag("Key", text(key)) + tag("ETag", text(f'"{etag}"')))


def parse_complete(body: bytes):
    """[(part number, etag)] of a CompleteMultipartUpload request, as given."""
    root = parse(body, "CompleteMultipartUpload")
    parts = []
    for part in _children(root, "Part"):
        number, etag = child_text(part, "PartNumber"), child_text(part, "ETag")
        if number is None or etag is None or not number.strip().isdigit():
            raise BadXML("a Part needs a PartNumber and an ETag")
        parts.append((int(number), etag.strip()))
    return parts


def list_parts(bucket, key, upload_id, parts, marker, max_parts, truncated) -> bytes:
    """parts: [(number, md5, size, mtime)]."""
    body = (tag("Bucket", bucket) + tag("Key", text(key)) + tag("UploadId", upload_id)
            + tag("PartNumberMarker", marker) + OWNER.replace("Owner>", "Initiator>") + OWNER
            + tag("StorageClass", "STANDARD") + tag("MaxParts", max_parts)
            + tag("IsTruncated", "true" if truncated else "false"))
    if truncated and parts:
        body += tag("NextPartNumberMarker", parts[-1][0])
    for number, md5, size, mtime in parts:
        body += ("<Part>" + tag("PartNumber", number) + tag("LastModified", iso8601(mtime))
                 + tag("ETag", f'"{md5}"') + tag("Size", size) + "</Part>")
    return document("ListPartsResult", body)


def list_uploads(bucket, uploads, strip, params, truncated) -> bytes:
    """uploads: [(key, id, created)]."""
    body = tag("Bucket", bucket) + "".join(tag(label, value) for label, value in params if value is not None)
    body += tag("IsTruncated", "true" if truncated else "false")
    if truncated and uploads:
        body += tag("NextKeyMarker", text(uploads[-1][0][strip:])) + tag("NextUploadIdMarker", uploads[-1][1])
    for key, upload_id, created in uploads:
        body += ("<Upload>" + tag("Key", text(key[strip:])) + tag("UploadId", upload_id)
                 + OWNER.replace("Owner>", "Initiator>") + OWNER + tag("StorageClass", "STANDARD")
                 + tag("Initiated", iso8601(created)) + "</Upload>")
    return document("ListMultipartUploadsResult", body)
