"""What a running rebuild.py or rebalance.py shows its master: its counts
(tools.Progress) written every PUBLISH_EVERY seconds to tool-NAME.json in
the master's run folder (mkvlib.runfolder, found from MKV_DB), and its exit
status when it ends. The admin listener reads them for /metrics
(mkv_tool_*) and the status page. No master running: nothing is written."""
import json
import os
import threading
import time

from mkvlib.runfolder import alive, run_folder

PUBLISH_EVERY = 0.5      # seconds between two writes of a running tool's counts
_publishers = []         # this process's


class Publisher:
    def __init__(self, tool, db, progress):
        self.tool, self.progress = tool, progress
        self.path = os.path.join(run_folder(db), f"tool-{tool}.json")
        self.started = time.time()
        self.exit_status = None
        self._stop = threading.Event()

    def state(self):
        p = self.progress
        return {"tool": self.tool, "pid": os.getpid(), "started": self.started, "updated": time.time(),
                "running": self.exit_status is None, "exit_status": self.exit_status,
                "units_done": p.done, "units_total": p.total, "unit": p.unit,
                "keys_done": p.keys, "bytes_copied": p.bytes, "failures": p.counts.get("failed", 0),
                "counts": dict(p.counts)}

    def write(self):
        try:
            with open(self.path + ".new", "w") as f:
                json.dump(self.state(), f)
            os.replace(self.path + ".new", self.path)
        except OSError:          # the master stopped and took its run folder away
            pass

    def run(self):
        while not self._stop.wait(PUBLISH_EVERY):
            self.write()

    def finish(self, exit_status):
        self.exit_status = exit_status
        self._stop.set()
        self.write()


def publish(tool, db, progress):
    """Show `progress` to the master running on `db`, if one runs."""
    if not os.path.isdir(run_folder(db)):
        return None
    publisher = Publisher(tool, db, progress)
    publisher.write()
    threading.Thread(target=publisher.run, daemon=True, name="publish").start()
    _publishers.append(publisher)
    return publisher


def exit_status_of(main):
    """main()'s exit status, shown to the master as the tool's last result
    (1 for an exception, which goes on up)."""
    status = 1
    try:
        status = main()
        return status
    finally:
        for publisher in _publishers:
            publisher.finish(status if isinstance(status, int) else 1)


def read(folder):
    """{tool: state} of the tools that ran since the master started; a tool
    killed before it could say so is not running."""
    found = {}
    for name in os.listdir(folder) if folder and os.path.isdir(folder) else []:
        if name.startswith("tool-") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                continue
            if state.get("running") and not alive(state.get("pid", 0)):
                state["running"], state["exit_status"] = False, "killed"
            found[state["tool"]] = state
    return found


