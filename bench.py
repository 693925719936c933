"""Benchmarks of mkv against their limits, on a throwaway cluster on loopback.

    python bench.py [--quick] [--rounds N] [--only NAME,...] [--duration S] [--keep] [--peer DIR]
    python bench.py fill --db FILE --keys N [--volumes H:P,...] [--replicas N] [--subvolumes N]

Starts 3 nginx volumes (`python volume DIR`), a master (`gunicorn -w 2 mkv:app`,
gunicorn.conf.py's worker.MkvWorker, MKV_REPLICAS=3) and whatever limit servers a workload needs, all on
free loopback ports in a temporary folder; runs each workload against the
master and against its limit, alternating, best of --rounds; prints a markdown
table (workload, mkv, limit, ratio, goal, met, Go, mkv/Go, notes) and a
line naming the machine. With --peer DIR (the Go original and its thrasher,
built by ../shared/peer/build.sh DIR) the original's master runs every
workload it can on the same volumes in the same rounds, alternating: the Go
column, and mkv/Go (higher is better for mkv). Ratios are mkv / limit, so higher is better everywhere; a benchmark,
never a test: nothing here fails on a number.

Workloads (--only takes these names):
  get        GET of an existing key (302), wrk -t2 -c100; limit: bare nginx `return 302`
  missing    GET of a missing key (404), same; limit: the same bare nginx
             (the master's answers are counted by status: only 302s, or 404s,
             count in its rate, and a note gives the number of any others)
  scrape     GET of an existing key while /metrics is scraped every second; limit:
             the same GETs of the same master, not scraped (goal: at most 5% off)
  bare       GET of an existing key, against a bare WSGI function (benchkit/bare.py:
             one SQLite lookup, a 302) under the same gunicorn -w 2
  bare-missing  the same for a missing key (404)
  thrash     write/read/delete of 1 KB values, 16 at once (thrasher.py); limit:
             thrasher.py --direct, the same work straight to the volumes
  gothrash   the original's tools/thrasher.go against each master (--peer only;
             goal mkv/Go >= 0.6); limit: thrasher.py --direct, 25 B values
  bigput     one 256 MB PUT, 3 replicas, and the master worker's peak RSS growth;
             limit: the three copies PUT straight to the three volumes at once
  rebuild    rebuild.py of 20,000 tiny keys on 3 volumes into a fresh index; limit:
             the volumes' leaf folders / nginx's rate of JSON listings of one folder
  rebalance  rebalance.py from 3 volumes to 4 (1,500 keys of 10 B to 300 KB);
             limit: a plain copy (sendfile) of the bytes that must move
  index      GET at random over an index of 10,000,000 keys (filled straight into
             SQLite); limit: the same on an index of 1,000 keys
  list       ?list&limit=1000 from a random start on that index, one client: p99
             latency; limit: the same on the 1,000-key index
  s3get      one 256 MB GetObject through the S3 gateway (s3.py), which reads the volumes'
             folders (MKV_S3_VOLUME_DIRS), and its worker's peak RSS growth; limit:
             curl of the same file from its volume's nginx
  s3getrelay the same through a gateway that relays the file from the volume's nginx
  s3put      one 256 MB PutObject through the gateway; limit: the native PUT
  s3small    put/get/delete of 1 KB objects through boto3 and the gateway, one
             client; limit: the same through the native API (requests)

--quick: shorter runs and smaller data (a 200,000-key index); under 3 minutes.
The volumes of the `index` and `list` masters are stub nginx servers that
answer 200 to everything (no files behind 10 million keys), so a master that
checks a volume before redirecting still redirects.

`fill` writes N records straight into an index file: keys /fill/%09d, state
live, volumes from mkvlib.placement.key2volume over --volumes ($MKV_VOLUMES), md5 and
size made up; in transactions of 100,000 rows.
"""

# The workloads and their helpers are in benchkit/ (one module per group of
# workloads, see benchkit/__init__.py); this file parses the command line,
# runs the chosen workloads in order and prints the table.
import argparse
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))      # conftest: the servers of the tests

