"""What this process knows of each volume server, and the one place every
path asks "may I send this volume a read, a write, now?".

Two sources feed it: every request to a volume (a failure marks the server
down for DOWN_RETRY seconds, any answer marks it up again), and the prober
(mkvlib.prober), which hears from every watched server each PROBE_EVERY
seconds and checks that it is the disk the index knows. No I/O here but
`ask`, the one request a write may make to a server not heard from lately."""
import logging
import time

log = logging.getLogger("mkv")

DOWN_RETRY = 5.0           # seconds a volume that failed is skipped before one retry
PROBE_FRESH = 2.5          # seconds the prober's last good answer keeps a volume a redirect target


class Health:
    def __init__(self, retry_after=DOWN_RETRY, fresh=PROBE_FRESH, ask=None):
        self.retry_after, self.fresh = retry_after, fresh
        self.ask = ask           # ask(host): True if the server answers a request now
        self.look = None         # look([host]): the prober's look, set by the prober
        self.watched = []        # hosts the prober looks at
        self.replaced = set()    # hosts that answer with an identity the index does not know
        self._down_until = {}    # host -> time.monotonic() until which it is skipped
        self._heard = {}         # host -> time.monotonic() of the prober's last good answer

    # -- what requests tell

    def failed(self, host, reason=""):
        if host not in self._down_until:
            log.warning("volume %s is down, skipping it for %.0f s: %s", host, self.retry_after, reason)
        self._down_until[host] = time.monotonic() + self.retry_after

    def answered(self, host):
        if self._down_until.pop(host, None) is not None:
            log.warning("volume %s is back up", host)

    # -- what the prober tells

    def heard(self, host):
        """The prober had a good answer; False if it had none before."""
        known = host in self._heard
        self._heard[host] = time.monotonic()
        return known

    def unheard(self, host):
        """The prober had no answer; True if it had one before."""
        return self._heard.pop(host, None) is not None

    # -- the answers

    def down(self, host):
        """True while `host` failed less than DOWN_RETRY seconds ago."""
        return time.monotonic() < self._down_until.get(host, 0)

    def may_read(self, host):
        """True if a GET may send a client to `host` now: the prober heard
        from it a moment ago (the disk the index knows), and no request has
        failed since. A host not watched yet (a volume removed from
        MKV_VOLUMES that records still name) is looked at now and watched."""
        if host not in self.watched:
            self.watched.append(host)
            if self.look is not None:
                self.look([host])
        return (time.monotonic() - self._heard.get(host, -self.fresh) < self.fresh
                and not self.down(host))

    def may_ask(self, host):
        """False while `host` is known down; after DOWN_RETRY, True once (a
        retry), and the others keep skipping it meanwhile."""
        until = self._down_until.get(host)
        if until is None:
            return True
        now = time.monotonic()
        if now < until:
            return False
        self._down_until[host] = now + self.retry_after
        return True

    def may_write(self, host, always_ask=False):
        """Whether to send `host` a value or a DELETE now: yes if the prober
        heard from it a moment ago. Otherwise it is asked now (ask(), one
        HEAD: a hung volume costs MKV_VOLTIMEOUT, not a transfer's timeout);
        while it stays down, once per DOWN_RETRY only, unless `always_ask`
        (a DELETE: rare, and right after the volume's return it must work)."""
        if self.may_read(host):
            return True
        return (always_ask or self.may_ask(host)) and self.ask is not None and self.ask(host)
