"""The master's requests, counted in one place: a WSGI wrapper around the app
(counted()), and the names every dashboard relies on.

Per request it only adds to this process's plain counters (a Counter and a
few ints: about a microsecond); a thread of each worker (a greenlet under
gevent) hands them to prometheus_client every FLUSH_EVERY seconds, whose
multiprocess files in the master's run folder (mkvlib.runfolder) the admin
listener reads at each scrape. A scrape is at most FLUSH_EVERY behind.
Without a run folder (a master started without gunicorn.conf.py) requests
are still counted for the failure log, and nothing is handed on.

Each failed request (a status of 400 or more but 404) is one log line:
method, key, status, reason, volume, duration."""
import collections
import json
import logging
import os
import re
import threading
import time
from bisect import bisect_left
from time import perf_counter

from mkvlib import health

# this process's id, kept up to date by a fork hook: os.getpid() is a system
# call, and Counted looks at it on every request (mkv.py does the same)
_PROCESS = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))

log = logging.getLogger("mkv")

FLUSH_EVERY = 1.0        # seconds between two hand-overs to prometheus_client
RECENT_FAILURES = 50     # failed requests each worker keeps for the status page
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KIND_OF_METHOD = {"PUT": "put", "DELETE": "delete", "UNLINK": "unlink"}
VOLUME_IN_REASON = re.compile(r"volume ([^\s:]+:\d+)")
S3_ERROR = re.compile(r"<Code>([^<]*)</Code>\s*<Message>([^<]*)</Message>")
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SERVER_KIND = "server"   # answers the HTTP server gave itself (method "-"): see count_server_answer

# status -> answers given in this process without the app since the last
# hand-over: gunicorn's to a request it could not parse (400, 414, 431...),
# the connection budget's 503 (not gunicorn's 500 for an app that raised:
# Counted counts that one under the request's kind)
SERVER_ANSWERS = collections.Counter()


def count_server_answer(status):
    """Count an answer no app saw (gunicorn.conf.py's write_error_line,
    connections.refuse): method "-", kind "server"."""
    SERVER_ANSWERS[status] += 1


class CountedInput:
    """A chunked request body (no Content-Length), with the bytes read from
    it counted for mkv_bytes_received."""

    def __init__(self, stream):
        self.stream, self.got = stream, 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.got += len(data)
        return data

    def readline(self, size=-1):
        data = self.stream.readline(size)
        self.got += len(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")


def content_length(headers):
    for name, value in headers:
        if name == "Content-Length":
            return int(value)
    return 0


def kind_of(environ, status):
    """What a request was: redirect, 404, list, put, delete, unlink, other;
    an app in front (s3.py) may name its own in environ['mkv.kind']."""
    kind = environ.get("mkv.kind")
    if kind:
        return kind
    method = environ["REQUEST_METHOD"]
    if method in ("GET", "HEAD"):
        query = environ.get("QUERY_STRING", "")
        if query and ("list" in query or "unlinked" in query):
            return "list"
        return "404" if status == 404 else "redirect"
    return KIND_OF_METHOD.get(method, "other")


class Tally:
    """One process's counts since the last hand-over: one row per (method,
    kind, status), [requests, seconds, bytes in, bytes out, then a count per
    latency bucket]: one dict lookup per request."""

    def __init__(self):
        self.rows = {}

    def row(self, key):
        """The row of `key`, made if new."""
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0, 0.0, 0, 0] + [0] * (len(BUCKETS) + 1)
        return row

    def add(self, key, seconds, got, sent):
        row = self.rows.get(key) or self.row(key)
        row[0] += 1
        row[1] += seconds
        row[2] += got
        row[3] += sent
        row[4 + bisect_left(BUCKETS, seconds)] += 1


