"""A PutObject's (or UploadPart's) body as the client framed and vouched
for it: plain or aws-chunked (its chunk signatures checked, its trailers
read), and every digest it sent checked (x-amz-content-sha256,
x-amz-checksum-*, Content-MD5 by the caller) before the value may land:
check() runs in the write's fence, after the last byte and before any MOVE.
Memory stays bounded: bytes go on as they come."""
import base64
import binascii
import hashlib
import zlib

from mkvlib.errors import ClientGone, MkvError
from mkvlib.sigv4 import (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER, UNSIGNED,
                          AuthError, chunk_signature, trailer_signature)

LINE_MAX = 8192            # bytes of one chunk header or trailer line
STREAMING = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)


class PayloadError(MkvError):
    """A body that does not match what its headers vouch for: S3's `code`, a 400."""

    def __init__(self, code, message, status=400):
        super().__init__(message)
        self.code, self.status = code, status


class Crc:
    """A CRC as hashlib's objects look: update(), digest() (big-endian, `width` bytes)."""

    def __init__(self, fn, width=4):
        self.fn, self.width, self.value = fn, width, 0

    def update(self, data):
        self.value = self.fn(data, self.value)

    def digest(self):
        return self.value.to_bytes(self.width, "big")


def _crt(name, width):
    """A CRC of awscrt (AWS's C library, as the SDKs use it: crc32c, crc64nvme at C speed)."""
    def make():
        from awscrt import checksums
        return Crc(getattr(checksums, name), width)
    return make


CHECKSUMS = {"crc32": lambda: Crc(zlib.crc32), "crc32c": _crt("crc32c", 4), "crc64nvme": _crt("crc64nvme", 8),
             "sha1": hashlib.sha1, "sha256": hashlib.sha256}


def _b64(value):
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise PayloadError("InvalidRequest", "a checksum header is not base64") from None


