"""The S3 gateway's errors: S3Error (status, S3's code, one line), and
which S3 code and status each error of the core is (ERRORS)."""
from mkvlib.errors import (BadKey, ClientGone, DeleteIncomplete, IndexBusy, KeyBusy, KeyMissing, KeyTooLong,
                           SettingsError, Unavailable, VolumeDown, VolumeError)
from mkvlib.multipart import NoSuchUpload, PartError
from mkvlib.objects import BadBucketName, BucketMissing, BucketNotEmpty
from mkvlib.payload import PayloadError
from mkvlib.sigv4 import AuthError

# the core's errors, the nearest class in the hierarchy wins: (status, S3 code)
ERRORS = {
    NoSuchUpload: (404, "NoSuchUpload"),
    BucketMissing: (404, "NoSuchBucket"),
    KeyMissing: (404, "NoSuchKey"),
    KeyTooLong: (400, "KeyTooLongError"),
    BadKey: (400, "InvalidArgument"),
    BadBucketName: (400, "InvalidBucketName"),
    BucketNotEmpty: (409, "BucketNotEmpty"),
    KeyBusy: (409, "OperationAborted"),
    ClientGone: (400, "IncompleteBody"),
    VolumeDown: (503, "ServiceUnavailable"),
    Unavailable: (503, "ServiceUnavailable"),
    VolumeError: (500, "InternalError"),
    DeleteIncomplete: (500, "InternalError"),
    IndexBusy: (503, "SlowDown"),
    SettingsError: (503, "ServiceUnavailable"),
}


class S3Error(Exception):
    """An answer in S3's terms: status, code, one-line message."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def not_implemented(what):
    return S3Error(501, "NotImplemented", f"A header or query you provided implies functionality "
                   f"that is not implemented: {what}")


def s3_error_of(exc):
    """The S3Error of a core error: the nearest class of its hierarchy in ERRORS;
    the errors that carry S3's code themselves give theirs."""
    if isinstance(exc, (AuthError, PayloadError)):
        return S3Error(exc.status, exc.code, str(exc))
    if isinstance(exc, PartError):
        return S3Error(400, exc.code, str(exc))
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            status, code = ERRORS[cls]
            return S3Error(status, code, str(exc))
    return S3Error(500, "InternalError", "We encountered an internal error. Please try again.")
