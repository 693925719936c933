"""mkv's gunicorn worker: gunicorn's gevent worker with a lean reader of
request heads in front of gunicorn's own parser.

    gunicorn -w 4 -b :3000 mkv:app          (gunicorn.conf.py: worker_class = "worker.MkvWorker")

Everything but the reading of a plain request is gunicorn's gevent worker:
its accept loop, heartbeat and worker timeout, graceful stop, keep-alive
timeout, body readers, request handling (serve_plain is its handle_request
step for step: hooks, access log, max_requests) and Response (status line,
Server, Date, Connection, chunking; PlainResponse skips the checks of a status
line and header names already seen to pass them, and formats the head in one
piece, byte for byte gunicorn's), with connections.py's budget and send
timeout on top, as under `-k gevent`.

The head: most requests are a plain GET, HEAD, PUT, DELETE or UNLINK of a
path with a few ordinary headers. read_request() reads those itself, with a
few regular expressions over the whole head (gunicorn's parser spends most of
a GET's time, per line and per header, in Python), and builds the WSGI
environ gunicorn would (with mkvlib.frozenheaders.TAKEN: PlainResponse takes
a FrozenHeaders list). Anything outside that subset, however small the
doubt (another method, a '#' or a byte outside printable ASCII, a
Transfer-Encoding, Expect, Upgrade or forwarding header, a header name with
'_', a repeated Host or Content-Length, a head over the limits, a bare LF, a
connection that ends mid-head), is handed with every byte read so far to
gunicorn's own Request parser on the same buffer: gunicorn accepts or refuses
it exactly as under `-k gevent` (gunicorn.conf.py's one-line errors included).
So the subset only ever holds requests gunicorn accepts, read as it reads
them (tests/test_worker.py compares the two environs).
"""
import io
import logging
import os
import re
import socket
import time
from datetime import datetime

import gevent

from gunicorn import config as gunicorn_config
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.message import TOKEN_RE, Request
from gunicorn.http.wsgi import HEADER_VALUE_RE
from gunicorn.http.unreader import SocketUnreader
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from mkvlib.frozenheaders import TAKEN, FrozenHeaders

# the request line of the subset: a method of mkv's or S3's, an origin-form
# target of printable ASCII but '#' (no fragment to split off) not starting
# '//' (which urlsplit reads as a host), HTTP/1.0 or 1.1
REQUEST_LINE = re.compile(r"(GET|HEAD|PUT|DELETE|UNLINK|POST) (/(?!/)[\x21\x22\x24-\x7e]*) HTTP/1\.([01])")
VALUE_BAD = re.compile(r"[^\x20-\x7e\t]")   # a header value of the subset: printable ASCII and tabs
# headers gunicorn gives a meaning beyond the environ: left to its parser
TO_GUNICORN = frozenset(("TRANSFER-ENCODING", "EXPECT", "UPGRADE", "HTTP2-SETTINGS"))
ONCE = frozenset(("HOST", "CONTENT-TYPE", "CONTENT-LENGTH"))   # a repeat is gunicorn's 400
LENGTH_DIGITS = 18      # a Content-Length of more digits is gunicorn's to judge (and mkv's 413)


class FastRequest:
    """A request of the subset, with the attributes of gunicorn's Request
    that its Response, its access log and the worker read."""

    proxy_protocol_info = None
    _expected_100_continue = False
    fragment = ""
    trailers = ()

    def __init__(self, method, uri, version, headers, length, body, number, scheme):
        self.method, self.uri, self.version, self.headers = method, uri, version, headers
        self.path, _, self.query = uri.partition("?")
        self.length, self.body, self.req_number, self.scheme = length, body, number, scheme
        self.must_close = False
        self.closes = None    # what the head says, once asked (see should_close)

    def force_close(self):
        self.must_close = True

    def should_close(self):
        """gunicorn's Message.should_close, the first Connection header deciding.
        The worker asks three times per request (its answer's head, after the
        answer, before the next request): the head is looked at once."""
        if self.must_close:
            return True
        if self.closes is None:
            self.closes = self.head_closes()
        return self.closes

    def head_closes(self):
        """Whether the head asks for the connection to close."""
        for name, value in self.headers:
            if name == "CONNECTION":
                value = value.lower().strip(" \t")
                if value == "close":
                    return True
                if value == "keep-alive":
                    return False
                break
        return self.version <= (1, 0)


