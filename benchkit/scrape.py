"""scrape: GETs of an existing key while /metrics of the admin listener is
scraped once a second (15 times Prometheus' default rate); limit: the same
GETs of the same master, not scraped. The issue's goal: at most 5% off."""
import threading

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

    def mkv(self):
        stop, scrapes = threading.Event(), []

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
        return result

    def limit(self):
        return self.served(wrk(self.b.cluster().url(self.path), self.b.duration, tally=True), self.expect)
