"""bench.py runs and reports, and `bench.py fill` makes an index the master
serves. No timing is asserted: the benchmark's numbers are for people."""
import os
import re
import subprocess
import sys

from mkvlib.placement import key2path, key2volume
from conftest import ROOT, TIMEOUT, start_master

import bench

ROW = re.compile(r"^\| GET of an existing key \(302\) \| ([\d,]+) req/s \| ([\d,]+) req/s \| (\d+\.\d{3}) "
                 r"\| >= 0\.15 \| (yes|no) \|  \|  \|.*\|$", re.M)    # no Go column without --peer
BARE = re.compile(r"^\| GET of an existing key \(302\), against a bare WSGI function \| ([\d,]+) req/s "
                  r"\| ([\d,]+) req/s \| (\d+\.\d{3}) \| >= 0\.9 \| (yes|no) \|.*\|$", re.M)


def test_bench_quick_prints_table_rows_with_a_ratio_and_the_machine():
    p = subprocess.run([sys.executable, "bench.py", "--quick", "--only", "get,bare", "--rounds", "1",
                        "--duration", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| workload | mkv | limit | ratio | goal | met | Go | mkv/Go | notes |" in p.stdout
    for pattern in (ROW, BARE):     # against nginx, and against the bare WSGI function
        row = pattern.search(p.stdout)
        assert row, p.stdout
        mkv, limit, ratio = (float(x.replace(",", "")) for x in row.groups()[:3])
        assert mkv > 0 and limit > 0 and abs(ratio - mkv / limit) < 0.002
    assert re.search(r"^machine: \d+ cores \(nproc\), .+, Linux .+ -k worker\.MkvWorker -w 2", p.stdout, re.M), p.stdout


def test_rebalance_is_judged_against_the_go_original_not_the_copy_limit():
    from benchkit.repair import Rebalance
    w = Rebalance.__new__(Rebalance)     # the judging alone: no cluster
    mkv, limit = {"value": 210.9}, {"value": 1722.0}    # MB/s moved
    ratio = w.ratio(mkv, limit)
    assert w.goal_text() == "mkv/Go >= 1.0"
    assert w.met(mkv, limit, ratio, go={"value": 209.8}) is True
    assert w.met(mkv, limit, ratio, go={"value": 230.0}) is False
    assert w.met(mkv, limit, ratio, go=None) is None      # printed "needs --peer"


def test_bench_refuses_an_unknown_workload():
    p = subprocess.run([sys.executable, "bench.py", "--only", "get,nosuch"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "nosuch" in p.stderr


def test_fill_makes_an_index_the_master_serves(tmp_path, http):
    # stub volumes that have every file: the master may check a volume before redirecting
    stubs = [bench.start_stub(str(tmp_path), f"stub{i}", bench.STUB_VOLUME) for i in range(3)]
    names = [f"127.0.0.1:{s.port}" for s in stubs]
    master = None
    try:
        db = tmp_path / "master" / "index.sqlite3"
        os.makedirs(db.parent)
        p = subprocess.run([sys.executable, "bench.py", "fill", "--db", str(db), "--keys", "250"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, MKV_VOLUMES=",".join(names)))
        assert p.returncode == 0, p.stdout + p.stderr
        assert re.search(r"^fill: 250 keys in [\d.]+ s .* B/key$", p.stdout, re.M), p.stdout
        master = start_master(str(db.parent), names, replicas=3)
        base = f"http://127.0.0.1:{master.port}"
        for i in (0, 137, 249):
            key = b"/fill/%09d" % i
            r = http.get(base + key.decode())
            assert r.status_code == 302, r.text
            placed = key2volume(key, names, 3, 10)
            assert r.headers["Key-Volumes"] == ",".join(placed)
            assert r.headers["Location"] in [f"http://{v}{key2path(key)}" for v in placed]
        assert http.get(base + "/fill/000000250").status_code == 404
        r = http.get(base + "/fill/?list&limit=1000", timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.json()["keys"]) == 250
    finally:
        if master:
            master.stop()
        for s in stubs:
            s.stop()
