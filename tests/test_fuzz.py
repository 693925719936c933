"""Bad input, fuzzed, against the running master (the session `cluster`: 4
volumes, 3 replicas): keys of any bytes and spelling, methods, headers
(Content-Length lies, Transfer-Encoding, Range, Expect, junk) and query
strings. Requests go out as raw bytes, so no client normalizes them.

The contract: bad input is never answered 5xx (nothing is down here); every
storable key reads back exactly; nothing is written outside a volume's
folders, nor inside one off a key's placement path; no worker dies and no
traceback is logged.

Examples per property: FUZZ_EXAMPLES below, or MKV_FUZZ_EXAMPLES (the soak
sets it; 2000 makes 10,000 inputs with the five properties). The inputs
sent are counted, printed in pytest's summary ("fuzz: N inputs ..."), and
written to the file MKV_FUZZ_COUNT_FILE names, if set.
"""
import base64
import collections
import hashlib
import json
import os
import random
import select
import socket
import string
import time
from typing import NamedTuple
from urllib.parse import quote, unquote_to_bytes

import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mkvlib.placement import key2path, key2volume, path2key
from mkvlib.volumes import CHUNK
from conftest import TIMEOUT

pytestmark = pytest.mark.fuzz

FUZZ_EXAMPLES = int(os.environ.get("MKV_FUZZ_EXAMPLES") or 100)
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
REQUEST_LINE_MAX = 4094     # gunicorn's limit_request_line: a longer request line is 414

INPUTS = collections.Counter()     # examples run, per property
REQUESTS = collections.Counter()   # requests sent, per property
_fresh = iter(range(10 ** 9))


# ---------------------------------------------------------------- a raw HTTP client

class Answer(NamedTuple):
    status: int
    headers: dict      # lowercase name -> value
    body: bytes


def exchange(data: bytes, head=False, counter=None, half_close=True) -> Answer:
    """Send `data` as it is, close our side (unless not `half_close`), and parse
    the first final answer (skipping 1xx). The connection and every read time
    out at TIMEOUT."""
    if counter:
        REQUESTS[counter] += 1
    deadline = time.monotonic() + TIMEOUT
    received = b""
    with socket.create_connection(("127.0.0.1", PORT[0]), timeout=TIMEOUT) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass     # answered and reset before it read everything: that answer is still there to read
        try:
            while time.monotonic() < deadline:
                piece = s.recv(65536)
                if not piece:
                    break
                received += piece
            else:
                raise AssertionError(f"no end of answer within {TIMEOUT} s: {received[:300]!r}")
        except ConnectionResetError:
            pass
    return parse_answer(received, head, data)


def parse_answer(received, head, sent):
    rest = received
    while True:
        head_bytes, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"no answer (or a truncated one) to {sent[:300]!r}: {received[:300]!r}"
        lines = head_bytes.decode("latin-1").split("\r\n")
        version, _, status = lines[0].partition(" ")
        assert version.startswith("HTTP/1."), f"not an HTTP answer to {sent[:300]!r}: {received[:300]!r}"
        status = int(status.split(" ")[0])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status >= 200:
            break
    if head or status in (204, 304):
        body = b""
    elif "content-length" in headers:
        body = rest[:int(headers["content-length"])]
        assert len(body) == int(headers["content-length"]), f"short body: {received[:300]!r}"
    else:
        body = rest
    return Answer(status, headers, body)


PORT = [None]


@pytest.fixture(scope="module", autouse=True)
def fuzz_run(cluster, request):
    """Points the raw client at the master; notes the files outside the volume
    folders and off a key's path in them (earlier tests of the session may
    have left some), the master's workers and where its log ends, for the
    checks at the end; counts the inputs and reports them."""
    PORT[0] = cluster.master.port
    state = {"outside": files_outside_volumes(cluster), "misplaced": set(misplaced_files(cluster)),
             "pids": sorted(cluster.master.pids()),
             "log_offset": os.path.getsize(cluster.master.log_path), "started": time.monotonic()}
    plugin = FuzzReport()
    request.config.pluginmanager.register(plugin, "mkv-fuzz-report")
    yield state
    plugin.seconds = time.monotonic() - state["started"]
    if os.environ.get("MKV_FUZZ_COUNT_FILE"):
        with open(os.environ["MKV_FUZZ_COUNT_FILE"], "w") as f:
            f.write(f"{sum(INPUTS.values())}\n")


