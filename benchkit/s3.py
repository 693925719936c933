"""s3get, s3getrelay, s3put, s3small: the S3 gateway (s3.py, open: no
MKV_S3_KEYS) beside the same work without it, on the bench's cluster: a
256 MB GetObject against nginx sending the same file (the gateway reading
the volumes' folders, and one relaying from their nginx), a 256 MB
PutObject against the native PUT, small objects through boto3 against the
native API through requests."""
import hashlib
import os
import subprocess
import time

from benchkit.common import MB, ensure_curl, http, peak_rss, say
from benchkit.writes import BigPut
from benchkit.workload import Workload

SMALL_KEYS = (200, 1000)    # small objects put, got and deleted (--quick, not)


def gateway(bench, relay=False):
    """The S3 gateway over the bench's cluster, started on first use; a bucket
    'bench' in it. It reads the volumes' files from their folders, as
    bringup.sh runs it (MKV_S3_VOLUME_DIRS), unless `relay`: then it is a
    second gateway that relays them from the volumes' nginx, as it does from
    volumes on other hosts."""
    attr = "_relay_gateway" if relay else "_gateway"
    if getattr(bench, attr, None) is None:
        from s3util import gateway_server
        cluster = bench.cluster()
        dirs = {} if relay else {"MKV_S3_VOLUME_DIRS": ",".join(cluster.volume_dirs)}
        server = gateway_server(cluster, workers=2, **dirs).start()
        server.url = f"http://127.0.0.1:{server.port}"
        setattr(bench, attr, server)
        http("PUT", server.url + "/bench")
        say(f"s3 gateway :{server.port}{' (relaying)' if relay else ''}")
    return getattr(bench, attr)


def curl(*args):
    return subprocess.run(["curl", "-sS", "-H", "Expect:", "-o", "/dev/null", "-w", "%{http_code}", *args],
                          capture_output=True, text=True, timeout=600)


class GatewayFile(BigPut):
    """BigPut's 256 MB file through the gateway: timed curls, the gateway
    workers' peak RSS growth."""

    def runs_go(self):
        return False    # the Go original has no S3 (BigPut's go() is a native PUT)

    def timed(self, args, want, what, workers=()):
        """curl `args`, timed: its rate as a result, and with `workers` their
        peak RSS growth; RuntimeError(`what`) unless curl reports `want`."""
        before = {pid: peak_rss(pid) for pid in workers}
        start = time.monotonic()
        p = curl(*args)
        took = time.monotonic() - start
        if p.stdout != want:
            raise RuntimeError(f"{what}: {p.stdout} {p.stderr}")
        rate = self.size / MB / took
        result = {"value": rate, "text": f"{rate:,.0f} MB/s"}
        if workers:
            result["rss"] = max(peak_rss(pid) - before[pid] for pid in workers)
            self.growth.append(result["rss"])
        return result


class S3Get(GatewayFile):
    name, title, goal = "s3get", "one 256 MB GetObject through the gateway", 0.8
    relay = False      # S3GetRelay: through the gateway that relays from the volumes' nginx

    def setup(self):
        super().setup()
        how = ("relayed from the volume's nginx (splice)" if self.relay
               else "the gateway sends the file (MKV_S3_VOLUME_DIRS)")
        self.notes[:] = [f"{how}; curl to /dev/null; limit: curl of the same file from the volume's nginx; "
                         "RSS: VmHWM growth of the busiest gateway worker"]
        gw = gateway(self.b, self.relay)
        p = curl("-T", self.file, gw.url + "/bench/big")
        if p.stdout != "200":
            raise RuntimeError(f"PutObject of 256 MB: {p.stdout} {p.stderr}")
        r = http("GET", self.b.cluster().url("/bench/big"))   # the native API redirects to a replica
        if r.status_code != 302:
            raise RuntimeError(f"GET of the native key: {r.status_code}")
        self.direct = r.headers["Location"]

    def mkv(self):
        gw = gateway(self.b, self.relay)
        return self.timed([gw.url + "/bench/big"], "200", "GetObject", gw.pids()[1:])

    def limit(self):
        return self.timed([self.direct], "200", f"GET {self.direct}")


class S3GetRelay(S3Get):
    name, title, relay = "s3getrelay", "one 256 MB GetObject relayed from a volume (volumes on other hosts)", True


class S3Put(GatewayFile):
    name, title, goal = "s3put", "one 256 MB PutObject through the gateway, 3 replicas", 0.8

    def setup(self):
        super().setup()
        self.notes[:] = ["curl -T; limit: the same file PUT to the native master (curl -L); "
                         "RSS: VmHWM growth of the busiest gateway worker"]
        gateway(self.b)

    def mkv(self):
        gw = gateway(self.b)
        self.count += 1
        url = f"{gw.url}/bench/put-{self.count}"
        result = self.timed(["-T", self.file, url], "200", "PutObject", gw.pids()[1:])
        http("DELETE", url)
        return result

    def limit(self):
        self.count += 1
        url = self.b.cluster().url(f"/bench/native-put-{self.count}")
        result = self.timed(["-T", self.file, url], "201", "native PUT")
        http("DELETE", url)
        return result


class S3Small(Workload):
    name, goal, sizes = "s3small", 0.5, SMALL_KEYS
    title = "put/get/delete of {keys:,} 1 KB objects, one client"
    note = "boto3 through the gateway; limit: the same through the native API with requests (GET follows the 302)"

    def setup(self):
        ensure_curl()
        gw = gateway(self.b)
        from s3util import boto3_client
        self.s3 = boto3_client(gw.url)
        self.value = os.urandom(1024)
        self.md5 = hashlib.md5(self.value).hexdigest()

    def mkv(self):
        start = time.monotonic()
        for i in range(self.keys):
            self.s3.put_object(Bucket="bench", Key=f"small/{i}", Body=self.value)
        for i in range(self.keys):
            if self.s3.get_object(Bucket="bench", Key=f"small/{i}")["Body"].read() != self.value:
                raise RuntimeError(f"GetObject small/{i}: wrong value")
        for i in range(self.keys):
            self.s3.delete_object(Bucket="bench", Key=f"small/{i}")
        rate = self.keys / (time.monotonic() - start)
        return {"value": rate, "text": f"{rate:,.0f} keys/s"}

    def limit(self):
        import requests
        c = self.b.cluster()
        session = requests.Session()
        start = time.monotonic()
        for i in range(self.keys):
            r = session.put(c.url(f"/bench/native-small/{i}"), data=self.value, timeout=30)
            if r.status_code != 201:
                raise RuntimeError(f"native PUT: {r.status_code}")
        for i in range(self.keys):
            if session.get(c.url(f"/bench/native-small/{i}"), timeout=30).content != self.value:
                raise RuntimeError(f"native GET /bench/native-small/{i}: wrong value")
        for i in range(self.keys):
            session.delete(c.url(f"/bench/native-small/{i}"), timeout=30)
        rate = self.keys / (time.monotonic() - start)
        return {"value": rate, "text": f"{rate:,.0f} keys/s"}
