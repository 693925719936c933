"""MKV_SECRET: writes through the master and to the volumes need it; reads do not."""
import os
import subprocess
import sys

import pytest
import requests

from mkvlib.errors import SettingsError
from mkvlib.placement import key2volume
from mkvlib.settings import SECRET_HEADER, Settings
from conftest import ROOT, TIMEOUT, Http

SECRET = "s3cret-for-tests"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    from conftest import Cluster
    c = Cluster(str(tmp_path_factory.mktemp("secret")), n_volumes=2, replicas=2, subvolumes=1, secret=SECRET)
    yield c
    c.kill()


def with_secret(secret=SECRET):
    return {SECRET_HEADER: secret}


def test_a_put_without_the_secret_is_401_and_stores_nothing(guarded, key):
    r = Http().put(guarded.url(key), data=b"v")
    assert r.status_code == 401 and SECRET_HEADER in r.text and r.text.count("\n") == 1
    assert Http().get(guarded.url(key)).status_code == 404


def test_a_put_with_a_wrong_secret_is_401(guarded, key):
    assert Http().put(guarded.url(key), data=b"v", headers=with_secret("wrong")).status_code == 401


def test_a_put_with_the_secret_stores_and_anyone_reads_it(guarded, key):
    assert Http().put(guarded.url(key), data=b"v", headers=with_secret()).status_code == 201
    r = Http().get(guarded.url(key), follow=True)
    assert r.status_code == 200 and r.content == b"v"


def test_delete_and_unlink_without_the_secret_are_401(guarded, key):
    http = Http()
    assert http.put(guarded.url(key), data=b"v", headers=with_secret()).status_code == 201
    assert http.delete(guarded.url(key)).status_code == 401
    assert http.request("UNLINK", guarded.url(key)).status_code == 401
    assert http.get(guarded.url(key)).status_code == 302
    assert http.delete(guarded.url(key), headers=with_secret()).status_code == 204


def test_a_volume_refuses_writes_without_the_secret_and_serves_reads(guarded, key):
    http = Http()
    assert http.put(guarded.url(key), data=b"v", headers=with_secret()).status_code == 201
    location = http.get(guarded.url(key)).headers["Location"]
    assert requests.get(location, timeout=TIMEOUT).content == b"v"
    assert requests.delete(location, timeout=TIMEOUT).status_code == 403
    assert requests.put(location, data=b"x", timeout=TIMEOUT).status_code == 403
    volume = guarded.volume_names()[0]
    assert requests.put(f"http://{volume}/.tmp/x", data=b"x", timeout=TIMEOUT).status_code == 403
    assert requests.get(location, timeout=TIMEOUT).content == b"v"
    assert requests.put(f"http://{volume}/.tmp/x", data=b"x", headers=with_secret(),
                        timeout=TIMEOUT).status_code == 201


def test_the_tools_carry_the_secret_to_the_volumes(guarded, key):
    http = Http()
    assert http.put(guarded.url(key), data=b"v", headers=with_secret()).status_code == 201
    victim = key2volume(key.encode(), guarded.volume_names(), 2, 1)[0]
    os.remove(guarded.file_of(victim, key.encode()))
    env = dict(os.environ, MKV_VOLUMES=",".join(guarded.volume_names()), MKV_DB=guarded.db(),
               MKV_REPLICAS="2", MKV_SUBVOLUMES="1", MKV_SECRET=SECRET)
    p = subprocess.run([sys.executable, "rebalance.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(guarded.file_of(victim, key.encode()), "rb") as f:
        assert f.read() == b"v"


def test_a_secret_that_nginx_could_not_hold_is_refused():
    with pytest.raises(SettingsError, match="MKV_SECRET"):
        Settings.from_env({"MKV_VOLUMES": "h:1", "MKV_DB": "/tmp/x", "MKV_REPLICAS": "1",
                                  "MKV_SECRET": 'a"; return 200; #'})


@pytest.mark.parametrize("variant", [SECRET.upper(), "S3cret-for-tests", SECRET + "x", SECRET[:-1], "s3cret.for.tests"])
def test_a_volume_refuses_a_secret_that_is_not_exactly_its_own(guarded, key, variant):
    volume = guarded.volume_names()[0]
    r = requests.put(f"http://{volume}/.tmp/variant", data=b"x", headers=with_secret(variant), timeout=TIMEOUT)
    assert r.status_code == 403
    assert requests.delete(f"http://{volume}/.tmp/variant", headers=with_secret(variant),
                           timeout=TIMEOUT).status_code == 403


@pytest.mark.parametrize("secret", ["default", "include", "hostnames", "volatile", "a.b-c_d"])
def test_every_secret_the_master_takes_works_on_the_volumes(private_cluster, key, secret):
    # words of nginx's map and regex characters included: the volumes start and compare it exactly
    c = private_cluster(n_volumes=2, replicas=2, subvolumes=1, secret=secret)
    http = Http()
    assert http.put(c.url(key), data=b"v", headers=with_secret(secret)).status_code == 201
    assert http.get(c.url(key), follow=True).content == b"v"
    volume = c.volume_names()[0]
    assert requests.put(f"http://{volume}/.tmp/y", data=b"x", headers=with_secret(secret.upper()),
                        timeout=TIMEOUT).status_code == 403
    assert http.delete(c.url(key), headers=with_secret(secret)).status_code == 204
