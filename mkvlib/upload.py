"""The fenced put: a value streamed into an upload on every replica (under
TMP_DIR), then, once all are complete and the writer's fence holds, each
MOVEd onto the key's path (Volumes.moves). Only the MOVE touches the path,
so an upload a frozen volume finishes late stays an upload."""
import hashlib
import socket
from time import perf_counter

from mkvlib import pipelined
from mkvlib.errors import MoveUnknown, VolumeError
from mkvlib.arrivals import arrivals
from mkvlib.http import NoAnswer, Refused, Unreachable, nginx_reason, request, unsent
from mkvlib.http import target as http_target
from mkvlib.placement import new_tmp, upload_name, volume_host
from mkvlib.volumes import CLOCK_SKEW, WRITE_TIMEOUT_MAX, refused, write_deadline

OFFLOAD_MIN = 256 << 10    # bytes of a chunk worth hashing in another thread (Volumes.offload)
WHOLE_MAX = 64 << 10       # bytes of a value in hand that put_whole() sends with its MOVE behind it
# what a failed put() may have left at a volume's path: our bytes, maybe our
# bytes, or nothing (a file found there was deleted, then the MOVE failed)
LANDED, UNKNOWN, CLEARED = "landed", "unknown", "cleared"


def put(volumes, targets, path, chunks, length=None, tmp=None, fence=None):
    """Write one value at `path` on every volume of `targets` (over
    `volumes`, a Volumes); returns (md5 hex, size).

    1. Stream `chunks` to every volume, each into its own upload under
       TMP_DIR (upload_name(tmp, volume)), chunk by chunk: each chunk goes
       to every volume before the next one is read, so memory does not
       grow with the value.
    2. Once every upload is complete, fence(md5, size): it raises if the
       writer may no longer land these bytes (its lock lost, the wrong md5).
    3. MOVE every upload onto `path`, never over a file (Overwrite: F);
       a file found there is deleted first (the caller holds the lock).

    Only the MOVE touches `path`, so an upload that a frozen volume
    finishes late stays an upload. On failure the error carries
    `.outcomes`: {volume: LANDED, UNKNOWN or CLEARED} for the volumes
    whose path may now hold these bytes, or lost what it held; the
    others' paths were not touched."""
    tmp = tmp or new_tmp()
    names = {v: upload_name(tmp, v) for v in targets}
    again = None
    try:
        md5, size = Upload(volumes, targets, names, length).run(chunks)
        deadline = write_deadline(volumes.op_timeout)
        if fence is not None:
            again = lambda: fence(md5, size)   # noqa: E731 (before each later write on the path)
            try:
                again()
            except Exception:
                volumes.delete_uploads(names)   # complete, never to be moved: they only take space
                raise
    except BaseException as e:
        e.outcomes = {}
        raise
    try:
        results = volumes.moves(targets, names, path, again, deadline)
    except BaseException as e:
        # cut off among the MOVEs (the lock lost, the worker killed): any may have landed
        e.outcomes = {v: UNKNOWN for v in targets}
        raise
    outcomes, errors = {}, {}
    for volume, error in zip(targets, results):
        _note_move(volume, error, outcomes, errors)
    if errors:
        # an upload whose MOVE was refused stays one, taking space (on a full disk, say)
        _fail(volumes, targets, names, outcomes, errors, [v for v in errors if v not in outcomes])
    return md5, size


def _note_move(volume, error, outcomes, errors):
    """Note in `outcomes` what a MOVE onto the path left there (error None:
    it landed; MoveUnknown: it may have; cleared: the file found there was
    deleted, then the MOVE failed), and its error in `errors`."""
    if error is None:
        outcomes[volume] = LANDED
        return
    errors[volume] = error
    if isinstance(error, MoveUnknown):
        outcomes[volume] = UNKNOWN
    elif getattr(error, "cleared", False):
        outcomes[volume] = CLEARED


