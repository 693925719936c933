"""mkv master: a Falcon WSGI app that indexes keys and redirects reads to volumes.

    MKV_VOLUMES=localhost:3001,localhost:3002,localhost:3003 MKV_DB=/tmp/mkv/index.sqlite3 \\
        gunicorn -w 4 -b :3000 mkv:app     (gunicorn.conf.py: worker.py's gevent worker)

Settings are read once, here at the edge (see mkvlib.settings); the storage
logic is in mkvlib and knows nothing of HTTP. Each storage error class maps to
one status in ERROR_STATUS, rendered as a one-line reason by one serializer.
"""
import functools
import hmac
import logging
import os
import sqlite3
import sys
import time
from urllib.parse import unquote_plus, unquote_to_bytes

import falcon

from mkvlib.errors import (BadKey, ClientGone, DeleteIncomplete, EmptyValue, IndexBusy, KeyBusy, KeyExists,
                           KeyMissing, KeyProtected, KeyTooLong, MkvError, SettingsError, Unauthorized,
                           Unavailable, VolumeDown, VolumeError)
import mkvlib.index
import mkvlib.listing
from mkvlib.db import is_full
from mkvlib.frozenheaders import TAKEN, FrozenHeaders
from mkvlib.index import LIST_MAX, LIVE, UNLINKED
from mkvlib.logs import use_format
from mkvlib.metrics import counted
from mkvlib.settings import SECRET_HEADER, Settings
from mkvlib.placement import key2path
from mkvlib.store import MISSING, Store
from mkvlib.volumes import CHUNK

log = logging.getLogger("mkv")

CLIENT_IDLE_TIMEOUT = 30.0   # seconds a read of a PUT's body may take before the PUT is dropped
READ_PIECE = 64 << 10        # bytes read from a client at once, at least (see read_body)
READ_SLACK = 16              # how many times slower than its last read a client may get at once
PASS_ON_EVERY = 5.0          # seconds a slow client's bytes wait for a whole chunk before going on
VALUE_MAX = (1 << 63) - 1    # bytes: the largest Content-Length a volume (nginx, an off_t) takes
PLACEMENTS_KEPT = 8192       # keys whose placement and path a worker keeps (an md5 per volume, and one)
ANSWERS_KEPT = 1024          # keys whose 302s a worker keeps made (about 2 KB a key)

ERROR_STATUS = {
    Unauthorized: falcon.HTTP_401,
    KeyMissing: falcon.HTTP_404,
    KeyExists: falcon.HTTP_403,
    KeyProtected: falcon.HTTP_403,
    KeyBusy: falcon.HTTP_409,
    KeyTooLong: falcon.HTTP_414,
    BadKey: falcon.HTTP_400,
    EmptyValue: falcon.HTTP_411,
    ClientGone: falcon.HTTP_400,
    VolumeDown: falcon.HTTP_503,
    VolumeError: falcon.HTTP_502,
    Unavailable: falcon.HTTP_503,
    DeleteIncomplete: falcon.HTTP_500,
    IndexBusy: falcon.HTTP_503,
    SettingsError: falcon.HTTP_503,   # the index could not be opened in this worker
}

QUERIES = {"list", "unlinked", "start", "limit", "encoding-type"}


def request_key(req) -> bytes:
    """The key: the decoded request path, leading '/' included, as bytes.
    WSGI hands the path over as latin-1 text, so this is exactly the bytes
    the client percent-encoded (what the original's r.URL.Path is)."""
    return (req.env.get("PATH_INFO") or "/").encode("latin-1")


def parse_query(query_string):
    """(the query's known parameters as a dict, the names of the others).
    A GET or HEAD of a key ignores the others, as the original does (clients
    add cache-busting ones); a listing and the writes refuse them (Resource).
    Names and values are text (UTF-8, '+' is a space, as parse_qsl reads them),
    except `start`: the raw bytes it percent-encodes, since a key need not be
    UTF-8 ('+' still a space, so a UTF-8 start reads as it always did).
    falcon.HTTPBadRequest for a known parameter given twice."""
    query, unknown = {}, []
    for pair in query_string.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        name = unquote_plus(name, errors="replace")
        if name not in QUERIES:
            unknown.append(name)
            continue
        if name in query:
            raise falcon.HTTPBadRequest(title=f"query parameter given twice: {name}")
        if name == "start":
            # WSGI hands the query over as latin-1 text: these are the bytes the client sent
            query[name] = unquote_to_bytes(value.replace("+", " ").encode("latin-1"))
        else:
            query[name] = unquote_plus(value, errors="replace")
    return query, unknown


