"""./bringup.sh as a user runs it: the S3 gateway counted by the master, a
volume that stops leaves the master and the others serving, starts again with
the command bringup.sh gives, and TERM stops everything it started."""
import os
import random
import re
import signal
import socket
import subprocess

import psutil
import requests

from conftest import ROOT, Http, wait_until


def free_base():
    """A port whose next three, its +100 (the admin listener) and its +200
    (given as S3_PORT) are free too (bringup.sh's layout)."""
    for _ in range(100):
        base = random.randrange(20000, 40000)
        try:
            for port in (base, base + 1, base + 2, base + 3, base + 100, base + 200):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free ports for bringup.sh")


def answers(url):
    try:
        requests.get(url, timeout=2, allow_redirects=False)
        return True
    except requests.RequestException:
        return False


def test_bringup_keeps_serving_when_a_volume_stops_and_takes_it_back(tmp_path):
    base, log_path = free_base(), tmp_path / "bringup.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")}
    env.update(MKV_HOME=str(tmp_path / "home"), BASE_PORT=str(base), WORKERS="2", S3_PORT=str(base + 200))
    with open(log_path, "wb") as log:
        bringup = subprocess.Popen(["bash", "bringup.sh"], cwd=ROOT, env=env, stdout=log, stderr=log,
                                   start_new_session=True)
    again, http = None, Http()
    try:
        master, admin = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 100}"
        wait_until(lambda: answers(admin + "/health/ready") and requests.get(
            admin + "/health/ready", timeout=2).status_code == 200, 60, "bringup.sh's cluster")
        assert http.put(master + "/before", data=b"v").status_code == 201
        s3 = f"http://127.0.0.1:{base + 200}"    # the S3 gateway, started once the master answers
        wait_until(lambda: answers(s3), 30, "bringup.sh's S3 gateway")
        assert http.put(s3 + "/bucket").status_code == 200
        wait_until(lambda: 's3:CreateBucket' in requests.get(admin + "/metrics", timeout=2).text, 10,
                   "the gateway's request in the master's metrics (it joined its run folder)")
        stopped = next(p for p in psutil.process_iter(["cmdline"])
                       if f"mkv volume :{base + 1} " in " ".join(p.info["cmdline"] or []))
        stopped.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopped; the master and the other volumes go on" in log_path.read_text(), 10,
                   "bringup.sh to say the volume stopped")
        wait_until(lambda: f":{base + 1}/" not in http.get(master + "/before").headers.get("Location", ":"), 10,
                   "reads to go to the other volumes")
        assert bringup.poll() is None
        command = re.search(r"Start it again with: (.*)", log_path.read_text()).group(1)
        again = subprocess.Popen(["bash", "-c", command], cwd=ROOT, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: http.put(master + "/after", data=b"v").status_code == 201, 10, "a PUT on 3 volumes")
    finally:
        http.close()        # TERM: gunicorn's graceful stop waits for idle keep-alive clients
        bringup.send_signal(signal.SIGTERM)
        try:
            code = bringup.wait(30)
        finally:            # the volume started by hand is not bringup.sh's to stop
            if again is not None:
                os.killpg(again.pid, signal.SIGTERM)
                again.wait(10)
    assert code == 143
    assert not answers(master) and not answers(f"http://127.0.0.1:{base + 2}/") and not answers(s3)
