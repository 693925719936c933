"""Settings: read once from the environment; bad ones stop the start with one line."""
import os
import subprocess
import sys

import pytest

from mkvlib.errors import SettingsError
from mkvlib.placement import key2path
from mkvlib.settings import Settings
from conftest import ROOT, Http, free_port

VOLS = "localhost:3001,localhost:3002,localhost:3003"


def settings(**env):
    return Settings.from_env({"MKV_VOLUMES": VOLS, "MKV_DB": "/tmp/x.db", **env})


def test_defaults_are_the_documented_ones():
    s = settings()
    assert s.volumes == ("localhost:3001", "localhost:3002", "localhost:3003")
    assert (s.replicas, s.subvolumes, s.protect, s.fallback, s.voltimeout) == (3, 10, False, None, 1.0)


def test_every_setting_is_read_from_the_environment():
    s = settings(MKV_REPLICAS="2", MKV_SUBVOLUMES="1", MKV_PROTECT="on",
                 MKV_FALLBACK="old:3000", MKV_VOLTIMEOUT="0.25")
    assert (s.replicas, s.subvolumes, s.protect, s.fallback, s.voltimeout) == (2, 1, True, "old:3000", 0.25)


def test_keyword_overrides_win_over_the_environment():
    assert settings(MKV_REPLICAS="2").replicas == 2
    assert Settings.from_env({"MKV_VOLUMES": VOLS, "MKV_DB": "/tmp/x.db", "MKV_REPLICAS": "2"},
                                    replicas=1).replicas == 1


@pytest.mark.parametrize("env, says", [
    ({"MKV_VOLUMES": ""}, "MKV_VOLUMES is empty"),
    ({"MKV_REPLICAS": "4"}, "need at least as many volumes as replicas"),
    ({"MKV_REPLICAS": "zero"}, "MKV_REPLICAS"),
    ({"MKV_SUBVOLUMES": "0"}, "MKV_SUBVOLUMES"),
    ({"MKV_SUBVOLUMES": "257"}, "MKV_SUBVOLUMES"),
    ({"MKV_VOLTIMEOUT": "-1"}, "MKV_VOLTIMEOUT"),
    ({"MKV_PROTECT": "maybe"}, "MKV_PROTECT"),
    ({"MKV_FALLBACK": "http://x"}, "MKV_FALLBACK"),
    ({"MKV_VOLUMES": "localhost"}, "not host:port"),
    ({"MKV_VOLUMES": "a:1,a:1,b:2"}, "twice"),
    ({"MKV_DB": ""}, "MKV_DB"),
    ({"MKV_CLIENT_CONNECTIONS": "0"}, "MKV_CLIENT_CONNECTIONS"),
    ({"MKV_SEND_TIMEOUT": "never"}, "MKV_SEND_TIMEOUT"),
    ({"MKV_LIST_BYTES": "100"}, "MKV_LIST_BYTES"),
])
def test_bad_settings_are_refused_with_a_reason(env, says):
    with pytest.raises(SettingsError, match=says):
        settings(**env)


