"""Several requests to a server on one keep-alive connection, sent in one
go and answered in order (HTTP/1.1 pipelining, which nginx serves): a
small PUT's upload and the MOVE of it (Volumes.upload_and_move)."""
import time

from mkvlib.http import NoAnswer, Unreachable, send_all


def exchange(pool, calls, timeout=None):
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
    pool's)."""
    timeout = timeout or pool.timeout
    out = [([], None) for _ in calls]
    sent = []
    for i, (host, data, n) in enumerate(calls):
        try:
            conn = pool.take(host)
        except Unreachable as e:
            out[i] = ([], e)
            continue
        try:
            conn.sock.settimeout(timeout)
            send_all(conn.sock, data)
        except OSError as e:
            conn.close()
            out[i] = ([], NoAnswer(host, e))
            continue
        sent.append((i, host, n, conn))
    end = time.monotonic() + timeout
    for i, host, n, conn in sent:
        answers, keep = out[i][0], True
        try:
            while keep and len(answers) < n:
                conn.sock.settimeout(max(end - time.monotonic(), 0.001))
                status, body, keep = conn.answer()
                conn.used = True
                answers.append((status, body))
        except (OSError, ValueError) as e:
            conn.close()
            out[i] = (answers, NoAnswer(host, e))
            continue
        pool.give(host, conn, keep)
    return out
