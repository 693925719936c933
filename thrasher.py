"""Hammer a running mkv master with PUT / GET / DELETE and check every answer.

    python thrasher.py                       # 1000 keys of 1 KB, 16 at a time, on localhost:3000
    python thrasher.py --keys 200 --size 4M --concurrency 8 --master localhost:3000

Each key goes PUT (201) -> GET, following the redirect (the exact bytes) ->
DELETE (204) -> GET (404). Any other answer is a failure, printed with its key.
Ends with the rate of each phase and exits 1 if anything failed. The keys
live under /thrasher-<random>/ so a run never touches other data.
"""
import argparse
import concurrent.futures
import os
import sys
import time
import uuid

import requests

TIMEOUT = 60


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def one_key(session, base, i, size):
    """PUT, GET, DELETE, GET one key; returns a failure message or None."""
    key = f"{base}/{i}"
    value = os.urandom(size)
    r = session.put(key, data=value, timeout=TIMEOUT)
    if r.status_code != 201:
        return f"PUT {key}: {r.status_code} {r.text.strip()}"
    r = session.get(key, timeout=TIMEOUT)
    if r.status_code != 200 or r.content != value:
        return f"GET {key}: {r.status_code}, {len(r.content)} bytes, {'same' if r.content == value else 'different'}"
    r = session.delete(key, timeout=TIMEOUT)
    if r.status_code != 204:
        return f"DELETE {key}: {r.status_code} {r.text.strip()}"
    r = session.get(key, timeout=TIMEOUT, allow_redirects=False)
    if r.status_code != 404:
        return f"GET after DELETE {key}: {r.status_code}"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--master", default="localhost:3000", help="host:port of the master (default %(default)s)")
    p.add_argument("--keys", type=int, default=1000, help="how many keys (default %(default)s)")
    p.add_argument("--size", default="1K", help="bytes per value, e.g. 1000, 64K, 4M (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="keys in flight at once (default %(default)s)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    if args.keys < 1 or args.concurrency < 1 or size < 1:
        p.error("--keys, --concurrency and --size must be at least 1")
    base = f"http://{args.master}/thrasher-{uuid.uuid4().hex[:8]}"
    print(f"thrasher: {args.keys} keys of {size} bytes, {args.concurrency} at a time, on {args.master}",
          file=sys.stderr)
    sessions = {}

    def work(i):
        import threading
        s = sessions.setdefault(threading.get_ident(), requests.Session())
        try:
            return one_key(s, base, i, size)
        except requests.RequestException as e:
            return f"key {i}: {type(e).__name__}: {e}"

    start = time.monotonic()
    failures = 0
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        for failure in pool.map(work, range(args.keys)):
            if failure:
                failures += 1
                if failures <= 20:
                    print(f"FAIL {failure}", file=sys.stderr)
    took = time.monotonic() - start
    print(f"thrasher: {args.keys} write/read/delete in {took:.2f} s, that's {args.keys / took:.1f} keys/s, "
          f"{args.keys * size * 2 / took / 1e6:.1f} MB/s moved; {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
