"""Rebuild mkv's index from what the volumes hold, or --check it against them.

    python rebuild.py [--volumes H:P,...] [--db FILE] [--replicas N] [--subvolumes N]
                      [--workers N] [--md5] [--check]

Walks every volume's nginx JSON autoindex and writes one record per key found:
its replicas in placement order (then any others), its size from the listing.
Works into a new index file, or against the live index while the master
serves: a key being written or deleted is left alone, and a key the index
does not know is claimed like a PUT claims it before it is added, so that a
DELETE that happened since the listing is not undone.

All replicas of a key sit in the same /xx/yy/ folder (xx, yy: the first bytes
of md5(key)) of whichever volume holds them, so the walk goes folder by folder
across all volumes at once: it sees every copy of a key together, and holds
in memory one folder's listings per worker, never a whole volume's.

Nearly every leaf folder holds one file or two, so the walk's cost is one
listing per key: listings go pipelined to every volume at once
(Volumes.listdirs), LIST_BATCH per worker. Into a new index nobody else
writes, so keys go in with INSERT OR IGNORE, INSERT_BATCH rows per
transaction, without the per-key claim the live index needs.
"""
import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from mkvlib import progress as published
from mkvlib.errors import KeyBusy, MkvError, Unavailable, VolumeError
from mkvlib.index import LIVE, UNLINKED
from mkvlib.lease import Lease, new_owner
from mkvlib.placement import key2path, path2key, volume_host
from mkvlib.volumes import CHUNK
import tools

PROG = "rebuild"
HEX_NAMES = frozenset(f"{i:02x}" for i in range(256))            # the xx and yy folders
SUBVOLUME_NAMES = frozenset(f"sv{i:02X}" for i in range(256))     # the svXX folders
REPORT_CAP = 200      # problem lines --check prints before it only counts
LIST_BATCH = 256      # leaf listings a worker asks for at once (and holds in memory)
INSERT_BATCH = 2000   # rows per transaction when rebuilding into a new index
SUMMARY = ["seen", "added", "updated", "unchanged", "busy", "skipped", "failed"]
KINDS = ["missing", "under-replicated", "misplaced", "orphan", "wrong-size", "wrong-md5"]


def is_hex_dir(entry):
    return entry.get("type") == "directory" and entry.get("name") in HEX_NAMES


def is_subvolume_dir(entry):
    return entry.get("type") == "directory" and entry.get("name") in SUBVOLUME_NAMES


def order_replicas(key, holders, settings):
    """The original's rule: the holders that are in the key's placement, in
    placement order, then the others (here in MKV_VOLUMES order, then by name,
    so that the result does not depend on which listing came first)."""
    placement = settings.placement(key)
    first = [v for v in placement if v in holders]
    if len(first) == len(holders):
        return first
    rank = {v: i for i, v in enumerate(settings.volumes)}
    rest = sorted((v for v in holders if v not in placement),
                  key=lambda v: (rank.get(volume_host(v), len(rank)), v))
    return first + rest


def classify(key, rec, holders, settings, notes=()):
    """Problems of one key: [(kind, detail)]. `holders` are the (sub)volumes
    that have its file, as a set or as {volume: size from the listing or
    None}; `notes` the volumes noted as unvouched. A key being written or
    deleted has none."""
    sizes = holders if isinstance(holders, dict) else dict.fromkeys(holders)
    if rec is None:
        return [("orphan", v + (" (noted: rebalance.py removes it)" if v in notes else ""))
                for v in sorted(sizes)]
    if rec.state not in (LIVE, UNLINKED) or rec.locked():
        return []
    placement = settings.placement(key)
    if not sizes:
        return [("missing", ",".join(rec.volumes))]
    problems = [("misplaced", v) for v in sorted(sizes) if v not in placement]
    problems += [("orphan", f"{v} (a file the record does not name)")
                 for v in sorted(sizes) if v in placement and v not in rec.volumes]
    wrong = [v for v in rec.volumes if sizes.get(v) is not None and rec.size is not None and sizes[v] != rec.size]
    problems += [("wrong-size", f"{v} ({sizes[v]} bytes, recorded {rec.size}): "
                                "rebuild.py drops it from the record, then rebalance.py replaces it")
                 for v in wrong]
    usable = [v for v in rec.volumes if v in sizes and v not in wrong]
    if len(usable) < settings.replicas:
        problems.append(("under-replicated", f"{len(usable)} of {settings.replicas} replicas"
                         + (f" ({','.join(usable)})" if usable else "")))
    return problems