class Counted:
    """The WSGI app `app`, with every request counted and each failure logged.

    An app may offer `app.quick(environ)`: (status line, headers) of a
    request it answers in full without waiting on anything, with an empty
    body and no query (mkv's plain GET or HEAD), else None. Those are
    answered and counted here without the wrapping below (half of the
    counting's cost): the same row of the tally, and in_flight, which no
    one can look at before such a request ends, left alone. A quick answer
    that raises is asked of the app, which renders its error as any other."""

    def __init__(self, app, boot=None):
        self.app = app
        self.quick = getattr(app, "quick", None)
        self._quick_rows = {}    # (method, status line) -> the tally's row of a quick answer
        self.on_boot = boot
        self.tally = Tally()
        self.failures = collections.deque(maxlen=RECENT_FAILURES)
        self.in_flight = 0
        self._flusher_pid = None

    def __call__(self, environ, start_response):
        if self._flusher_pid != _PROCESS[0]:
            self._start_flusher()
        started = perf_counter()
        try:
            answer = self.quick(environ) if self.quick is not None else None
        except Exception:
            answer = None
        if answer is not None:
            status, headers = answer
            start_response(status, headers)
            method = environ["REQUEST_METHOD"]
            key = self._quick_rows.get((method, status)) or self._quick_row(environ, method, status)
            seconds = perf_counter() - started
            # Tally.add, inline (a GET's every call counts); no body sent
            tally = self.tally
            row = tally.rows.get(key) or tally.row(key)
            row[0] += 1
            row[1] += seconds
            row[4 + bisect_left(BUCKETS, seconds)] += 1
            length = environ.get("CONTENT_LENGTH")
            if length and length.isdigit():
                row[2] += int(length)
            return []
        seen = []

        def start(status, headers, exc_info=None):
            seen.append(status)
            seen.append(headers)
            return start_response(status, headers, exc_info)
        length = environ.get("CONTENT_LENGTH")
        chunked = None
        if not length and environ.get("HTTP_TRANSFER_ENCODING"):
            chunked = environ["wsgi.input"] = CountedInput(environ["wsgi.input"])
        self.in_flight += 1
        try:
            body = self.app(environ, start)
        except Exception:
            # gunicorn answers it 500 itself (write_error_line counts no 500:
            # a body that fails after this returned was counted here already)
            self.count(environ, started, "500", None, length, chunked)
            raise
        finally:
            self.in_flight -= 1
        status, _ = self.count(environ, started, seen[0] if seen else "500", seen[1] if seen else None,
                               length, chunked)
        if status >= 400 and status != 404:
            self.failed(environ, status, body, perf_counter() - started)
        return body

    def count(self, environ, started, status, headers, length, chunked):
        """Add a request the app answered to the tally: (status code, body bytes sent)."""
        code, sent = int(status[:3]), content_length(headers) if headers else 0
        got = chunked.got if chunked is not None else int(length) if length and length.isdigit() else 0
        self.tally.add((environ["REQUEST_METHOD"], kind_of(environ, code), code), perf_counter() - started, got, sent)
        return code, sent

    def _quick_row(self, environ, method, status):
        code = int(status[:3])
        row = self._quick_rows[method, status] = (method, kind_of(environ, code), code)
        return row

    def boot(self):
        """At a worker's start (gunicorn.conf.py's post_worker_init): the
        hand-over thread, and `boot` (the master opens its store, whose
        prober then looks at the volumes with no request needed)."""
        self._start_flusher()
        if self.on_boot is not None:
            try:
                self.on_boot()
            except Exception:   # the index cannot be opened now, say: the first request tries again
                log.exception("opening the store at the worker's start failed")

    def failed(self, environ, status, body, seconds):
        reason = b"".join(body).decode("utf-8", "replace").strip() if isinstance(body, list) else ""
        found = S3_ERROR.search(reason)   # the S3 gateway's XML: its code and message, one line
        if found:
            reason = f"{found.group(1)}: {found.group(2)}"
        found = VOLUME_IN_REASON.search(reason)
        entry = {"time": time.time(), "method": environ["REQUEST_METHOD"],
                 "key": environ.get("PATH_INFO", "")[:300], "status": status, "reason": reason[:300],
                 "volume": found.group(1) if found else "", "duration_ms": round(seconds * 1000, 1)}
        self.failures.append(entry)
        log.log(logging.WARNING if status >= 500 else logging.INFO,
                "request failed: %s %s %d %s (volume %s, %.1f ms)", entry["method"], entry["key"], status,
                entry["reason"] or "-", entry["volume"] or "-", entry["duration_ms"], extra={"fields": entry})

    def _start_flusher(self):
        self._flusher_pid = _PROCESS[0]
        folder = os.environ.get(METRICS_ENV)
        if folder and os.path.isdir(folder):
            threading.Thread(target=self._flush_forever, args=(Exported(), folder), daemon=True,
                             name="metrics").start()

    def _flush_forever(self, exported, folder):
        failures_file = os.path.join(os.path.dirname(folder), f"failures-{os.getpid()}.json")
        shown = None
        while True:
            time.sleep(FLUSH_EVERY)
            try:
                tally, self.tally = self.tally, Tally()     # no yield between: nothing lost
                for status in list(SERVER_ANSWERS):
                    tally.row(("-", SERVER_KIND, status))[0] += SERVER_ANSWERS.pop(status)
                exported.add(tally, self.in_flight, health.take_counts(), health.take_latency())
                if self.failures and self.failures[-1] is not shown:
                    shown = self.failures[-1]
                    write_atomically(failures_file, json.dumps(list(self.failures)))
            except Exception:
                log.exception("handing the counts to prometheus_client failed")


