"""worker.py, mkv's gunicorn worker: it reads every request as gunicorn's own
parser does (the environ the app sees, the body, whether the connection goes
on, or gunicorn's very error), and the master's promises hold under it and
under `-k gevent` alike."""
import re
import select
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ROOT, TIMEOUT, Cluster, wait_until

from gunicorn.config import Config
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.message import Request
from gunicorn.http.unreader import SocketUnreader

import mkv
import worker
from mkvlib.frozenheaders import TAKEN, FrozenHeaders

ADDR, SERVER = ("127.0.0.1", 40000), ("127.0.0.1", 3000)
OPAQUE = {"wsgi.input", "gunicorn.socket", "wsgi.errors", "wsgi.early_hints", "wsgi.file_wrapper", TAKEN}


def gunicorn_config():
    cfg = Config()
    cfg.set("forwarder_headers", "")     # as gunicorn.conf.py
    return cfg


CFG = gunicorn_config()
HEADS = worker.HeadReader(CFG, CFG.secure_scheme_headers)
BASE = worker.fast_base_environ(CFG)


def reading(data, read):
    """What read(unreader) makes of `data` sent on a connection then closed:
    ('error', its class and message) or ('request', the environ the app gets
    but its objects, the body, whether the connection closes after it)."""
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        unreader = SocketUnreader(theirs)
        try:
            req = read(unreader)
        except StopIteration:
            return ("closed",)
        except Exception as e:
            return ("error", type(e).__name__, str(e))
        if req is None:
            return ("closed",)
        if type(req) is worker.FastRequest:
            environ = worker.fast_environ(req, theirs, ADDR, SERVER, CFG, BASE)
        else:
            environ = gunicorn_wsgi.create(req, theirs, ADDR, SERVER, CFG)[1]
            environ["wsgi.multithread"] = True
        try:
            body = req.body.read()
        except Exception as e:
            body = ("error", type(e).__name__, str(e))
        return ("request", {k: v for k, v in environ.items() if k not in OPAQUE}, body,
                req.should_close(), unreader.read())
    finally:
        ours.close()
        theirs.close()


def by_gunicorn(data):
    return reading(data, lambda unreader: Request(CFG, unreader, ADDR, 1))


def by_mkv(data):
    return reading(data, lambda unreader: HEADS.read_request(unreader, ADDR, 1))


PLAIN = ["GET", "HEAD", "PUT", "DELETE", "UNLINK", "POST"]
METHODS = st.sampled_from(PLAIN * 3 + ["get", "PATCH", "CONNECT", "G"])
TARGETS = st.one_of(
    st.sampled_from(["/k"] * 8 + ["/a/b%20c", "/k?list", "/k?list&start=%ff", "//k", "/k#frag", "*", "k", "/%",
                     "/" + "x" * 5000, "/caf\xe9", "/a b"]),
    st.text(alphabet="/abc%?=&#:;+ \x7f\xe9", min_size=0, max_size=12))
VERSIONS = st.sampled_from(["HTTP/1.1"] * 4 + ["HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.1 "])
NAMES = st.sampled_from(["Host", "Connection", "X-Amz-Date", "Range"] * 3 + ["Host", "Content-Length", "content-length", "Connection", "Content-Type", "X-Amz-Date",
                         "Mkv-Secret", "Transfer-Encoding", "Expect", "Script_Name", "X-Forwarded-Proto",
                         "Upgrade", "Bad Name", "", "X-Forwarded-For", "Range"])
VALUES = st.one_of(
    st.sampled_from(["5", "x", "close"] * 4 + ["5", "0", "-1", "+5", "05", "99999999999999999999", "5, 5", "close", "keep-alive",
                     "chunked", "100-continue", "https", "  x  ", "a\tb", "caf\xe9", "x\x01", ""]),
    st.text(alphabet="ab 5,-\t\x7f\xe9", max_size=6))
ENDINGS = st.sampled_from(["\r\n"] * 9 + ["\n"])


