"""Runs the shell and Python blocks of README.md and docs/*.md, so that they stay true.

Every code block must be fenced with a language. ```sh, ```bash and ```python blocks run, each
against a modelstated of its own on 127.0.0.1 (port 0; the documented 127.0.0.1:50551 is
rewritten to it), in a scratch directory that holds the source tree's top-level entries and
`build` (the build tree), with /tmp/ rewritten to a scratch /tmp/ of its own. Shell blocks run
with `set -e -o pipefail`, then wait for their background jobs. A line ending in
`# fails: CODE ...` must fail, with CODE on its stderr. Blocks in other languages (text, json,
yaml, c++) are not run.

An HTML comment on the line before a block says otherwise, always with a reason:

    <!-- docs-test: cluster REASON -->   needs a Kubernetes cluster or several hosts. Checked:
                                         it parses, every repository path its commands name exists, and
                                         every manifest it applies is one that
                                         deploy/validate-manifests.sh validates (an overlay or
                                         an example under deploy/k8s/).
    <!-- docs-test: skip REASON -->      runs elsewhere or is illustrative; checked as above
                                         but not run, and reported as skipped with REASON.
    <!-- docs-test: daemon FLAGS -->     runs, against a daemon started with these flags too.

Environment (CTest sets it): MODELSTATE_SOURCE_DIR, MODELSTATE_BUILD_DIR, MODELSTATED, and
MODELSTATE_PYTHON_DIR (build/python) when the Python client is built.
"""
import glob
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

