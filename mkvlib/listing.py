"""A listing page, costing what it returns and never holding the event loop:
where it ends is found first (SQLite counts, in steps), then its keys are
read and rendered in batches, each a short read, each inside `turn()`: the
master passes one that runs one listing step at a time in the worker, once
nothing else there is ready to run (sqlite3 calls never yield), so that
however many listings run, a GET waits for one step at most.

A page holds at most `limit` keys (mkvlib.index.LIST_MAX without one) and at most
`max_bytes` bytes of keys, and at least one key when there is one. Its JSON
is the same as one json.dumps of {"next", "keys"[, "encoding-type"]} would
be, written as it goes: the whole page is never in memory.
"""
import contextlib
import dataclasses
from urllib.parse import quote

import mkvlib.index
from mkvlib.index import LIVE, UNLINKED, prefix_end

STEP = 5_000          # keys SQLite counts at once while it finds the page's end (a few ms)
BATCH = 1_000         # keys read and rendered at once (about a millisecond)
# A key that may not be UTF-8: SQLite reads text as UTF-8 (a bad byte as
# U+FFFD) and GLOB stops at a NUL byte, so a key with one is looked at too.
NON_ASCII = "(CAST(key AS TEXT) GLOB '*[^\x01-\x7f]*' OR instr(key, x'00') > 0)"


@dataclasses.dataclass
class Extent:
    """Where a page ends: its last key, the next page's first (None: none)."""
    low: bytes
    high: bytes           # None: no upper bound
    last: bytes = None
    next: bytes = None
    count: int = 0
    key_bytes: int = 0
    utf8: bool = True     # every key on the page, and next, is UTF-8


def _where(state, high, after):
    if state not in (LIVE, UNLINKED):
        raise ValueError(state)
    # the state is a literal so that SQLite can use the partial index for 'unlinked'
    return (f"state = '{state}' AND key {'>' if after else '>='} ?" + (" AND key < ?" if high is not None else ""))


def _params(cursor, high, *more):
    return (cursor,) + ((high,) if high is not None else ()) + more


def _all_utf8(keys):
    try:
        b"\n".join(keys).decode("utf-8")   # '\n' joins: no sequence can span two keys
        return True
    except UnicodeDecodeError:
        return False


def extent(index, prefix, start=b"", limit=None, state=LIVE, max_bytes=None, turn=contextlib.nullcontext):
    """Find where the page of keys with `prefix`, from `start` on, ends."""
    most = limit if limit is not None else mkvlib.index.LIST_MAX
    ext = Extent(low=max(prefix, start or b""), high=prefix_end(prefix))
    cursor, after = ext.low, False
    while True:
        with turn():
            done = _step(index, ext, state, cursor, after, most, max_bytes)
        if done:
            return ext
        cursor, after = ext.last, True


def _step(index, ext, state, cursor, after, most, max_bytes):
    """One STEP of extent(); True once the page's end is found."""
    inner = f"SELECT key FROM keys WHERE {_where(state, ext.high, after)} ORDER BY key LIMIT ?"
    take = min(STEP, most + 1 - ext.count)          # one more: the next page's first key
    n, size, top, odd = index.db.read(
        f"SELECT count(*), total(length(key)), max(key), total({NON_ASCII}) FROM ({inner})",
        _params(cursor, ext.high, take))[0]
    if not n:
        return True
    if ext.count + n > most or (max_bytes is not None and ext.key_bytes + size > max_bytes):
        # the page ends inside this step: key by key
        _cut(ext, index.db.read(inner, _params(cursor, ext.high, take)), most, max_bytes)
        return True
    if odd and ext.utf8:
        ext.utf8 = _all_utf8([bytes(r[0]) for r in index.db.read(
            f"SELECT key FROM ({inner}) WHERE {NON_ASCII}", _params(cursor, ext.high, take))])
    ext.count, ext.key_bytes, ext.last = ext.count + n, ext.key_bytes + int(size), bytes(top)
    return n < take


def more_than(index, most, prefix, start=b"", state=LIVE, turn=contextlib.nullcontext, hop=100_000):
    """Whether more than `most` keys have `prefix` from `start` on: SQLite
    skips `hop` keys at a time (a few ms each) and Python sees one key per hop."""
    high, cursor, after, seen = prefix_end(prefix), max(prefix, start or b""), False, 0
    while True:
        skip = min(hop, most + 1 - seen)
        with turn():
            rows = index.db.read(f"SELECT key FROM keys WHERE {_where(state, high, after)} "
                                 "ORDER BY key LIMIT 1 OFFSET ?", _params(cursor, high, skip - 1))
        if not rows:
            return False
        seen += skip
        if seen > most:
            return True
        cursor, after = bytes(rows[0][0]), True


def _cut(ext, rows, most, max_bytes):
    """The rest of the page from one step's rows, up to its caps."""
    for (key,) in rows:
        key = bytes(key)
        full = ext.count >= most or (max_bytes is not None and ext.count and ext.key_bytes + len(key) > max_bytes)
        if ext.utf8 and not key.isascii():
            ext.utf8 = _all_utf8([key])
        if full:
            ext.next = key
            return ext
        ext.count, ext.key_bytes, ext.last = ext.count + 1, ext.key_bytes + len(key), key
    return ext


def batches(index, ext, state=LIVE, render=list, turn=contextlib.nullcontext):
    """render(keys) of the page's keys, BATCH at a time, in byte order; each
    batch read and rendered inside one turn()."""
    if ext.last is None:
        return
    cursor, after = ext.low, False
    while True:
        with turn():
            where = _where(state, None, after) + " AND key <= ?"
            keys = [bytes(r[0]) for r in index.db.read(f"SELECT key FROM keys WHERE {where} ORDER BY key LIMIT ?",
                                                      (cursor, ext.last, BATCH))]
            rendered = render(keys) if keys else None
        if not keys:
            return
        yield rendered
        if len(keys) < BATCH:
            return
        cursor, after = keys[-1], True


def name_of(key, url):
    """A key as listed: percent-encoded (raw bytes, '/' kept) or as text. A key
    that stopped being UTF-8 after its page was planned keeps its bytes as
    surrogates (json writes them as \\udcXX), never a lossy name."""
    return quote(key, safe="/") if url else key.decode("utf-8", "surrogateescape")


def render(index, ext, state=LIVE, url=False, turn=contextlib.nullcontext):
    """The page as JSON, in pieces of bytes (a batch each)."""
    import json
    nxt = name_of(ext.next, url) if ext.next is not None else ""
    head = '{"next": ' + json.dumps(nxt) + ', "keys": ['
    first = True
    for body in batches(index, ext, state, lambda keys: json.dumps([name_of(k, url) for k in keys])[1:-1], turn):
        yield (head + ("" if first else ", ") + body).encode("ascii")
        head, first = "", False
    yield (head + "]" + (', "encoding-type": "url"' if url else "") + "}").encode("ascii")
