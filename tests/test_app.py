"""The HTTP contract in-process: Falcon's TestClient over mkv.create_app with
a small store that answers from memory or raises what it is told to. No
servers; the same contract runs on real ones in test_api.py."""
import falcon
import falcon.testing
import pytest

import mkv
from mkvlib import errors
from mkvlib.index import LIVE, Record
from mkvlib.settings import Settings


class FakeStore:
    """What Master asks of a Store, from a dict; `fail` is raised by every call."""

    def __init__(self):
        self.values, self.fail = {}, None

    def placement(self, key):
        return ["v1:1", "v2:1"]

    def _check(self):
        if self.fail is not None:
            raise self.fail

    def find(self, key):
        self._check()
        return None    # Master.answer_plain leaves every GET to locate()

    def locate(self, key):
        self._check()
        if key not in self.values:
            raise errors.KeyMissing("no such key")
        return "http://v1:1/x", Record(key, LIVE, ["v1:1", "v2:1"], md5="ab" * 16, size=1)

    def put(self, key, chunks, length=None):
        self._check()
        self.values[key] = b"".join(chunks)
        return "cd" * 16, len(self.values[key])

    def delete(self, key):
        self._check()
        del self.values[key]

    def unlink(self, key):
        self._check()


@pytest.fixture
def store():
    return FakeStore()


def client_of(store, **env):
    settings = Settings.from_env({"MKV_VOLUMES": "v1:1,v2:1", "MKV_DB": "/nonexistent/i.sqlite3",
                                  "MKV_REPLICAS": "2", **env})
    return falcon.testing.TestClient(mkv.create_app(settings, store=store))


@pytest.fixture
def client(store):
    return client_of(store)


@pytest.mark.parametrize("error, status", [
    (errors.Unauthorized("x"), 401), (errors.KeyMissing("x"), 404), (errors.KeyExists("x"), 403),
    (errors.KeyProtected("x"), 403), (errors.KeyBusy("x"), 409), (errors.KeyTooLong("x"), 414),
    (errors.BadKey("x"), 400), (errors.EmptyValue("x"), 411), (errors.ClientGone("x"), 400),
    (errors.VolumeDown("x"), 503), (errors.VolumeError("x"), 502), (errors.Unavailable("x"), 503),
    (errors.DeleteIncomplete("x"), 500), (errors.IndexBusy("x"), 503), (errors.SettingsError("x"), 503),
])
def test_each_storage_error_is_its_documented_status(client, store, error, status):
    store.fail = error
    assert client.simulate_get("/k").status_code == status


def test_an_error_class_not_in_the_table_takes_its_nearest_parents_status(client, store):
    store.fail = errors.MoveUnknown("volume v1:1 did not answer MOVE")   # a VolumeDown
    r = client.simulate_put("/k", body=b"v")
    assert r.status_code == 503 and r.text == "volume v1:1 did not answer MOVE\n"


def test_a_subclass_of_a_storage_error_takes_its_parents_status_whatever_the_table_order():
    class Deeper(errors.KeyTooLong):
        pass
    assert mkv.status_of(Deeper("x")) == falcon.HTTP_414
    assert mkv.status_of(errors.MkvError("x")) == falcon.HTTP_500


def test_an_error_is_its_reason_in_one_line(client, store):
    store.fail = errors.KeyBusy("key is being written or deleted by another request")
    r = client.simulate_delete("/k")
    assert r.status_code == 409 and r.text == "key is being written or deleted by another request\n"


def test_a_404_has_an_empty_body(client):
    r = client.simulate_get("/missing")
    assert r.status_code == 404 and r.content == b"" and r.headers["Content-Length"] == "0"


def test_a_put_then_get_redirects_with_the_records_md5_and_volumes(client):
    assert client.simulate_put("/k", body=b"v").status_code == 201
    r = client.simulate_get("/k")
    assert r.status_code == 302 and r.headers["Location"] == "http://v1:1/x"
    assert r.headers["Content-Md5"] == "ab" * 16 and r.headers["Key-Volumes"] == "v1:1,v2:1"
    assert r.headers["Key-Balance"] == "balanced"


def test_a_put_answers_the_values_md5(client):
    r = client.simulate_put("/k", body=b"v")
    assert r.status_code == 201 and r.headers["Content-Md5"] == "cd" * 16


def test_a_method_the_api_does_not_have_is_405(client):
    assert client.simulate_request("PATCH", "/k").status_code == 405


def test_a_write_without_the_secret_is_401_with_the_header_to_send(store):
    client = client_of(store, MKV_SECRET="s3cr3t")
    r = client.simulate_put("/k", body=b"v")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Mkv-Secret"
    assert client.simulate_put("/k", body=b"v", headers={"Mkv-Secret": "s3cr3t"}).status_code == 201


def test_a_query_on_a_write_is_400(client, store):
    r = client.simulate_put("/k", body=b"v", query_string="list")
    assert r.status_code == 400 and store.values == {}


def test_an_unexpected_error_is_500_in_one_line_without_a_traceback(client, store):
    store.fail = RuntimeError("boom")
    r = client.simulate_get("/k")
    assert r.status_code == 500 and r.text == "internal error (RuntimeError); see the master's log\n"


def test_a_request_whose_app_raises_is_counted_once_as_a_500_of_its_kind():
    from mkvlib.metrics import Counted

    def app(environ, start_response):
        raise RuntimeError("a bug")
    counted = Counted(app)
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/k", "CONTENT_LENGTH": "3"}
    with pytest.raises(RuntimeError):
        counted(environ, lambda status, headers, exc_info=None: None)
    (key, row), = counted.tally.rows.items()
    assert key == ("PUT", "put", 500) and row[0] == 1 and row[2] == 3    # one request, its 3 bytes
    assert counted.in_flight == 0
