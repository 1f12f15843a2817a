"""Fixtures: a real modelstated subprocess on 127.0.0.1, port 0, and clients of it.

The daemon binary comes from $MODELSTATED (CTest sets it) or build/server/modelstated.
"""
import os
import queue
import re
import subprocess
import sys
import threading

import pytest

SOURCE_DIR = os.environ.get(
    "MODELSTATE_SOURCE_DIR",
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(SOURCE_DIR, "tests"))  # torch_oracle's models

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


class Daemon:
    """modelstated as a child process; its stderr is drained by a thread."""

    def __init__(self, extra_args=()):
        binary = os.environ.get(
            "MODELSTATED", os.path.join(SOURCE_DIR, "build", "server", "modelstated"))
        self.process = subprocess.Popen(
            [binary, "--listen=127.0.0.1:0", "--demo_model=", "--log_rpcs=false",
             "--retain_versions=4",
             *extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = self._wait_for_port()

    def _drain(self):
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_port(self):
        while True:
            try:
                line = self.lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                self.stop()
                raise RuntimeError("modelstated printed no port in %d s" % START_TIMEOUT_S)
            if line is None:
                raise RuntimeError("modelstated exited: " + "".join(self.log))
            match = re.search(r"serving on port (\d+)", line)
            if match:
                return int(match.group(1))

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def daemon():
    d = Daemon()
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    import modelstate
    return modelstate.connect(daemon.address, timeout=120)


@pytest.fixture
def fresh_name(request):
    """A model name of this test's own, deleted afterwards if it exists."""
    import modelstate
    names = []

    def make(suffix=""):
        name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name) + suffix
        names.append(name)
        return name

    yield make
    d = request.getfixturevalue("daemon")
    c = modelstate.connect(d.address, timeout=30)
    for name in names:
        try:
            c.delete(name)
        except modelstate.NotFound:
            pass
