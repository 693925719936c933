"""rebuild and rebalance: mkv's tools against what the disks and nginx allow
(rebuild.py against nginx's JSON listings of the leaf folders; rebalance.py
against a plain copy of the bytes that must move)."""
import hashlib
import os
import random
import re
import shutil
import time

from benchkit.common import MB, failure, http, remove_tree, say, timed_tool
from benchkit.mkvdata import placement, plant_copies, write_index
from benchkit.workload import Workload
from benchkit.wrk import ensure_wrk, wrk


def leaf_folders(folders):
    """Every svXX/aa/bb folder under the volume folders."""
    leaves = []
    for top in folders:
        for sv in os.scandir(top):
            if not (sv.is_dir() and re.fullmatch(r"sv[0-9A-F]{2}", sv.name)):
                continue
            for a in os.scandir(sv.path):
                if a.is_dir():
                    leaves += [b.path for b in os.scandir(a.path) if b.is_dir()]
    return leaves


class Rebuild(Workload):
    name, goal, sizes = "rebuild", 0.5, (5000, 20000)
    title = "rebuild of {keys:,} tiny keys on 3 volumes into a fresh index"

    def setup(self):
        ensure_wrk()
        self.dir = os.path.join(self.b.tmp, "rebuild")
        self.folders = [os.path.join(self.dir, f"volume{i}") for i in range(3)]
        self.volumes, self.names = self.b.start_volumes(self.folders)
        owner = os.stat(self.folders[0])
        began = time.monotonic()
        rng = random.Random(1)
        made = set()
        for i in range(self.keys):
            key = b"/rebuild/%06d" % i
            value = rng.randbytes(rng.randint(1, 100))
            plant_copies(key, value, placement(key, self.names), self.folders, self.names, owner, made)
        self.leaves = leaf_folders(self.folders)
        leaf = self.leaves[0]
        i = self.folders.index(os.path.dirname(os.path.dirname(os.path.dirname(leaf))))
        self.leaf_url = f"http://{self.names[i]}/{os.path.relpath(leaf, self.folders[i])}/"
        r = http("GET", self.leaf_url)
        if r.status_code != 200 or not isinstance(r.json(), list):
            raise RuntimeError(f"GET {self.leaf_url}: {r.status_code} {r.text[:200]}")
        self.notes.append("rebuild.py with its default --workers; limit: wrk -t2 -c64 on one leaf "
                          "folder's JSON listing")
        say(f"rebuild: planted {self.keys:,} keys x 3 in {time.monotonic() - began:.1f} s, "
            f"{len(self.leaves):,} leaf folders")
        self.count = 0

    def teardown(self):
        for v in getattr(self, "volumes", []):
            v.stop()
        if hasattr(self, "dir"):
            remove_tree(self.dir)

    def best(self, results):
        return min(results, key=lambda r: r["seconds"])

    def mkv(self):
        self.count += 1
        db = os.path.join(self.dir, f"new-{self.count}.sqlite3")
        took, p = timed_tool("rebuild.py", self.names, db)
        if p.returncode != 0 or f"{self.keys} added" not in p.stdout.replace(",", ""):
            raise failure("rebuild.py", p)
        for f in (db, db + "-wal", db + "-shm"):
            if os.path.exists(f):
                os.unlink(f)
        return {"seconds": took, "text": f"{took:.2f} s ({self.keys / took:,.0f} keys/s)"}

    def go(self):
        self.count += 1
        db = os.path.join(self.dir, f"go-new-{self.count}")
        took, p = self.b.peer.tool("rebuild", self.names, db)
        remove_tree(db)
        if p.returncode != 0:
            raise failure("the Go original's rebuild", p)
        return {"seconds": took, "text": f"{took:.2f} s ({self.keys / took:,.0f} keys/s)"}

    def limit(self):
        w = wrk(self.leaf_url, self.b.duration, conns=64)
        seconds = len(self.leaves) / w["rate"]
        return {"seconds": seconds, "rate": w["rate"],
                "text": f"{seconds:.2f} s ({len(self.leaves):,} folders at {w['rate']:,.0f} listings/s)"}

    def ratio(self, mkv, limit):
        return limit["seconds"] / mkv["seconds"]


