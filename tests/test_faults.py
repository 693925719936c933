"""Faults on real processes: the master and its workers killed under load,
volumes killed and frozen, a short thrash of them all. After each, nothing
acknowledged is lost and nothing wrong is served (faults.py's model of what
every key may hold), no lock stays held, and rebalance.py leaves nothing for
rebuild.py --check to report. `pytest -m faults` runs these alone; faults.py
runs the long soak."""
import os
import random
import sys
import time

import pytest
import requests

from mkvlib.health import PROBE_FRESH
from mkvlib.index import Index
from mkvlib.placement import key2volume
from conftest import ROOT, Http, wait_until

sys.path.insert(0, ROOT)
import faults  # noqa: E402

pytestmark = pytest.mark.faults


def assert_nothing_lost(counts, injected, rebalanced, checked, kinds):
    assert counts["lost"] == 0 and counts["wrong"] == 0, counts
    assert counts["acknowledged"] > 0 and counts["keys verified"] > 0, counts
    assert counts["locks held at the end"] == 0 and counts["notes left at the end"] == 0, counts
    assert all(injected[k] for k in kinds), injected
    assert rebalanced.returncode == 0, rebalanced.stdout + rebalanced.stderr
    assert checked.returncode == 0, checked.stdout + checked.stderr   # no orphan, missing, wrong copy


@pytest.fixture
def thrash_cluster(tmp_path):
    from conftest import Cluster
    c = Cluster(str(tmp_path), n_volumes=3, replicas=3, voltimeout=0.5)
    yield c
    c.kill()


class InRounds(random.Random):
    """faults.Faults' random source, but its choice among the fault kinds
    deals them in rounds: every kind once per round, in a shuffled order."""

    def __init__(self, seed, kinds):
        super().__init__(seed)
        self.kinds, self.round = kinds, []

    def choice(self, seq):
        if seq is not self.kinds:
            return super().choice(seq)
        if not self.round:
            self.round = self.sample(seq, len(seq))
        return self.round.pop()


class FaultsInRounds(faults.Faults):
    """faults.Faults dealing its faults in rounds: the first len(kinds)
    faults injected hold every kind once (a short run misses none)."""

    def __init__(self, cluster, every, seed, stop, kinds=faults.FAULTS):
        super().__init__(cluster, every, seed, stop, kinds)
        self.rnd = InRounds(seed, self.kinds)


def test_the_master_sigkilled_20_times_under_load_loses_nothing(thrash_cluster):
    kinds = ["master killed"]
    # the load runs 12 s, and on until the 20th kill (a restart takes about half a second)
    counts, injected, rebalanced, checked = faults.thrash(
        thrash_cluster, seconds=12, every=0.2, clients=6, keys=20, kinds=kinds, at_least=20)
    assert injected["master killed"] >= 20, injected
    assert_nothing_lost(counts, injected, rebalanced, checked, kinds)


def test_workers_sigkilled_under_load_lose_nothing_and_the_others_keep_serving(thrash_cluster):
    kinds = ["worker killed"]
    counts, injected, rebalanced, checked = faults.thrash(
        thrash_cluster, seconds=4, every=1, clients=6, keys=20, kinds=kinds, at_least=4)
    assert_nothing_lost(counts, injected, rebalanced, checked, kinds)
    assert counts["acknowledged"] > 10 * counts["no answer"], counts   # only the killed worker's requests


def test_a_short_thrash_of_every_fault_loses_nothing(thrash_cluster, monkeypatch):
    # the load runs 8 s, and on until one fault of each kind was injected (a worker stall takes 6 to 10 s)
    monkeypatch.setattr(faults, "Faults", FaultsInRounds)
    counts, injected, rebalanced, checked = faults.thrash(thrash_cluster, seconds=8, every=1, clients=6,
                                                          keys=20, at_least=len(faults.FAULTS))
    assert_nothing_lost(counts, injected, rebalanced, checked, faults.FAULTS)


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_one_volume_of_three_down_reads_go_on_writes_fail_fast_and_rebalance_repairs(private_cluster, fault):
    c = private_cluster(n_volumes=3, replicas=3, subvolumes=1, voltimeout=0.5)
    http = Http()
    values = {f"/v{i}": os.urandom(2000) for i in range(12)}
    for k, v in values.items():
        assert http.put(c.url(k), data=v).status_code == 201
    down = c.volume_names()[0]
    getattr(c.volumes[0], fault)()
    try:
        time.sleep(PROBE_FRESH + 0.5)
        for k, v in values.items():             # every read from another replica, no timeout on the way
            started = time.monotonic()
            r = http.get(c.url(k))
            assert time.monotonic() - started < 0.5
            assert r.status_code == 302 and down not in r.headers["Location"]
            assert requests.get(r.headers["Location"], timeout=10).content == v
        started = time.monotonic()
        r = http.put(c.url("/while-down"), data=b"x" * 100_000)
        assert r.status_code == 503 and down in r.text and r.text.count("\n") == 1
        assert time.monotonic() - started < 5    # fails fast: the volume is known down
        assert http.get(c.url("/while-down")).status_code == 404
        assert http.delete(c.url("/v0")).status_code == 500   # it cannot remove the copy there
        assert http.get(c.url("/v0")).status_code == 404
    finally:
        if fault == "kill":
            c.volumes[0].start()
        else:
            c.volumes[0].resume()
    p = faults.tool(c, "rebalance.py")
    assert p.returncode == 0, p.stdout + p.stderr
    for v in key2volume(b"/v0", c.volume_names(), 3, 1):   # what it missed: /v0's delete
        assert not os.path.exists(c.file_of(v, b"/v0"))
    for v in key2volume(b"/while-down", c.volume_names(), 3, 1):
        assert not os.path.exists(c.file_of(v, b"/while-down"))
    assert Index(c.db()).get(b"/v0") is None
    wait_until(lambda: http.put(c.url("/after"), data=b"y").status_code == 201, 10, "PUTs to work again")

