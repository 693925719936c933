"""The volume server on its own (nginx through `python volume`): what it
refuses, the upload-then-MOVE path of the master, and who its workers run as."""
import http.client as httpclient
import json
import os
import subprocess
import sys
import uuid

import psutil
import pytest
import requests

from conftest import ROOT, TIMEOUT, Http, free_port, start_volume

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="what the launcher does when started as root")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    v = start_volume(str(tmp_path_factory.mktemp("volume") / "v"))
    v.dir = v.argv[-1]
    yield v
    v.stop()


def url(volume, path):
    return f"http://127.0.0.1:{volume.port}{path}"


def raw(volume, method, path, headers=None, body=None):
    """A request whose path is sent exactly as written (no client clean-up of
    '..' or '%2e'); returns the status."""
    conn = httpclient.HTTPConnection("127.0.0.1", volume.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


def name():
    return uuid.uuid4().hex


def put_file(http, volume, path, data=b"value"):
    r = http.put(url(volume, path), data=data)
    assert r.status_code == 201, r.text
    return path


def upload(http, volume, data=b"value"):
    """PUT to /.tmp/NAME as the master does; the upload's path."""
    return put_file(http, volume, f"/.tmp/{name()}", data)


def move(http, volume, src, dest, overwrite="F"):
    return http.request("MOVE", url(volume, src), headers={"Destination": dest, "Overwrite": overwrite})


def on_disk(volume, path):
    return os.path.join(volume.dir, path.lstrip("/"))


# ---------------------------------------------------------------- folders are never deleted

def test_delete_of_the_volume_root_is_refused_and_removes_nothing(volume, http):
    path = put_file(http, volume, f"/sv00/aa/bb/{name()}")
    r = http.delete(url(volume, "/"))
    assert r.status_code == 405
    assert os.path.exists(on_disk(volume, path))
    assert os.path.exists(os.path.join(volume.dir, ".mkv", "nginx.conf"))
    assert http.get(url(volume, path)).content == b"value"


def test_delete_of_a_subvolume_folder_is_refused(volume, http):
    path = put_file(http, volume, f"/sv01/aa/bb/{name()}")
    for folder in ("/sv01/", "/sv01/aa/", "/sv01/aa/bb/"):
        assert http.delete(url(volume, folder)).status_code == 405, folder
    assert os.path.exists(on_disk(volume, path))


def test_delete_of_a_folder_in_disguise_is_refused(volume):
    """Paths that nginx turns into a folder ('/sv02/x/..', '/sv02/%2F') or a
    folder named without its '/' (nginx: 409)."""
    path = f"/sv02/aa/{name()}"
    with Http() as s:
        put_file(s, volume, path)
    assert raw(volume, "DELETE", "/sv02/aa/..") == 405
    assert raw(volume, "DELETE", "/sv02/aa/%2F") == 405
    assert raw(volume, "DELETE", "/sv02/aa/.") == 405
    assert raw(volume, "DELETE", "/sv02") == 409
    assert os.path.exists(on_disk(volume, path))


def test_delete_of_a_file_is_204_then_404(volume, http):
    path = put_file(http, volume, f"/sv00/cc/dd/{name()}")
    assert http.delete(url(volume, path)).status_code == 204
    assert not os.path.exists(on_disk(volume, path))
    assert http.delete(url(volume, path)).status_code == 404


# ---------------------------------------------------------------- the state folder

@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "MOVE"])
def test_the_state_folder_config_is_refused_to_every_method(volume, method):
    conf = os.path.join(volume.dir, ".mkv", "nginx.conf")
    with open(conf, "rb") as f:
        before = f.read()
    headers = {"Destination": f"/sv00/{name()}"} if method == "MOVE" else {}
    body = b"user root;" if method == "PUT" else None
    assert raw(volume, method, "/.mkv/nginx.conf", headers, body) == 403
    with open(conf, "rb") as f:
        assert f.read() == before


@pytest.mark.parametrize("path", ["/.mkv", "/.mkv/", "/.mkv/nginx.pid", "/%2emkv/nginx.conf",
                                  "/sv00/../.mkv/nginx.conf", "//.mkv/nginx.conf", "/.mkv/body_temp/"])