class Listing:
    """The folders of the volumes, as rebuild walks them: many listings at
    once (Volumes.listdirs), a folder that could not be listed counted as a
    failure and reported."""

    def __init__(self, volumes, progress):
        self.volumes, self.progress = volumes, progress

    def listdirs(self, folders):
        """Listings of [(volume, path)], in order, all asked at once; None for a
        folder whose volume did not give it (one failure counted for each)."""
        out = []
        for (volume, path), got in zip(folders, self.volumes.listdirs(folders)):
            if not isinstance(got, list):    # the VolumeError this folder got
                self.progress.count("failed")
                self.progress.message(f"{PROG}: cannot list {volume}{path}: {got}")
                got = None
            out.append(got)
        return out

    def subvolumes(self, hosts):
        """{(sub)volume: set of its xx folders}. A volume with svXX folders is
        walked in those; top-level xx folders are walked too (a volume whose
        MKV_SUBVOLUMES changed, or one written with subvolumes=1)."""
        tops, subs = {}, []
        for host, entries in zip(hosts, self.listdirs([(h, "/") for h in hosts])):
            if entries is None:
                continue
            mine = [f"{host}/{e['name']}" for e in entries if is_subvolume_dir(e)]
            flat = {e["name"] for e in entries if is_hex_dir(e)}
            self.progress.count("skipped", len(entries) - len(mine) - len(flat))
            if flat:
                tops[host] = flat
            subs += mine
        for sub, entries in zip(subs, self.listdirs([(s, "/") for s in subs])):
            if entries is None:
                continue
            xx = {e["name"] for e in entries if is_hex_dir(e)}
            self.progress.count("skipped", len(entries) - len(xx))
            tops[sub] = xx
        return tops

    def files(self, folders):
        """[(volume, tag, name, size)] of every file in `folders`
        [(volume, path, tag)], all listed at once. `name` is the file's path
        below its folder's: a base64 name with '/' lies in sub-folders, listed
        in a further round."""
        out = []
        folders = [(volume, path, tag, "") for volume, path, tag in folders]
        while folders:
            deeper = []
            listings = self.listdirs([(volume, path) for volume, path, _, _ in folders])
            for (volume, path, tag, prefix), entries in zip(folders, listings):
                for e in entries or ():
                    name, kind = e.get("name", ""), e.get("type")
                    if kind == "file":
                        out.append((volume, tag, prefix + name, e.get("size")))
                    elif kind == "directory":
                        deeper.append((volume, f"{path}{name}/", tag, f"{prefix}{name}/"))
                    else:
                        self.progress.count("skipped")
            folders = deeper
        return out