class HeadReader:
    """Reads each request's head on a connection: a FastRequest for the
    subset, gunicorn's Request (its parser, on the same bytes) otherwise."""

    def __init__(self, cfg, secure_headers):
        self.cfg = cfg
        self.line_max = cfg.limit_request_line if 0 < cfg.limit_request_line < 8190 else 8190
        self.fields_max = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= 32768 else 32768
        self.field_max = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else 8190
        self.head_max = min(16384, self.line_max + 2 + self.fields_max * (self.field_max + 2) + 4)
        self.special = TO_GUNICORN | frozenset(secure_headers) | frozenset(n.upper() for n in cfg.forwarder_headers)

    def read_request(self, unreader, addr, number):
        """The next request, or None when the client closed the connection
        before a byte of it (gunicorn's StopIteration)."""
        buf = unreader.read()
        if not buf:
            return None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                req = self.fast_request(buf, end, unreader, number)
                if req is not None:
                    return req
                break
            line_end = buf.find(b"\r\n")
            if ((line_end >= 0 and REQUEST_LINE.fullmatch(buf[:line_end].decode("latin-1")) is None)
                    or len(buf) > self.head_max or buf.count(b"\n") != buf.count(b"\r\n")):
                break   # gunicorn answers a bad request line or a bare LF at once, or a head too long
            more = unreader.read()
            if not more:
                break   # gunicorn's NoMoreData
            buf += more
        unreader.unread(buf)
        return Request(self.cfg, unreader, addr, number)

    def fast_request(self, buf, end, unreader, number):
        """The FastRequest of the head buf[:end], or None if it is outside the subset."""
        lines = buf[:end].decode("latin-1").split("\r\n")
        line = lines[0]
        m = REQUEST_LINE.fullmatch(line)
        if m is None or len(line) > self.line_max or len(lines) > self.fields_max + 1:
            return None
        headers, seen, length = [], set(), 0
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if (not colon or "_" in name or len(line) + 2 > self.field_max
                    or not TOKEN_RE.fullmatch(name) or VALUE_BAD.search(value)):
                return None
            name = name.upper()
            if name in ONCE:
                if name in seen:
                    return None
                seen.add(name)
                if name == "CONTENT-LENGTH":
                    value = value.strip(" \t")
                    if not (value.isascii() and value.isdigit()) or len(value) > LENGTH_DIGITS:
                        return None
                    length = int(value)
            elif name in self.special:
                return None
            headers.append((name, value.strip(" \t")))
        rest = end + 4
        if 0 < length <= len(buf) - rest:    # the whole body came with its head: a small PUT's
            body = BodyInHand(buf[rest:rest + length])
            rest += length
        else:
            body = Body(LengthReader(unreader, length))
        if rest < len(buf):
            unreader.unread(buf[rest:])
        return FastRequest(m.group(1), m.group(2), (1, int(m.group(3))), headers, length, body, number, "http")


class BodyInHand(io.BytesIO):
    """A request body that came whole in the reads of its head (a small
    PUT's, nearly always): read from memory as gunicorn's Body reads it, no
    socket read and no timer, and handed over whole by in_hand() to an app
    that asks (mkv.put_value: one PUT of a small value costs no read loop)."""

    failed = False    # as gunicorn's Body: reading it never fails (finished() looks)

    def in_hand(self):
        """The whole body, if none of it was read yet (it is read now); else None."""
        if self.tell():
            return None
        value = self.getvalue()
        self.seek(len(value))
        return value


def fast_base_environ(cfg):
    """What every FastRequest's environ starts from: gunicorn's, greenlets
    counted as threads, and TAKEN: PlainResponse takes a FrozenHeaders list
    (and keeps on it what it checked once)."""
    return dict(gunicorn_wsgi.base_environ(cfg), **{"wsgi.multithread": True, TAKEN: True})