def parse_limit(value):
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= LIST_MAX:
        raise falcon.HTTPBadRequest(title=f"limit must be a whole number from 1 to {LIST_MAX}")
    return int(value)


def in_a_thread(fn, arg):
    """Start fn(arg) in one of gevent's real threads and return a function
    that waits for it: a worker hashes a large value on another core while
    its greenlet sends the value on (the md5 was about a quarter of a 256 MB
    PUT's time in the profile)."""
    import gevent
    return gevent.get_hub().threadpool.spawn(fn, arg).get


def read_body(stream, length, idle_timeout=CLIENT_IDLE_TIMEOUT):
    """The request body in chunks of about CHUNK bytes (the last one shorter).
    Raises ClientGone if the client stops early: fewer bytes than its
    Content-Length, a broken connection, or a read that takes idle_timeout
    seconds (a slow but steady client is fine).

    Each read asks for what the client sent in idle_timeout / READ_SLACK
    seconds at the rate of its last read, between READ_PIECE and CHUNK: a
    fast client is read a megabyte at a time, a slow one 64 KB at a time. So
    a client is dropped only if it slows down READ_SLACK times at once and
    then sends less than a read's worth in idle_timeout. (gunicorn copies
    what it buffered beyond a read at every read: 64 KB reads of a fast
    upload cost about 40% of a worker's time, the profile showed.)"""
    import gevent   # the master runs under gevent; imported here so tests of logic need not
    remaining = length
    chunk = bytearray()
    piece = READ_PIECE
    passed_on = time.monotonic()
    while remaining is None or remaining > 0:
        want = piece if remaining is None else min(piece, remaining)
        started = time.monotonic()
        try:
            with gevent.Timeout(idle_timeout, ClientGone(
                    f"client sent less than {want >> 10} KB in {idle_timeout:.0f} s; value not stored")):
                data = stream.read(want)
        except ClientGone:
            raise
        except Exception as e:
            raise ClientGone(f"client connection broke mid-body ({type(e).__name__}); "
                                    "value not stored") from None
        if not data:
            if remaining is not None:
                raise ClientGone(f"body ended {remaining} bytes short of its Content-Length; "
                                        "value not stored")
            break
        rate = len(data) / max(time.monotonic() - started, 1e-6)
        # at most twice the last piece: one fast burst of a bursty client is no rate
        piece = int(min(CHUNK, 2 * piece, max(READ_PIECE, rate * idle_timeout / READ_SLACK)))
        if remaining is not None:
            remaining -= len(data)
        if not chunk and len(data) >= CHUNK:
            yield bytes(data)    # a whole chunk as read: no copy (bytes() of bytes is itself)
            passed_on = time.monotonic()
            continue
        chunk += data
        # a slow client's bytes go on before a volume waits for them too long
        # (nginx drops an upload after client_body_timeout, 20 s, without a byte)
        if len(chunk) >= CHUNK or time.monotonic() - passed_on > PASS_ON_EVERY:
            yield bytes(chunk)
            chunk.clear()
            passed_on = time.monotonic()
    if chunk:
        yield bytes(chunk)


# this process's id, kept up to date by a fork hook: os.getpid() is a system
# call, and Master.store looks at it on every request
_PROCESS = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))