def _fail(volumes, targets, names, outcomes, errors, unmoved):
    """Delete the uploads of `unmoved` (never to be moved: they only take
    space), then raise the first error in placement order, with `.outcomes`."""
    volumes.delete_uploads({v: names[v] for v in unmoved})
    error = next(errors[v] for v in targets if v in errors)
    error.outcomes = outcomes
    raise error


def put_whole(volumes, targets, path, value, tmp=None, fence=None):
    """put() of a value in hand (bytes, at most WHOLE_MAX), in one round
    trip to each volume instead of two: its md5 and size are known before a
    byte is sent, so fence(md5, size) comes first, and then each volume gets
    its upload and the MOVE of it onto `path` in one send
    (mkvlib.pipelined.upload_and_move_many). A MOVE whose upload failed has nothing to
    move: that volume's path is not touched. A MOVE that found a file at
    the path (412), that came too late (410), or that the volume did not
    run is sent again as put() sends it, once every upload is complete.
    The MOVE's deadline is short (move_window), so a volume that
    answers nothing costs op_timeout, as its upload alone would. Raises
    what put() raises, with `.outcomes`."""
    tmp = tmp or new_tmp()
    names = {v: upload_name(tmp, v) for v in targets}
    md5, size = hashlib.md5(value).hexdigest(), len(value)
    again = None if fence is None else (lambda: fence(md5, size))   # noqa: E731
    deadline = write_deadline(move_window(volumes))
    try:
        if again is not None:
            again()
    except BaseException as e:
        e.outcomes = {}      # nothing sent
        raise
    head = b"Content-Length: %d\r\n%s" % (size, volumes.write_headers)
    puts = [(v, names[v], request("PUT", volume_host(v), names[v], head), value, path) for v in targets]
    try:
        results = pipelined.upload_and_move_many(volumes, puts, deadline)
    except BaseException as e:
        e.outcomes = {v: UNKNOWN for v in targets}   # cut off with its MOVEs out: any may land
        raise
    outcomes, errors, unmoved = _whole_outcomes(targets, results)
    if not errors:
        _move_unmoved(volumes, names, path, unmoved, again, outcomes, errors)
    if errors:
        _fail(volumes, targets, names, outcomes, errors, [v for v in unmoved if v not in outcomes])
    return md5, size


def put_whole_many(volumes, items):
    """put_whole() of several values at once: `items` [(targets, path,
    value, tmp, fence)]. Every value's fence(md5, size) first (one that
    raises sends nothing), then every upload with its MOVE behind it, each
    server's pipelined in one send (mkvlib.pipelined); what
    put_whole() sends again is sent again, value by value. Returns, in
    order, (md5, size) of each or the error put_whole() would raise, with
    `.outcomes`."""
    deadline = write_deadline(move_window(volumes))
    out, sending = [None] * len(items), []
    for i, (targets, path, value, tmp, fence) in enumerate(items):
        md5, size = hashlib.md5(value).hexdigest(), len(value)
        try:
            if fence is not None:
                fence(md5, size)
        except Exception as e:
            e.outcomes = {}      # nothing sent
            out[i] = e
            continue
        tmp = tmp or new_tmp()
        names = {v: upload_name(tmp, v) for v in targets}
        head = b"Content-Length: %d\r\n%s" % (size, volumes.write_headers)
        sending.append((i, md5, size, names))
        out[i] = [(v, names[v], request("PUT", volume_host(v), names[v], head), value, path) for v in targets]
    puts = [put for i, _, _, _ in sending for put in out[i]]
    # cut off with their MOVEs out (interrupted), any may land: the caller's
    # notes of every target stay for the next run
    results = iter(pipelined.upload_and_move_many(volumes, puts, deadline))
    for i, md5, size, names in sending:
        targets, path, _, _, fence = items[i]
        again = None if fence is None else (lambda f=fence, m=md5, n=size: f(m, n))
        mine = [next(results) for _ in targets]
        try:
            outcomes, errors, unmoved = _whole_outcomes(targets, mine)
            if not errors:
                _move_unmoved(volumes, names, path, unmoved, again, outcomes, errors)
            if errors:
                _fail(volumes, targets, names, outcomes, errors, [v for v in unmoved if v not in outcomes])
            out[i] = (md5, size)
        except Exception as e:
            if not hasattr(e, "outcomes"):
                e.outcomes = {v: UNKNOWN for v in targets}
            out[i] = e
    return out


