"""One scrape of the admin listener's /metrics: the workers' and the tools'
multiprocess files (mkvlib.metrics, mkvlib.progress), and what is read once
per scrape, each cheap: the shared volume health, a few rows of the index's
counts (mkvlib.counts, kept by triggers), file sizes, /proc of the master's
processes."""
import os
import time

from mkvlib import counts, progress
from mkvlib.health import MISSED, PROBED, REPLACED

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def master_pids():
    """The arbiter (this process) and its children (the workers)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [me] + [int(p) for p in f.read().split()]
    except OSError:
        return [me]


def resident_bytes(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def open_sockets(pid):
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    n = 0
    for name in names:
        try:
            n += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:
            pass
    return n


class Collector:
    """The per-scrape metrics, for prometheus_client's registry."""

    def __init__(self, view):
        self.view = view

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily as G
        view, now = self.view, time.monotonic()
        up = G("mkv_volume_up", "1 if the volume answered the prober lately with the identity the index "
               "knows and no request failed since", labels=["volume"])
        mismatch = G("mkv_volume_identity_mismatch", "1 if the volume answers with a disk identity the "
                     "index does not know (wiped or replaced; no reads until rebalance.py)", labels=["volume"])
        seen = G("mkv_volume_last_seen_seconds", "seconds since the prober's last good answer", labels=["volume"])
        for host, row in view.volumes():
            up.add_metric([host], 1 if view.up(row, now) else 0)
            mismatch.add_metric([host], row[REPLACED])
            if row[PROBED] or row[MISSED]:
                seen.add_metric([host], now - row[PROBED] if row[PROBED] else float("inf"))
        yield from (up, mismatch, seen)
        free = G("mkv_volume_disk_free_bytes", "free bytes of the volume's disk (its /.disk)", labels=["volume"])
        used = G("mkv_volume_disk_used_bytes", "used bytes of the volume's disk (its /.disk)", labels=["volume"])
        for host, disk in sorted(view.disks().items()):
            free.add_metric([host], disk.get("free", 0))
            used.add_metric([host], disk.get("used", 0))
        yield from (free, used)
        yield from self.index_metrics()
        yield from self.process_metrics()
        yield from tool_metrics(self.view.run_folder())

    def index_metrics(self):
        from prometheus_client.core import GaugeMetricFamily as G
        found, notes, _ = self.view.index()
        live = found.get("live", (0, 0))
        yield G("mkv_keys", "live keys in the index", value=live[0])
        yield G("mkv_value_bytes", "bytes of the live keys' values (one copy each)", value=live[1])
        yield G("mkv_locks_held", "keys locked by a write now (the master's or a tool's)",
                value=found.get("locks", (0, 0))[0])
        if notes is not None:
            yield G("mkv_notes", "copies awaiting removal (pending_deletes)", value=notes)
        keys = G("mkv_volume_keys", "live keys with a copy on the volume", labels=["volume"])
        size = G("mkv_volume_value_bytes", "bytes of the live copies on the volume", labels=["volume"])
        for host, (n, b) in sorted(counts.per_host(found).items()):
            keys.add_metric([host], n)
            size.add_metric([host], b)
        yield keys
        yield size
        files = self.view.file_sizes()
        yield G("mkv_index_bytes", "size of the index file (MKV_DB)", value=files["index"])
        yield G("mkv_index_wal_bytes", "size of the index's write-ahead log (MKV_DB-wal)", value=files["wal"])

    def process_metrics(self):
        from prometheus_client.core import GaugeMetricFamily as G
        pids = master_pids()
        yield G("mkv_process_resident_bytes", "resident memory of the master's processes (arbiter and "
                "workers) together", value=sum(resident_bytes(p) for p in pids))
        yield G("mkv_process_open_sockets", "open sockets of the master's processes together (clients, "
                "volumes, listeners)", value=sum(open_sockets(p) for p in pids))
        yield G("mkv_workers", "worker processes running", value=len(pids) - 1)


TOOL_GAUGES = [
    ("running", "mkv_tool_running", "1 while the tool runs"),
    ("keys_done", "mkv_tool_keys_done", "keys the tool's run has handled"),
    ("units_done", "mkv_tool_units_done", "units of work done (folders for rebuild, keys for rebalance)"),
    ("units_total", "mkv_tool_units_total", "units of work in the run, once known"),
    ("bytes_copied", "mkv_tool_bytes_copied", "bytes the tool's run has copied"),
    ("failures", "mkv_tool_failures", "keys that failed in the tool's run"),
    ("exit_status", "mkv_tool_last_exit_status", "exit status of the tool's last run (-1: killed)"),
    ("started", "mkv_tool_started_timestamp_seconds", "unix time the tool's last run started"),
]


def tool_metrics(folder):
    """rebuild.py's and rebalance.py's progress and last result (mkvlib.progress)."""
    from prometheus_client.core import GaugeMetricFamily as G
    states = progress.read(folder)
    for field, name, doc in TOOL_GAUGES:
        family = G(name, doc, labels=["tool"])
        for tool, state in sorted(states.items()):
            value = state.get(field)
            if field == "exit_status" and value == "killed":
                value = -1
            if isinstance(value, (bool, int, float)):
                family.add_metric([tool], float(value))
        yield family


def scrape(view):
    """(body, content type) of one scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    registry.register(Collector(view))
    return generate_latest(registry), CONTENT_TYPE_LATEST
