"""Which volumes a GET may send a client to, known without a request per
GET: one thread per process (a greenlet in the master) asks every watched
volume for its identity (GET /.id, MKV_VOLTIMEOUT) every PROBE_EVERY
seconds, and tells mkvlib.health what it heard."""
import logging
import threading
import time

log = logging.getLogger("mkv")

PROBE_EVERY = 1.0          # seconds between two looks of a process at each volume


class Prober:
    """A volume is a redirect target while its last answer is under
    PROBE_FRESH seconds old and its identity is the one the index recorded
    (the first seen is recorded): a wiped or replaced disk is not, until
    rebalance.py has filled it and recorded its new identity."""

    def __init__(self, index, volumes, hosts, every=PROBE_EVERY):
        self.index, self.volumes, self.every = index, volumes, every
        self.health = volumes.health
        self.health.watched.extend(h for h in hosts if h not in self.health.watched)
        self.health.look = self.look
        self._thread = None

    def start(self):
        """One look now (so the first GETs know), then one every `every` seconds."""
        self.look()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")
        self._thread.start()
        return self

    def _run(self):
        while True:
            time.sleep(self.every)
            try:
                self.look()
            except Exception:   # the index busy, say: the next look will do
                log.exception("probing the volumes failed")

    def look(self, hosts=None):
        health = self.health
        asked = list(hosts or health.watched)
        # a host that did not answer is not vouched for, and not marked down
        # either: a look that a busy worker made late is no proof it is down
        found = {host: ident for host, ident in zip(asked, self.volumes.identities(asked, mark=False))
                 if not isinstance(ident, Exception)}
        for host in asked:
            if host not in found and health.unheard(host):
                log.warning("volume %s did not answer the prober: reads go to the other replicas", host)
        known = self.index.volume_ids()
        for host, ident in found.items():
            if host not in known:
                self.index.record_volume_id(host, ident)
                known[host] = self.index.volume_ids().get(host, ident)
            if known[host] != ident:
                if health.set_replaced(host, True):
                    log.warning("volume %s is not the disk the index knows (identity %r, recorded %r): "
                                "no reads go to it until rebalance.py has filled it", host, ident, known[host])
                continue
            if health.set_replaced(host, False):
                log.warning("volume %s is the disk the index knows again", host)
            if health.heard(host):
                log.warning("volume %s answers the prober again", host)