class FuzzReport:
    """Says in pytest's summary how many inputs the fuzz run sent."""
    seconds = None

    def pytest_terminal_summary(self, terminalreporter):
        per = ", ".join(f"{name} {n}" for name, n in sorted(INPUTS.items()))
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        terminalreporter.write_line(f"fuzz: {sum(INPUTS.values())} inputs, {sum(REQUESTS.values())} requests"
                                    f"{took} ({per}; MKV_FUZZ_EXAMPLES={FUZZ_EXAMPLES})")


def request_bytes(method, target, headers=(), body=b"", version=b"HTTP/1.1"):
    """One request as bytes; `headers` are whole header lines (bytes)."""
    lines = [method + b" " + target + b" " + version, b"Host: fuzz", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def put_bytes(target, body):
    return request_bytes(b"PUT", target, [b"Content-Length: %d" % len(body)], body)


def fresh_target(tag):
    """A key of its own for one example: `/fuzz-TAG-PID-N`."""
    return f"/fuzz-{tag}-{os.getpid()}-{next(_fresh)}".encode()


def assert_not_5xx(answer, sent):
    assert answer.status < 500, f"{answer.status} {answer.body[:300]!r} for {sent[:500]!r}"
    assert b"Traceback" not in answer.body, answer.body


def read_back(cluster, target, value, counter):
    """The key behind `target` redirects to a replica at its placement that holds `value`."""
    answer = exchange(request_bytes(b"GET", target), counter=counter)
    assert answer.status == 302, (target, answer)
    key = unquote_to_bytes(target.split(b"?")[0])
    volumes = answer.headers["key-volumes"].split(",")
    assert volumes == key2volume(key, cluster.volume_names(), 3, 10)
    assert answer.headers["location"] in [f"http://{v}{key2path(key)}" for v in volumes]
    assert answer.headers["content-md5"] == hashlib.md5(value).hexdigest()
    REQUESTS[counter] += 1
    got = requests.get(answer.headers["location"], timeout=TIMEOUT, allow_redirects=False)
    assert got.status_code == 200 and got.content == value, (target, got.status_code, got.content[:100])


def delete(target, counter):
    answer = exchange(request_bytes(b"DELETE", target), counter=counter)
    assert answer.status == 204, (target, answer)
    assert exchange(request_bytes(b"GET", target), counter=counter).status == 404


# ---------------------------------------------------------------- keys

# bytes a request target cannot carry as they are: they must be %-escaped
MUST_ESCAPE = set(range(0x21)) | set(range(0x7F, 0x100)) | set(b"%?#")

KEY_PIECES = [b"..", b".", b"", b"%2F", b"%", b"%%", b"%zz", b"?", b"#", b"+", b" ", b"etc", b"passwd",
              b"\x00", b"\r\n", b"\xff", b"\xc3\xa9", "\u263a".encode(), "\U0001f600".encode(), b"=", b"\\",
              b"~", b".mkv", b".tmp", b".id", b"sv00", b"list", b"&", b";"]

KEYS = st.one_of(
    st.binary(max_size=40),                                          # any bytes
    st.text(max_size=30).map(lambda s: s.encode("utf-8")),           # any unicode
    st.lists(st.sampled_from(KEY_PIECES), max_size=10).map(b"/".join),    # dot segments, %2F...
    st.builds(lambda piece, n: piece * n,                            # very long
              st.sampled_from([b"k", b"\xc3\xa9", b"?", b".", b"/", b"%", b"kk?", b"a/"]),
              st.integers(50, 1600)),
).map(lambda rest: b"/" + rest)

SPELLINGS = st.tuples(st.sampled_from(["needed", "all", "mixed"]), st.booleans(), st.integers(0, 2 ** 32))


def spell(key: bytes, spelling) -> bytes:
    """A request target for `key`: its bytes %-escaped where they must be
    ("needed"), everywhere but the leading '/' ("all": '/' as %2F, '.' as %2E),
    or anything in between ("mixed"), with hex digits in either case."""
    mode, lower, seed = spelling
    rnd = random.Random(seed)
    out = [b"/"]
    for b in key[1:]:
        escape = b in MUST_ESCAPE or mode == "all" or (mode == "mixed" and rnd.random() < 0.5)
        if escape:
            hexed = b"%%%02X" % b
            out.append(hexed.lower() if lower and (mode != "mixed" or rnd.random() < 0.5) else hexed)
        else:
            out.append(bytes([b]))
    return b"".join(out)


def expected_put_status(key, target, body=b"value"):
    """What the README promises for a PUT of `key` spelled as `target`, with
    `body` sent with its Content-Length (None: no body, no Content-Length)."""
    if len(b"PUT " + target + b" HTTP/1.1") > REQUEST_LINE_MAX:
        return 414                    # gunicorn: request line too long
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return 400                    # not UTF-8
    if body == b"":
        return 411                    # Content-Length: 0
    parts = base64.b64encode(key).split(b"/")
    if any(len(p) > 255 for p in parts) or len(b"/".join(parts)) + 1 > 2048:
        return 414                    # a file name part over 255 bytes, or 2048 with its folders
    if not all(parts):
        return 400                    # a name part would be empty: no file can have it
    return 411 if body is None else 201   # no body at all: found empty once the key is claimed


def spelled_within_limit(key, spelling, method=b"GET"):
    target = spell(key, spelling)
    if len(method + b" " + target + b" HTTP/1.1") > REQUEST_LINE_MAX:
        target = spell(key, ("needed", False, 0))
    return target


@FUZZ
@given(key=KEYS, value=st.binary(min_size=1, max_size=4096), put_as=SPELLINGS, get_as=SPELLINGS,
       delete_as=SPELLINGS)
def test_any_key_is_stored_and_read_back_exactly_or_refused_with_a_4xx(cluster, key, value, put_as, get_as,
                                                                       delete_as):
    target = spell(key, put_as)
    expected = expected_put_status(key, target)
    if expected == 201:
        # a key some other test of this session stored is not ours to overwrite or delete
        assume(exchange(request_bytes(b"GET", spelled_within_limit(key, get_as)), counter="keys").status == 404)
    INPUTS["keys"] += 1
    sent = put_bytes(target, value)
    answer = exchange(sent, counter="keys")
    assert_not_5xx(answer, sent)
    assert answer.status == expected, (key, target, answer)
    if answer.status != 201:
        assert exchange(request_bytes(b"GET", spelled_within_limit(key, get_as)), counter="keys").status in (
            404, 414)
        return
    assert answer.headers["content-md5"] == hashlib.md5(value).hexdigest()
    read_back(cluster, spelled_within_limit(key, get_as), value, "keys")
    delete(spelled_within_limit(key, delete_as, b"DELETE"), "keys")


# ---------------------------------------------------------------- methods

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "UNLINK", "POST", "PATCH", "OPTIONS", "TRACE", "CONNECT",
                     "PROPFIND", "PROPPATCH", "MOVE", "COPY", "MKCOL", "LOCK", "get", "put", "Put", "delete",
                     "unlink", "head", "GET GET", "PUT\x00", ""]),
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=24),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=12),
).map(lambda m: m.encode("latin-1"))
MINE = {b"GET": 404, b"HEAD": 404, b"DELETE": 404, b"UNLINK": 404}   # on a key nobody has