@st.composite
def requests_of_all_kinds(draw):
    """Request bytes from the plain (a GET with a Host) to the malformed."""
    line = f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}"
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=5))
    head = line + "".join(f"\r\n{n}: {v}" if draw(ENDINGS) == "\r\n" else f"\n{n}:{v}" for n, v in headers)
    body = draw(st.sampled_from(["", "hello", "GET /next HTTP/1.1\r\n\r\n"]))
    cut = draw(st.sampled_from([None, None, None, 3, -2]))    # a head that never ends
    data = (head + "\r\n\r\n" + body).encode("latin-1")
    return data[:cut] if cut else data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_of_all_kinds())
def test_every_request_is_read_as_gunicorns_parser_reads_it_or_refused_with_its_error(data):
    assert by_mkv(data) == by_gunicorn(data)


@pytest.mark.parametrize("data", [
    b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /a/b%20c?x=1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhelloGET /next HTTP/1.1\r\n\r\n",
    b"DELETE /k HTTP/1.1\r\nA: 1\r\nA: 2\r\nMkv-Secret:  s \r\nConnection: close\r\n\r\n",
])
def test_a_plain_request_is_read_by_mkvs_reader_into_the_environ_gunicorn_gives(data):
    mine = by_mkv(data)
    assert mine[0] == "request" and mine == by_gunicorn(data)


def test_a_request_head_sent_a_byte_at_a_time_is_read_whole():
    data = b"GET /k?list HTTP/1.1\r\nHost: x\r\n\r\n"
    ours, theirs = socket.socketpair()
    try:
        unreader = SocketUnreader(theirs, max_chunk=1)
        ours.sendall(data)
        req = HEADS.read_request(unreader, ADDR, 1)
        assert type(req) is worker.FastRequest and (req.path, req.query) == ("/k", "list")
    finally:
        ours.close()
        theirs.close()


def test_a_body_that_came_with_its_head_is_handed_over_whole_and_the_next_request_kept():
    data = b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\n\r\n"
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(data)
        unreader = SocketUnreader(theirs)
        req = HEADS.read_request(unreader, ADDR, 1)
        assert req.body.in_hand() == b"hello"
        assert req.body.read() == b"" and req.body.in_hand() is None and worker.finished(req)
        assert HEADS.read_request(unreader, ADDR, 2).path == "/next"
    finally:
        ours.close()
        theirs.close()