def move_window(volumes):
    """Seconds a MOVE sent behind its upload may take: short enough that,
    once op_timeout has passed without an answer, its deadline has passed
    on the volume's clock too (a second's rounding and CLOCK_SKEW), so a
    frozen volume costs op_timeout, as an upload does, and no settle() more."""
    return min(volumes.op_timeout - 2 - CLOCK_SKEW, WRITE_TIMEOUT_MAX)


def _whole_outcomes(targets, results):
    """What pipelined.upload_and_move_many()'s results say: ({volume: LANDED or
    UNKNOWN}, {volume: error}, {volume: delete a file at the path first?}
    of the uploads that are complete and not moved)."""
    outcomes, errors, unmoved = {}, {}, {}
    for v, (up, move) in zip(targets, results):
        if isinstance(up, Exception):
            errors[v] = up
            if move is not None:
                outcomes[v] = UNKNOWN     # unanswered: the upload, then its MOVE, may have run
        elif up[0] not in (201, 204):
            # no upload, so its MOVE had nothing to move
            errors[v] = VolumeError(f"volume {volume_host(v)} answered PUT with {up[0]}: {nginx_reason(up[1])}")
        elif isinstance(move, Exception):
            outcomes[v], errors[v] = UNKNOWN, move
        elif move is not None and move[0] in (201, 204):
            outcomes[v] = LANDED
        else:
            unmoved[v] = move is not None and move[0] == 412
            if move is not None and move[0] not in (410, 412):
                errors[v] = refused(v, "MOVE", *move)
    return outcomes, errors, unmoved


def _move_unmoved(volumes, names, path, unmoved, fence, outcomes, errors):
    """MOVE the uploads `unmoved` ({volume: delete first?}) as put() does,
    one by one; their outcomes and errors go into those dicts."""
    try:
        for v, delete_first in unmoved.items():
            try:
                volumes.move(v, names[v], path, delete_first=delete_first, fence=fence)
                error = None
            except VolumeError as e:
                error = e
            _note_move(v, error, outcomes, errors)
    except BaseException as e:
        e.outcomes = {v: UNKNOWN for v in names}   # cut off among the MOVEs: any may have landed
        raise