SOURCE_DIR = os.environ.get(
    "MODELSTATE_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_DIR = os.environ.get("MODELSTATE_BUILD_DIR", os.path.join(SOURCE_DIR, "build"))
MODELSTATED = os.environ.get("MODELSTATED", os.path.join(BUILD_DIR, "server", "modelstated"))
PYTHON_DIR = os.environ.get("MODELSTATE_PYTHON_DIR", "")

DOCUMENTED_ADDRESS = "127.0.0.1:50551"
RUN_LANGUAGES = {"sh": "shell", "bash": "shell", "python": "python"}
OTHER_LANGUAGES = {"text", "json", "yaml", "c++"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(\S+)\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
EXPECTED_FAILURE = re.compile(r"^(\s*)(\S.*?)\s+# fails: ([A-Z_]+)\b.*$")
REPOSITORY_PATH = re.compile(
    r"(?<![\w/.$-])((?:access|bench|client|cmake|common|deploy|docs|fuzz|model|proto|python|"
    r"server|store|tests|tools|transfer)/[\w./-]*[\w])")
KUBECTL_MANIFEST = re.compile(r"\bkubectl\b[^\n]*?\s(?:-k|-f|kustomize)\s+(?!-\s)(\S+)")
BLOCK_TIMEOUT_S = 180
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20

# Run before every shell block: `fails:` lines call this.
SHELL_PROLOGUE = r"""set -e -o pipefail
expect_failure() {  # CODE COMMAND...: COMMAND must fail and name CODE on stderr
  local code="$1" err
  shift
  err="$(mktemp)"
  if "$@" 2>"$err"; then
    echo "docs-test: expected $code from: $*" >&2
    return 1
  fi
  cat "$err" >&2
  grep -q -- "$code" "$err" || { echo "docs-test: no $code from: $*" >&2; return 1; }
}
"""
SHELL_EPILOGUE = '\nfor job in $(jobs -p); do wait "$job"; done\n'


class Block:
    def __init__(self, path, line, language, text, marker):
        self.path, self.line, self.language, self.text = path, line, language, text
        self.verb, self.argument = marker if marker else ("run", "")

    @property
    def id(self):
        return "%s:%d" % (os.path.relpath(self.path, SOURCE_DIR), self.line)


def documents():
    return [os.path.join(SOURCE_DIR, "README.md")] + sorted(
        glob.glob(os.path.join(SOURCE_DIR, "docs", "*.md")))


def parse(path):
    """(fenced blocks, problems): each block with the marker on the line before it, if any."""
    blocks, problems = [], []
    lines = open(path, encoding="utf-8").read().split("\n")
    where = os.path.relpath(path, SOURCE_DIR)
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            if _starts_indented_block(lines, i):
                problems.append("%s:%d: an indented code block; fence it with a language"
                                % (where, i + 1))
            i += 1
            continue
        start, language = i, fence.group(1)
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            problems.append("%s:%d: a fence that is never closed" % (where, start + 1))
            break
        marker = MARKER.match(lines[start - 1].strip()) if start > 0 else None
        block = Block(path, start + 1, language, "\n".join(lines[start + 1:i]) + "\n",
                      marker.groups() if marker else None)
        problems.extend(_problems_of(block, where))
        blocks.append(block)
        i += 1
    return blocks, problems


def _starts_indented_block(lines, i):
    """An indented code block starts after a blank line that follows unindented prose (in a
    list item, indented lines are the item's paragraphs)."""
    if not lines[i].startswith("    ") or not lines[i].strip() or i == 0 or lines[i - 1].strip():
        return False
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    prose = lines[j] if j >= 0 else ""
    return not prose.startswith((" ", "\t")) and not re.match(r"^([-*+]|\d+\.)\s", prose)


def _problems_of(block, where):
    at = "%s:%d" % (where, block.line)
    if block.language not in RUN_LANGUAGES and block.language not in OTHER_LANGUAGES:
        return ["%s: fence language %r: use one of %s" % (
            at, block.language, ", ".join(sorted(set(RUN_LANGUAGES) | OTHER_LANGUAGES)))]
    if block.verb not in ("run", "cluster", "skip", "daemon"):
        return ["%s: unknown docs-test marker %r" % (at, block.verb)]
    if block.verb != "run" and block.language not in RUN_LANGUAGES:
        return ["%s: a docs-test marker on a %s block, which never runs" % (at, block.language)]
    if block.verb != "run" and not block.argument:
        return ["%s: docs-test %s needs a reason or flags" % (at, block.verb)]
    return []


def all_blocks():
    blocks = []
    for path in documents():
        blocks.extend(parse(path)[0])
    return [b for b in blocks if b.language in RUN_LANGUAGES]


def test_every_block_is_fenced_with_a_known_language_and_marker():
    problems = []
    for path in documents():
        problems.extend(parse(path)[1])
    assert not problems, "\n".join(problems)


def test_blocks_were_found():
    verbs = {b.verb for b in all_blocks()}
    assert {"run", "cluster", "skip"} <= verbs, verbs


@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b.id)
def test_block(block, tmp_path):
    check_syntax(block)
    check_repository_paths(block)
    if block.verb == "cluster":
        check_manifests(block)
        return
    if block.verb == "skip":
        pytest.skip("%s: %s" % (block.id, block.argument))
    if (block.language == "python" or "import modelstate" in block.text) and not PYTHON_DIR:
        pytest.skip("%s: built without the Python client (MODELSTATE_BUILD_PYTHON=OFF)" % block.id)
    run(block, tmp_path)


def check_syntax(block):
    if RUN_LANGUAGES[block.language] == "python":
        compile(block.text, block.id, "exec")
        return
    parsed = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True,
                            timeout=30)
    assert parsed.returncode == 0, "%s does not parse: %s" % (block.id, parsed.stderr)


def check_repository_paths(block):
    """Paths in commands, not in comments (which may name what a command writes)."""
    commands = re.sub(r"(^|\s)#.*", "", block.text, flags=re.M)
    missing = [p for p in REPOSITORY_PATH.findall(commands)
               if not glob.glob(os.path.join(SOURCE_DIR, p))]
    assert not missing, "%s names paths that do not exist: %s" % (block.id, missing)


