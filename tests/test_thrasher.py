"""thrasher.py, run as a user runs it, against the shared cluster."""
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