from benchkit import runner  # noqa: E402
from benchkit.bigindex import Index, List  # noqa: E402
from benchkit.common import MB, REPLICAS, SUBVOLUMES  # noqa: E402
from benchkit.gets import Bare, BareMissing, Get, Missing  # noqa: E402
from benchkit.mkvdata import every, fill, index_size  # noqa: E402
from benchkit.repair import Rebalance, Rebuild  # noqa: E402
from benchkit.scrape import Scrape  # noqa: E402
from benchkit.report import machine_line, print_table  # noqa: E402
from benchkit.servers import STUB_VOLUME, Bench, start_stub  # noqa: E402,F401  (tests/test_bench.py)
from benchkit.s3 import S3Get, S3GetRelay, S3Put, S3Small  # noqa: E402
from benchkit.writes import BigPut, GoThrash, Thrash  # noqa: E402

WORKLOADS = [Get, Missing, Bare, BareMissing, Scrape, Thrash, GoThrash, BigPut, Rebuild, Rebalance, Index, List,
             S3Get, S3GetRelay, S3Put, S3Small]


def fill_main(argv):
    p = argparse.ArgumentParser(prog="bench.py fill",
                                description="Write N records /fill/%09d straight into an mkv index.")
    p.add_argument("--db", required=True, help="the SQLite index file (created if missing)")
    p.add_argument("--keys", type=int, required=True, help="how many records")
    p.add_argument("--volumes", default=os.environ.get("MKV_VOLUMES"),
                   help="volume servers H:P,H:P,... (default: $MKV_VOLUMES)")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("MKV_REPLICAS", REPLICAS)))
    p.add_argument("--subvolumes", type=int, default=int(os.environ.get("MKV_SUBVOLUMES", SUBVOLUMES)))
    p.add_argument("--start", type=int, default=0, help="first key number (default 0)")
    args = p.parse_args(argv)
    volumes = [v for v in (args.volumes or "").split(",") if v]
    if not volumes:
        p.error("name the volumes with --volumes or MKV_VOLUMES")
    if args.keys < 1 or not 1 <= args.replicas <= len(volumes) or not 1 <= args.subvolumes <= 256:
        p.error("--keys >= 1, 1 <= --replicas <= volumes, 1 <= --subvolumes <= 256")
    progress = every(5, lambda done, took: print(f"fill: {done:,} keys, {took:.0f} s", file=sys.stderr, flush=True),
                     last_done=args.keys)
    took = fill(args.db, args.keys, volumes, args.replicas, args.subvolumes, args.start, progress)
    size = index_size(args.db)
    print(f"fill: {args.keys:,} keys in {took:.1f} s ({args.keys / took:,.0f} keys/s); "
          f"{args.db} is {size / MB:,.1f} MB, {size / args.keys:.0f} B/key")
    return 0


def parse_args(argv):
    """(the options, the names of the chosen workloads)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, small data: under 3 minutes")
    p.add_argument("--rounds", type=int, default=3, help="rounds per workload, best kept (default %(default)s)")
    p.add_argument("--only", metavar="NAME,...", help="these workloads: " + ",".join(w.name for w in WORKLOADS))
    p.add_argument("--duration", type=int, help="seconds of each wrk run (default 5, 2 with --quick)")
    p.add_argument("--tmp", help="folder for the temporary cluster (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--peer", metavar="DIR", help="the Go original built by ../shared/peer/build.sh DIR: "
                   "a Go column beside mkv's, and the gothrash workload")
    args = p.parse_args(argv)
    names = [w.name for w in WORKLOADS]
    default = [w.name for w in WORKLOADS if args.peer or not w.needs_peer]
    chosen = [n for n in (args.only or ",".join(default)).split(",") if n]
    unknown = [n for n in chosen if n not in names]
    if unknown or args.rounds < 1:
        p.error(f"unknown workload {','.join(unknown)} (known: {','.join(names)})" if unknown
                else "--rounds must be at least 1")
    return args, chosen


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fill"]:
        return fill_main(argv[1:])
    args, chosen = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    bench = Bench(args)
    rows, failed = [], False
    try:
        for cls in WORKLOADS:
            if cls.name in chosen:
                row, ran = runner.run(bench, cls, args.rounds)
                rows.append(row)
                failed = failed or not ran
    finally:
        bench.close()
    print_table(rows)
    print()
    print(machine_line(bench))
    print(f"bench: took {time.monotonic() - began:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