def fast_environ(req, sock, client, server, cfg, base):
    """The environ gunicorn.http.wsgi.create builds for a FastRequest
    (a TCP listener, no SCRIPT_NAME, no proxy protocol, no Expect)."""
    environ = base.copy()
    environ["wsgi.input"] = req.body
    environ["gunicorn.socket"] = sock
    environ["REQUEST_METHOD"] = req.method
    environ["QUERY_STRING"] = req.query
    environ["RAW_URI"] = req.uri
    environ["SERVER_PROTOCOL"] = "HTTP/1.%d" % req.version[1]
    repeated = None
    for name, value in req.headers:
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
            continue
        if name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
            continue
        key = "HTTP_" + name.replace("-", "_")
        if key in environ:
            repeated = repeated or {}
            repeated.setdefault(key, [environ[key]]).append(value)
        else:
            environ[key] = value
    if repeated:
        for key, values in repeated.items():
            environ[key] = ",".join(values)
    environ["wsgi.url_scheme"] = req.scheme
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    environ["SERVER_NAME"], environ["SERVER_PORT"] = server[0], str(server[1])
    environ["PATH_INFO"] = util.unquote_to_wsgi_str(req.path) if "%" in req.path else req.path
    environ["SCRIPT_NAME"] = ""
    return environ


class PlainResponse(gunicorn_wsgi.Response):
    """gunicorn's Response, which checks every header of every answer by
    regular expressions and builds its head from a list of pieces: here a
    status line and a header name seen to pass gunicorn's checks are known,
    and only the values are checked, all at once; the head is formatted in
    one piece, byte for byte what gunicorn's send_headers writes (status
    line, Server, Date, Connection, Transfer-Encoding, the app's headers;
    tests/test_worker.py compares the two). Anything else goes through
    gunicorn's own start_response and process_headers, which also refuse
    what they refuse."""

    known = {}           # header name -> its lower case: a token, not hop-by-hop
    length_names = set()     # the names of known that are Content-Length
    statuses = {}        # status line -> its code: passed STATUS_RE, a body allowed
    KNOWN_MAX = 256      # names (and statuses) an app could make up, kept at most

    block = None         # the app's headers formatted, from a FrozenHeaders list checked before

    def start_response(self, status, headers, exc_info=None):
        code = self.statuses.get(status) if exc_info is None and self.status is None else None
        if code is None:
            self.block = None    # gunicorn's start_response may add to the headers already taken
            write = super().start_response(status, headers, exc_info)
            self.learn_status(status)
            return write
        self.status, self.status_code = status, code
        form = headers.server_form if type(headers) is FrozenHeaders else None
        if form is not None and form[0] is self.known:
            # this very list passed process_headers' checks before (it cannot
            # have changed since, and a name known stays known)
            self.headers.extend(headers)
            if form[1] is not None:
                self.response_length = form[1]
            self.block = form[2]
        else:
            self.process_headers(headers)
            form = headers.server_form if type(headers) is FrozenHeaders else None
            if form is not None and form[0] is self.known:
                self.block = form[2]    # checked just now: formatted once
        # gunicorn's _response_omits_body for a status with a body (learn_status)
        self._omits_body = self.req.method == "HEAD" or code == 304
        self.chunked = self.response_length is None and self.req.version > (1, 0) and not self._omits_body
        return self.write

    def learn_status(self, status):
        """Keep a status gunicorn's start_response took that needs none of its
        special cases (1xx, 204: no Content-Length; an unparsable code)."""
        code = self.status_code
        if (type(status) is str and code is not None and 200 <= code and code != 204
                and len(self.statuses) < self.KNOWN_MAX and status.split()[0] == str(code)):
            self.statuses[status] = code

    def process_headers(self, headers):
        """gunicorn's, told at once for the usual answer (every name known, no
        name twice, every value printable ASCII with no space at either end:
        what gunicorn passes unchanged), else header by header."""
        try:
            pairs = dict(headers) if type(headers) is list or type(headers) is FrozenHeaders else None
            values = "|".join(pairs.values())           # TypeError if one is not a str
        except (TypeError, ValueError, AttributeError):
            pairs = values = None
        if (pairs is None or len(pairs) != len(headers) or not self.known.keys() >= pairs.keys()
                or not values.isascii() or " |" in values or "| " in values
                or values[:1] == " " or values[-1:] == " "):
            return self.process_each(headers)
        encoded = values.encode()
        if encoded.translate(PRINTABLE) != encoded:      # a control byte
            return self.process_each(headers)
        lengths = pairs.keys() & self.length_names
        if len(lengths) > 1:
            return self.process_each(headers)
        length = int(pairs[lengths.pop()]) if lengths else None
        if length is not None:
            self.response_length = length
        # the app's own pairs: as gunicorn's (name, value) when they are tuples
        # (send_headers formats them); a list of two is formatted by gunicorn's
        self.headers.extend(headers)
        if type(headers) is FrozenHeaders:
            try:    # what start_response takes at once the next times this list is answered
                headers.server_form = (self.known, length, "".join(map(HEADER.__mod__, headers)))
            except TypeError:
                pass    # a pair not a tuple: formatted by gunicorn's send_headers each time

    def process_each(self, headers):
        known, kept, length = self.known, [], None
        for name, value in headers:
            # printable ASCII (space to '~') passes HEADER_VALUE_RE, and is
            # nearly every value: told at about half the cost of the regex
            lower = known.get(name) if type(name) is str else None
            if lower is None or type(value) is not str or not (
                    value.isascii() and value.isprintable() or HEADER_VALUE_RE.fullmatch(value)):
                self.learn(headers)
                return super().process_headers(headers)
            value = value.strip(" \t")
            if lower == "content-length":
                length = int(value)
            kept.append((name, value))
        self.headers.extend(kept)
        if length is not None:
            self.response_length = length

    def is_chunked(self):
        """gunicorn's, but for uwsgi, which a FastRequest never comes from (fast_reading)."""
        return self.response_length is None and self.req.version > (1, 0) and not self._omits_body

    def send_headers(self):
        """gunicorn's send_headers (and default_headers), formatted at once."""
        if self.headers_sent:
            return
        if self.upgrade:
            return super().send_headers()
        headers = self.block
        if headers is None:
            try:
                headers = "".join(map(HEADER.__mod__, self.headers))
            except TypeError:      # a pair not a tuple (process_headers keeps the app's)
                return super().send_headers()
        version = self.req.version
        head = HEAD % (version[0], version[1], self.status, self.version, util.http_date(),
                       "close" if self.should_close() else "keep-alive", CHUNKED if self.chunked else "", headers)
        util.write(self.sock, head.encode("latin-1"))
        self.headers_sent = True

    def learn(self, headers):
        for name, _ in headers:
            if (type(name) is str and name not in self.known and len(self.known) < self.KNOWN_MAX
                    and TOKEN_RE.fullmatch(name) and not util.is_hoppish(name)):
                self.known[name] = name.lower()
                if name.lower() == "content-length":
                    self.length_names.add(name)