class Master:
    """The HTTP face of the store. One instance per process; the Store (SQLite
    connection, HTTP pools) is opened on first use, i.e. after gunicorn forks."""

    def __init__(self, settings: Settings, store=None):
        self.settings = settings
        # a key's placement and path depend on the key and the settings
        # alone: the GETs of a hot key hash it once (an md5 per volume was a
        # fifth of a GET's time in the app)
        self.parts = functools.lru_cache(maxsize=PLACEMENTS_KEPT)(self._parts)
        # key -> (volumes, md5, {volume: the 302's FrozenHeaders}) of the row
        # its last plain GET read: the same answer while the row stays the same
        self.answers = {}
        self._store = store
        self._pid = None if store is None else "given"   # a store given is used as it is

    @property
    def store(self) -> Store:
        if self._pid is not _PROCESS[0] and self._pid != "given":
            self._store, self._pid = Store(self.settings, offload=in_a_thread, group_commit=True), _PROCESS[0]
        return self._store

    HANDLERS = {"GET": "on_get", "HEAD": "on_get", "PUT": "on_put", "DELETE": "on_delete",
                "UNLINK": "on_unlink"}

    def __call__(self, req, resp, **kwargs):
        """Sink for every path and method: the whole key space."""
        deferred = req.env.pop(DEFERRED_ERROR, None)
        if deferred is not None:
            raise deferred    # a fast path's error, rendered as every other one
        handler = self.HANDLERS.get(req.method)
        if handler is None:
            raise falcon.HTTPMethodNotAllowed(list(self.HANDLERS), title=f"method {req.method} not allowed")
        key = request_key(req)
        query, unknown = parse_query(req.query_string) if req.query_string else ({}, ())
        if (query or unknown) and handler != "on_get":
            raise falcon.HTTPBadRequest(title=f"{req.method} takes no query")
        if unknown and ("list" in query or "unlinked" in query):
            raise falcon.HTTPBadRequest(title=f"unknown query parameter: {unknown[0][:100]}")
        if handler != "on_get" and not self.authorized(req.env):
            raise Unauthorized(f"{req.method} needs the header {SECRET_HEADER}: MKV_SECRET")
        getattr(self, handler)(req, resp, key, query)

    def authorized(self, environ):
        """A write may go on: no MKV_SECRET, or the request carries it."""
        secret = self.settings.secret
        return not secret or hmac.compare_digest((environ.get(SECRET_ENVIRON) or "").encode(), secret.encode())

    def on_get(self, req, resp, key, query):
        listing = [op for op in ("list", "unlinked") if op in query]
        if listing:
            return self.on_list(req, resp, key, query, listing)
        if query:
            raise falcon.HTTPBadRequest(title="start, limit and encoding-type go with ?list or ?unlinked")
        for name, value in self.found_headers(key):
            resp.set_header(name, value)
        resp.status = falcon.HTTP_302
        resp.content_length = 0

    def _parts(self, key):
        """(the key's placement as Key-Volumes would show it, its path on a volume)."""
        return ",".join(self.store.placement(key)), key2path(key)

    def found_headers(self, key):
        """The headers of the 302 to a GET or HEAD of `key` (Content-Length
        aside): Content-Md5, Key-Volumes, Key-Balance of a live key, and
        Location. Raises what Store.locate raises (KeyMissing: 404)."""
        url, rec = self.store.locate(key)
        if rec is None or rec.state != LIVE:
            return [("location", url)]    # MKV_FALLBACK's
        volumes = ",".join(rec.volumes)
        return found_head(rec.md5, volumes, volumes == self.parts(key)[0], url, ())

    def answer_plain(self, environ):
        """(status line, headers) of a plain GET or HEAD (of a key, no query)
        in one index statement (Store.find), the very headers found_headers
        and Falcon give it; None for any other request, and when Store.find
        leaves the answer to them. Raises what the index raises."""
        path = environ.get("PATH_INFO", "")    # plain_key's test, inline: each call counts here
        if environ["REQUEST_METHOD"] not in READS or environ.get("QUERY_STRING") or path[:1] != "/":
            return None
        key = path.encode("latin-1")
        # the store property's test, inline
        found = (self._store if self._pid is _PROCESS[0] else self.store).find(key)
        if found is None:
            return None
        if found is MISSING:
            return NOT_FOUND, MISSING_ANSWER if TAKEN in environ else list(MISSING_HEADERS)
        volumes, md5, volume = found
        answers = self.answers
        row = answers.get(key)
        if row is not None and row[0] == volumes and row[1] == md5:
            heads = row[2]
            head = heads.get(volume)
            if head is not None:
                return FOUND, head if TAKEN in environ else list(head)
        else:
            # a row seen the first time: its answers are kept from its second
            # GET on (most keys of a big index are read once); a dict store, so
            # a reader has the old row or the new one, whole
            if len(answers) >= ANSWERS_KEPT:
                answers.clear()     # a hot key is kept again from its next two GETs
            answers[key] = (volumes, md5, {})
            heads = None
        placement, path = self.parts(key)
        head = found_head(md5, volumes, volumes == placement, "http://" + volume + path, FOUND_TAIL)
        if heads is not None:
            heads[volume] = FrozenHeaders(head)
        return FOUND, head

    def on_list(self, req, resp, key, query, listing):
        """Keys with the prefix `key`, as JSON text; percent-encoded (quote of the
        raw bytes, '/' kept) with ?encoding-type=url, or by itself when a name
        on the page is not UTF-8, so that no name is ever lossy."""
        if len(listing) > 1:
            raise falcon.HTTPBadRequest(title="ask for ?list or ?unlinked, not both")
        if query[listing[0]]:
            raise falcon.HTTPBadRequest(title=f"?{listing[0]} takes no value")
        encoding = query.get("encoding-type")
        if encoding not in (None, "url"):
            raise falcon.HTTPBadRequest(title="encoding-type must be url")
        limit = parse_limit(query.get("limit"))
        start = query.get("start", b"")
        state = LIVE if listing[0] == "list" else UNLINKED
        self.stream_listing(resp, key, start, limit, state, encoding)

    def stream_listing(self, resp, prefix, start, limit, state, encoding):
        """The page, found and then sent in batches that yield to the other
        requests of this worker (mkvlib.listing); a client that stops reading
        holds one batch, until MKV_SEND_TIMEOUT drops it. Without a limit, a
        listing over LIST_MAX keys or MKV_LIST_BYTES bytes of keys is 413."""
        index, turn, cap = self.store.index, self.listing_turn(), self.settings.list_bytes
        if limit is None and mkvlib.listing.more_than(index, mkvlib.index.LIST_MAX, prefix, start, state, turn):
            raise falcon.HTTPContentTooLarge(
                title=f"more than {mkvlib.index.LIST_MAX} keys: page with &limit=N&start=NEXT")
        page = mkvlib.listing.extent(index, prefix, start, limit, state, cap, turn)
        if limit is None and page.next is not None:
            raise falcon.HTTPContentTooLarge(
                title=f"more than {cap} bytes of keys (MKV_LIST_BYTES): page with &limit=N&start=NEXT")
        resp.content_type = falcon.MEDIA_JSON
        pieces = mkvlib.listing.render(index, page, state, url=encoding == "url" or not page.utf8, turn=turn)
        if page.count <= mkvlib.listing.BATCH:
            resp.data = b"".join(pieces)   # one batch: sent whole, with its Content-Length
        else:
            resp.stream = pieces

    def listing_turn(self):
        """mkvlib.listing's turn() in this process: yield to the other requests
        first, then one listing step at a time, so that a GET waits for one
        step however many listings run (made on first use, after the fork)."""
        if getattr(self, "_listing_turn", None) is None:
            import contextlib
            import gevent   # the master runs under gevent; imported here so tests of logic need not
            import gevent.lock
            one_at_a_time = gevent.lock.Semaphore(1)

            @contextlib.contextmanager
            def turn():
                with one_at_a_time:
                    gevent.idle()   # once nothing else is ready: every request waiting on I/O goes first
                    yield
            self._listing_turn = turn
        return self._listing_turn

    def on_put(self, req, resp, key, query):
        md5 = self.put_value(key, req.stream, req.content_length)
        resp.status = falcon.HTTP_201
        resp.set_header("Content-Md5", md5)
        resp.content_length = 0

    def put_value(self, key, stream, length):
        """Store the body in `stream` (`length` bytes, None if chunked) at
        `key`; returns its md5 (hex)."""
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            # listings hand keys out as JSON text: a key that is not UTF-8 could not be paged through
            raise BadKey("key is not UTF-8 once percent-decoded") from None
        if length == 0:
            raise EmptyValue("empty value: a PUT needs a body")
        if length is not None and length > VALUE_MAX:
            # passed on, it would be the volumes' 400 and our 502 for the client's lie
            raise falcon.HTTPContentTooLarge(title=f"Content-Length over {VALUE_MAX}: no volume takes it")
        # a body the server read whole with the head (worker.BodyInHand) needs no read loop
        in_hand = getattr(stream, "in_hand", None)
        value = in_hand() if in_hand is not None and length else None
        md5, size = self.store.put(key, (value,) if value else read_body(stream, length), length)
        return md5

    def on_delete(self, req, resp, key, query):
        self.store.delete(key)
        resp.status = falcon.HTTP_204

    def on_unlink(self, req, resp, key, query):
        self.store.unlink(key)
        resp.status = falcon.HTTP_204


