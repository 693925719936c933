"""Counts the metrics and the status page show without counting per scrape:
live keys and their bytes, in all and per volume, and the locks held. SQLite
triggers on `keys` keep them in the table mkv_counts, in the transaction of
each write that changes them (a lock's renewal changes none of them), so
every writer, the master's workers and the tools alike, keeps them right.

Installed by the master's start (gunicorn.conf.py): the first time, the
table is filled with one scan of the index, in the transaction that makes
the triggers, so no write falls between the scan and the first trigger."""
import sqlite3

from mkvlib.db import BUSY_TIMEOUT

# rows: 'live' (every live key), 'locks' (keys locked, n only), 'vol:' + a
# volume as records name it (host:port/svXX)
TABLE = """CREATE TABLE mkv_counts (
    name  TEXT PRIMARY KEY,
    n     INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID"""

ADD = """
INSERT INTO mkv_counts SELECT 'locks', {sign}, 0 WHERE {row}.lock_owner IS NOT NULL
    ON CONFLICT(name) DO UPDATE SET n = n + excluded.n;
INSERT INTO mkv_counts SELECT 'live', {sign}, {sign} * coalesce({row}.size, 0) WHERE {row}.state = 'live'
    ON CONFLICT(name) DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes;
INSERT INTO mkv_counts SELECT 'vol:' || value, {sign}, {sign} * coalesce({row}.size, 0)
    FROM json_each('["' || replace({row}.volumes, ',', '","') || '"]')
    WHERE {row}.state = 'live' AND value != ''
    ON CONFLICT(name) DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes;"""

CHANGED = ("old.state IS NOT new.state OR old.volumes IS NOT new.volumes OR old.size IS NOT new.size "
           "OR (old.lock_owner IS NULL) != (new.lock_owner IS NULL)")

TRIGGERS = [
    f"CREATE TRIGGER mkv_counts_insert AFTER INSERT ON keys BEGIN {ADD.format(sign=1, row='new')} END",
    f"CREATE TRIGGER mkv_counts_delete AFTER DELETE ON keys BEGIN {ADD.format(sign=-1, row='old')} END",
    f"CREATE TRIGGER mkv_counts_update AFTER UPDATE OF state, volumes, size, lock_owner ON keys "
    f"WHEN {CHANGED} BEGIN {ADD.format(sign=-1, row='old')} {ADD.format(sign=1, row='new')} END",
]

FILL = """
INSERT INTO mkv_counts SELECT 'live', count(*), coalesce(sum(size), 0) FROM keys WHERE state = 'live';
INSERT INTO mkv_counts SELECT 'locks', count(*), 0 FROM keys WHERE lock_owner IS NOT NULL;
INSERT INTO mkv_counts SELECT 'vol:' || j.value, count(*), coalesce(sum(size), 0)
    FROM keys, json_each('["' || replace(keys.volumes, ',', '","') || '"]') AS j
    WHERE keys.state = 'live' AND j.value != '' GROUP BY j.value;"""


def install(db_path):
    """Make the table and its triggers unless they are there; True if made."""
    db = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'mkv_counts_update'").fetchone():
            db.execute("ROLLBACK")
            return False
        db.execute("DROP TABLE IF EXISTS mkv_counts")
        db.execute(TABLE)
        for sql in [s for s in FILL.split(";") if s.strip()] + TRIGGERS:
            db.execute(sql)
        db.execute("COMMIT")
        return True
    finally:
        db.close()


def read(db):
    """{name: (n, bytes)} from an open sqlite3 connection; {} if not installed."""
    try:
        return {name: (n, b) for name, n, b in db.execute("SELECT name, n, bytes FROM mkv_counts")}
    except sqlite3.OperationalError:
        return {}


def per_host(found):
    """{host: (keys, bytes)} of read()'s rows, the subvolumes of each volume summed."""
    out = {}
    for name, (n, b) in found.items():
        if name.startswith("vol:"):
            host = name[4:].partition("/")[0]
            k, v = out.get(host, (0, 0))
            out[host] = (k + n, v + b)
    return out
