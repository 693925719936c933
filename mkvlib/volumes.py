"""What a volume's answers mean: has, open, identity, listings, delete,
MOVE an upload onto its path (mkvlib.upload streams the uploads). Calls
go over mkvlib.http; every failure feeds mkvlib.health, and is raised as a
VolumeError with a one-line reason."""
import base64
import functools
import hashlib
import json
import time

from mkvlib.errors import MoveUnknown, VolumeDown, VolumeError
from mkvlib.exchange import exchange, pipelines
from mkvlib.health import DOWN_RETRY, Health
from mkvlib.http import NoAnswer, Pool, Unreachable, nginx_reason, reason, request
from mkvlib.http import target as http_target
from mkvlib.placement import ID_PATH, upload_name, volume_host
from mkvlib.settings import SECRET_HEADER

CHUNK = 1 << 20            # bytes read from a client and sent to volumes at once
TRANSFER_TIMEOUT = 30.0    # seconds a volume may stall sending a listing or a file (to rebuild, rebalance)
OP_TIMEOUT = 5.0           # seconds a volume may take to answer a MOVE or DELETE (a rename, an unlink)
MOVE_TRIES = 3             # MOVEs onto a path where a foreign file keeps appearing
CLOCK_SKEW = 1.0           # seconds a volume's clock may be behind ours (they must agree, NTP)
WRITES = ("MOVE", "DELETE")  # requests that carry a deadline (volume/nginx.conf refuses them late)
WRITE_TIMEOUT_MAX = 10.0   # seconds: the longest a MOVE or DELETE is waited for (its deadline's distance)
LATE_MAX = WRITE_TIMEOUT_MAX + 2 + CLOCK_SKEW   # seconds after its send a MOVE or DELETE may still run


@functools.lru_cache(maxsize=64)
def deadline_headers(deadline):
    """The header lines that make a volume refuse a MOVE or DELETE (410)
    once the unix second `deadline` has passed (secure_link in
    volume/nginx.conf: a base64url md5 it insists on, not a secret)."""
    sig = base64.urlsafe_b64encode(hashlib.md5(b"%d mkv" % deadline).digest()).rstrip(b"=")
    return b"Mkv-Deadline: %d\r\nMkv-Sig: %s\r\n" % (deadline, sig)


def write_deadline(timeout):
    """The unix second after which a MOVE or DELETE sent now must not run
    (its timeout from now, at most WRITE_TIMEOUT_MAX): taken before the
    fence, so that a writer stalled after its fence sends nothing that can
    run later than this."""
    return int(time.time() + min(timeout, WRITE_TIMEOUT_MAX)) + 1   # nginx: whole seconds


def listing(host, path, status, body):
    """The entries of an autoindex answer ([] for a missing folder), or the VolumeError."""
    if status == 404:
        return []
    if status != 200:
        return VolumeError(f"volume {host} answered GET {path} with {status}")
    try:
        return json.loads(body.decode())   # a str skips json.loads' encoding guess
    except ValueError:
        return VolumeError(f"volume {host}: {path} is not a JSON listing")


def refused(volume, method, status, body):
    """The VolumeError of a write the volume answered with an error."""
    host = volume_host(volume)
    if status == 410:
        return VolumeError(f"volume {host} refused {method} as past its deadline: it reached the volume "
                           "late, or the volume's clock runs ahead of this machine's (they must agree: NTP)")
    return VolumeError(f"volume {host} answered {method} with {status}: {nginx_reason(body)}")


def found(volume, status):
    """What a volume's answer to a HEAD says of the file: True, False, or a VolumeError."""
    if status in (200, 404):
        return status == 200
    return VolumeError(f"volume {volume_host(volume)} answered HEAD with {status}")


def on_host(volume, path):
    """(host, path on that server) of `path` in `volume` (its svXX folder first)."""
    host = volume_host(volume)
    return host, volume[len(host):] + path


