"""mkv_volume_request_duration_seconds of a real master (its admin
listener's /metrics): every answer of a volume to the master counted, each
from its own request's send, so a slow volume's delay shows on that volume
and not on the others asked at once (its fan, its pipelined PUTs)."""
import pytest

from mkvlib.health import LATENCY_BUCKETS
from mkvlib.placement import key2volume
from mkvlib.upload import WHOLE_MAX
from conftest import Cluster, Http, free_port, wait_until
from test_admin import scrape, value
from test_late_requests import behind_proxy

HELD = 0.3        # seconds the proxy holds a request to the slow volume
LATENCY = "mkv_volume_request_duration_seconds"


@pytest.fixture(scope="module")
def slow_first(tmp_path_factory):
    """3 volumes, 3 replicas, the admin listener; the first volume behind a
    holding proxy (the master knows it by the proxy's name)."""
    c = Cluster(str(tmp_path_factory.mktemp("latency")), n_volumes=3, replicas=3, subvolumes=2,
                admin_port=free_port())
    c.admin = f"http://127.0.0.1:{c.settings['admin_port']}"
    proxy, names = behind_proxy(c, 0)
    yield c, proxy, names
    proxy.close()
    c.kill()


def counts(samples, volume):
    """(answers timed, those slower than a quarter second) of a volume."""
    assert 0.25 in LATENCY_BUCKETS
    total = value(samples, LATENCY + "_count", volume=volume)
    quick = value(samples, LATENCY + "_bucket", volume=volume, le="0.25")
    return total, total - quick


def test_every_answer_of_a_volume_to_puts_and_deletes_is_timed(slow_first):
    c, proxy, names = slow_first
    http = Http()
    before = scrape(c)
    for i in range(10):
        assert http.put(c.url(f"/timed{i}"), data=b"t" * 100).status_code == 201
    assert http.put(c.url("/timed-large"), data=b"L" * (WHOLE_MAX + 1)).status_code == 201   # streamed
    for key in [f"/timed{i}" for i in range(10)] + ["/timed-large"]:
        assert http.delete(c.url(key)).status_code == 204
    # each PUT: its upload and its MOVE on every volume; each DELETE: one request
    wait_until(lambda: all(counts(scrape(c), v)[0] - counts(before, v)[0] >= 11 * 3 for v in names), 5,
               "the traffic timed in a scrape")


def test_a_slow_volume_shows_its_delay_and_the_volumes_asked_with_it_do_not(slow_first):
    c, proxy, names = slow_first
    http = Http()
    # keys whose first copy is the slow volume's: its requests go out first,
    # so reading answers in the order sent would charge its delay to the others
    keys = [k for k in (b"/held%d" % i for i in range(100))
            if key2volume(k, names, 3, 2)[0].startswith(proxy.name)][:3]
    before = scrape(c)
    for k in keys:
        proxy.hold(rb"^PUT /\.tmp/", delay=HELD)   # the upload; its MOVE behind it waits too
        assert http.put(c.url(k.decode()), data=b"s" * 100).status_code == 201
        proxy.hold(rb"^DELETE /sv", delay=HELD)
        assert http.delete(c.url(k.decode())).status_code == 204
    slow, others = names[0], names[1:]
    # per key on the slow volume: the upload, its MOVE and the DELETE, each held
    wait_until(lambda: counts(scrape(c), slow)[1] - counts(before, slow)[1] >= 3 * len(keys), 5,
               "the slow volume's delay in a scrape")
    after = scrape(c)
    for v in others:
        assert counts(after, v)[0] - counts(before, v)[0] >= 3 * len(keys)
        assert counts(after, v)[1] == counts(before, v)[1], v     # none charged the slow one's delay
