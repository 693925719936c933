"""AWS Signature Version 4, as S3 checks it: in the Authorization header
and in presigned URLs (the query's X-Amz-*), and the chunk signatures of a
STREAMING-AWS4-HMAC-SHA256-PAYLOAD body (mkvlib.payload). Pure functions
over what a request carries; tests/test_sigv4.py holds them to botocore's
own signer.

The canonical request is rebuilt from the decoded path (percent-encoded
again, '/' kept, as S3 does: its paths are not normalized), the query's
pairs sorted, the signed headers' values trimmed."""
import dataclasses
import datetime
import hashlib
import hmac
import re
from urllib.parse import quote, unquote

from mkvlib.errors import MkvError

ALGORITHM = "AWS4-HMAC-SHA256"
EXPIRES_MAX = 604_800          # seconds a presigned URL may live (7 days), as S3 allows
SKEW_MAX = 15 * 60             # seconds a signed request's date may be off from ours
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
AUTH_HEADER = re.compile(r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]{64})")


class AuthError(MkvError):
    """A request S3 would refuse for its authentication: `code` and `status` say how."""

    def __init__(self, code, message, status=403):
        super().__init__(message)
        self.code, self.status = code, status


@dataclasses.dataclass
class Signed:
    """What a verified request's signature covers: its scope and key, for
    the chunk signatures of a streaming body (mkvlib.payload)."""
    access: str
    amz_date: str
    scope: str
    key: bytes             # the signing key
    signature: str         # the seed signature of a streaming body
    payload: str           # x-amz-content-sha256 (or UNSIGNED for a presigned URL)


def uri_encode(value, safe="-_.~"):
    return quote(value, safe=safe)


def canonical_uri(path: bytes) -> str:
    """The path as S3 signs it: each byte percent-encoded but unreserved ones and '/'."""
    return quote(path, safe="/~") or "/"


