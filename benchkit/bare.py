"""A bare WSGI function for bench.py's `bare` rows: what gunicorn gives an app
that does only what a GET must (one SQLite lookup of the key in MKV_DB, then
a 302 to its first volume, or an empty 404), with no framework, no headers
beyond Location and Content-Length, and no checks. mkv's GET is measured
against it under the same server (`gunicorn -w 2`, gunicorn.conf.py's worker)."""
import base64
import hashlib
import os
import sqlite3

_db = None


def _lookup(key):
    global _db
    if _db is None:          # after the fork: one connection per worker
        _db = sqlite3.connect(os.environ["MKV_DB"], isolation_level=None, check_same_thread=False)
    row = _db.execute("SELECT volumes FROM keys WHERE key = ? AND state = 'live'", (key,)).fetchone()
    return row[0].split(",", 1)[0] if row else None


def app(environ, start_response):
    key = environ.get("PATH_INFO", "/").encode("latin-1")
    volume = _lookup(key)
    if volume is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    digest = hashlib.md5(key).digest()
    location = "http://%s/%02x/%02x/%s" % (volume, digest[0], digest[1], base64.b64encode(key).decode("ascii"))
    start_response("302 Found", [("Location", location), ("Content-Length", "0")])
    return [b""]
