"""wrk: installing it, running it, reading its output; Lua asking for random keys."""
import os
import re
import shutil
import subprocess
import tempfile

from benchkit.common import say

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


TALLY_LUA = """
-- bench.py: count the answers by status; done() prints 'status N: COUNT' lines
local threads = {}
setup = function(thread) table.insert(threads, thread) end
statuses = {}
response = function(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
done = function(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("status %d: %d\\n", k, v)) end
end
"""


def ensure_wrk():
    if shutil.which("wrk"):
        return
    say("wrk is missing: installing it with apt-get (apt-get install -y wrk)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = sudo + ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    if not shutil.which("wrk"):
        raise SystemExit("bench: could not install wrk")


def wrk(url, duration, threads=2, conns=100, lua="", tally=False):
    """Run wrk, with the Lua script text `lua` if any, counting the answers
    by status if `tally`; {'rate': req/s, 'requests', 'bad' (non-2xx/3xx),
    'errors' (socket errors), 'statuses' {status: count} (with tally), 'p50',
    'p99' (ms)}."""
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "10s", "--latency"]
    script = None
    if lua or tally:
        fd, script = tempfile.mkstemp(suffix=".lua", prefix="bench-")
        with os.fdopen(fd, "w") as f:
            f.write(lua + (TALLY_LUA if tally else ""))
        argv += ["-s", script]
    try:
        p = subprocess.run(argv + [url], capture_output=True, text=True, timeout=duration + 60)
    finally:
        if script:
            os.unlink(script)
    out = p.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk {url} failed ({p.returncode}): {out}{p.stderr}")
    result = {"rate": float(m.group(1)), "bad": 0, "errors": 0,
              "statuses": {int(a): int(b) for a, b in re.findall(r"^status (\d+): (\d+)$", out, re.M)}}
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        result["bad"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        result["errors"] = sum(int(x) for x in m.groups())
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            result["p" + pct] = float(m.group(1)) * _UNITS[m.group(2)]
    return result


def unexpected(w, expect):
    """'N answers S, ...' for the answers of a tallied wrk run whose status is not `expect`."""
    odd = {s: n for s, n in w["statuses"].items() if s != expect}
    parts = [f"{n} answers {s}" for s, n in sorted(odd.items())]
    if w["errors"]:
        parts.append(f"{w['errors']} socket errors or timeouts")
    return ", ".join(parts)


def good_rate(w, expect):
    """Requests per second that got the `expect` status: a fast 503 is no GET served."""
    total = sum(w["statuses"].values())
    return w["rate"] * w["statuses"].get(expect, 0) / total if total else 0.0


def random_key_lua(fmt, n):
    """wrk Lua asking for fmt % random(0, n-1) on every request."""
    return f"""\
local n = {int(n)}
local fmt = "{fmt}"
init = function(args)
  math.randomseed(os.time() + (tonumber(tostring({{}}):match("0x(%x+)") or "0", 16) % 1000003))
end
request = function()
  return wrk.format("GET", string.format(fmt, math.random(0, n - 1)))
end
"""
