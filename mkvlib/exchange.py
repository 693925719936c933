"""Several requests to a server on one keep-alive connection, sent in one
go and answered in order (HTTP/1.1 pipelining, which nginx serves): a
small PUT's upload and the MOVE of it (exchange: mkvlib.pipelined.upload_and_move_many),
and many GETs of listings (pipelines: rebuild's Volumes.listdirs)."""
import socket
import time
from time import perf_counter

from mkvlib.arrivals import arrivals
from mkvlib.http import NoAnswer, Unreachable, request, send_all


def exchange(pool, calls, timeout=None, times=None):
    """Several requests to each server on one connection, sent in one
    go (pipelined: a server answers one connection's requests in order):
    `calls` [(host, data, n)], `data` the bytes of n requests. Every
    server's go out before any answer is read, all servers' at once; none
    is ever sent twice. Returns, per call, (answers, error): the
    [(status, body)] that came, in order, and what ended the rest: None
    if the server closed the connection after the last of them, as it
    said it would (then it ran none of the rest: HTTP/1.1 forbids it),
    else Unreachable (nothing sent) or NoAnswer (the rest may have run).
    `timeout`: for all the answers of a call together (default: the
    pool's). Answers are read as they come, whichever server's
    (mkvlib.arrivals). `times`, a list if given: set to, per call, the
    seconds from its send to the first bytes of each answer that came."""
    timeout = timeout or pool.timeout
    out = [([], None) for _ in calls]
    took = [[] for _ in calls]
    sent = []
    for i, (host, data, n) in enumerate(calls):
        try:
            conn = pool.take(host)
        except Unreachable as e:
            out[i] = ([], e)
            continue
        try:
            conn.sock.settimeout(timeout)
            started = perf_counter()
            send_all(conn.sock, data)
        except OSError as e:
            conn.close()
            out[i] = ([], NoAnswer(host, e))
            continue
        sent.append((i, host, n, conn, started))
    end = time.monotonic() + timeout
    awaited = [True] * len(sent)     # answers still to come on sent[k]'s connection
    for k, seconds, error in arrivals([(s[3], s[4]) for s in sent], timeout, end, awaited.__getitem__):
        i, host, n, conn, _ = sent[k]
        answers = out[i][0]
        if error is None:
            try:
                conn.sock.settimeout(max(end - time.monotonic(), 0.001))
                status, body, keep = conn.answer()
            except (OSError, ValueError) as e:
                error = e
        if error is not None:
            conn.close()
            out[i], awaited[k] = (answers, NoAnswer(host, error)), False
            continue
        conn.used = True
        answers.append((status, body))
        took[i].append(seconds)
        if not keep or len(answers) == n:
            awaited[k] = False
            pool.give(host, conn, keep)
    if times is not None:
        times[:] = took
    return out


def pipelines(pool, by_host, timeout, window=128, method="GET"):
    """GETs (or HEADs: `method`) of many paths: {host: [path]} -> {host:
    [result]}, each result (status, body) or the error (Unreachable,
    NoAnswer). Each
    server's requests go pipelined on one keep-alive connection (nginx
    answers pipelined requests in order), at most `window` unanswered at
    a time, and all servers' at once."""
    pipes = {host: Pipeline(pool, host, paths, timeout, window, method) for host, paths in by_host.items()}
    for pipe in pipes.values():
        pipe.send()
    for pipe in pipes.values():
        pipe.finish()
    return {host: pipe.results for host, pipe in pipes.items()}


class Pipeline:
    """pipelines()' GETs to one server on one keep-alive connection,
    taken from (and given back to) the pool's idle ones. A connection that
    the server closed (an idle one it timed out, or its keepalive_requests
    reached) is replaced and what it had not answered is sent again: a GET
    changes nothing (nor does a HEAD)."""

    # bytes of requests sent and not answered: less than the socket buffers
    # of both ends hold, so sendall() returns even while the server waits for
    # us to read its answers
    MAX_BYTES = 32768

    def __init__(self, pool, host, paths, timeout, window, method="GET"):
        self.pool, self.host, self.timeout, self.window = pool, host, timeout, window
        self.results = [None] * len(paths)
        self.heads = method == "HEAD"    # answers without a body
        # (result index, request) not sent yet, next one last
        self.todo = [(i, request(method, host, p)) for i, p in enumerate(paths)][::-1]
        self.sent = []            # sent on self.conn and not answered yet, oldest first
        self.conn = None

    def send(self):
        """Send requests until `window` (or MAX_BYTES) are unanswered (a new
        connection if needed)."""
        if self.conn is None:
            try:
                self.conn = self.pool.take(self.host)
            except Unreachable as e:
                return self.fail(e)
            self.conn.sock.settimeout(self.timeout)
        batch, room = [], self.MAX_BYTES - sum(len(data) for _, data in self.sent)
        while self.todo and len(self.sent) + len(batch) < self.window:
            size = len(self.todo[-1][1])
            if size > room and (batch or self.sent):   # one request always goes
                break
            room -= size
            batch.append(self.todo.pop())
        if not batch:
            return
        self.sent += batch
        try:
            self.conn.sock.sendall(b"".join(data for _, data in batch))
        except OSError as e:
            self.broken(e)

    def finish(self):
        """Read every answer, sending the rest of the requests as room frees up."""
        while self.sent or self.todo:
            if self.conn is None or not self.sent:
                self.send()
                continue
            try:
                status, body, keep = self.conn.answer(to_head=self.heads)
            except (OSError, ValueError) as e:
                self.broken(e)
                continue
            i, _ = self.sent.pop(0)
            self.conn.used = True
            self.results[i] = (status, body)
            if not keep:
                self.drop()
            elif self.todo and len(self.sent) <= self.window // 2:
                self.send()
        if self.conn is not None:
            self.pool.give(self.host, self.conn)
            self.conn = None

    def drop(self):
        """Close the connection; what it did not answer is sent again on a new one."""
        self.conn.close()
        self.conn = None
        self.todo += self.sent[::-1]
        self.sent = []

    def broken(self, e):
        """The connection failed: try again on a new one, unless this one had
        answered nothing yet, or the server let it time out."""
        if not self.conn.used or isinstance(e, socket.timeout):
            self.fail(NoAnswer(self.host, e))
        else:
            self.drop()

    def fail(self, error):
        """The server cannot be reached: every request not answered fails."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        for i, _ in self.sent + self.todo:
            self.results[i] = error
        self.sent, self.todo = [], []