def check_manifests(block):
    """Every manifest a cluster block applies is one that deploy/validate-manifests.sh
    renders and validates (test deploy_manifests)."""
    validated = ([os.path.join("deploy", "k8s", "overlays", os.path.basename(d.rstrip("/")))
                  for d in glob.glob(os.path.join(SOURCE_DIR, "deploy/k8s/overlays/*/"))] +
                 [os.path.relpath(f, SOURCE_DIR)
                  for f in glob.glob(os.path.join(SOURCE_DIR, "deploy/k8s/examples/*.yaml"))])
    for manifest in KUBECTL_MANIFEST.findall(block.text):
        if manifest.startswith("deploy/"):
            assert os.path.normpath(manifest) in validated, (
                "%s applies %s, which deploy/validate-manifests.sh does not validate"
                % (block.id, manifest))


def run(block, tmp_path):
    work = make_workspace(tmp_path)
    extra_flags = shlex.split(block.argument) if block.verb == "daemon" else []
    daemon = Daemon(extra_flags, cwd=work)
    try:
        text = block.text.replace(DOCUMENTED_ADDRESS, daemon.address)
        text = re.sub(r"(?<![\w.])/tmp/", os.path.join(work, "tmp") + "/", text)
        if RUN_LANGUAGES[block.language] == "python":
            command = [sys.executable, "-c", text]
        else:
            command = ["bash", "-c", SHELL_PROLOGUE + expect_failures(text) + SHELL_EPILOGUE]
        output, status = run_bounded(command, work)
        assert status == 0, "%s exited with %s:\n%s\ndaemon:\n%s" % (
            block.id, status, output, "".join(daemon.log))
        assert daemon.process.poll() is None, "%s: the daemon died:\n%s" % (
            block.id, "".join(daemon.log))
    finally:
        daemon.stop()


def expect_failures(text):
    return "\n".join(EXPECTED_FAILURE.sub(r"\1expect_failure \3 \2", line)
                     for line in text.split("\n"))


def make_workspace(tmp_path):
    """A directory that looks like the source tree with its build in `build`, where blocks
    may write files of their own."""
    work = str(tmp_path / "work")
    os.makedirs(os.path.join(work, "tmp"))
    for entry in os.listdir(SOURCE_DIR):
        if entry not in ("build", ".git"):
            os.symlink(os.path.join(SOURCE_DIR, entry), os.path.join(work, entry))
    os.symlink(BUILD_DIR, os.path.join(work, "build"))
    return work


def run_bounded(command, cwd):
    """(stdout and stderr, exit status) of command in its own process group, killed with its
    children after BLOCK_TIMEOUT_S."""
    env = dict(os.environ)
    if PYTHON_DIR:
        env["PYTHONPATH"] = PYTHON_DIR
    env["TMPDIR"] = os.path.join(cwd, "tmp")
    env["PYTHONUNBUFFERED"] = "1"  # what a killed block printed is in the report
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
        return output + "\n(killed after %d s)" % BLOCK_TIMEOUT_S, "timeout"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # background jobs it left behind
        except ProcessLookupError:
            pass
    return output, process.returncode


class Daemon:
    """modelstated on 127.0.0.1, port 0, with the built-in demo model."""

    def __init__(self, extra_flags, cwd):
        self.process = subprocess.Popen(
            [MODELSTATED, "--listen=127.0.0.1:0", "--demo_model=demo", "--log_rpcs=false",
             *extra_flags],
            cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.log, lines = [], queue.Queue()

        def drain():
            for line in self.process.stderr:
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        self.address = "127.0.0.1:%d" % self._port(lines)

    def _port(self, lines):
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                self.stop()
                raise RuntimeError("modelstated printed no port in %d s" % START_TIMEOUT_S)
            if line is None:
                raise RuntimeError("modelstated exited: " + "".join(self.log))
            match = re.search(r"serving on port (\d+)", line)
            if match:
                return int(match.group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