# gunicorn's response head (Response.default_headers and send_headers), whole
HEAD = "HTTP/%s.%s %s\r\nServer: %s\r\nDate: %s\r\nConnection: %s\r\n%s%s\r\n"
HEADER = "%s: %s\r\n"
CHUNKED = "Transfer-Encoding: chunked\r\n"
# each control byte (and DEL) made another: no header value of the usual answer has one
PRINTABLE = bytes(c ^ 0x40 if c < 32 or c == 127 else c for c in range(256))


def http_date_per_second(http_date):
    """gunicorn.util.http_date, made once a second: every answer's Date
    header (gunicorn's Response formats it anew for each)."""
    made = [None, None]

    def date(timestamp=None):
        if timestamp is not None:
            return http_date(timestamp)
        now = int(time.time())
        if made[0] != now:
            made[:] = now, http_date(now)
        return made[1]
    date.gunicorn_http_date = http_date
    return date


def request_hooks(cfg, log):
    """gunicorn's pre_request and post_request hooks, read once (each setting
    read is a Python call in gunicorn's Config); None for gunicorn's defaults
    where they would do nothing: a debug line below the log's level, a pass."""
    pre, post = cfg.pre_request, cfg.post_request
    error_log = getattr(log, "error_log", None)
    if pre is gunicorn_config.PreRequest.default and error_log is not None \
            and not error_log.isEnabledFor(logging.DEBUG):
        pre = None
    if post is gunicorn_config.PostRequest.default:
        post = None
    return pre, post


def fast_reading(cfg):
    """Whether this configuration leaves every connection plain HTTP/1.x,
    as the subset needs (no TLS, no proxy protocol, no cleartext HTTP/2, no
    SCRIPT_NAME from the environment, keep-alive on)."""
    from gunicorn.http2 import negotiation
    return (not cfg.is_ssl and cfg.keepalive and cfg.proxy_protocol == "off"
            and getattr(cfg, "protocol", "http") == "http" and not negotiation._h2c_available(cfg)
            and not os.environ.get("SCRIPT_NAME"))


