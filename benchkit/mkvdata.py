"""mkv's data made straight on disk, without a master: index files (`fill`
and a list of rows), where a key's copies go, key files planted on a volume's
disk. The one module of benchkit that uses mkvlib (placement, paths, the
index's schema)."""
import multiprocessing
import os
import sqlite3
import time

from mkvlib.index import Index
from mkvlib.placement import key2path, key2volume, volume_host
from benchkit.common import REPLICAS, SUBVOLUMES, conftest

FILL_BATCH = 100_000


# ---------------------------------------------------------------- index files

def _placements(args):
    """Worker of fill: the volumes column of keys start..stop-1."""
    start, stop, volumes, replicas, subvolumes = args
    return [",".join(key2volume(b"/fill/%09d" % i, volumes, replicas, subvolumes))
            for i in range(start, stop)]


def fill(db, keys, volumes, replicas=REPLICAS, subvolumes=SUBVOLUMES, start=0, progress=None):
    """Write records /fill/START.. /fill/START+KEYS-1 into the index `db`
    (created by Index if new); returns seconds taken."""
    began = time.monotonic()
    Index(db).close()          # the file, its schema and WAL mode, as the master makes it
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")      # 256 MB: inserts in key order, mostly appends
    sql = ("INSERT OR REPLACE INTO keys (key, state, volumes, md5, size, lock_owner, lock_until) "
           "VALUES (?, 'live', ?, ?, 1024, NULL, NULL)")
    md5 = "d41d8cd98f00b204e9800998ecf8427e"       # made up: no file is behind these keys
    batches = [(i, min(i + FILL_BATCH, start + keys), volumes, replicas, subvolumes)
               for i in range(start, start + keys, FILL_BATCH)]
    done = 0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, os.cpu_count() or 1)) as pool:
        for (lo, hi, *_), column in zip(batches, pool.imap(_placements, batches)):
            conn.execute("BEGIN")
            conn.executemany(sql, ((b"/fill/%09d" % i, v, md5) for i, v in zip(range(lo, hi), column)))
            conn.execute("COMMIT")
            done += hi - lo
            if progress:
                progress(done, time.monotonic() - began)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - began


def every(seconds, report, last_done=None):
    """A progress(done, took) for fill that calls report(done, took) once
    `seconds` have passed since it last did, and at `last_done` keys."""
    last = [0.0]

    def progress(done, took):
        if took - last[0] >= seconds or done == last_done:
            last[0] = took
            report(done, took)
    return progress


def index_size(db):
    """Bytes of the index file and its WAL."""
    return sum(os.path.getsize(f) for f in (db, db + "-wal") if os.path.exists(f))


def write_index(db, rows):
    """A new index `db` holding `rows` (key, state, volumes, md5, size)."""
    Index(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO keys (key, state, volumes, md5, size) VALUES (?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.close()


# ---------------------------------------------------------------- keys on volumes

def placement(key, names):
    """The volumes ('host:port/svXX') of `key` over the volume servers `names`,
    with the bench's replicas and subvolumes."""
    return key2volume(key, names, REPLICAS, SUBVOLUMES)


def direct_urls(key, names):
    """The URLs of `key`'s copies straight on the volume servers `names`."""
    path = key2path(key)
    return [f"http://{v}{path}" for v in placement(key, names)]


def plant(folder, volume, key, value, owner, made=None):
    """Write a key's file straight onto the disk of `volume` ('host:port/svXX')
    served from `folder`, owned like the folder (tests/conftest.py plant_file)."""
    return conftest().plant_file(folder, volume.partition("/")[2] + key2path(key), value, made, owner)


def plant_copies(key, value, volumes, folders, names, owner, made):
    """plant() `key` on each of `volumes`, where folders[i] is served as
    names[i]; the files written."""
    return [plant(folders[names.index(volume_host(v))], v, key, value, owner, made)
            for v in volumes]