def write_atomically(path, text):
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


class Exported:
    """The prometheus_client metrics a worker hands its counts to (imported
    here, after the master's start set PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram
        self.requests = Counter("mkv_requests", "requests answered, by method, kind and status",
                                ["method", "kind", "status"])
        self.duration = Histogram("mkv_request_duration_seconds", "time to answer a request, by kind",
                                  ["kind"], buckets=BUCKETS)
        self.bytes_in = Counter("mkv_bytes_received", "request body bytes received (Content-Length, or as read "
                                "from a chunked body)")
        self.bytes_out = Counter("mkv_bytes_sent", "response body bytes sent (Content-Length)")
        self.in_flight = Gauge("mkv_requests_in_flight", "requests being answered now",
                               multiprocess_mode="livesum")
        self.volume_requests = Counter("mkv_volume_requests", "requests to a volume that it answered "
                                       "(the prober's included), as the master saw them", ["volume"])
        self.volume_errors = Counter("mkv_volume_errors", "requests to a volume that failed (no answer)",
                                     ["volume"])
        self.volume_latency = Histogram(
            "mkv_volume_request_duration_seconds", "seconds from the master's send of a request to a volume "
            "to the first bytes of its answer (the prober's, fanned and pipelined requests, a GET's head; "
            "for an upload, from its last byte sent), each volume's own; failed requests not included",
            ["volume"], buckets=health.LATENCY_BUCKETS)

    def add(self, tally, in_flight, volume_counts, volume_latency=None):
        kinds = {}
        for (method, kind, status), row in tally.rows.items():
            self.requests.labels(method, kind, str(status)).inc(row[0])
            if row[2]:
                self.bytes_in.inc(row[2])
            if row[3]:
                self.bytes_out.inc(row[3])
            total = kinds.setdefault(kind, [0.0] + [0] * (len(BUCKETS) + 1))
            total[0] += row[1]
            for i, n in enumerate(row[4:]):
                total[1 + i] += n
        for kind, total in kinds.items():
            if not any(total[1:]):     # the server's own answers: no time taken
                continue
            observe_many(self.duration.labels(kind), total[0], total[1:])
        self.in_flight.set(in_flight)
        for (host, ok), n in volume_counts.items():
            (self.volume_requests if ok else self.volume_errors).labels(host).inc(n)
        for host, row in (volume_latency or {}).items():     # health.took()'s rows
            observe_many(self.volume_latency.labels(host), row[1], row[2:])


def observe_many(child, seconds, per_bucket):
    """Add to a Histogram's child a count per bucket and their sum in seconds
    at once (prometheus_client has no bulk observe)."""
    for i, n in enumerate(per_bucket):
        if n:
            child._buckets[i].inc(n)
    child._sum.inc(seconds)


def counted(app, boot=None):
    return Counted(app, boot)
