"""python/examples/ run as a user runs them, against the test daemon."""
import os
import queue
import signal
import subprocess
import sys
import threading

import modelstate
from conftest import SOURCE_DIR

RL_WORKER = os.path.join(SOURCE_DIR, "python", "examples", "rl_worker.py")
WAIT_S = 60


def _lines_of(stream):
    """A queue of the stream's lines, read by a thread; None at its end."""
    lines = queue.Queue()

    def drain():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    return lines


def test_rl_worker_stops_on_ctrl_c_while_its_publisher_has_versions_to_go(daemon, fresh_name):
    name = fresh_name()
    updates = 1000  # 200 s of publishing: far more than the wait below
    worker = subprocess.Popen(
        [sys.executable, RL_WORKER, "--server", daemon.address, "--model", name, "--create",
         "--updates", str(updates)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines_of(worker.stdout)
        refreshed = 0
        while refreshed < 2:  # the CURRENT version and one the publisher loaded
            line = lines.get(timeout=WAIT_S)
            assert line is not None, worker.stderr.read()
            refreshed += line.startswith("version ")
        worker.send_signal(signal.SIGINT)
        # Without the publisher stopping, the interpreter's exit would wait for all its versions.
        assert worker.wait(timeout=WAIT_S) == 130
        assert "Traceback" not in worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=WAIT_S)
    version = modelstate.connect(daemon.address, timeout=30).info(name).model.version
    assert 2 <= version < 1 + updates