class Payload:
    """One body: chunks() gives its bytes, check() its verdict."""

    def __init__(self, header, signed=None):
        """header(name) -> value or None; signed: the request's sigv4.Signed (None: no keys set)."""
        self.signed = signed
        self.content_sha = header("x-amz-content-sha256")
        if self.content_sha is not None and self.content_sha not in (UNSIGNED,) + STREAMING:
            if len(self.content_sha) != 64 or not all(c in "0123456789abcdef" for c in self.content_sha):
                raise PayloadError("InvalidArgument", "x-amz-content-sha256 is not a SHA-256 in hex, "
                                   "UNSIGNED-PAYLOAD or a STREAMING- form")
        self.streaming = self.content_sha in STREAMING
        self.sha256 = hashlib.sha256() if self.content_sha and not self.streaming and self.content_sha != UNSIGNED \
            else None
        self.expected = {}    # algorithm -> digest it must have (bytes); from a trailer later
        for name, make in CHECKSUMS.items():
            value = header(f"x-amz-checksum-{name}")
            if value is not None:
                self.expected[name] = _b64(value)
        for name in header_names(header, "x-amz-checksum-"):
            if name not in CHECKSUMS and name not in ("algorithm", "type", "mode"):
                raise PayloadError("InvalidRequest", f"x-amz-checksum-{name} is not supported "
                                   f"(crc32, crc32c, crc64nvme, sha1, sha256 are)")
        trailer = (header("x-amz-trailer") or "").strip().lower()
        self.trailer = trailer[len("x-amz-checksum-"):] if trailer.startswith("x-amz-checksum-") else None
        if trailer and self.trailer not in CHECKSUMS:
            raise PayloadError("InvalidRequest", f"x-amz-trailer {trailer} is not supported")
        self.hashers = {n: CHECKSUMS[n]() for n in list(self.expected) + ([self.trailer] if self.trailer else [])}
        self.decoded_length = header("x-amz-decoded-content-length")

    def length(self, content_length):
        """The value's length: x-amz-decoded-content-length for an aws-chunked body."""
        if not self.streaming:
            return content_length
        try:
            return int(self.decoded_length)
        except (TypeError, ValueError):
            raise PayloadError("MissingContentLength", "an aws-chunked body needs x-amz-decoded-content-length",
                               411) from None

    def chunks(self, raw):
        """The value's bytes, from the body's `raw` chunks, each hashed on its way."""
        data = self._decode(raw) if self.streaming else raw
        for piece in data:
            if self.sha256 is not None:
                self.sha256.update(piece)
            for h in self.hashers.values():
                h.update(piece)
            yield piece

    def check(self, md5, size):
        """Raise PayloadError unless every digest the client sent holds."""
        if self.sha256 is not None and self.sha256.hexdigest() != self.content_sha:
            raise PayloadError("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not "
                               "match what was computed.")
        for name, want in self.expected.items():
            if self.hashers[name].digest() != want:
                raise PayloadError("BadDigest", f"The {name.upper()} you specified did not match the calculated "
                                   "checksum.")
        if self.streaming and str(size) != str(self.decoded_length):
            raise PayloadError("IncompleteBody", "the body's chunks do not add up to x-amz-decoded-content-length")

    # -- aws-chunked

    def _decode(self, raw):
        reader = Lines(raw)
        previous = self.signed.signature if self.signed is not None else None
        signed = self.content_sha in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        while True:
            size, signature = parse_chunk_header(reader.line())
            digest = hashlib.sha256() if signed else None
            for piece in reader.take(size):
                if digest is not None:
                    digest.update(piece)
                yield piece
            if signed and self.signed is not None:
                want = chunk_signature(self.signed, previous, digest.hexdigest())
                if signature != want:
                    raise AuthError("SignatureDoesNotMatch", "a chunk's signature does not match")
                previous = want
            if size == 0:
                break
            if reader.line() != b"":
                raise PayloadError("IncompleteBody", "a chunk of the aws-chunked body is not followed by CRLF")
        self._trailers(reader, previous, signed)

    def _trailers(self, reader, previous, signed):
        lines = []
        while True:
            line = reader.line()
            if line == b"":
                break
            lines.append(line)
        fields = {}
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise PayloadError("IncompleteBody", "a trailer of the aws-chunked body is not name:value")
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if self.trailer:
            value = fields.get("x-amz-checksum-" + self.trailer)
            if value is None:
                raise PayloadError("InvalidRequest", f"the trailer x-amz-checksum-{self.trailer} did not come")
            self.expected[self.trailer] = _b64(value)
            if signed and self.signed is not None:
                text = b"".join(l + b"\n" for l in lines if not l.lower().startswith(b"x-amz-trailer-signature"))
                if fields.get("x-amz-trailer-signature") != trailer_signature(self.signed, previous, text):
                    raise AuthError("SignatureDoesNotMatch", "the trailer's signature does not match")


def header_names(header, prefix):
    """Names after `prefix` of the request's headers (header.names: lowercase names, if the caller gave them)."""
    return [n[len(prefix):] for n in getattr(header, "names", ()) if n.startswith(prefix)]


def parse_chunk_header(line):
    """(size, chunk-signature or None) of 'hex[;chunk-signature=...]'."""
    size, _, ext = line.partition(b";")
    try:
        n = int(size.strip(), 16)
    except ValueError:
        raise PayloadError("IncompleteBody", "a chunk size of the aws-chunked body is not hex") from None
    signature = None
    if ext.strip().startswith(b"chunk-signature="):
        signature = ext.strip()[len(b"chunk-signature="):].decode("latin-1")
    return n, signature


class Lines:
    """A body's chunks read as CRLF lines and runs of bytes."""

    def __init__(self, raw):
        self.raw, self.buf = iter(raw), bytearray()

    def _more(self):
        data = next(self.raw, None)
        if not data:
            if data is None:
                raise ClientGone("the aws-chunked body ended early; value not stored")
            return
        self.buf += data

    def line(self):
        while True:
            at = self.buf.find(b"\r\n")
            if at >= 0:
                line = bytes(self.buf[:at])
                del self.buf[:at + 2]
                return line
            if len(self.buf) > LINE_MAX:
                raise PayloadError("IncompleteBody", "a line of the aws-chunked body is too long")
            self._more()

    def take(self, n):
        while n:
            if not self.buf:
                self._more()
                continue
            piece = bytes(self.buf[:n])
            del self.buf[:len(piece)]
            n -= len(piece)
            yield piece