class Volumes:
    """Calls to the volume servers, and what this process knows of their
    health (`health`: a volume that fails is skipped for DOWN_RETRY seconds,
    then one request tries it again; so a dead volume costs one timeout now
    and then, not one per request).

    The rule for writes: when a call returns, answered or not, no MOVE or
    DELETE it sent can take effect later. Each carries a deadline, its
    timeout from now, after which the volume refuses it (a stalled nginx
    worker, a blocked disk or a slow network may deliver it late); a call
    that got no answer returns only once that deadline has passed on the
    volume's clock too (CLOCK_SKEW). And a write on a key's path is sent only
    right after `fence()`, the check that its writer still holds the key."""

    def __init__(self, timeout=1.0, retry_after=DOWN_RETRY, maxsize=64, secret=None, offload=None):
        self.timeout = timeout
        self.pool = Pool(timeout, maxsize)
        self.health = Health(retry_after, ask=self.answers)
        # offload(fn, arg): starts fn(arg) in a real thread and returns a
        # function that waits for it; an upload hashes its chunks that way
        # (hashlib lets go of the GIL) while it sends them. None: hash inline.
        self.offload = offload
        # writes carry MKV_SECRET: a volume started with it refuses writes without it
        self.write_headers = b"%s: %s\r\n" % (SECRET_HEADER.encode(), secret.encode()) if secret else b""
        # a MOVE or DELETE is a rename or an unlink, and a volume that takes
        # no byte of an upload for this long is stuck: seconds at the most on
        # a healthy volume, so a frozen one costs this, not TRANSFER_TIMEOUT
        self.op_timeout = max(timeout, OP_TIMEOUT)
        self.unsettled_until = 0.0   # unix time until which a write cut off unanswered may run (settle)

    def failed(self, host, cause, mark=True, what="is unreachable", kind=None):
        """The error to raise for a volume that failed (marked down unless `mark` is False)."""
        if mark:
            self.health.failed(host, reason(cause))
        return (kind or VolumeDown)(f"volume {host} {what}: {reason(cause)}")

    def settle(self):
        """Return once no MOVE or DELETE of this process that was cut off
        unanswered (its caller killed, say) can still run."""
        time.sleep(max(0.0, self.unsettled_until - time.time()))

    def may_run_until(self, deadline):
        """A MOVE or DELETE carrying `deadline` went out and got no answer:
        it may still run until the volume's clock passes its deadline (a
        second's rounding in nginx, and skew). settle() waits for that."""
        self.unsettled_until = max(self.unsettled_until, deadline + 1 + CLOCK_SKEW)

    def exchange_writes(self, calls, deadline, times=None):
        """exchange() of [(host, data, n)] whose requests include MOVEs or
        DELETEs carrying `deadline` (and `times`, as exchange() fills it):
        cut off (GreenletExit, say) while they were out, they may still run."""
        try:
            return exchange(self.pool, calls, timeout=self.op_timeout, times=times)
        except BaseException:
            self.may_run_until(deadline)
            raise

    def settle_unanswered(self, got, deadline):
        """Return once no write of exchange_writes' answers `got` that went
        unanswered can still run."""
        if any(isinstance(error, NoAnswer) for _, error in got):
            self.may_run_until(deadline)
            self.settle()

    def _fan(self, method, calls, timeout=None, mark=True, kind=None, deadline=None):
        """Pool.fan of (volume, path, header lines) calls: in order, (status,
        body) or the error: VolumeDown if the request could not be sent,
        `kind` (VolumeDown by default) if it was sent and no answer came. A
        MOVE or DELETE carries `deadline` (default: its timeout from now)."""
        timeout = timeout or self.timeout
        late = b""
        if method in WRITES:
            timeout = min(timeout, WRITE_TIMEOUT_MAX)
            deadline = deadline or write_deadline(timeout)
            late = deadline_headers(deadline)
        times = []     # each answer's, as fan() measures it
        try:
            got = self.pool.fan(method, [on_host(v, p) + (h + late,) for v, p, h in calls], timeout, times)
        except BaseException:
            if late:   # cut off (GreenletExit, say) while its requests were out: they may still run
                self.may_run_until(deadline)
            raise
        out = []
        for (volume, _, _), result, seconds in zip(calls, got, times):
            host = volume_host(volume)
            if isinstance(result, Unreachable):
                result = self.failed(host, result.cause, mark)
            elif isinstance(result, NoAnswer):
                result = self.failed(host, result.cause, mark, f"did not answer {method}", kind)
            else:
                self.health.answered(host, seconds)
            out.append(result)
        if late and any(isinstance(r, NoAnswer) for r in got):
            self.may_run_until(deadline)    # sent and unanswered: it may still run
            self.settle()
        return out

    def _call(self, method, volume, path, headers=b"", timeout=None, mark=True, kind=None, deadline=None):
        """(status, body) of one request without a body; raises what _fan() returns."""
        result = self._fan(method, [(volume, path, headers)], timeout, mark, kind, deadline)[0]
        if isinstance(result, Exception):
            raise result
        return result

    # -- reads

    def answers(self, host):
        """Ask the server now (one HEAD, `timeout`): True if it answers at all."""
        try:
            self.has(host, "/")
        except VolumeDown:
            return False
        except VolumeError:
            pass                   # any answer will do: the volume is up
        return True

    def has(self, volume, path):
        """True if the volume has the file, False if not; VolumeDown if it does not answer."""
        found = self.has_many([(volume, path)])[0]
        if isinstance(found, Exception):
            raise found
        return found

    def has_many(self, calls):
        """has() of each (volume, path), asked at once: True, False or the VolumeError."""
        return [result if isinstance(result, Exception) else found(volume, result[0])
                for (volume, _), result in zip(calls, self._fan("HEAD", [(v, p, b"") for v, p in calls]))]

    def identity(self, volume, mark=True):
        """The identity of the disk behind a volume (its /.id); '' for a volume
        that has none (served by an earlier launcher, or the original's nginx).
        VolumeDown if it does not answer (marked down unless `mark` is False)."""
        found = self.identities([volume_host(volume)], mark)[0]
        if isinstance(found, Exception):
            raise found
        return found

    def identities(self, hosts, mark=True):
        """identity() of each host, asked at once: the identity or the VolumeError."""
        out = []
        for host, result in zip(hosts, self._fan("GET", [(h, ID_PATH, b"") for h in hosts], mark=mark)):
            if not isinstance(result, Exception):
                status, body = result
                if status == 200:
                    result = body.decode("ascii", "replace").strip()
                elif status in (403, 404):
                    result = ""
                else:
                    result = VolumeError(f"volume {host} answered GET {ID_PATH} with {status}")
            out.append(result)
        return out

    def open(self, volume, path, headers=b""):
        """A streaming GET of a file: a Download (.length, .stream(CHUNK),
        .close()); None if the file is missing. `headers`: extra header
        lines (a Range: the Download then holds that part, a 206)."""
        host, there = on_host(volume, path)
        times = []
        try:
            status, got = self.pool.open(host, there, TRANSFER_TIMEOUT, headers, times)
        except Unreachable as e:
            raise self.failed(host, e.cause) from None
        except NoAnswer as e:
            raise self.failed(host, e.cause, what="did not answer GET") from None
        self.health.answered(host, times[-1])   # the attempt that was answered
        if status in (200, 206):
            return Download(got)
        if status == 404:
            return None
        raise VolumeError(f"volume {host} answered GET with {status}")

    # -- listings

    def listdir(self, volume, path="/"):
        """Entries of a folder from nginx's JSON autoindex: [{'name', 'type', 'size'?}].
        A missing folder is an empty list."""
        status, body = self._call("GET", volume, path.rstrip("/") + "/", timeout=TRANSFER_TIMEOUT)
        found = listing(volume_host(volume), path, status, body)
        if isinstance(found, Exception):
            raise found
        return found

    def listdirs(self, folders, window=128):
        """listdir() of many folders at once: [(volume, path)] -> a list in the
        same order, each item the folder's entries ([] if it is missing) or the
        VolumeError that folder got.

        rebuild.py lists every folder of every volume, most of them holding
        one file: so each server's requests go pipelined, all servers' at
        once (Pool.pipelines)."""
        by_host = {}
        for i, (volume, path) in enumerate(folders):
            host, there = on_host(volume, path.rstrip("/") + "/")
            by_host.setdefault(host, []).append((i, there))
        got = pipelines(self.pool, {h: [p for _, p in asked] for h, asked in by_host.items()},
                        TRANSFER_TIMEOUT, window)
        results = [None] * len(folders)
        for host, asked in by_host.items():
            errors = [r for r in got[host] if isinstance(r, Exception)]
            if len(errors) < len(asked):
                self.health.answered(host)   # it answered (a failure after that marks it down again)
            error = self.failed(host, errors[0].cause) if errors else None
            for (i, _), result in zip(asked, got[host]):
                results[i] = error if isinstance(result, Exception) else \
                    listing(host, folders[i][1], *result)
        return results

    # -- deletes

    def delete_many(self, calls, fence=None):
        """DELETE of each (volume, path) at once: None for each file deleted
        (or already gone), else the VolumeError it got. fence() first, if
        given: it raises if the caller may no longer touch these paths."""
        if not calls:
            return []
        deadline = write_deadline(self.op_timeout)
        if fence is not None:
            fence()
        out = []
        for (volume, _), result in zip(calls, self._fan("DELETE", [(v, p, self.write_headers) for v, p in calls],
                                                        timeout=self.op_timeout, deadline=deadline)):
            if not isinstance(result, Exception) and result[0] not in (200, 204, 404):
                result = refused(volume, "DELETE", *result)
            out.append(result if isinstance(result, Exception) else None)
        return out

    def delete(self, volume, path, fence=None):
        """Delete a file; a file that is already gone is fine."""
        error = self.delete_many([(volume, path)], fence)[0]
        if error is not None:
            raise error

    def delete_copies(self, copies, path, fence=None):
        """Delete a key's file at `path` from each volume of `copies` ({volume:
        upload name or None}), at once: first the upload (a write's, see
        upload_name) whose MOVE onto the path may still be on its way, since
        once the upload is gone no MOVE can land; then the file. Returns
        {volume: reason} of those not deleted for sure (a volume known down
        is not asked). fence() right before the files' DELETEs, if given."""
        if not copies:
            return {}      # nearly every PUT: no copy outside its placement
        failed = {v: f"volume {volume_host(v)} is down" for v in copies if self.health.down(volume_host(v))}
        uploads = [v for v in copies if copies[v] and v not in failed]
        for v, error in zip(uploads, self.delete_many([(volume_host(v), upload_name(copies[v], v))
                                                        for v in uploads])):
            if error is not None:
                failed[v] = str(error)
        asked = [v for v in copies if v not in failed]
        for v, error in zip(asked, self.delete_many([(v, path) for v in asked], fence)):
            if error is not None:
                failed[v] = str(error)
        return failed

    def delete_uploads(self, names):
        """Delete uploads {volume: name} that will not be moved (tidiness: an
        upload is never read; rebalance.py sweeps what is left)."""
        self.delete_many([(volume_host(v), names[v]) for v in names if not self.health.down(volume_host(v))])

    # -- MOVEs of uploads onto a path (mkvlib.upload.put, mkvlib.replace)

    def moves(self, volumes, names, path, fence=None, deadline=None):
        """MOVE each volume's upload onto `path` at once, as move() does: None
        for each that landed, else the VolumeError (MoveUnknown: it may have landed)."""
        calls = [(volume_host(v), names[v], self.move_headers(v, path)) for v in volumes]
        out = []
        moved = self._fan("MOVE", calls, timeout=self.op_timeout, kind=MoveUnknown, deadline=deadline)
        for volume, result in zip(volumes, moved):
            if not isinstance(result, Exception):
                status, body = result
                if status in (201, 204):
                    result = None
                elif status == 412:     # a file is there: delete it and try again, this volume alone
                    try:
                        self.move(volume, names[volume], path, delete_first=True, fence=fence)
                        result = None
                    except VolumeError as e:
                        result = e
                else:
                    result = refused(volume, "MOVE", status, body)
            out.append(result)
        return out

    def move_headers(self, volume, path, overwrite=False):
        host, there = on_host(volume, path)
        return b"Destination: %s\r\nOverwrite: %s\r\n%s" % (http_target(there), b"T" if overwrite else b"F",
                                                            self.write_headers)

    def move(self, volume, name, path, delete_first=False, fence=None):
        """MOVE the upload `name` onto `path` without replacing a file (the
        volume checks and renames at once): a file found there (a stray
        copy, or a late writer's) is deleted and the MOVE tried again, each
        request right after fence(), if given (the writer may have stalled
        since its last look at its lock). VolumeError: nothing moved;
        MoveUnknown: no answer (and it will not land later)."""
        host = volume_host(volume)
        headers = self.move_headers(volume, path)
        cleared = False                 # a file at the path was deleted: a failure now says so
        try:
            for _ in range(MOVE_TRIES):
                if delete_first:
                    cleared = True      # from the moment the DELETE may run, answered or not
                    self.delete(volume, path, fence)
                delete_first = True
                deadline = write_deadline(self.op_timeout)
                if fence is not None:
                    fence()
                status, body = self._call("MOVE", host, name, headers, timeout=self.op_timeout,
                                          kind=MoveUnknown, deadline=deadline)
                if status in (201, 204):
                    return
                if status != 412:
                    raise refused(volume, "MOVE", status, body)
            raise VolumeError(f"volume {host}: a file kept appearing at {path} while a value was moved there")
        except VolumeError as e:
            e.cleared = cleared
            raise

    def move_over(self, volume, name, path, fence=None):
        """MOVE the upload `name` onto `path`, replacing the file there in one
        rename (Overwrite: T: a reader opens the old file or the new one,
        never neither), right after fence(), if given. The caller holds the
        key and has noted the path (mkvlib.replace). VolumeError: nothing
        moved; MoveUnknown: no answer (and it will not land later)."""
        host = volume_host(volume)
        headers = self.move_headers(volume, path, overwrite=True)
        deadline = write_deadline(self.op_timeout)
        if fence is not None:
            fence()
        status, body = self._call("MOVE", host, name, headers, timeout=self.op_timeout,
                                  kind=MoveUnknown, deadline=deadline)
        if status not in (201, 204):
            raise refused(volume, "MOVE", status, body)