def test_the_state_folder_is_refused_under_any_spelling(volume, path):
    assert raw(volume, "GET", path) == 403
    assert raw(volume, "DELETE", path) == 403


def test_listing_of_the_root_hides_the_dot_folders(volume, http):
    put_file(http, volume, f"/sv03/aa/{name()}")
    upload(http, volume)
    names = {e["name"] for e in http.get(url(volume, "/")).json()}
    assert "sv03" in names and not any(n.startswith(".") for n in names)


# ---------------------------------------------------------------- uploads: PUT to /.tmp, MOVE into place

def test_put_to_tmp_then_move_into_place_serves_the_file(volume, http):
    tmp = upload(http, volume, b"hello")
    dest = f"/sv04/5d/41/{name()}aGVsbG8="       # its folders do not exist yet
    r = move(http, volume, tmp, dest)
    assert r.status_code in (201, 204), r.text
    assert http.get(url(volume, dest)).content == b"hello"
    assert http.get(url(volume, tmp)).status_code == 404


def test_move_with_overwrite_f_onto_an_existing_file_is_412_and_keeps_it(volume, http):
    dest = put_file(http, volume, f"/sv04/aa/{name()}", b"first")
    tmp = upload(http, volume, b"second")
    assert move(http, volume, tmp, dest).status_code == 412
    assert http.get(url(volume, dest)).content == b"first"
    assert http.get(url(volume, tmp)).content == b"second"


def test_move_from_outside_tmp_is_refused(volume, http):
    src = put_file(http, volume, f"/sv05/aa/{name()}")
    dest = f"/sv05/bb/{name()}"
    assert move(http, volume, src, dest).status_code == 405
    assert http.get(url(volume, src)).content == b"value"
    assert http.get(url(volume, dest)).status_code == 404


@pytest.mark.parametrize("dest", ["/.mkv/nginx.conf", "/.mkv/x", "/.tmp/other", "/sv06/", "/",
                                  "/sv06/%2e%2e/.mkv/x", "/%2emkv/x", "/sv06/../.mkv/x", "/sv06/./x",
                                  "//.mkv/x", "/sv06/.x", "http://127.0.0.1/sv06/x", "sv06/x", ""])
def test_move_to_a_forbidden_destination_is_refused(volume, http, dest):
    tmp = upload(http, volume)
    r = move(http, volume, tmp, dest)
    assert r.status_code == 403
    assert http.get(url(volume, tmp)).content == b"value"


def test_move_of_a_folder_is_refused(volume, http):
    folder = f"/.tmp/{name()}"
    os.mkdir(on_disk(volume, folder))
    assert move(http, volume, folder, f"/sv07/{name()}").status_code == 400   # nginx: "is collection"
    assert move(http, volume, folder + "/", f"/sv07/{name()}/").status_code == 403   # a dot-path folder
    assert os.path.isdir(on_disk(volume, folder))


def test_tmp_accepts_only_plain_names(volume, http):
    assert http.put(url(volume, f"/.tmp/{name()}/x"), data=b"v").status_code == 403
    assert http.put(url(volume, "/.tmp/"), data=b"v").status_code == 405
    assert http.delete(url(volume, "/.tmp/")).status_code == 405
    assert http.delete(url(volume, "/.tmp")).status_code == 403


def test_delete_of_an_upload_is_204_then_404(volume, http):
    tmp = upload(http, volume)
    assert http.delete(url(volume, tmp)).status_code == 204
    assert http.delete(url(volume, tmp)).status_code == 404


def test_tmp_folder_lists_its_uploads_as_json(volume, http):
    tmp = upload(http, volume, b"12345")
    r = http.get(url(volume, "/.tmp/"))
    assert r.status_code == 200
    entries = {e["name"]: e for e in json.loads(r.content)}
    assert entries[tmp.rsplit("/", 1)[1]]["size"] == 5


def test_other_dot_names_are_refused(volume, http):
    assert http.put(url(volume, f"/sv08/.{name()}"), data=b"v").status_code == 403
    assert http.put(url(volume, f"/.{name()}"), data=b"v").status_code == 403


# ---------------------------------------------------------------- who the workers run as