@FUZZ
@given(method=METHODS, body=st.none() | st.binary(max_size=200), suffix=st.binary(max_size=12))
def test_any_method_on_any_key_is_answered_without_a_5xx(cluster, method, body, suffix):
    INPUTS["methods"] += 1
    key = fresh_target("method") + suffix
    target = spell(key, ("needed", False, 0))
    headers = [] if body is None else [b"Content-Length: %d" % len(body)]
    sent = request_bytes(method, target, headers, body or b"")
    answer = exchange(sent, head=method == b"HEAD", counter="methods")
    assert_not_5xx(answer, sent)
    if method in MINE:
        assert answer.status == MINE[method], (sent, answer)
    elif method == b"PUT":
        assert answer.status == expected_put_status(key, target, body), (sent, answer)
        if answer.status == 201:
            read_back(cluster, target, body, "methods")
            delete(target, "methods")
    elif method.startswith((b"\r", b"\n")):
        pass    # empty lines before a request line may be skipped (RFC 9112 2.2): another method then
    elif not method or any(c not in TOKEN_CHARS.encode() for c in method):
        assert answer.status == 400, (sent, answer)
    else:
        assert answer.status in (400, 405), (sent, answer)


# ---------------------------------------------------------------- headers

def put_until_answered(target, length, most=32 << 20):
    """PUT with this Content-Length, sending its body until the master answers
    (or `most` bytes are sent); the master's status."""
    with socket.create_connection(("127.0.0.1", PORT[0]), timeout=TIMEOUT) as s:
        s.sendall(b"PUT %s HTTP/1.1\r\nHost: fuzz\r\nContent-Length: %d\r\n\r\n" % (target, length))
        sent, received = 0, b""
        try:
            while sent < most and not select.select([s], [], [], 0)[0]:
                sent += s.send(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while b"\r\n\r\n" not in received:
            piece = s.recv(65536)
            if not piece:
                break
            received += piece
    assert received, f"no answer after {sent} bytes"
    return int(received.split(b" ", 2)[1])


def test_a_content_length_beyond_what_a_volume_takes_is_413_and_stores_nothing(cluster):
    """nginx refuses a Content-Length over 2**63 - 1 (off_t): the master passed such
    a length on, and answered 502 (volume answered PUT with 400) for the client's lie."""
    for length in [1 << 63, 10 ** 30]:
        target = fresh_target("huge")
        assert put_until_answered(target, length) == 413
        assert exchange(request_bytes(b"GET", target)).status == 404
        assert exchange(put_bytes(target, b"v")).status == 201
        delete(target, None)


UNKNOWN = object()    # the value a 201 stored cannot be told from the request alone


class Shaped(NamedTuple):
    method: bytes
    headers: list
    body: bytes
    stored: object    # bytes: what a 201 must have stored; None: no 201 allowed; UNKNOWN

    def __repr__(self):   # a failing example is shown without megabytes of body
        def short(b):
            return repr(b) if not isinstance(b, bytes) or len(b) < 200 else f"{b[:100]!r}...({len(b)} bytes)"
        return (f"Shaped(method={self.method!r}, headers={[short(h) for h in self.headers]}, "
                f"body={short(self.body)}, stored={short(self.stored)})")


def chunked(parts, draw):
    """`parts` as a valid chunked body, sizes in either case, maybe with extensions and trailers."""
    out = b""
    for p in parts:
        size = b"%x" % len(p)
        out += (size.upper() if draw(st.booleans()) else size)
        out += draw(st.sampled_from([b"", b";ext", b";a=b", b' ;name="v"']))
        out += b"\r\n" + p + b"\r\n"
    return out + b"0\r\n" + draw(st.sampled_from([b"", b"Trailer-Field: 1\r\n"])) + b"\r\n"


JUNK_LENGTHS = [b"-1", b"abc", b"1.5", b"0x10", b"+5", b"", b"5, 5", b"9" * 30, b"%d" % (1 << 63),
                b"%d" % ((1 << 63) - 1), b"18446744073709551616", b"1e3", b"\xff", b"\x00"]
EXPECTS = [b"100-continue", b"100-Continue", b"100-CONTINUE", b"", b"foo", b"100-continue, foo", b"200-ok",
           b"100-continue;x=1", b"\xff"]
TRANSFER_ENCODINGS = [b"chunked", b"gzip", b"identity", b"chunked, gzip", b"gzip, chunked", b"CHUNKED",
                      b"chunked;q=1", b"chunked\x00", b"", b"chunked, chunked"]
HEADER_VALUE = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
HEADER_NAME = st.one_of(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20).map(str.encode),
                        st.binary(min_size=0, max_size=10).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
ODD_LINES = [b"No-Colon-Here", b" folded continuation", b"\tfolded", b"Space-Before-Colon : x", b": no name",
             b"Host: second-host", b"Host:", b"X: " + b"v" * 9000, b"Mkv-Secret: wrong", b"Connection: keep-alive",
             b"Content-Type: application/json", b"Content-Md5: 00", b"X-Forwarded-For: ::1"]


@st.composite
def shaped_requests(draw):
    """A request with something odd in its headers, and what a 201 must have stored."""
    kind = draw(st.sampled_from(["lying-length", "junk-length", "chunked", "bad-chunked", "transfer-encoding",
                                 "expect", "odd-lines", "many-headers"]))
    body = draw(st.binary(min_size=0, max_size=3000))
    if kind in ("lying-length", "junk-length") and draw(st.integers(0, 9)) == 0:
        body += b"b" * (CHUNK + 1000)    # past one chunk: the master starts writing the volumes
    if kind == "lying-length":
        length = draw(st.integers(0, len(body) + 100))
        stored = body[:length] if 0 < length <= len(body) else None
        return Shaped(b"PUT", [b"Content-Length: %d" % length], body, stored)
    if kind == "junk-length":
        return Shaped(b"PUT", [b"Content-Length: " + draw(st.sampled_from(JUNK_LENGTHS))], body, None)
    if kind == "chunked":
        parts = draw(st.lists(st.binary(min_size=1, max_size=500), max_size=6))
        return Shaped(b"PUT", [b"Transfer-Encoding: chunked"], chunked(parts, draw), b"".join(parts) or None)
    if kind == "bad-chunked":
        return Shaped(b"PUT", [b"Transfer-Encoding: chunked"], draw(st.sampled_from(
            [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"ffffffffffffffffffff\r\nabc", b"-1\r\nx\r\n",
             b"5\r\nab", b"3\nabc\n0\n\n", b"3\r\nabc", b""])) + body[:50], UNKNOWN)
    if kind == "transfer-encoding":
        headers = [b"Transfer-Encoding: " + draw(st.sampled_from(TRANSFER_ENCODINGS))]
        if draw(st.booleans()):
            headers.append(b"Content-Length: %d" % len(body))
        return Shaped(b"PUT", headers, body, UNKNOWN)
    if kind == "expect":
        expect = draw(st.sampled_from(EXPECTS))
        headers = [b"Expect: " + expect, b"Content-Length: %d" % len(body)]
        # 100-continue is the one expectation there is; any other is 417
        return Shaped(b"PUT", draw(st.permutations(headers)), body,
                      body or None if expect.lower() == b"100-continue" else None)
    method = draw(st.sampled_from([b"PUT", b"GET", b"HEAD", b"DELETE"]))
    if kind == "odd-lines":
        lines = draw(st.lists(st.one_of(st.sampled_from(ODD_LINES),
                                        st.builds(lambda n, v: n + b": " + v, HEADER_NAME, HEADER_VALUE)),
                              min_size=1, max_size=8))
    else:
        lines = [b"X-Many-%d: %d" % (i, i) for i in range(draw(st.integers(50, 150)))]
    return Shaped(method, lines + [b"Content-Length: %d" % len(body)], body, UNKNOWN)


@FUZZ
@given(shaped=shaped_requests())
def test_odd_headers_are_answered_without_a_5xx_and_store_only_what_was_sent(cluster, shaped):
    INPUTS["headers"] += 1
    target = fresh_target("header")
    sent = request_bytes(shaped.method, target, shaped.headers, shaped.body)
    answer = exchange(sent, head=shaped.method == b"HEAD", counter="headers")
    if answer.status == 501 and unknown_transfer_coding(shaped.headers):
        # RFC 9112 6.1: a transfer coding the server does not know is 501; gunicorn says so itself
        assert answer.body.startswith(b"Unsupported transfer coding"), (sent, answer)
        assert exchange(request_bytes(b"GET", target), counter="headers").status == 404
        return
    assert_not_5xx(answer, sent)
    if shaped.method != b"PUT":
        return
    if shaped.stored is None:
        assert answer.status != 201, (sent, answer)
    elif shaped.stored is not UNKNOWN:
        assert answer.status == 201, (sent, answer)
    if answer.status == 201:
        if shaped.stored is UNKNOWN:   # what the master read: the body, or the data of its chunks
            candidates = [shaped.body, b"".join(unchunk_loosely(shaped.body))]
            md5 = answer.headers["content-md5"]
            assert md5 in [hashlib.md5(c).hexdigest() for c in candidates], (sent, answer)
            read_back(cluster, target, next(c for c in candidates if hashlib.md5(c).hexdigest() == md5), "headers")
        else:
            read_back(cluster, target, shaped.stored, "headers")
        delete(target, "headers")
    else:
        assert exchange(request_bytes(b"GET", target), counter="headers").status == 404


def unknown_transfer_coding(headers):
    """Whether a Transfer-Encoding names a coding other than chunked."""
    codings = [c.strip().lower() for line in headers if line.lower().startswith(b"transfer-encoding:")
               for c in line.partition(b":")[2].split(b",")]
    return any(c != b"chunked" for c in codings)


def unchunk_loosely(body):
    """The data of a chunked body as far as it is well formed."""
    while body:
        size, sep, body = body.partition(b"\r\n")
        try:
            n = int(size.split(b";")[0], 16)
        except ValueError:
            return
        if not sep or n == 0:
            return
        yield body[:n]
        body = body[n + 2:]


RANGE = 1000


@pytest.fixture(scope="module")
def ranged_key(cluster):
    target = fresh_target("range")
    value = random.Random(7).randbytes(RANGE)
    assert exchange(put_bytes(target, value)).status == 201
    location = exchange(request_bytes(b"GET", target)).headers["location"]
    yield target, value, location
    exchange(request_bytes(b"DELETE", target))


RANGES = st.one_of(
    st.sampled_from([b"bytes=", b"bytes=5-2", b"bytes=-0", b"bytes=0-", b"bytes=-", b"bytes=999999999999999999999-",
                     b"items=1-2", b"bytes=0-0,1-1,2-2", b"bytes=" + b"0-1," * 300, b"bytes=1000-", b"bytes=-2000",
                     b"bytes = 1-2", b"bytes=\xff", b"none", b""]),
    st.builds(lambda a, b: b"bytes=%d-%d" % (a, b), st.integers(0, 2 * RANGE), st.integers(0, 2 * RANGE)),
    st.builds(lambda n: b"bytes=-%d" % n, st.integers(0, 2 * RANGE)),
    HEADER_VALUE.map(lambda v: b"bytes=" + v),
)


@FUZZ
@given(range_=RANGES)
def test_a_range_of_any_shape_is_answered_without_a_5xx_by_the_master_and_the_volume(ranged_key, range_):
    INPUTS["ranges"] += 1
    target, value, location = ranged_key
    sent = request_bytes(b"GET", target, [b"Range: " + range_])
    answer = exchange(sent, counter="ranges")
    if any(b < 0x20 and b != 0x09 or b == 0x7F for b in range_):
        assert answer.status == 400, (sent, answer)   # no field value holds a control character
        return
    assert answer.status == 302, (sent, answer)
    host, _, path = location[len("http://"):].partition("/")
    sent = b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: v\r\nRange: " + range_ + b"\r\nConnection: close\r\n\r\n"
    REQUESTS["ranges"] += 1
    with socket.create_connection(tuple(host.rsplit(":", 1)), timeout=TIMEOUT) as s:
        s.sendall(sent)
        received = b""
        while piece := s.recv(65536):
            received += piece
    got = parse_answer(received, False, sent)
    assert got.status in (200, 206, 416), (range_, got.status)
    if got.status == 200:
        assert got.body == value
    elif got.status == 206 and "content-range" in got.headers:
        first, last = map(int, got.headers["content-range"].split()[1].split("/")[0].split("-"))
        assert got.body == value[first:last + 1]


# ---------------------------------------------------------------- query strings

QUERY_NAMES = [b"list", b"unlinked", b"start", b"limit", b"encoding-type", b"l%69st", b"LIST", b"list ", b"",
               b"%", b"%zz", b"%ff", b"+", b"list+", b"x"]
QUERY_VALUES = st.one_of(
    st.sampled_from([b"", b"0", b"1", b"2", b"-1", b"1000000", b"1000001", b"9" * 30, b"url", b"URL", b"json",
                     b"%", b"%zz", b"%ff%fe", b"+", b"%2B", b"/", b"\xd9\xa3", b"\xc2\xb2", b"1e3", b" 1"]),
    st.binary(max_size=20).map(lambda b: quote(b, safe="").encode()),
    st.text(alphabet=TOKEN_CHARS + "/=?&;", max_size=20).map(str.encode),
)
QUERIES = st.lists(st.tuples(st.sampled_from(QUERY_NAMES), st.none() | QUERY_VALUES), max_size=5).map(
    lambda pairs: b"&".join(n if v is None else n + b"=" + v for n, v in pairs))
QUERY_BASE = f"/fuzz-query-{os.getpid()}/".encode()


@pytest.fixture(scope="module")
def listed_keys():
    """A few keys under QUERY_BASE for the listings to page through."""
    keys = [QUERY_BASE + k for k in [b"a", b"b c", b"caf\xc3\xa9", b"d/e", b"z"]]
    for k in keys:
        assert exchange(put_bytes(quote(k).encode(), b"v")).status == 201
    yield keys
    for k in keys:
        exchange(request_bytes(b"DELETE", quote(k).encode()))


@FUZZ
@given(method=st.sampled_from([b"GET", b"HEAD", b"PUT", b"DELETE", b"UNLINK"]), query=QUERIES,
       separator=st.sampled_from([b"&", b";", b"&&", b"?"]), prefix=st.sampled_from([b"", b"a", b"b", b"%", b"zz"]))
def test_any_query_string_is_answered_without_a_5xx(listed_keys, method, query, separator, prefix):
    INPUTS["queries"] += 1
    query = query.replace(b"&", separator) if separator != b"&&" else query.replace(b"&", b"&&")
    # reads look at the listed keys; writes go to a key of their own
    path = QUERY_BASE + prefix if method in (b"GET", b"HEAD") else fresh_target("query")
    target = path + b"?" + query
    headers = [b"Content-Length: 1"] if method == b"PUT" else []
    sent = request_bytes(method, target, headers, b"v" if method == b"PUT" else b"")
    answer = exchange(sent, head=method == b"HEAD", counter="queries")
    assert_not_5xx(answer, sent)
    if answer.status == 200 and method == b"GET":
        page = json.loads(answer.body)
        assert set(page) <= {"keys", "next", "encoding-type"} and isinstance(page["next"], str)
        names = [unquote_to_bytes(k) if page.get("encoding-type") else k.encode() for k in page["keys"]]
        prefix_bytes = unquote_to_bytes(QUERY_BASE + prefix)
        assert names == sorted(names) and all(n.startswith(prefix_bytes) for n in names), page
        assert set(names) <= set(listed_keys)
    if method in (b"PUT", b"DELETE", b"UNLINK"):
        # a query that names nothing ("?", "?&&") leaves the request to the path; any other: 400
        names_nothing = not any(query.split(b"&"))
        expected = 400 if not names_nothing else 201 if method == b"PUT" else 404
        assert answer.status == expected, (sent, answer)
        if answer.status == 201:
            delete(path, "queries")


# ---------------------------------------------------------------- after the run

def files_outside_volumes(cluster):
    """Every file under the folders that hold the volume folders, but not inside one."""
    found = set()
    volume_dirs = {os.path.abspath(d) for d in cluster.volume_dirs}
    for parent in {os.path.dirname(d) for d in volume_dirs}:
        for folder, dirs, files in os.walk(parent):
            dirs[:] = [d for d in dirs if os.path.join(folder, d) not in volume_dirs]
            found.update(os.path.join(folder, f) for f in files)
    return found


def misplaced_files(cluster):
    """Files inside a volume folder that are neither the volume's own (.mkv,
    .tmp, .id) nor at the path key2path gives a key, in an svXX folder."""
    subvolumes = int(cluster.settings.get("subvolumes", 10))
    folders = {"sv%02X" % i for i in range(subvolumes)}
    bad = []
    for root in cluster.volume_dirs:
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            top = rel.split(os.sep)[0]
            if rel == ".":
                dirs[:] = [d for d in dirs if d not in (".mkv", ".tmp")]
                bad += [os.path.join(folder, f) for f in files if f != ".id"]
                bad += [os.path.join(folder, d) for d in dirs if d not in folders]
                continue
            for f in files:
                path = "/" + os.path.relpath(os.path.join(folder, f), os.path.join(root, top))
                try:
                    key = path2key(path.split("/", 3)[3])
                except (ValueError, IndexError):
                    bad.append(os.path.join(folder, f))
                    continue
                if top not in folders or key2path(key) != path:
                    bad.append(os.path.join(folder, f))
    return bad


def test_the_fuzz_run_wrote_no_file_outside_the_volumes_nor_off_a_keys_path_in_one(cluster, fuzz_run):
    index = os.path.abspath(cluster.db())    # and its -wal and -shm
    appeared = files_outside_volumes(cluster) - fuzz_run["outside"]
    assert [f for f in appeared if not f.startswith(index)] == []
    assert set(misplaced_files(cluster)) - fuzz_run["misplaced"] == set()


def test_the_fuzz_run_lost_no_worker_and_logged_no_traceback(cluster, fuzz_run):
    assert sorted(cluster.master.pids()) == fuzz_run["pids"]
    with open(cluster.master.log_path, "rb") as f:
        f.seek(fuzz_run["log_offset"])
        log = f.read().decode("utf-8", "replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
