"""Whether another process has the index open: the one thing that can hand
out a redirect (the master's workers, the S3 gateway) must have it open to
read a record. rebalance.py asks before it switches a key and again before
it removes the copies the switch dropped: no other process at either time,
no redirect to those copies can be in flight, and they need no grace.

SQLite's WAL mode says it: every connection holds a shared POSIX lock on
the DMS byte (offset 128) of the `-shm` file for as long as it is open
(sqlite.org/walformat.html, "the DMS lock"); F_GETLK reports another
process's lock, never this one's own.

The probe's file descriptor is never closed: closing any descriptor of a
file drops every POSIX lock this process holds on it, SQLite's own
included. One is opened per index file, once, and kept."""
import fcntl
import os
import struct
import threading

DMS_BYTE = 128                  # WAL_DMS: (22 + SQLITE_SHM_NLOCK) * 4 + SQLITE_SHM_NLOCK
_FLOCK = "hhqqi"                # struct flock on Linux: type, whence, start, len, pid
_fds = {}                       # absolute path of a -shm file -> its probe's descriptor
_fds_lock = threading.Lock()


def _probe_fd(shm):
    with _fds_lock:
        if shm not in _fds:
            _fds[shm] = os.open(shm, os.O_RDONLY)
        return _fds[shm]


def others_have_open(db_path) -> bool:
    """True if a process other than this one may have the SQLite file
    `db_path` open (in doubt, as when its -shm cannot be read: True).
    Call it only while this process has the index open in WAL mode: the
    -shm file stays the same file until the last connection closes."""
    shm = os.path.abspath(db_path) + "-shm"
    try:
        asked = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, DMS_BYTE, 1, 0)
        held = struct.unpack(_FLOCK, fcntl.fcntl(_probe_fd(shm), fcntl.F_GETLK, asked))
    except OSError:
        return True
    return held[0] != fcntl.F_UNLCK
