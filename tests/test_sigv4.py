"""mkvlib.sigv4 against botocore's own signer: what botocore signs (header
or presigned URL), the gateway's check accepts, and any change to a signed
part is refused. In-process, no servers."""
import time
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from mkvlib import sigv4

KEYS = {"AKIDEXAMPLE": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
CREDS = Credentials("AKIDEXAMPLE", KEYS["AKIDEXAMPLE"])


class Header:
    def __init__(self, headers):
        self.h = {k.lower(): v for k, v in headers.items()}
        self.names = list(self.h)

    def __call__(self, name):
        return self.h.get(name)


def signed_by_botocore(method, url, body=b"", headers=None, region="eu-west-3"):
    request = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    S3SigV4Auth(CREDS, "s3", region).add_auth(request)
    return request


def check(request, method=None, keys=KEYS, now=None):
    parts = urlsplit(request.url)
    from urllib.parse import unquote_to_bytes
    return sigv4.check(method or request.method, unquote_to_bytes(parts.path), parts.query,
                       Header(dict(request.headers, host=parts.netloc)), keys, now or time.time())


def test_header_signature_of_botocore_is_accepted():
    request = signed_by_botocore("PUT", "http://h:9000/b/dir/a%20b~%2B.txt?x-id=PutObject", b"body",
                                 {"Content-Type": "text/plain", "x-amz-meta-a": "  two  spaces "})
    assert check(request).access == "AKIDEXAMPLE"


def test_query_with_empty_and_repeated_order_is_accepted():
    request = signed_by_botocore("GET", "http://h:9000/b?list-type=2&prefix=a%2Fb&delimiter=%2F&location")
    check(request)


def test_wrong_secret_is_signature_does_not_match():
    request = signed_by_botocore("GET", "http://h:9000/b/k")
    with pytest.raises(sigv4.AuthError) as info:
        check(request, keys={"AKIDEXAMPLE": "another"})
    assert info.value.code == "SignatureDoesNotMatch"


def test_a_changed_method_or_path_is_refused():
    request = signed_by_botocore("GET", "http://h:9000/b/k")
    with pytest.raises(sigv4.AuthError):
        check(request, method="DELETE")
    request.url = "http://h:9000/b/other"
    with pytest.raises(sigv4.AuthError):
        check(request)


def test_unknown_access_key_is_invalid_access_key_id():
    request = signed_by_botocore("GET", "http://h:9000/b/k")
    with pytest.raises(sigv4.AuthError) as info:
        check(request, keys={"OTHER": "x"})
    assert info.value.code == "InvalidAccessKeyId"


def test_old_request_is_too_skewed():
    request = signed_by_botocore("GET", "http://h:9000/b/k")
    with pytest.raises(sigv4.AuthError) as info:
        check(request, now=time.time() + 3600)
    assert info.value.code == "RequestTimeTooSkewed"


def presigned(url, expires, method="GET"):
    request = AWSRequest(method=method, url=url)
    S3SigV4QueryAuth(CREDS, "s3", "us-east-1", expires=expires).add_auth(request)
    return request


def test_presigned_url_of_botocore_is_accepted_until_it_expires():
    request = presigned("http://h:9000/b/k%20x", 60)
    check(request)
    with pytest.raises(sigv4.AuthError) as info:
        check(request, now=time.time() + 61)
    assert (info.value.code, info.value.status) == ("AccessDenied", 403)


def test_presigned_url_living_over_a_week_is_refused():
    with pytest.raises(sigv4.AuthError) as info:
        check(presigned("http://h:9000/b/k", 604_801))
    assert info.value.code == "AuthorizationQueryParametersError"
    check(presigned("http://h:9000/b/k", 604_800))


def test_unsigned_request_is_access_denied():
    with pytest.raises(sigv4.AuthError) as info:
        sigv4.check("GET", b"/b/k", "", Header({"host": "h"}), KEYS, time.time())
    assert info.value.code == "AccessDenied"