def test_workers_do_not_run_as_root(volume):
    """As root too (the volume's folder is under pytest's 0700 temp folders,
    which the workers need not reach: nginx runs from inside it)."""
    workers = psutil.Process(volume.proc.pid).children()
    assert workers
    assert all(w.uids().effective != 0 and w.uids().real != 0 for w in workers), \
        [(w.pid, w.username()) for w in workers]


@as_root
def test_a_data_folder_written_by_root_is_given_to_the_workers_and_stays_deletable(tmp_path):
    folder = str(tmp_path / "v")
    v = start_volume(folder)
    v.stop()
    # as an earlier launcher left it: root's workers wrote folders 775 and files 664
    path = f"/sv00/aa/bb/{name()}"
    os.makedirs(os.path.dirname(os.path.join(folder, path.lstrip("/"))), mode=0o775)
    with open(os.path.join(folder, path.lstrip("/")), "wb") as f:
        f.write(b"old")
    v.start()
    try:
        with Http() as s:
            assert s.get(url(v, path)).content == b"old"
            assert s.delete(url(v, path)).status_code == 204
            put_file(s, v, f"/sv00/aa/bb/{name()}")
        assert "chown -R, once" in v.tail()
    finally:
        v.stop()


@as_root
def test_volume_user_root_is_refused_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "volume", str(tmp_path / "v")], cwd=ROOT, capture_output=True,
                       text=True, timeout=TIMEOUT, env=dict(os.environ, VOLUME_USER="root", PORT="1"))
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "VOLUME_USER" in p.stderr


def test_help_names_volume_user():
    p = subprocess.run([sys.executable, "volume", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 2 and "VOLUME_USER" in p.stderr


def test_the_volume_serves_its_identity_read_only_and_keeps_it_across_restarts(tmp_path):
    v = start_volume(str(tmp_path / "vol"))
    try:
        url = f"http://127.0.0.1:{v.port}/.id"
        first = requests.get(url, timeout=10)
        assert first.status_code == 200 and len(first.text.strip()) == 32
        assert requests.put(url, data=b"x", timeout=10).status_code == 403
        assert requests.delete(url, timeout=10).status_code == 403
        v.restart()
        assert requests.get(url, timeout=10).text == first.text
    finally:
        v.stop()


def test_a_volume_told_to_bind_loopback_answers_there_only(tmp_path):
    v = start_volume(str(tmp_path / "vol"), VOLUME_BIND="127.0.0.1")
    try:
        assert requests.get(f"http://127.0.0.1:{v.port}/.id", timeout=10).status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.2:{v.port}/.id", timeout=10)
    finally:
        v.stop()


def test_refused_moves_and_deletes_of_missing_files_leave_no_line_in_the_log(volume, http):
    dest = put_file(http, volume, f"/sv05/aa/{name()}", b"first")
    assert move(http, volume, upload(http, volume), dest).status_code == 412
    assert http.delete(url(volume, f"/sv05/aa/{name()}")).status_code == 404
    assert http.delete(url(volume, f"/.tmp/{name()}")).status_code == 404
    log = volume.tail(200)
    assert "File exists" not in log and "lstat()" not in log, log


def test_the_volume_serves_its_disk_usage_read_only(volume, http):
    r = http.get(url(volume, "/.disk"))
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    disk = r.json()
    st = os.statvfs(volume.dir)
    assert disk["total"] == st.f_blocks * st.f_frsize and 0 < disk["free"] <= disk["total"]
    assert http.put(url(volume, "/.disk"), data=b"{}").status_code == 403
    assert http.delete(url(volume, "/.disk")).status_code == 403


def test_the_volume_names_its_port_and_folder_in_its_process_title(volume):
    title = " ".join(psutil.Process(volume.proc.pid).cmdline())
    assert f":{volume.port} {volume.dir}" in title, title


def test_a_folder_the_workers_cannot_write_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / ".tmp").mkdir()
    os.chmod(folder, 0o500)      # readable, not writable: as a folder of mode 000 once it is listed
    try:
        p = subprocess.run([sys.executable, "volume", str(folder)], cwd=ROOT, capture_output=True, text=True,
                           timeout=30, env=dict(os.environ, PORT=str(free_port())))
    finally:
        os.chmod(folder, 0o700)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "cannot write in" in p.stderr and str(folder) in p.stderr, p.stderr
