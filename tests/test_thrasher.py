"""thrasher.py, run as a user runs it, against the shared cluster."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def run_thrasher(cluster, *args):
    return subprocess.run([sys.executable, "thrasher.py", "--master", f"127.0.0.1:{cluster.master.port}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_thrasher_puts_reads_and_deletes_every_key_and_reports_no_failure(cluster):
    p = run_thrasher(cluster, "--keys", "40", "--size", "64K", "--concurrency", "4")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "40 write/read/delete" in p.stdout and "0 failed" in p.stdout


def test_thrasher_refuses_a_size_of_zero():
    p = subprocess.run([sys.executable, "thrasher.py", "--size", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "at least 1" in p.stderr


def test_thrasher_exits_1_and_names_each_failed_key_when_the_master_is_unreachable():
    p = subprocess.run([sys.executable, "thrasher.py", "--master", "127.0.0.1:9", "--keys", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("FAIL key") == 2


def test_thrasher_prints_the_original_thrashers_two_lines(cluster):
    p = run_thrasher(cluster, "--keys", "30", "--size", "100")
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^30 write/read/delete in \d+\.\d\ds$", p.stdout, re.M), p.stdout
    assert re.search(r"^thats \d+\.\d\d/sec$", p.stdout, re.M), p.stdout


def test_thrasher_direct_does_the_same_work_straight_to_the_volumes_and_leaves_nothing(cluster):
    volumes = cluster.volume_names()[:3]
    p = subprocess.run([sys.executable, "thrasher.py", "--direct", ",".join(volumes), "--keys", "40",
                        "--size", "2K"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "40 write/read/delete" in p.stdout and "0 failed" in p.stdout
    left = [os.path.join(d, f) for folder in cluster.volume_dirs for d, _, files in os.walk(folder)
            for f in files if "/.mkv" not in d and "/.tmp" not in d and f.startswith("L3RocmFzaGVy")]
    assert left == []   # base64 of "/thrasher"


def test_thrasher_direct_needs_as_many_volumes_as_replicas():
    p = subprocess.run([sys.executable, "thrasher.py", "--direct", "127.0.0.1:9", "--replicas", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--replicas" in p.stderr