# -- the fast paths: a plain GET, HEAD, PUT or DELETE of a key without Falcon

DEFERRED_ERROR = "mkv.read_error"    # environ key: the error of a fast path, for Falcon to render
SECRET_ENVIRON = "HTTP_" + SECRET_HEADER.upper().replace("-", "_")
TEXT = ("content-type", "text/plain; charset=utf-8")
FOUND_TAIL = [("content-length", "0"), TEXT]      # Falcon's order for the 302 and the 201
MISSING_HEADERS = [TEXT, ("content-length", "0")]  # and for the 404 (serialize_error's)
MISSING_ANSWER = FrozenHeaders(MISSING_HEADERS)    # the same list for every 404 of a worker that takes it
READS, WRITES = ("GET", "HEAD"), ("PUT", "DELETE")
FOUND, NOT_FOUND = "302 Found", "404 Not Found"
BALANCE = {True: "balanced", False: "unbalanced"}


def found_head(md5, volumes, balanced, url, tail):
    """The headers of a 302 to a live key, in their order, then `tail`."""
    # the url is made of the volume's name and base64: nothing to encode
    if md5:
        return [("content-md5", md5), ("key-volumes", volumes), ("key-balance", BALANCE[balanced]),
                ("location", url), *tail]
    return [("key-volumes", volumes), ("key-balance", BALANCE[balanced]), ("location", url), *tail]