class Rebalance(Workload):
    name, goal, sizes = "rebalance", 1.0, (300, 1500)
    goal_vs_go = True    # issue 17: at least as fast as the original on the same move
    title = "rebalance 3 -> 4 volumes ({keys:,} keys of 10 B to 300 KB)"
    note = ("wall time (no master has the index open: rebalance.py removes old copies without its grace); "
            "limit: one sendfile copy per moved replica; Go: its rebalance over an index its rebuild made")

    def setup(self):
        rng = random.Random(2)
        self.values = [(b"/rebalance/%05d" % i, rng.randbytes(rng.randint(10, 300 * 1000)))
                       for i in range(self.keys)]
        self.md5s = [hashlib.md5(v).hexdigest() for _, v in self.values]
        self.count = 0
        self.round = None

    def order(self, sides, round_no):
        # the limit first: it copies the files the rebalance then moves
        return ["limit"] + super().order([s for s in sides if s != "limit"], round_no)

    def prepare(self):
        """A fresh round: 4 volumes, the keys planted on the first 3 and indexed."""
        self.clean()
        self.count += 1
        d = os.path.join(self.b.tmp, f"rebalance-{self.count}")
        folders = [os.path.join(d, f"volume{i}") for i in range(4)]
        servers, names = self.b.start_volumes(folders)
        owner = os.stat(folders[0])
        db = os.path.join(d, "index.sqlite3")
        moves = []        # (a recorded copy's file, bytes) for every replica the rebalance must write
        rows = []
        made = set()
        for (key, value), md5 in zip(self.values, self.md5s):
            old = placement(key, names[:3])
            files = plant_copies(key, value, old, folders, names, owner, made)
            new = placement(key, names)
            moves += [(files[0], len(value))] * len([v for v in new if v not in old])
            rows.append((key, "live", ",".join(old), md5, len(value)))
        write_index(db, rows)
        self.round = (d, servers, names, db, moves)

    def clean(self):
        if self.round:
            d, servers, *_ = self.round
            for s in servers:
                s.stop()
            remove_tree(d)
            self.round = None

    def teardown(self):
        self.clean()

    def limit(self):
        self.prepare()
        d, _, _, _, moves = self.round
        scratch = os.path.join(d, "copies")
        os.makedirs(scratch)
        start = time.monotonic()
        for i, (src, _) in enumerate(moves):
            shutil.copyfile(src, os.path.join(scratch, str(i)))
        took = time.monotonic() - start
        moved = sum(n for _, n in moves)
        shutil.rmtree(scratch)
        rate = moved / MB / took
        return {"value": rate, "text": f"{rate:,.0f} MB/s ({moved / MB:,.0f} MB in {took:.2f} s)"}

    def mkv(self):
        if self.round is None:
            self.prepare()
        _, _, names, db, moves = self.round
        took, p = timed_tool("rebalance.py", names, db)
        self.clean()
        if p.returncode != 0:
            raise failure("rebalance.py", p)
        moved = sum(n for _, n in moves)
        rate = moved / MB / took
        return {"value": rate, "text": f"{rate:,.1f} MB/s ({moved / MB:,.0f} MB in {took:.2f} s)",
                "summary": p.stdout.strip().splitlines()[-1]}

    def go(self):
        """The original's rebalance of the same round, over an index its
        rebuild made of the 3 volumes first (not timed)."""
        if self.round is None:
            self.prepare()
        d, _, names, _, moves = self.round
        db = os.path.join(d, "go-index")
        _, p = self.b.peer.tool("rebuild", names[:3], db)
        if p.returncode != 0:
            raise failure("the Go original's rebuild", p)
        took, p = self.b.peer.tool("rebalance", names, db)
        landed = sum(len(files) for _, _, files in os.walk(os.path.join(d, "volume3")))
        self.clean()
        if p.returncode != 0 or not landed:
            raise failure(f"the Go original's rebalance ({landed} files on the new volume)", p)
        moved = sum(n for _, n in moves)
        rate = moved / MB / took
        return {"value": rate, "text": f"{rate:,.1f} MB/s ({moved / MB:,.0f} MB in {took:.2f} s)"}

    def best(self, results):
        best = super().best(results)
        if "summary" in best:
            said = re.sub(r"^rebalance: ", "", best["summary"])
            self.notes.append(f"its summary: {said}")
        return best