def upload_and_move_result(volumes, host, answers, error, times=()):
    """(upload, move) of one volume, from exchange()'s (answers, error) and
    `times`, the seconds each answer took."""
    if isinstance(error, Unreachable):
        return volumes.failed(host, error.cause), None
    if answers:
        volumes.health.answered_each(host, times)
    if error is None:
        return answers[0], answers[1] if len(answers) > 1 else None
    # the volume is marked down once, by what it did not answer first
    upload = answers[0] if answers else volumes.failed(host, error.cause, what="failed during upload")
    return upload, volumes.failed(host, error.cause, mark=bool(answers), what="did not answer MOVE",
                               kind=MoveUnknown)


class Download:
    """A file being read from a volume (Volumes.open): `length` (None if the
    volume did not say), stream(n) for its bytes, close() when done."""

    def __init__(self, reader):
        self.reader, self.length = reader, reader.length

    def stream(self, n):
        """The file's bytes, at most n at a time. VolumeError if the transfer breaks."""
        try:
            yield from self.reader.stream(n)
        except NoAnswer as e:
            raise VolumeError(f"volume {e.host}: reading a file broke off: {e}") from None

    @property
    def relayable(self):
        return self.reader.relayable

    def take_over(self):
        """(first bytes, socket, bytes to come on it) for a relay (mkvlib.relay); done() after."""
        try:
            return self.reader.take_over()
        except NoAnswer as e:
            raise VolumeError(f"volume {e.host}: reading a file broke off: {e}") from None

    def done(self):
        self.reader.done()

    def close(self):
        """Give the connection back if the file was read to its end, else close it."""
        self.reader.close()