def plain_key(environ):
    """The key of a request with no query (what most requests are), or
    None: the request goes through Falcon."""
    path = environ.get("PATH_INFO", "")
    if not environ.get("QUERY_STRING") and path[:1] == "/":
        return path.encode("latin-1")
    return None


def content_length(environ):
    """The request's Content-Length as Falcon reads it: None if absent or
    empty (a chunked body), falcon.HTTPInvalidHeader if not a count."""
    value = environ.get("CONTENT_LENGTH")
    if not value:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        raise falcon.HTTPInvalidHeader("The value of the header must be a positive number.", "Content-Length")
    return length


def fast_paths(master, app):
    """The WSGI app: a plain GET, HEAD, PUT or DELETE of a key (no query,
    the secret given if one is set) is answered here with the very headers
    Falcon gives it, at about half its cost per request; any other request,
    and one that failed (its error kept in the environ), go to Falcon's
    `app`, which renders the error as every other one."""
    def serve(environ, start_response):
        key = plain_key(environ)
        method = environ["REQUEST_METHOD"]
        if key is None or not (method in READS or (method in WRITES and master.authorized(environ))):
            return app(environ, start_response)
        try:
            if method == "PUT":
                md5 = master.put_value(key, environ["wsgi.input"], content_length(environ))
                start_response("201 Created", [("content-md5", md5)] + FOUND_TAIL)
            elif method == "DELETE":
                master.store.delete(key)
                start_response("204 No Content", [])
            else:
                start_response(*(master.answer_plain(environ) or (FOUND, master.found_headers(key) + FOUND_TAIL)))
        except Exception as e:
            if method in READS and (type(e) is KeyMissing or   # the common 404 first
                                    isinstance(e, MkvError) and status_of(e) == falcon.HTTP_404):
                start_response(NOT_FOUND, list(MISSING_HEADERS))
                return []
            environ[DEFERRED_ERROR] = e
            return app(environ, start_response)
        return []
    # mkvlib.metrics.Counted answers a plain GET or HEAD with it, without
    # its wrapping (and asks serve() again if it raises)
    serve.falcon_app, serve.quick = app, master.answer_plain
    return serve