def run_master(env, timeout=30, flags=()):
    """Start gunicorn as a user would and return (exit code, output) once it stops."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")}
    full.update(env)
    argv = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2",
            "-b", f"127.0.0.1:{free_port()}", *flags, "mkv:app"]
    p = subprocess.run(argv, env=full, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("env, says", [
    ({"MKV_DB": "/tmp/never.db"}, "MKV_VOLUMES is empty"),
    ({"MKV_VOLUMES": VOLS, "MKV_DB": "/tmp/never.db", "MKV_REPLICAS": "5"},
     "need at least as many volumes as replicas"),
    ({"MKV_VOLUMES": VOLS, "MKV_DB": "/etc/hostname/index.sqlite3"}, "cannot create /etc/hostname"),
])
def test_master_with_bad_settings_stops_with_one_line(env, says):
    code, output = run_master(env)
    assert code != 0
    assert says in output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if says in line]) == 1


@pytest.mark.parametrize("timeout", ["30", "0"])
def test_master_whose_workers_may_stall_past_a_lease_does_not_start(tmp_path, timeout):
    # a stalled worker must be killed before its keys' 30 s locks run out
    code, output = run_master({"MKV_VOLUMES": VOLS, "MKV_DB": str(tmp_path / "i.sqlite3")},
                              flags=("--timeout", timeout))
    assert code == 1 and f"--timeout {timeout}: a worker that stops must be killed within 20 s" in output
    assert "Traceback" not in output


def test_a_master_with_no_time_limit_on_a_request_head_does_not_start(tmp_path):
    code, output = run_master({"MKV_VOLUMES": VOLS, "MKV_DB": str(tmp_path / "i.sqlite3")},
                              flags=("--keep-alive", "0"))
    assert code == 1 and "--keep-alive 0 would leave no time limit on a request's head" in output
    assert "Traceback" not in output


def test_master_creates_the_index_and_its_folder(tmp_path):
    from conftest import start_master, start_volume
    v = start_volume(str(tmp_path / "v"))
    db_dir = tmp_path / "deep" / "er"
    m = start_master(str(tmp_path), [f"127.0.0.1:{v.port}"], replicas=1, db=str(db_dir / "i.sqlite3"))
    try:
        assert (db_dir / "i.sqlite3").exists()
        assert Http().put(f"http://127.0.0.1:{m.port}/k", data=b"v").status_code == 201
    finally:
        m.stop()
        v.stop()


# ---------------------------------------------------------------- settings that change behaviour

def test_protect_refuses_delete_of_a_live_key_until_it_is_unlinked(private_cluster):
    c = private_cluster(n_volumes=1, replicas=1, protect="on")
    http = Http()
    http.put(c.url("/p"), data=b"v")
    r = http.delete(c.url("/p"))
    assert r.status_code == 403 and "UNLINK" in r.text
    assert http.get(c.url("/p")).status_code == 302
    assert http.request("UNLINK", c.url("/p")).status_code == 204
    assert http.delete(c.url("/p")).status_code == 204


def test_fallback_gets_the_reads_of_missing_and_unlinked_keys(private_cluster):
    c = private_cluster(n_volumes=1, replicas=1, fallback="old-cluster:3000")
    http = Http()
    r = http.get(c.url("/never/put"))
    assert r.status_code == 302 and r.headers["Location"] == "http://old-cluster:3000/never/put"
    http.put(c.url("/soft"), data=b"v")
    http.request("UNLINK", c.url("/soft"))
    assert http.get(c.url("/soft")).headers["Location"] == "http://old-cluster:3000/soft"


def test_subvolumes_1_uses_the_flat_layout(private_cluster):
    c = private_cluster(n_volumes=1, replicas=1, subvolumes=1)
    Http().put(c.url("/hello"), data=b"v")
    path = key2path(b"/hello")    # no svXX folder between the volume and the path
    assert open(c.volume_dirs[0] + path, "rb").read() == b"v"


@pytest.mark.parametrize("volumes", ["a:1;b:2;c:3", "a:1 b:2", "a:1/x", "a b:1"])
def test_volumes_separated_by_anything_but_commas_are_refused(volumes):
    with pytest.raises(SettingsError, match="separate volumes with commas"):
        settings(MKV_VOLUMES=volumes, MKV_REPLICAS="1")


def test_an_unknown_mkv_variable_is_named_with_the_setting_it_looks_like():
    from mkvlib.settings import unknown_names
    assert unknown_names({"MKV_REPLCIAS": "2", "MKV_DB": "x", "MKV_HOME": "/tmp/mkv", "MKV_ZZZ": "1"}) == [
        ("MKV_REPLCIAS", "MKV_REPLICAS"), ("MKV_ZZZ", None)]


def test_master_names_a_mistyped_setting_and_a_volume_that_does_not_answer_and_starts(private_cluster):
    c = private_cluster(n_volumes=2, replicas=1, subvolumes=1, replcias="2")
    silent = f"127.0.0.1:{free_port()}"
    c.restart_master(volumes=c.volume_names() + [silent], replicas=1, subvolumes=1, replcias="2")
    log = c.master.tail(100)
    assert "mkv: MKV_REPLCIAS is no setting of mkv, ignored (did you mean MKV_REPLICAS?)" in log
    assert f"mkv: volume {silent} does not answer now" in log