class Seen:
    """The set of keys --check found on the volumes, in a throwaway SQLite
    file (billions of keys do not fit in memory); safe between threads."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="mkv-check-")
        self._db = sqlite3.connect(os.path.join(self._tmp.name, "seen.sqlite3"),
                                   check_same_thread=False, isolation_level=None)
        self._db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                               "CREATE TABLE seen (key BLOB PRIMARY KEY) WITHOUT ROWID;")
        self._lock = threading.Lock()

    def add(self, keys):
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", [(k,) for k in keys])

    def __contains__(self, key):
        with self._lock:
            return self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None


class Rebuild:
    def __init__(self, settings, index, volumes, progress, fresh, md5=False, check=False):
        self.settings, self.index, self.volumes = settings, index, volumes
        self.progress, self.fresh, self.md5, self.check = progress, fresh, md5, check
        self.owner = new_owner("rebuild-")
        self.problems = {k: 0 for k in KINDS}
        self._report_lock = threading.Lock()
        self._rows, self._rows_lock = [], threading.Lock()   # add_fresh's rows waiting for insert()
        self.listing = Listing(volumes, progress)
        self.seen = Seen() if check else None    # keys found on the volumes, for --check

    # -- the walk

    def walk_top(self, xx, subs):
        """Every /xx/yy/ folder of every (sub)volume that has /xx/, LIST_BATCH
        listings at a time, yy by yy."""
        try:
            by_yy = {}
            for sub, entries in zip(subs, self.listing.listdirs([(sub, f"/{xx}/") for sub in subs])):
                for e in entries or ():
                    if is_hex_dir(e):
                        by_yy.setdefault(e["name"], []).append(sub)
                    else:
                        self.progress.count("skipped")
            rows = []
            group, n = [], 0
            for yy in sorted(by_yy):
                group.append(yy)
                n += len(by_yy[yy])
                if n >= LIST_BATCH:
                    self.walk_leaves(xx, group, by_yy, rows)
                    group, n = [], 0
            if group:
                self.walk_leaves(xx, group, by_yy, rows)
            with self._rows_lock:
                self._rows += rows
                rows = self._rows if len(self._rows) >= INSERT_BATCH else []
                if rows:
                    self._rows = []
            self.insert(rows)
        finally:
            self.progress.add(done=1)

    def walk_leaves(self, xx, yys, by_yy, rows):
        """The keys of the /xx/yy/ folders `yys`, yy by yy, each key once with
        every copy the listings show."""
        found = {yy: {} for yy in yys}    # yy -> key -> {(sub)volume: size}
        keys = {}                          # (yy, name) -> its key, None if not a file mkv wrote
        for sub, yy, name, size in self.listing.files([(sub, f"/{xx}/{yy}/", yy) for yy in yys
                                                        for sub in by_yy[yy]]):
            key = keys.get((yy, name), False)
            if key is False:    # each name once, not once per copy
                try:
                    key = path2key(name)
                except ValueError:
                    key = None
                if key is not None and key2path(key) != f"/{xx}/{yy}/{name}":
                    key = None
                keys[yy, name] = key
            if key is None:
                self.progress.count("skipped")   # not a file mkv wrote
                continue
            found[yy].setdefault(key, {})[sub] = size
        seen = nbytes = 0
        for yy in yys:
            for copies in found[yy].values():
                seen += 1
                nbytes += next(iter(copies.values())) or 0
        self.progress.count("seen", seen)
        self.progress.add(keys=seen, nbytes=nbytes)
        for yy in yys:
            for key in sorted(found[yy]):
                try:
                    self.one_key(key, found[yy][key], rows)
                except (MkvError, sqlite3.Error) as e:
                    self.progress.count("failed")
                    self.progress.message(f"{PROG}: {tools.show(key)}: {e}")
            if self.seen is not None and found[yy]:
                self.seen.add(found[yy])
        if len(rows) >= INSERT_BATCH:
            self.insert(rows)

    def run(self, workers):
        tops = self.listing.subvolumes(self.settings.volumes)
        units = {}
        for sub, xxs in tops.items():
            for xx in xxs:
                units.setdefault(xx, []).append(sub)
        self.progress.set_total(len(units))
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(self.walk_top, xx, units[xx]) for xx in sorted(units)]:
                f.result()
        self.insert(self._rows)
        if self.check:
            self.find_missing()

    # -- one key

    def one_key(self, key, found, rows):
        """One key and its copies {(sub)volume: size}: checked, added (into a
        new index: a row appended to `rows`), or compared with its record."""
        if self.check:
            return self.check_key(key, found)
        if self.fresh:
            return self.add_fresh(key, found, rows)
        rec = self.index.get(key)
        if rec is None:
            return self.add_key(key, found)
        if rec.state not in (LIVE, UNLINKED) or rec.locked():
            return self.progress.count("busy")
        volumes = order_replicas(key, found, self.settings)
        if volumes == rec.volumes and all(s == rec.size for s in found.values()) and not self.md5:
            return self.progress.count("unchanged")
        self.update_key(key, found)

    def present(self, candidates):
        """Those of `candidates` that have the key's file now; a volume that
        does not answer is kept (its copy is not known to be gone)."""
        out = []
        for v, path in candidates:
            try:
                if self.volumes.has(v, path):
                    out.append(v)
            except VolumeError:
                out.append(v)
        return out

    def checksum(self, key, volume):
        """(md5, size) of the key's file on `volume`; None if it cannot be read."""
        try:
            r = self.volumes.open(volume, key2path(key))
        except VolumeError:
            return None
        if r is None:
            return None
        h, n = hashlib.md5(), 0
        try:
            for chunk in r.stream(CHUNK):
                h.update(chunk)
                n += len(chunk)
        except Exception as e:   # a transfer broken off
            self.progress.message(f"{PROG}: {tools.show(key)}: reading {volume} failed: {e}")
            return None
        finally:
            r.close()
        return h.hexdigest(), n

    def conflict(self, key, differences):
        """Copies of a key that no record vouches for disagree: none is added."""
        self.progress.count("failed")
        detail = ", ".join(f"{v}: {d}" for v, d in sorted(differences.items()))
        self.progress.message(f"{PROG}: {tools.show(key)}: conflict, its copies differ ({detail}); not added: "
                              "remove the wrong copies (or all but the one you trust) and run rebuild again")

    def agreed_sum(self, key, volumes):
        """(md5, size) that the key's copies on `volumes` agree on, read off
        them; None if they disagree (reported as a conflict); Unavailable if
        none can be read."""
        sums = {v: self.checksum(key, v) for v in volumes}
        readable = {v: s for v, s in sums.items() if s is not None}
        if not readable:
            raise Unavailable("could not read the file from any volume for --md5")
        if len(set(readable.values())) > 1:
            self.conflict(key, {v: f"md5 {m}, {n} bytes" for v, (m, n) in readable.items()})
            return None
        return next(iter(readable.values()))

    def md5_and_size(self, key, found, volumes):
        """(md5, size) of a new key whose copies are on `volumes`: the listed
        size and no md5, or with --md5 the md5 its copies agree on; None if
        they do not (agreed_sum has reported it)."""
        if not self.md5:
            return None, found[volumes[0]]
        return self.agreed_sum(key, volumes)

    def add_fresh(self, key, found, rows):
        """A key for a new index, which nobody else writes: no claim, no lock,
        no second look at the volumes; a row for insert(). Copies that
        disagree (size; md5 with --md5) are reported and none is added."""
        if len(set(found.values())) > 1:
            return self.conflict(key, {v: f"{s} bytes" for v, s in found.items()})
        volumes = order_replicas(key, found, self.settings)
        value = self.md5_and_size(key, found, volumes)
        if value is None:
            return
        md5, size = value
        rows.append((key, volumes, md5, size))

    def insert(self, rows):
        """Write the rows add_fresh made, in one transaction, and empty `rows`.
        A key that has a record by now keeps it (INSERT OR IGNORE: whoever
        wrote it knows better; counted busy)."""
        if not rows:
            return
        try:
            added = self.index.insert_live(rows)
        except (MkvError, sqlite3.Error) as e:
            self.progress.count("failed", len(rows))
            self.progress.message(f"{PROG}: could not write {len(rows)} keys to the index: {e}")
        else:
            self.progress.count("added", added)
            self.progress.count("busy", len(rows) - added)
        rows.clear()

    def add_key(self, key, found):
        """A key the index does not know: claim it as a PUT would, check that
        the files are still there (a DELETE may have happened since the
        listing), then make it live with those. Copies noted as unvouched
        (what failed writes and moves left) are never added; copies that
        disagree (size; md5 with --md5) are reported and none is added."""
        noted = self.index.notes(key)
        found = {v: s for v, s in found.items() if v not in noted}
        if not found:
            return self.progress.count("skipped")
        if len(set(found.values())) > 1:
            return self.conflict(key, {v: f"{s} bytes" for v, s in found.items()})
        volumes = order_replicas(key, found, self.settings)
        if not self.index.claim(key, volumes, self.owner):
            return self.progress.count("busy")   # written meanwhile: the master's record wins
        done = False
        try:
            with Lease(self.index, key, self.owner):
                volumes = self.present([(v, key2path(key)) for v in volumes])
                if not volumes:
                    return self.progress.count("unchanged")   # deleted since the listing
                value = self.md5_and_size(key, found, volumes)
                if value is None:
                    return
                md5, size = value
                if self.index.set_value(key, self.owner, volumes, size, md5) and \
                        self.index.finish_put(key, self.owner, md5, size):
                    done = True
                    self.progress.count("added")
                else:
                    raise KeyBusy("lost the lock while adding the key")
        finally:
            if not done:
                self.index.abandon_put(key, self.owner)

    def update_key(self, key, found):
        """A live or unlinked key whose record differs from the listing: lock
        it and look again. Recorded copies that are gone leave the record;
        recorded copies of the wrong size (or md5, with --md5) leave it and are
        noted for rebalance.py to remove. A copy the record does not name is
        added only if it is the record's value: its size, and its md5 read and
        compared with the record's (or a recorded copy's)."""
        try:
            rec = tools.lock_key(self.index, key, self.owner)
        except KeyBusy:
            return self.progress.count("busy")
        if rec is None:
            return self.progress.count("unchanged")   # deleted since
        try:
            with Lease(self.index, key, self.owner):
                if rec.state not in (LIVE, UNLINKED):
                    return self.progress.count("busy")
                path = key2path(key)
                noted = self.index.notes(key)
                kept = self.present([(v, path) for v in rec.volumes])
                wrong = [v for v in kept if v in found and rec.size is not None and found[v] != rec.size]
                md5, size = rec.md5, rec.size
                sums = {}
                if self.md5:
                    sums = {v: self.checksum(key, v) for v in kept if v not in wrong}
                    if md5 is None:   # the record's value is what its copies agree on
                        agreed = {s for s in sums.values() if s is not None}
                        if len(agreed) == 1:
                            md5, size = agreed.pop()
                    wrong += [v for v, s in sums.items() if s is not None and md5 and s[0] != md5]
                kept = [v for v in kept if v not in wrong]
                adopted = []
                for v in found:
                    if v in rec.volumes or v in noted or (size is not None and found[v] != size):
                        continue
                    if md5 is None and kept:   # no md5 recorded: a recorded copy's is the reference
                        ref = self.checksum(key, kept[0])
                        if ref is not None and (size is None or ref[1] == size):
                            md5, size = ref
                    got = self.checksum(key, v)
                    if md5 is not None and got is not None and got == (md5, size):
                        adopted.append(v)
                for v in wrong:
                    self.progress.message(f"{PROG}: {tools.show(key)}: the copy on {v} is not the recorded "
                                          "value; dropped from the record (rebalance.py replaces it)")
                volumes = order_replicas(key, kept + adopted, self.settings)
                if not volumes:
                    return self.progress.count("unchanged")   # nothing trustworthy found: keep the record
                if (volumes, size, md5) == (rec.volumes, rec.size, rec.md5):
                    return self.progress.count("unchanged")
                if not self.index.set_value(key, self.owner, volumes, size, md5, dropped=wrong):
                    raise KeyBusy("lost the lock while updating the key")
                self.progress.count("updated")
        finally:
            self.index.release(key, self.owner)

    # -- --check

    def check_key(self, key, found):
        """A key of the listing: looked at again if anything seemed wrong;
        'unchanged' if nothing is (so the summary adds up to what was seen)."""
        rec = self.index.get(key)
        if (classify(key, rec, found, self.settings) or self.md5) and self.confirm(key, found):
            return
        self.progress.count("unchanged")

    def confirm(self, key, listed=None):
        """Something looked wrong in a listing: look again now (the master may
        have written or deleted the key since), and report what remains (returned)."""
        listed = listed or {}
        rec = self.index.get(key)
        placement = self.settings.placement(key)
        path = key2path(key)
        # the listing's holders too: a misplaced file is on neither of the others
        candidates = set(placement) | set(rec.volumes if rec else ()) | set(listed)
        holders = {}
        for v in candidates:
            try:
                if self.volumes.has(v, path):
                    holders[v] = listed.get(v)
            except VolumeError:
                holders[v] = listed.get(v)
        problems = classify(key, rec, holders, self.settings, self.index.notes(key))
        if self.md5 and rec is not None and rec.md5 and rec.state in (LIVE, UNLINKED) \
                and not rec.locked():
            for v in rec.volumes:
                got = self.checksum(key, v) if v in holders else None
                if got is not None and got[0] != rec.md5:
                    problems.append(("wrong-md5", f"{v} (md5 {got[0]}, recorded {rec.md5})"))
        for kind, detail in problems:
            self.report(kind, key, detail)
        return problems

    def report(self, kind, key, detail):
        with self._report_lock:
            self.problems[kind] += 1
            if sum(self.problems.values()) <= REPORT_CAP:
                print(f"{kind} {tools.show(key)} {detail}", flush=True)

    def find_missing(self):
        """Keys of the index that the walk did not see anywhere."""
        for rec in self.index.scan():
            if rec.state not in (LIVE, UNLINKED) or rec.locked():
                continue
            if rec.key not in self.seen:
                self.confirm(rec.key)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="rebuild.py",
        description="Rebuild mkv's index from the files on the volumes (into a new index file, or "
                    "into the live one while the master serves), or compare them with --check.",
        epilog="Settings not given as flags come from MKV_VOLUMES, MKV_DB, MKV_REPLICAS, MKV_SUBVOLUMES. "
               "Exit status: 0 done, 1 something failed (or --check found problems), 2 bad settings.")
    tools.add_common_args(parser)
    parser.add_argument("--check", action="store_true",
                        help="change nothing: report keys with fewer replicas than they should have, "
                             "keys with no file anywhere, files no key owns (orphans) and files outside "
                             "their key's placement (misplaced)")
    parser.add_argument("--md5", action="store_true",
                        help="read every file and record its md5 (default: md5 left empty for new keys)")
    args = parser.parse_args(argv)
    settings = tools.settings_from_args(PROG, args)
    fresh = not os.path.exists(settings.db)
    if args.check and fresh:
        print(f"{PROG}: --check compares with an existing index, and {settings.db} does not exist",
              file=sys.stderr)
        return 2
    index, volumes, progress = tools.open_all(PROG, settings, args.workers, unit="folders")
    job = Rebuild(settings, index, volumes, progress, fresh, md5=args.md5, check=args.check)
    if not tools.run(PROG, job, args.workers, progress):
        return 1
    print(progress.summary(SUMMARY, "listed"), flush=True)
    failed = progress.counts.get("failed", 0)
    if args.check:
        print(f"{PROG} --check: " + ", ".join(f"{job.problems[k]} {k}" for k in KINDS), flush=True)
        return 1 if failed or any(job.problems.values()) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(published.exit_status_of(main))   # the master's status page shows it