def serialize_error(req, resp, exc):
    """Every error is its status and one line of reason; a 404 has an empty
    body (Content-Length: 0), as the original's clients expect."""
    resp.content_type = falcon.MEDIA_TEXT
    if exc.status == falcon.HTTP_404 or req.method == "HEAD":
        resp.text = None
        resp.content_length = 0
    else:
        resp.text = (exc.title or exc.status) + "\n"


def status_of(exc):
    """The status of a storage error: that of the nearest class in its
    hierarchy that ERROR_STATUS names (KeyTooLong before BadKey), as
    Falcon finds an error handler."""
    return next((ERROR_STATUS[cls] for cls in type(exc).__mro__ if cls in ERROR_STATUS), falcon.HTTP_500)


def handle_storage_error(req, resp, exc, params):
    status = status_of(exc)
    headers = {"WWW-Authenticate": f"{SECRET_HEADER}"} if status == falcon.HTTP_401 else None
    raise falcon.HTTPError(status, title=str(exc), headers=headers)


def handle_index_error(req, resp, exc, params):
    """SQLite failed under a request: the index's disk is full (507) or
    read-only or failing (503). The client gets SQLite's reason in one line;
    the log gets the traceback."""
    log.exception("index error on %s %r", req.method, req.env.get("PATH_INFO"))
    full = is_full(exc)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    raise falcon.HTTPError(falcon.HTTP_507 if full else falcon.HTTP_503,
                           title=f"index error (MKV_DB): {reason[:200]}; see the master's log")


def handle_unexpected(req, resp, exc, params):
    if isinstance(exc, falcon.HTTPError):
        raise exc
    log.exception("unexpected error on %s %r", req.method, req.env.get("PATH_INFO"))
    raise falcon.HTTPInternalServerError(title=f"internal error ({type(exc).__name__}); see the master's log")


def create_app(settings: Settings, store=None, master=None):
    """The master's WSGI app: Falcon's, behind fast_paths. `store`: the Store
    to use (or any object with its methods, for in-process tests of the HTTP
    contract); by default each process opens its own on first use. `master`:
    the Master to serve (the metrics wrapper keeps it, to open its store at
    a worker's boot)."""
    if not logging.getLogger().handlers:   # gunicorn configures only its own loggers
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S %z")
    app = falcon.App(media_type=falcon.MEDIA_TEXT)
    app.req_options.strip_url_path_trailing_slash = False
    master = master or Master(settings, store)
    app.add_sink(master, prefix="/")
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(sqlite3.Error, handle_index_error)
    app.add_error_handler(MkvError, handle_storage_error)
    return fast_paths(master, app)


def _app_from_env():
    try:
        settings = Settings.from_env()
        master = Master(settings)
        app = create_app(settings, master=master)
        use_format(settings.log_format)
        # every request counted, each failure logged (mkvlib.metrics); at the
        # worker's boot its store opens, so its prober looks before any request
        return counted(app, boot=lambda: master.store)
    except SettingsError as e:
        # gunicorn.conf.py checks the settings before any worker starts; this is
        # for a run without it: one line, and exit 3 so gunicorn stops retrying.
        print(f"mkv: {e}", file=sys.stderr)
        sys.exit(3)


def __getattr__(name):
    """`mkv:app` is built on first access (gunicorn's import of it), so that
    tests and tools can import this module without the MKV_* settings."""
    if name == "app":
        globals()["app"] = _app_from_env()
        return globals()["app"]
    raise AttributeError(f"module 'mkv' has no attribute {name!r}")
