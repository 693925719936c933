"""The status page at / of the admin listener: plain HTML that reloads
itself every REFRESH seconds (no script): each volume up or down, its
identity, disk and keys; readiness; recent failed requests; a running
rebuild or rebalance with its progress. Everything shown is what /metrics
reads too (admin.View), so the page and the metrics never disagree."""
import datetime
import glob
import html
import json
import os
import time

from mkvlib import counts, progress
from mkvlib.health import REPLACED

REFRESH = 2           # seconds between two loads of the page
FAILURES_SHOWN = 20

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}.up{color:#176117;font-weight:bold}.down{color:#b00020;font-weight:bold}
.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:13px}"""


def esc(value):
    return html.escape(str(value), quote=True)


def size(n):
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def volume_rows(view, disks):
    found, _, ids = view.index()
    per_host = counts.per_host(found)
    now = time.monotonic()
    rows = []
    for host, row in view.volumes():
        up = view.up(row, now)
        state = "up" if up else ("replaced disk" if row[REPLACED] else "down")
        disk = disks.get(host) or {}
        keys, value_bytes = per_host.get(host, (0, 0))
        rows.append(
            f'<tr data-volume="{esc(host)}" data-state="{"up" if up else "down"}">'
            f'<td><code>{esc(host)}</code></td><td class="{"up" if up else "down"}">{esc(state)}</td>'
            f'<td><code>{esc(ids.get(host, "?"))}</code></td>'
            f'<td class="num">{size(disk.get("free"))}</td><td class="num">{size(disk.get("used"))}</td>'
            f'<td class="num">{keys}</td><td class="num">{size(value_bytes)}</td></tr>')
    return rows


def recent_failures(run_folder):
    found = []
    for path in glob.glob(os.path.join(run_folder, "failures-*.json")) if run_folder else []:
        try:
            with open(path) as f:
                found += json.load(f)
        except (OSError, ValueError):
            continue
    found.sort(key=lambda e: e.get("time", 0), reverse=True)
    rows = []
    for e in found[:FAILURES_SHOWN]:
        when = datetime.datetime.fromtimestamp(e.get("time", 0), datetime.timezone.utc).strftime("%H:%M:%S")
        rows.append(f'<tr><td>{when}</td><td>{esc(e.get("method"))}</td><td><code>{esc(e.get("key"))}</code></td>'
                    f'<td>{esc(e.get("status"))}</td><td>{esc(e.get("reason"))}</td>'
                    f'<td><code>{esc(e.get("volume"))}</code></td><td class="num">{esc(e.get("duration_ms"))} ms</td></tr>')
    return rows


def tool_rows(run_folder):
    rows = []
    for tool, state in sorted(progress.read(run_folder).items()):
        status = "running" if state.get("running") else f"exited {state.get('exit_status', '?')}"
        total = state.get("units_total")
        done = f'{state.get("units_done", 0)}{f" of {total}" if total else ""} {state.get("unit", "")}'
        rows.append(f'<tr data-tool="{esc(tool)}"><td>{esc(tool)}</td><td>{esc(status)}</td>'
                    f'<td class="num">{esc(done)}</td><td class="num">{esc(state.get("keys_done", 0))}</td>'
                    f'<td class="num">{size(state.get("bytes_copied", 0))}</td>'
                    f'<td class="num">{esc(state.get("failures", 0))}</td></tr>')
    return rows


def table(head, rows, empty):
    if not rows:
        return f"<p>{esc(empty)}</p>"
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>\n" + "\n".join(rows)
            + "</table>")


def render(view, disks=None):
    settings = view.settings
    run_folder = view.run_folder()
    why = view.ready()
    ready = ('<p class="up" id="ready">ready</p>' if why is None
             else f'<p class="down" id="ready">not ready: {esc(why)}</p>')
    found, notes, _ = view.index()
    live = found.get("live", (0, 0))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH}">
<title>mkv status</title><style>{STYLE}</style></head><body>
<h1>mkv</h1>
{ready}
<p>index <code>{esc(settings.db)}</code>: {live[0]} live keys, {size(live[1])} of values;
{esc(notes if notes is not None else "?")} copies awaiting removal.
Replicas {settings.replicas}, subvolumes {settings.subvolumes}.</p>
<h2>Volumes</h2>
{table(["volume", "state", "identity", "disk free", "disk used", "keys", "values"],
       volume_rows(view, disks if disks is not None else view.disks()), "no volumes")}
<h2>Tools</h2>
{table(["tool", "state", "done", "keys", "copied", "failures"], tool_rows(run_folder),
       "no rebuild or rebalance has run since the master started")}
<h2>Recent failed requests</h2>
{table(["time (UTC)", "method", "key", "status", "reason", "volume", "took"], recent_failures(run_folder),
       "none since the master started")}
<p><a href="/metrics">metrics</a> &middot; <a href="/health/ready">readiness</a></p>
</body></html>
"""
