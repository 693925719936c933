"""The master's log lines (one per failed request, one per volume going down
or coming back, MKV_LOG_FORMAT=json) and readiness on a full index disk."""
import json
import os

import requests

from conftest import Http, free_port, wait_until
from test_disks import disk_cluster, fill, mounts  # noqa: F401 (fixtures)


def json_lines(c):
    out = []
    for line in c.master.tail(500).splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_json_log_has_one_line_per_failed_request_and_one_per_volume_down_and_back(private_cluster):
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, voltimeout=0.5, workers=2, log_format="json")
    http = Http()
    assert http.put(c.url("/logged"), data=b"v").status_code == 201
    dead = c.volume_names()[1]
    c.volumes[1].kill()
    wait_until(lambda: any("did not answer the prober" in e["message"] for e in json_lines(c)), 5, "a down line")
    r = http.delete(c.url("/logged"))
    assert r.status_code == 500
    failed = [e for e in json_lines(c) if e["message"].startswith("request failed")]
    assert len(failed) == 1
    assert {k: failed[0][k] for k in ("method", "key", "status", "volume")} == {
        "method": "DELETE", "key": "/logged", "status": 500, "volume": dead}
    assert failed[0]["reason"] == r.text.strip() and failed[0]["duration_ms"] >= 0
    c.volumes[1].start()
    wait_until(lambda: any("answers the prober again" in e["message"] for e in json_lines(c)), 5, "a back line")
    lines = json_lines(c)
    # two workers, each probing every second: still one line each way
    assert sum("did not answer the prober" in e["message"] for e in lines) == 1, lines
    assert sum("answers the prober again" in e["message"] for e in lines) == 1, lines
    assert all(e["level"] and e["pid"] for e in lines)


def test_an_index_on_a_full_disk_is_not_ready_and_says_why(mounts, disk_cluster, tmp_path):  # noqa: F811
    folder = mounts.tmpfs(str(tmp_path / "index-disk"))
    port = free_port()
    c = disk_cluster(n_volumes=2, replicas=2, subvolumes=1, db=os.path.join(folder, "index.sqlite3"), admin_port=port)
    ready = f"http://127.0.0.1:{port}/health/ready"
    wait_until(lambda: requests.get(ready, timeout=10).status_code == 200, 5, "ready")
    fill(os.path.join(folder, "filler"))
    r = requests.get(ready, timeout=10)
    assert r.status_code == 503 and "disk is full" in r.text and r.text.count("\n") == 1, r.text
    os.remove(os.path.join(folder, "filler"))
    assert requests.get(ready, timeout=10).status_code == 200
