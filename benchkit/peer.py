"""The Go original (geohot/minikeyvalue), built by ../shared/peer/build.sh
into a folder given as `bench.py --peer DIR`: its master on the bench's own
volumes, its tools, and its thrasher aimed at any port.

Nothing of the original is in this repository: DIR holds the binaries
(`mkv`, `thrasher`) and, for a thrasher aimed at another port than 3000, the
Go toolchain's cache that build.sh made there."""
import os
import re
import shutil
import subprocess

from benchkit.common import REPLICAS, SUBVOLUMES, conftest, say

THRASHER_PORT = 3000     # tools/thrasher.go asks http://localhost:3000/ and nothing else
GOPATH = "/usr/share/gocode"   # Debian's Go libraries, as build.sh uses them


class Peer:
    """The Go original's binaries in `folder`; `source`: its source tree (for
    a thrasher aimed at another port)."""

    def __init__(self, folder, source=None):
        self.folder = os.path.abspath(folder)
        self.binary = os.path.join(self.folder, "mkv")
        self.source = source or default_source()
        for path in (self.binary, os.path.join(self.folder, "thrasher")):
            if not os.access(path, os.X_OK):
                raise SystemExit(f"bench: --peer {folder}: no {os.path.basename(path)} there "
                                 "(build it with ../shared/peer/build.sh DIR)")
        self._thrashers = {}

    def args(self, names, db):
        return ["-volumes", ",".join(names), "-db", db, "-replicas", str(REPLICAS),
                "-subvolumes", str(SUBVOLUMES)]

    def start_master(self, workdir, names, port=None):
        """Its master (`mkv ... server`) over the volume servers `names`, with
        its own LevelDB index in workdir; a conftest.Server."""
        c = conftest()
        port = port or c.free_port()
        db = os.path.join(workdir, f"go-index-{port}")
        argv = [self.binary, "-port", str(port)] + self.args(names, db) + ["server"]
        server = c.Server(f"go master :{port}", argv, dict(os.environ),
                          os.path.join(workdir, f"go-master-{port}.log"), port)
        return server.start()

    def tool(self, command, names, db, timeout=600):
        """(seconds, CompletedProcess) of `mkv ... rebuild` or `rebalance`."""
        from benchkit.common import timed
        return timed([self.binary] + self.args(names, db) + [command], timeout=timeout)

    def thrasher(self, port):
        """The path of tools/thrasher.go's binary aimed at 127.0.0.1:port
        (the built one for port 3000; for another, a copy of its source with
        the port changed, built once into DIR)."""
        if port == THRASHER_PORT:
            return os.path.join(self.folder, "thrasher")
        if port not in self._thrashers:
            self._thrashers[port] = self._build_thrasher(port)
        return self._thrashers[port]

    def _build_thrasher(self, port):
        src = os.path.join(self.source, "thrasher", "thrasher.go")
        if not os.path.exists(src) or not shutil.which("go"):
            raise RuntimeError(f"a thrasher for port {port} needs {src} and go (../shared/peer/build.sh)")
        work = os.path.join(self.folder, f"thrasher-{port}-src")
        os.makedirs(work, exist_ok=True)
        with open(src) as f:
            text = f.read()
        aimed = text.replace("http://localhost:3000/", f"http://127.0.0.1:{port}/")
        if aimed == text:
            raise RuntimeError(f"{src}: no http://localhost:3000/ to aim elsewhere")
        with open(os.path.join(work, "thrasher.go"), "w") as f:
            f.write(aimed)
        out = os.path.join(self.folder, f"thrasher-{port}")
        env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=os.path.join(self.folder, "cache"))
        p = subprocess.run(["go", "build", "-o", out, "."], cwd=work, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"go build of the thrasher for port {port}: {p.stderr[-2000:]}")
        say(f"built {out}")
        return out


def default_source():
    """../shared/peer/minikeyvalue beside the repo's folder, or $MKV_PEER_SRC."""
    from benchkit.common import ROOT
    return os.environ.get("MKV_PEER_SRC") or os.path.join(os.path.dirname(ROOT), "shared", "peer", "minikeyvalue")


def thrasher_rate(stdout):
    """The keys/s tools/thrasher.go printed ('thats N/sec'), or None."""
    m = re.search(r"^thats ([\d.]+)/sec$", stdout, re.M)
    return float(m.group(1)) if m else None
