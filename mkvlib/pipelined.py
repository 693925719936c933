"""Many files at once, each volume's requests pipelined on one keep-alive
connection (mkvlib.exchange), all volumes' at once: the HEADs, GETs,
uploads with their MOVEs, and DELETEs of rebalance.py's batches. Each
function is the many-paths form of a Volumes call, with its answers read
the same way (mkvlib.volumes) and the same rule for writes: a MOVE or
DELETE is never sent twice, carries a deadline, and one left unanswered
makes the call return only once that deadline has passed (Volumes.settle)."""
from mkvlib.errors import VolumeError
from mkvlib.exchange import pipelines
from mkvlib.http import request
from mkvlib.placement import volume_host
from mkvlib.volumes import (TRANSFER_TIMEOUT, on_host, upload_and_move_result, deadline_headers,
                            found, refused, write_deadline)


def _by_host(calls):
    """{host: [(index in calls, path on that server)]} of (volume, path) calls."""
    by_host = {}
    for i, (volume, path) in enumerate(calls):
        host, there = on_host(volume, path)
        by_host.setdefault(host, []).append((i, there))
    return by_host


def _reads(volumes, method, calls):
    """(status, body) or the VolumeError of a GET or HEAD of each (volume,
    path) of `calls`, in order (as Volumes.listdirs reads them)."""
    by_host = _by_host(calls)
    got = pipelines(volumes.pool, {h: [p for _, p in asked] for h, asked in by_host.items()},
                    TRANSFER_TIMEOUT, method=method)
    results = [None] * len(calls)
    for host, asked in by_host.items():
        errors = [r for r in got[host] if isinstance(r, Exception)]
        if len(errors) < len(asked):
            volumes.health.answered(host)
        error = volumes.failed(host, errors[0].cause, what=f"did not answer {method}") if errors else None
        for (i, _), result in zip(asked, got[host]):
            results[i] = error if isinstance(result, Exception) else result
    return results


def has_many(volumes, calls):
    """Volumes.has_many of (volume, path) calls: True, False or the VolumeError."""
    return [r if isinstance(r, Exception) else found(volume, r[0])
            for (volume, _), r in zip(calls, _reads(volumes, "HEAD", calls))]


def read_many(volumes, calls):
    """The whole files at (volume, path) of `calls` (small ones: every body
    is held at once): bytes, None if missing, or the VolumeError."""
    out = []
    for (volume, _), r in zip(calls, _reads(volumes, "GET", calls)):
        if not isinstance(r, Exception):
            status, body = r
            r = body if status == 200 else None if status == 404 else \
                VolumeError(f"volume {volume_host(volume)} answered GET with {status}")
        out.append(r)
    return out


def upload_and_move_many(volumes, puts, deadline):
    """Each upload and the MOVE of it onto its path (never over a file, as
    Volumes.moves() sends it, with `deadline`), each server's pipelined on
    one connection in one send, all servers at once: `puts` [(volume,
    upload name, the head of its PUT, the value, path)]; a server runs its
    connection's requests in order, each MOVE after its own upload.
    Returns, in order, (upload, move) of each: its (status, body), None if
    the volume did not run it (it closed the connection after the upload's
    answer, as it said it would), or the error: VolumeDown for an upload
    (unanswered, it may still complete), MoveUnknown for a MOVE
    (unanswered, it may still land). Returns only once no MOVE it sent can
    still run (settle)."""
    by_host = {}
    for i, (volume, name, head, value, path) in enumerate(puts):
        host = volume_host(volume)
        move = request("MOVE", host, name, volumes.move_headers(volume, path) + deadline_headers(deadline))
        by_host.setdefault(host, []).append((i, (head, value, move)))
    # one copy of the values: into each server's one send
    times = []
    got = volumes.exchange_writes([(host, b"".join(part for _, parts in asked for part in parts), 2 * len(asked))
                                   for host, asked in by_host.items()], deadline, times)
    out = [None] * len(puts)
    for (host, asked), (answers, error), took in zip(by_host.items(), got, times):
        for j, (i, _) in enumerate(asked):
            mine = answers[2 * j:2 * j + 2]    # this upload's answer and its MOVE's, as far as they came
            if not mine and error is None:     # it closed the connection before this upload: not run
                out[i] = (VolumeError(f"volume {host} closed the connection before an upload"), None)
            else:
                out[i] = upload_and_move_result(volumes, host, mine, None if len(mine) == 2 else error,
                                                took[2 * j:2 * j + 2])
    volumes.settle_unanswered(got, deadline)
    return out


def delete_many(volumes, calls, fence=None):
    """Volumes.delete_many of (volume, path) calls: None for each file
    deleted (or already gone), else the VolumeError. fence() first, if given."""
    if not calls:
        return []
    deadline = write_deadline(volumes.op_timeout)
    if fence is not None:
        fence()
    late = volumes.write_headers + deadline_headers(deadline)
    by_host = {}
    for i, (volume, path) in enumerate(calls):
        host, there = on_host(volume, path)
        by_host.setdefault(host, []).append((i, request("DELETE", host, there, late)))
    times = []
    got = volumes.exchange_writes([(h, b"".join(r for _, r in asked), len(asked)) for h, asked in by_host.items()],
                                  deadline, times)
    out = [None] * len(calls)
    for (host, asked), (answers, error), took in zip(by_host.items(), got, times):
        if answers:
            volumes.health.answered_each(host, took)
        for j, (i, _) in enumerate(asked):
            if j < len(answers):
                status, body = answers[j]
                out[i] = None if status in (200, 204, 404) else refused(calls[i][0], "DELETE", status, body)
            elif error is None:   # it closed the connection as it said it would: not run
                out[i] = VolumeError(f"volume {host} closed the connection before a DELETE")
            else:                 # marked down once, by the first it did not answer
                out[i] = volumes.failed(host, getattr(error, "cause", error), mark=j == len(answers),
                                        what="did not answer DELETE")
    volumes.settle_unanswered(got, deadline)
    return out
