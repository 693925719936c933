"""docs/operations.md's procedures, followed as written (the commands are
read from the page itself)."""
import os
import re
import sqlite3
import subprocess
import threading

from conftest import ROOT, Http

DOC = os.path.join(ROOT, "docs", "operations.md")


def commands_under(heading):
    """The first ```sh block below `heading` in docs/operations.md."""
    with open(DOC) as f:
        text = f.read()
    section = text[text.index(heading):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_online_backup_copies_every_key_while_puts_go_on(cluster, tmp_path):
    http = Http()
    keys = [f"/backup-{i}" for i in range(50)]
    for k in keys:
        assert http.put(cluster.url(k), data=b"v").status_code == 201
    stop = threading.Event()

    def more_puts():
        i = 0
        while not stop.is_set():
            Http().put(cluster.url(f"/backup-during-{i}"), data=b"v")
            i += 1
    writer = threading.Thread(target=more_puts)
    writer.start()
    try:
        script = commands_under("### Backing up the index while it serves").replace(
            "/backup/index.sqlite3", str(tmp_path / "index.sqlite3"))
        p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=dict(os.environ, MKV_DB=cluster.db()),
                           capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        writer.join()
    assert p.returncode == 0, p.stderr
    backup = sqlite3.connect(tmp_path / "index.sqlite3")
    assert backup.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    found = {bytes(k) for (k,) in backup.execute("SELECT key FROM keys WHERE state = 'live'")}
    assert {k.encode() for k in keys} <= found