def canonical_query(query_string: str, drop=()) -> str:
    """The query's pairs, decoded then encoded again, sorted (X-Amz-Signature dropped when presigned)."""
    pairs = []
    for part in query_string.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if name in drop:
            continue
        pairs.append((uri_encode(name), uri_encode(value)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_headers(header, signed) -> str:
    """'name:value\n' of each signed header, its value trimmed; header(name) -> value or None."""
    lines = []
    for name in signed:
        value = header(name)
        if value is None:
            raise AuthError("SignatureDoesNotMatch", f"the signed header {name} is missing")
        lines.append(f"{name}:{' '.join(value.split())}\n")
    return "".join(lines)


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    key = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def string_to_sign(amz_date, scope, canonical_request) -> str:
    return "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()))


def parse_date(amz_date):
    try:
        return datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()
    except (TypeError, ValueError):
        raise AuthError("AccessDenied", "X-Amz-Date is not a date (YYYYMMDDTHHMMSSZ)") from None


def parse_credential(credential, amz_date, keys):
    """(access key, scope, signing key) of a Credential=AK/date/region/s3/aws4_request."""
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or parts[3] != "s3":
        raise AuthError("AuthorizationHeaderMalformed", "the Credential is not AK/date/region/s3/aws4_request", 400)
    access, date, region = parts[0], parts[1], parts[2]
    if access not in keys:
        raise AuthError("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
    if not amz_date.startswith(date):
        raise AuthError("AuthorizationHeaderMalformed", "the Credential's date is not X-Amz-Date's", 400)
    return access, "/".join(parts[1:]), signing_key(keys[access], date, region)


def check(method, path, query, header, keys, now):
    """Verify a request's signature (header or presigned); returns Signed.
    header(name) -> value or None (names in lowercase); keys: {access: secret}."""
    auth = header("authorization")
    if auth is not None:
        return check_header(method, path, query, header, keys, now, auth)
    if "X-Amz-Signature=" in query:
        return check_presigned(method, path, query, header, keys, now)
    raise AuthError("AccessDenied", "Access Denied: this gateway needs requests signed with AWS Signature V4")


def check_header(method, path, query, header, keys, now, auth):
    m = AUTH_HEADER.fullmatch(auth.strip())
    if m is None:
        if auth.startswith("AWS "):
            raise AuthError("InvalidRequest", "Signature V2 is not supported: sign with AWS Signature V4", 400)
        raise AuthError("AuthorizationHeaderMalformed", "The authorization header is malformed", 400)
    credential, signed_headers, signature = m.groups()
    amz_date = header("x-amz-date") or ""
    when = parse_date(amz_date)
    if abs(now - when) > SKEW_MAX:
        raise AuthError("RequestTimeTooSkewed", "The difference between the request time and the server's time "
                        "is too large.")
    access, scope, key = parse_credential(credential, amz_date, keys)
    payload = header("x-amz-content-sha256")
    if payload is None:
        raise AuthError("InvalidRequest", "Missing required header for this request: x-amz-content-sha256", 400)
    signed = signed_headers.split(";")
    if "host" not in signed:
        raise AuthError("AccessDenied", "the Host header must be signed")
    canonical = "\n".join((method, canonical_uri(path), canonical_query(query),
                           canonical_headers(header, signed), signed_headers, payload))
    if not hmac.compare_digest(sign(key, string_to_sign(amz_date, scope, canonical)), signature):
        raise AuthError("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                        "signature you provided. Check your key and signing method.")
    return Signed(access, amz_date, scope, key, signature, payload)


def check_presigned(method, path, query, header, keys, now):
    params = {}
    for part in query.split("&"):
        name, _, value = part.partition("=")
        params[unquote(name)] = unquote(value)
    if params.get("X-Amz-Algorithm") != ALGORITHM:
        raise AuthError("AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256", 400)
    amz_date = params.get("X-Amz-Date", "")
    when = parse_date(amz_date)
    try:
        expires = int(params.get("X-Amz-Expires", ""))
    except ValueError:
        raise AuthError("AuthorizationQueryParametersError", "X-Amz-Expires must be a number of seconds", 400) from None
    if not 0 < expires <= EXPIRES_MAX:
        raise AuthError("AuthorizationQueryParametersError",
                        f"X-Amz-Expires must be less than a week (in seconds); that is, between 1 and {EXPIRES_MAX}", 400)
    if now > when + expires:
        raise AuthError("AccessDenied", "Request has expired")
    if when - now > SKEW_MAX:
        raise AuthError("AccessDenied", "Request is not valid yet")
    access, scope, key = parse_credential(params.get("X-Amz-Credential", ""), amz_date, keys)
    signed_headers = params.get("X-Amz-SignedHeaders", "")
    signed = signed_headers.split(";")
    if "host" not in signed:
        raise AuthError("AccessDenied", "the Host header must be signed")
    payload = header("x-amz-content-sha256") or UNSIGNED
    canonical = "\n".join((method, canonical_uri(path), canonical_query(query, drop=("X-Amz-Signature",)),
                           canonical_headers(header, signed), signed_headers, payload))
    if not hmac.compare_digest(sign(key, string_to_sign(amz_date, scope, canonical)), params.get("X-Amz-Signature", "")):
        raise AuthError("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                        "signature you provided. Check your key and signing method.")
    return Signed(access, amz_date, scope, key, params["X-Amz-Signature"], payload)


def chunk_signature(signed: Signed, previous: str, chunk_sha256: str) -> str:
    """The signature of one chunk of a STREAMING-AWS4-HMAC-SHA256-PAYLOAD body."""
    text = "\n".join(("AWS4-HMAC-SHA256-PAYLOAD", signed.amz_date, signed.scope, previous, EMPTY_SHA256,
                      chunk_sha256))
    return sign(signed.key, text)


def trailer_signature(signed: Signed, previous: str, trailer: bytes) -> str:
    """The signature of the trailing headers of a signed streaming body."""
    text = "\n".join(("AWS4-HMAC-SHA256-TRAILER", signed.amz_date, signed.scope, previous,
                      hashlib.sha256(trailer).hexdigest()))
    return sign(signed.key, text)