def test_the_master_runs_mkvs_worker_unless_k_says_otherwise():
    def worker_class(*args):
        p = subprocess.run([sys.executable, "-m", "gunicorn", *args, "--print-config", "mkv:app"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        return next(line.split("=", 1)[1].strip() for line in p.stdout.splitlines()
                    if line.startswith("worker_class "))
    assert worker_class() == "worker.MkvWorker"
    assert worker_class("-k", "gevent") == "gevent"


# ---------------------------------------------------------------- both workers, on real servers

@pytest.fixture(scope="module", params=["worker.MkvWorker", "gevent"])
def master(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    access_log = folder / "access.log"
    with pytest.MonkeyPatch.context() as mp:    # gunicorn's own way to take flags from the environment
        mp.setenv("GUNICORN_CMD_ARGS", f"--access-logfile {access_log}")
        c = Cluster(str(folder), n_volumes=3, worker_class=request.param, client_connections=3)
    c.access_log = access_log
    yield c
    c.kill()


def exchange(port, data, answers):
    """Send `data` at once on one connection; the first `answers` answers'
    (status line, body), read until the connection closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        got = b""
        while got.count(b"HTTP/1.1 ") < answers or not complete(got, answers):
            piece = s.recv(65536)
            if not piece:
                break
            got += piece
    return split_answers(got)


def complete(got, answers):
    return len(split_answers(got)) >= answers


def split_answers(got):
    out = []
    while b"\r\n\r\n" in got:
        head, _, rest = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:])
                       if k.lower() == "content-length"), 0)
        if len(rest) < length:
            break
        out.append((lines[0], rest[:length]))
        got = rest[length:]
    return out


def test_pipelined_requests_with_a_body_between_them_are_answered_in_order(master):
    data = (b"PUT /pipelined HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /pipelined HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /pipelined-missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    statuses = [line for line, _ in exchange(master.master.port, data, 3)]
    assert statuses == ["HTTP/1.1 201 Created", "HTTP/1.1 302 Found", "HTTP/1.1 404 Not Found"]


@pytest.mark.parametrize("data, status", [
    (b"get /k HTTP/1.1\r\nHost: x\r\n\r\n", "400 Bad Request"),
    (b"GET /k HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400 Bad Request"),
    (b"GET /" + b"k" * 5000 + b" HTTP/1.1\r\n\r\n", "414 URI Too Long"),
    (b"GET /k HTTP/1.1\r\nHost: x\r\nExpect: nothing\r\n\r\n", "417 Expectation Failed"),
])
def test_a_malformed_request_gets_gunicorns_status_in_one_line(master, data, status):
    (line, body), = exchange(master.master.port, data, 1)
    assert line == f"HTTP/1.1 {status}" and body.endswith(b"\n") and body.count(b"\n") == 1, body


def test_a_client_over_its_connection_budget_loses_its_oldest_idle_connection(master):
    port = master.master.port
    held = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(6)]   # 3 per worker
    try:
        time.sleep(0.5)    # every one accepted: the 7th below is the newest wherever it lands
        (line, _), = exchange(port, b"GET /budget HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1)
        assert line == "HTTP/1.1 404 Not Found"
        # 7 connections, 2 workers of 3: some idle one was dropped to make room
        readable, _, _ = select.select(held, [], [], TIMEOUT)
        assert readable and all(s.recv(1) == b"" for s in readable)
    finally:
        for s in held:
            s.close()


def test_each_request_gets_gunicorns_access_log_line(master):
    data = (b"GET /logged-missing HTTP/1.1\r\nHost: x\r\nUser-Agent: agent/1\r\nReferer: /from\r\n\r\n"
            b"GET /logged-odd#frag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert len(exchange(master.master.port, data, 2)) == 2

    def lines():
        return [line for line in master.access_log.read_text().splitlines() if "/logged-" in line]
    wait_until(lambda: len(lines()) == 2, TIMEOUT, "two access log lines")
    plain, odd = lines()   # gunicorn's default format; the second request is gunicorn's to parse
    assert re.fullmatch(r'127\.0\.0\.1 - - \[.+\] "GET /logged-missing HTTP/1\.1" 404 0 "/from" "agent/1"', plain), plain
    assert re.fullmatch(r'127\.0\.0\.1 - - \[.+\] "GET /logged-odd#frag HTTP/1\.1" 404 0 "-" "-"', odd), odd


def test_request_hooks_of_ones_own_are_kept_and_gunicorns_do_nothing_defaults_skipped():
    from gunicorn.glogging import Logger
    cfg = gunicorn_config()
    assert worker.request_hooks(cfg, Logger(cfg)) == (None, None)
    cfg.set("loglevel", "debug")      # the default pre_request logs each request at debug level
    assert worker.request_hooks(cfg, Logger(cfg))[0] is not None

    def mine(w, req, environ, resp):
        pass
    cfg.set("post_request", mine)
    assert worker.request_hooks(cfg, Logger(cfg))[1] is not None


# ---------------------------------------------------------------- the answer's head, byte for byte

FOUND = mkv.found_head("7265f4d211b56873a381d321f586e4a9", "127.0.0.1:3001/sv01,127.0.0.1:3002/sv02", True,
                       "http://127.0.0.1:3002/sv02/1c/a0/L2s=", mkv.FOUND_TAIL)
ANSWERS = {"/found": (mkv.FOUND, FOUND, []), "/missing": (mkv.NOT_FOUND, mkv.MISSING_HEADERS, []),
           "/chunked": ("200 OK", [("X-Made-Up", " a  b "), ("Content-Type", "text/plain")], [b"hi"])}
ASKED = b"".join(b"%s %s HTTP/1.%s\r\nHost: x\r\n%s\r\n" % request for request in [
    (b"GET", b"/found", b"1", b""), (b"GET", b"/found", b"1", b""), (b"HEAD", b"/found", b"1", b""),
    (b"GET", b"/missing", b"1", b""), (b"GET", b"/missing", b"1", b""), (b"HEAD", b"/missing", b"1", b""),
    (b"GET", b"/chunked", b"1", b""), (b"GET", b"/chunked", b"1", b""), (b"HEAD", b"/chunked", b"1", b""),
    (b"GET", b"/found", b"0", b"Connection: keep-alive\r\n"), (b"HEAD", b"/found", b"0", b"Connection: keep-alive\r\n"),
    (b"GET", b"/missing", b"1", b"Connection: close\r\n")])


def answering(environ, start_response):
    """mkv's own 302 and 404 (their headers as mkv.py makes them), and a chunked answer."""
    status, headers, body = ANSWERS[environ["PATH_INFO"]]
    start_response(status, headers if type(headers) is FrozenHeaders else list(headers))   # the same list each time
    return list(body)


def served(data, serve):
    """Every byte answered to `data` sent on one connection, then closed."""
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        serve(theirs)
        theirs.close()
        got = b""
        while piece := ours.recv(65536):
            got += piece
        return got
    finally:
        ours.close()


def by_gunicorns_response(sock):
    """gunicorn's handle_request, in short: its Request, environ and Response."""
    unreader = SocketUnreader(sock)
    for number in range(1, 100):
        req = Request(CFG, unreader, ADDR, number)
        resp, environ = gunicorn_wsgi.create(req, sock, ADDR, SERVER, CFG)
        for item in answering(environ, resp.start_response):
            resp.write(item)
        resp.close()
        if resp.should_close():
            return


def by_mkvs_worker(sock):
    from gunicorn.glogging import Logger
    w = object.__new__(worker.MkvWorker)    # its serve loop, without a master's fork and signals
    w.cfg, w.log, w.wsgi, w.heads, w.base_environ = CFG, Logger(CFG), answering, HEADS, BASE
    w.pre_request_hook = w.post_request_hook = None
    w.nr, w.max_requests, w.alive = 0, 1 << 40, True
    w.serve(socket.socket(), sock, ADDR)


def test_the_workers_answer_heads_are_gunicorns_byte_for_byte(monkeypatch):
    from gunicorn import util
    monkeypatch.setattr(util, "http_date", lambda timestamp=None: "Wed, 02 Dec 2026 08:00:00 GMT")
    monkeypatch.setattr(worker.PlainResponse, "known", {})       # learned afresh below, then used
    monkeypatch.setattr(worker.PlainResponse, "statuses", {})
    monkeypatch.setattr(worker.PlainResponse, "length_names", set())
    expected = served(ASKED, by_gunicorns_response)
    assert expected.count(b"HTTP/1.") == 12 and b"Transfer-Encoding: chunked" in expected
    assert served(ASKED, by_mkvs_worker) == expected
    assert {"302 Found", "404 Not Found", "200 OK"} <= worker.PlainResponse.statuses.keys()
    assert {"key-volumes", "content-length", "X-Made-Up"} <= worker.PlainResponse.known.keys()


FROZEN_ANSWERS = {"/frozen-found": (mkv.FOUND, FrozenHeaders(FOUND), []),
                  "/frozen-missing": (mkv.NOT_FOUND, FrozenHeaders(mkv.MISSING_HEADERS), [])}
ASKED_AGAIN = ASKED.replace(b"/found", b"/frozen-found").replace(b"/missing", b"/frozen-missing")


def test_a_frozen_header_list_is_checked_once_then_sent_as_gunicorn_sends_it_each_time(monkeypatch):
    from gunicorn import util
    monkeypatch.setattr(util, "http_date", lambda timestamp=None: "Wed, 02 Dec 2026 08:00:00 GMT")
    monkeypatch.setattr(worker.PlainResponse, "known", {})
    monkeypatch.setattr(worker.PlainResponse, "statuses", {})
    monkeypatch.setattr(worker.PlainResponse, "length_names", set())
    monkeypatch.setitem(ANSWERS, "/frozen-found", FROZEN_ANSWERS["/frozen-found"])
    monkeypatch.setitem(ANSWERS, "/frozen-missing", FROZEN_ANSWERS["/frozen-missing"])
    expected = served(ASKED_AGAIN, by_gunicorns_response)
    assert expected == served(ASKED, by_gunicorns_response)     # a frozen list is a list to gunicorn
    assert served(ASKED_AGAIN, by_mkvs_worker) == expected
    frozen = FROZEN_ANSWERS["/frozen-found"][1]
    form = frozen.server_form     # kept from the first answer, taken at once by the next ones
    assert form is not None and form[0] is worker.PlainResponse.known and form[1] == 0
    assert served(ASKED_AGAIN, by_mkvs_worker) == expected and frozen.server_form is form


@pytest.mark.parametrize("headers", [
    [("Location", "http://h/p"), ("Content-Length", "0")],
    [("X-A", " padded "), ("Content-Length", "0")],           # gunicorn strips the value
    [("X-A", "a\tb")],                                         # no length: chunked
    [("X-A", "a\r\nb: c")],                                    # refused
    [("Connection", "close"), ("X-A", "x")],                  # a hop-by-hop header, dropped
    [("content-length", "5"), ("Content-Length", "6")],
])
def test_a_frozen_header_list_is_kept_or_refused_as_gunicorns_response_does_every_time(headers):
    frozen = FrozenHeaders(headers)

    def taken(response):
        try:
            response.start_response("200 OK", frozen)
        except Exception as e:
            return type(e).__name__
        return response.headers, response.response_length, response.chunked, response.status

    class Req:
        method, version = "GET", (1, 1)
    theirs = taken(gunicorn_wsgi.Response(Req(), None, CFG))
    for _ in range(3):
        assert taken(worker.PlainResponse(Req(), None, CFG)) == theirs


def test_mkvs_worker_tells_the_app_it_takes_a_frozen_header_list():
    req = worker.FastRequest("GET", "/k", (1, 1), [("HOST", "x")], 0, None, 1, "http")
    assert worker.fast_environ(req, None, ADDR, SERVER, CFG, BASE)[TAKEN] is True
    assert TAKEN not in gunicorn_wsgi.base_environ(CFG)    # gunicorn's Response is given plain lists


def test_a_frozen_header_list_cannot_change_once_made():
    frozen = FrozenHeaders([("Content-Length", "0")])
    for change in (lambda: frozen.append(("X-A", "x")), lambda: frozen.extend([]), lambda: frozen.__setitem__(0, 1),
                   lambda: frozen.__delitem__(0), lambda: frozen.__init__([("X-A", "x")]), lambda: frozen.__iadd__([]),
                   lambda: frozen.insert(0, 1), lambda: frozen.pop(), lambda: frozen.clear(), lambda: frozen.sort()):
        with pytest.raises(TypeError):
            change()
    assert frozen == [("Content-Length", "0")] and frozen + [("X-A", "x")] == [("Content-Length", "0"), ("X-A", "x")]


HEADER_NAMES = st.sampled_from(["Location", "content-length", "X-A"] * 5 + [
    "Content-Length", "Connection", "Bad Name", "", b"X-A", 5])
HEADER_VALUES = st.one_of(st.sampled_from(["0", "5", " 5 ", "x", "", " ", "a\tb", "\tx", "x\r\ny", "caf\xe9", "\u0100",
                                           "a  b", "http://h/p", b"x", None]),
                          st.text(alphabet="ab 5\t\n\x01\x7f\xe9", max_size=5))


KNOWN_NAMES = [("Location", "x"), ("content-length", "0"), ("X-A", "x"), ("Content-Length", "0")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5), st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
@example(KNOWN_NAMES, [("X-A", " x"), ("Location", "y")])
@example(KNOWN_NAMES, [("X-A", "x "), ("content-length", "5")])
@example(KNOWN_NAMES, [("X-A", "a\tb"), ("content-length", "5")])
@example(KNOWN_NAMES, [("X-A", "a"), ("X-A", "b")])
@example(KNOWN_NAMES, [("content-length", "5"), ("Content-Length", "6")])
@example(KNOWN_NAMES, [("Content-Length", "6"), ("content-length", "5")])
@example(KNOWN_NAMES, [("X-A", "a\r\nb: c")])
@example(KNOWN_NAMES, [("Location", b"x")])
def test_the_workers_answer_keeps_and_refuses_headers_as_gunicorns_does(learned, headers):
    def processed(response):
        try:
            response.process_headers(learned)     # names seen before: what the fast reading knows
        except Exception:
            pass
        response.headers, response.response_length = [], None
        try:
            response.process_headers(list(headers))
        except Exception as e:
            return type(e).__name__
        return response.headers, response.response_length
    assert processed(worker.PlainResponse(None, None, CFG)) == processed(gunicorn_wsgi.Response(None, None, CFG))
