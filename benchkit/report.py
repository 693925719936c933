"""What bench.py prints on stdout: the markdown table and the line naming the machine."""
import os
import platform
import subprocess

from benchkit.common import REPLICAS, SUBVOLUMES, WORKERS, worker_class
from benchkit.servers import nginx_binary


def print_table(rows):
    print("| workload | mkv | limit | ratio | goal | met | Go | mkv/Go | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |")


def machine_line(bench):
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nginx = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    except (OSError, SystemExit):
        nginx = "?"
    from importlib.metadata import version
    return (f"machine: {os.cpu_count()} cores (nproc), {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, load average {bench.load:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end (1 min); "
            f"master: gunicorn {version('gunicorn')} -k {worker_class()} -w {WORKERS} (gevent {version('gevent')}), "
            f"MKV_REPLICAS={REPLICAS}, MKV_SUBVOLUMES={SUBVOLUMES}; volumes: nginx {nginx} via `python volume`; "
            f"wrk -t2 -c100 -d{bench.duration}s; best of {bench.args.rounds} rounds, master and limit alternating"
            + ("; --quick" if bench.quick else ""))
