"""mkvlib.payload: aws-chunked bodies decoded and their signatures and
checksums checked, against AWS's documented example of a signed streaming
upload and botocore's own aws-chunked framing. In-process, no servers."""
import base64
import calendar
import hashlib
import io
import zlib

import pytest
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

from mkvlib import sigv4
from mkvlib.payload import Payload, PayloadError

# AWS's example (S3 API reference, "Signature Calculations for the Authorization
# Header: Transferring Payload in Multiple Chunks"): 66,560 bytes of 'a' in two chunks
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEYS = {"AKIAIOSFODNN7EXAMPLE": SECRET}
EXAMPLE_HEADERS = {
    "host": "s3.amazonaws.com", "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
    "authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
                     "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
                     "x-amz-decoded-content-length;x-amz-storage-class,"
                     "Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "content-encoding": "aws-chunked",
    "x-amz-decoded-content-length": "66560", "content-length": "66824"}
CHUNK_SIGNATURES = ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
                    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
                    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]


class Header(dict):
    @property
    def names(self):
        return list(self)

    def __call__(self, name):
        return self.get(name)


def example_body(tamper=False):
    body = b""
    for data, sig in zip([b"a" * 65536, b"a" * 1024, b""], CHUNK_SIGNATURES):
        if tamper and data:
            data = b"b" + data[1:]
        body += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(data), sig.encode(), data)
    return body


def decode(payload, body, piece=1000):
    """The decoded value, the body fed in pieces of `piece` bytes."""
    value = b"".join(payload.chunks(body[i:i + piece] for i in range(0, len(body), piece)))
    payload.check(hashlib.md5(value).hexdigest(), len(value))
    return value


def example_payload():
    header = Header(EXAMPLE_HEADERS)
    signed = sigv4.check("PUT", b"/examplebucket/chunkObject.txt", "", header, KEYS,
                         calendar.timegm((2013, 5, 24, 0, 0, 0)))
    return Payload(header, signed)


def test_signed_chunks_of_aws_example_decode_to_the_value():
    body = example_body()
    assert len(body) == 66824
    assert decode(example_payload(), body) == b"a" * 66560


def test_a_changed_chunk_is_signature_does_not_match():
    with pytest.raises(sigv4.AuthError) as info:
        decode(example_payload(), example_body(tamper=True))
    assert info.value.code == "SignatureDoesNotMatch"


def botocore_chunked(value, chunk_size=4096):
    """An aws-chunked body with a CRC32 trailer, framed by botocore (as it sends one over HTTPS)."""
    wrapper = AwsChunkedWrapper(io.BytesIO(value), checksum_cls=Crc32Checksum,
                                checksum_name="x-amz-checksum-crc32", chunk_size=chunk_size)
    return wrapper.read()


def unsigned_trailer_headers(value):
    return Header({"x-amz-content-sha256": sigv4.STREAMING_UNSIGNED_TRAILER, "content-encoding": "aws-chunked",
                   "x-amz-trailer": "x-amz-checksum-crc32", "x-amz-decoded-content-length": str(len(value))})


def test_unsigned_trailer_body_of_botocore_decodes_and_its_crc32_holds():
    value = bytes(range(256)) * 100
    assert decode(Payload(unsigned_trailer_headers(value)), botocore_chunked(value)) == value


def test_a_wrong_trailer_checksum_is_bad_digest():
    value = b"x" * 10000
    body = botocore_chunked(value)
    good = base64.b64encode(zlib.crc32(value).to_bytes(4, "big"))
    body = body.replace(good, base64.b64encode(b"\0\0\0\0"))
    with pytest.raises(PayloadError) as info:
        decode(Payload(unsigned_trailer_headers(value)), body)
    assert info.value.code == "BadDigest"


def test_content_sha256_mismatch_is_refused():
    header = Header({"x-amz-content-sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(PayloadError) as info:
        decode(Payload(header), b"value")
    assert info.value.code == "XAmzContentSHA256Mismatch"


@pytest.mark.parametrize("name, digest", [
    ("crc32", lambda v: zlib.crc32(v).to_bytes(4, "big")),
    ("sha1", lambda v: hashlib.sha1(v).digest()),
    ("sha256", lambda v: hashlib.sha256(v).digest())])
def test_checksum_headers_are_verified(name, digest):
    value = b"checksummed"
    good = Header({f"x-amz-checksum-{name}": base64.b64encode(digest(value)).decode()})
    assert decode(Payload(good), value) == value
    bad = Header({f"x-amz-checksum-{name}": base64.b64encode(digest(b"other")).decode()})
    with pytest.raises(PayloadError):
        decode(Payload(bad), value)


@pytest.mark.parametrize("name", ["crc32c", "crc64nvme"])
def test_crt_checksum_headers_are_verified_as_botocore_computes_them(name):
    from botocore.httpchecksum import CrtCrc32cChecksum, CrtCrc64NvmeChecksum
    value = b"checksummed" * 1000
    checksum = {"crc32c": CrtCrc32cChecksum, "crc64nvme": CrtCrc64NvmeChecksum}[name]()
    checksum.update(value)
    good = Header({f"x-amz-checksum-{name}": checksum.b64digest()})
    assert decode(Payload(good), value) == value
    with pytest.raises(PayloadError):
        decode(Payload(Header({f"x-amz-checksum-{name}": checksum.b64digest()})), value + b"!")