class Upload:
    """Step 1 of put(): one value streamed into an upload on every
    volume, all complete, or an error (and the uploads that did complete
    deleted, where the volume answers).

    One loop sends each chunk to every volume in turn: the kernel's socket
    buffers keep every volume busy meanwhile, and a PUT costs no thread or
    queue per replica. A volume that takes no byte for op_timeout seconds
    fails the write."""

    def __init__(self, volumes, replicas, names, length):
        self.volumes, self.replicas, self.names, self.length = volumes, replicas, names, length
        self.hosts = {v: volume_host(v) for v in replicas}
        framing = (b"Content-Length: %d\r\n" % length if length is not None
                   else b"Transfer-Encoding: chunked\r\n")
        self.heads = {v: b"PUT %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            http_target(names[v]), self.hosts[v].encode(), framing, volumes.write_headers) for v in replicas}
        self.conns = {}
        self.sent = set()         # volumes that got the whole body
        self.ended = {}           # volume -> perf_counter() after the last bytes were sent to it

    def run(self, chunks):
        """(md5 hex, size) once every upload is complete."""
        try:
            for v in self.replicas:
                try:
                    self.conns[v] = self.volumes.pool.take(self.hosts[v])
                except Unreachable as e:
                    raise self.volumes.failed(self.hosts[v], e.cause) from None
                self.conns[v].sock.settimeout(self.volumes.op_timeout)
            md5, size = self._send_all(chunks)
        except BaseException:
            self._break_off()
            raise
        self._answers()
        return md5, size

    def _send(self, v, data):
        """Bytes of the upload to volume v (its request head first)."""
        host = self.hosts[v]
        try:
            self.conns[v].send(host, self.heads.pop(v, b"") + data)
            self.ended[v] = perf_counter()     # the answer's wait is timed from the last
        except NoAnswer as e:
            raise self.volumes.failed(host, e.cause, what="failed during upload") from None
        except Refused as e:
            raise VolumeError(f"volume {host} answered PUT with {e.status}: {nginx_reason(e.body)}") from None

    def _send_all(self, chunks):
        md5, size, length = hashlib.md5(), 0, self.length
        offload = self.volumes.offload
        hashing = None                # waits for the md5 of the chunk before
        for chunk in chunks:
            if not chunk:
                continue   # chunked, it would say the body ended
            if hashing is not None:
                hashing()
                hashing = None
            if offload is not None and len(chunk) >= OFFLOAD_MIN:
                hashing = offload(md5.update, chunk)   # on another core while we send
            else:
                md5.update(chunk)
            size += len(chunk)
            data = chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk)
            for v in self.replicas:
                self._send(v, data)
                if size == length:
                    self.sent.add(v)   # its upload is complete: it may land even if we break off now
        if hashing is not None:
            hashing()
        if length is not None and size != length:
            raise VolumeError(f"the value was {size} bytes, not the {length} announced")
        end = b"" if length is not None else b"0\r\n\r\n"   # a chunked body's last chunk
        for v in self.replicas:
            if v in self.heads or end:
                self._send(v, end)
            self.sent.add(v)
        return md5.hexdigest(), size

    def _break_off(self):
        """Broken off (the client went away, a volume failed): a volume ends
        an upload whose connection closes before its last byte. One that got
        the last byte completes it: its answer is awaited (op_timeout), so
        that the DELETE of the upload comes after it."""
        for v, conn in self.conns.items():
            if v in self.sent:
                try:
                    conn.sock.settimeout(self.volumes.op_timeout)
                    status, low, _ = conn.head()
                    conn.body(status, low)
                except (OSError, ValueError):
                    pass
            conn.close()
        self.volumes.delete_uploads({v: self.names[v] for v in self.sent})

    def _answers(self):
        """Every volume's answer to its upload, read as they come; raises
        the first error in placement order, once the uploads that did
        complete are deleted."""
        errors, done, conns = {}, [], self.conns
        for v, seconds, error in self._heads():
            host, conn = self.hosts[v], conns[v]
            try:
                if error is not None:
                    raise error
                status, low, keep = conn.head()
                body = conn.body(status, low)
            except (OSError, ValueError) as e:
                conn.close()
                errors[v] = self.volumes.failed(host, e, what="failed during upload")
                continue
            conn.used = True
            self.volumes.pool.give(host, conn, keep)
            self.volumes.health.answered(host, seconds)
            if status in (201, 204):
                done.append(v)
            else:
                errors[v] = VolumeError(f"volume {host} answered PUT with {status}: {nginx_reason(body)}")
        if errors:
            self.volumes.delete_uploads({v: self.names[v] for v in done})
            raise next(errors[v] for v in self.replicas if v in errors)

    def _heads(self):
        """(volume, seconds, None) of each volume as its answer comes (its
        wait from the last byte sent), or (volume, None, the error): a volume
        that had nothing to say for op_timeout seconds, and took none of our
        bytes that its kernel held (TIOCOUTQ: a megabyte or more in socket
        buffers) meanwhile, is frozen; one that took some is slow, and
        waited for again."""
        waiting = list(self.replicas)
        left = {v: unsent(self.conns[v].sock) for v in waiting}
        while waiting:
            slow = []
            for k, seconds, error in arrivals([(self.conns[v], self.ended[v]) for v in waiting],
                                              self.volumes.op_timeout):
                v = waiting[k]
                if isinstance(error, socket.timeout):
                    now = unsent(self.conns[v].sock)
                    if left[v] is not None and now is not None and 0 < now < left[v]:
                        left[v] = now
                        slow.append(v)
                        continue
                yield v, seconds, error
            waiting = slow