class MkvWorker(GeventWorker):
    """gunicorn's gevent worker, its heads read by HeadReader."""

    def init_process(self):
        self.fast = fast_reading(self.cfg)
        if self.fast:
            self.heads = HeadReader(self.cfg, self.cfg.secure_scheme_headers)
            self.base_environ = fast_base_environ(self.cfg)
            self.pre_request_hook, self.post_request_hook = request_hooks(self.cfg, self.log)
            if getattr(util.http_date, "gunicorn_http_date", None) is None:
                util.http_date = http_date_per_second(util.http_date)
        super().init_process()

    def handle_request(self, listener_name, req, sock, addr):
        """gunicorn's own for its Request; serve_plain for a FastRequest."""
        if type(req) is not FastRequest:
            return super().handle_request(listener_name, req, sock, addr)
        try:
            return self.serve_plain(listener_name, req, sock, addr)
        except (gevent.GreenletExit, SystemExit):    # as GeventWorker.handle_request
            pass

    def serve_plain(self, listener_name, req, sock, addr):
        """gunicorn's AsyncWorker.handle_request, step for step, for a
        FastRequest: its environ made by fast_environ, its answer by
        PlainResponse; the request's time taken only for an access log."""
        logged = getattr(self.log, "access_log_enabled", True)   # a property: read once
        request_start = datetime.now() if logged else None
        environ, resp = {}, None
        try:
            if self.pre_request_hook is not None:
                self.pre_request_hook(self, req)
            resp = PlainResponse(req, sock, self.cfg)
            environ = fast_environ(req, sock, addr, listener_name, self.cfg, self.base_environ)
            environ["wsgi.early_hints"] = gunicorn_wsgi._make_early_hints_callback(req, sock, resp)
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if not self.alive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            if self.is_already_handled(respiter):
                return False
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                if logged:
                    self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            if resp.should_close():
                raise StopIteration()
        except (StopIteration, OSError):
            raise
        except (Exception, SystemExit):
            if resp and resp.headers_sent:
                self.log.exception("Error handling request")   # a second answer would corrupt the first
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
                raise StopIteration()
            raise
        finally:
            try:
                if self.post_request_hook is not None:
                    self.post_request_hook(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return True

    def handle(self, listener, client, addr):
        if not self.fast or not isinstance(addr, tuple) or not isinstance(listener.getsockname(), tuple):
            return super().handle(listener, client, addr)
        client.setblocking(1)
        self.serve(listener, client, addr)

    def serve(self, listener, client, addr):
        """gunicorn's AsyncWorker.handle for plain HTTP/1.x, its requests read
        by HeadReader: the same keep-alive loop, errors and logs."""
        import errno
        from gunicorn.http import errors
        req, keepalive = None, None
        try:
            unreader = SocketUnreader(client)
            listener_name = listener.getsockname()
            number = 0
            keepalive = self.timeout_ctx()   # gunicorn's keep-alive timeout, one timer per connection
            try:
                while True:
                    prev, req = req, None
                    number += 1
                    req = self.next_request(keepalive, prev, unreader, addr, number)
                    if not req:
                        break
                    self.handle_request(listener_name, req, client, addr)
            except errors.NoMoreData as e:
                self.log.debug("Ignored premature client disconnection. %s", e)
            except StopIteration as e:
                self.log.debug("Closing connection. %s", e)
            except OSError:
                raise
            except Exception as e:
                self.handle_error(req, client, addr, e)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
            else:
                self.log.debug("Ignoring %s", errno.errorcode.get(e.errno, e.errno))
        except BaseException as e:
            self.handle_error(req, client, addr, e)
        finally:
            util.close(client)
            if keepalive is not None:
                keepalive.close()

    def next_request(self, keepalive, prev, unreader, addr, number):
        """The next request, read within gunicorn's keep-alive timeout (None
        when it runs out, as `with self.timeout_ctx()` ends quietly), the
        previous one's body read first; None if the connection must close."""
        keepalive.start()
        try:
            if prev is None or finished(prev):
                return self.heads.read_request(unreader, addr, number)
            return None
        except gevent.Timeout as t:
            if t is not keepalive:
                raise
            return None
        finally:
            keepalive.cancel()


def finished(req):
    """What gunicorn's parser does before reading the next request: False
    if the connection must close (the request said so, or its body failed to
    read), else True once the rest of the body is read."""
    if req.should_close() or getattr(req.body, "failed", False) is True:
        return False
    if type(req) is FastRequest and not req.length:
        return True     # no body
    while req.body.read(8192):
        pass
    return True
