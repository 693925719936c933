"""scrape: GETs of an existing key while /metrics of the admin listener is
scraped once a second (15 times Prometheus' default rate); limit: the same
GETs of the same master, not scraped. The issue's goal: at most 5% off.

The rate's rounds swing more than 5% on a shared machine, so the row also
gives what a scrape costs in CPU, which noise hardly moves: the arbiter's
CPU time (its admin listener answers /metrics) per scrape, and that share
of the machine's CPU at one scrape a second."""
import os
import threading

import psutil

from benchkit.common import http
from benchkit.gets import Get
from benchkit.wrk import wrk

SCRAPE_EVERY = 1.0      # seconds between two scrapes


class Scrape(Get):
    name, title, goal = "scrape", "GET (302) while /metrics is scraped every second", 0.95
    note = "limit: the same GETs, no scrape"

    def setup(self):
        super().setup()
        if not self.b.admin_url():
            raise RuntimeError("the bench cluster has no admin listener")
        self.cpu_seconds, self.scrapes, self.cpu_note = 0.0, 0, None    # the arbiter's, over every round

    def mkv(self):
        stop, scrapes = threading.Event(), []
        arbiter = psutil.Process(self.b.cluster().master.proc.pid)
        cpu_before = sum(arbiter.cpu_times()[:2])

        def scrape():
            while not stop.is_set():
                r = http("GET", self.b.admin_url() + "/metrics")
                scrapes.append(r.status_code)
                stop.wait(SCRAPE_EVERY)
        t = threading.Thread(target=scrape, daemon=True)
        t.start()
        try:
            result = super().mkv()
        finally:
            stop.set()
            t.join()
        if any(s != 200 for s in scrapes):
            self.notes.append(f"scrapes answered {sorted(set(scrapes))}")
        self.note_cpu(sum(arbiter.cpu_times()[:2]) - cpu_before, len(scrapes))
        return result

    def note_cpu(self, seconds, scrapes):
        """One note for every round so far (the CPU clock ticks in 10 ms)."""
        self.cpu_seconds += seconds
        self.scrapes += scrapes
        if self.cpu_note in self.notes:
            self.notes.remove(self.cpu_note)
        if self.scrapes:
            per_scrape = self.cpu_seconds / self.scrapes
            self.cpu_note = (f"{self.scrapes} scrapes, {per_scrape * 1000:.1f} ms of the arbiter's CPU each: "
                             f"{per_scrape / SCRAPE_EVERY / os.cpu_count():.2%} of the machine's CPU")
            self.notes.append(self.cpu_note)

    def limit(self):
        return self.served(wrk(self.b.cluster().url(self.path), self.b.duration, tally=True), self.expect)
