"""Benchmarks the Python client (python/) against the C++ client it wraps and
against a grpcio client, in one run (docs/performance.md, "Python client").

A modelstated subprocess on 127.0.0.1 (port 0) serves one float32 model of
--tensors tensors and --model_mib MiB. Each repetition runs every contender
once, in a rotated order, each in a fresh process (so each one's peak RSS is
its own):

  cpp.state_dict     Client::StateDict into fresh memory (modelstate_bench
                     fetch-loop ... state-dict)
  cpp.into           Client::StateDictInto into preallocated, touched memory,
                     staged (allow_partial_write=false)
  cpp.into_partial   the same, written in place (allow_partial_write=true)
  py.state_dict      c.state_dict(model)
  py.refresh         c.refresh(model, net), allow_partial_write=False
  py.refresh_partial c.refresh(model, net, allow_partial_write=True)
  py.state_dict_local c.state_dict(model) through the same-host socket
                     (local_socket), after one untimed fetch that has the
                     daemon make its export; reports the growth of the
                     process's anonymous memory too (0 when the tensors are
                     the mapping, the model's size for a private copy)
  py.refresh_again   c.refresh(model, net) once untimed, then timed: the
                     steady state of a worker (its staging memory is the
                     client's already), against py.refresh, a process's first
  grpcio.refresh     grpcio with stubs generated at run time by
                     python3-grpc-tools' protoc: reads the stream, copies each
                     chunk into net's tensors and verifies every tensor's XXH3
                     (python3-xxhash) as the C++ client does

Every Python worker resets its peak RSS (/proc/self/clear_refs <- 5) after its
setup and reads VmHWM after the timed call. Ratios are per repetition (the
contenders of one repetition ran back to back), reported min-median-max.

Usage: bench/python_bench.sh [--model_mib=1024] [--tensors=16] [--reps=5]
                             [--out=bench/results/python]
"""
import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
PROTO = "proto/modelstate/v1/model_state.proto"
CONTENDERS = ["cpp.state_dict", "cpp.into", "cpp.into_partial", "py.state_dict",
              "py.refresh", "py.refresh_partial", "py.refresh_again",
              "py.state_dict_local", "grpcio.refresh"]
CPP_MODES = {"cpp.state_dict": "state-dict", "cpp.into": "into",
             "cpp.into_partial": "into-partial"}
WORKER_TIMEOUT_S = 300


# ---------------------------------------------------------------- workers --

def _peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def _anonymous_bytes():
    """Anonymous memory of this process: its allocations and copied-on-write
    pages, not the pages a mapping of the daemon's export shares."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Anonymous in /proc/self/smaps_rollup")


def _net_for(shapes):
    """An nn.Module holding one zeroed (touched) float32 parameter per key, as
    a worker's model whose weights refresh overwrites."""
    import torch
    net = torch.nn.Module()
    for name, shape in shapes:
        net.register_parameter(
            name, torch.nn.Parameter(torch.zeros(shape), requires_grad=False))
    return net


def _report(seconds, nbytes, extra=None):
    out = {"gbps": nbytes / seconds / 1e9, "seconds": seconds,
           "hwm": _status_bytes("VmHWM")}
    out.update(extra or {})
    print(json.dumps(out), flush=True)


def worker_local(address, model, local_socket):
    import modelstate
    manifest = modelstate.connect(address).info(model)
    nbytes = sum(t.nbytes for t in manifest.tensors.values())
    c = modelstate.connect(address, local_socket=local_socket)
    del c.state_dict(model)[next(iter(manifest.tensors))]  # the export
    anonymous = _anonymous_bytes()
    rss_base = _status_bytes("VmRSS")
    _peak_rss_reset()
    start = time.monotonic()
    sd = c.state_dict(model)
    seconds = time.monotonic() - start
    assert len(sd) == len(manifest.tensors)
    _report(seconds, nbytes, {"rss_before": rss_base, "rss_base": rss_base,
                              "anonymous": _anonymous_bytes() - anonymous})


def worker_modelstate(mode, address, model):
    import modelstate
    c = modelstate.connect(address)
    manifest = c.info(model)  # opens the connection outside the timing
    nbytes = sum(t.nbytes for t in manifest.tensors.values())
    rss_base = _status_bytes("VmRSS")  # interpreter, torch, the client
    net = None
    if mode != "py.state_dict":
        net = _net_for((k, t.shape) for k, t in manifest.tensors.items())
        pointers = [p.data_ptr() for p in net.parameters()]
    if mode == "py.refresh_again":
        c.refresh(model, net)
    rss_before = _status_bytes("VmRSS")
    _peak_rss_reset()
    start = time.monotonic()
    if net is None:
        sd = c.state_dict(model)
        seconds = time.monotonic() - start
        assert len(sd) == len(manifest.tensors)
    else:
        c.refresh(model, net, allow_partial_write=mode == "py.refresh_partial")
        seconds = time.monotonic() - start
        assert pointers == [p.data_ptr() for p in net.parameters()]
    _report(seconds, nbytes, {"rss_before": rss_before, "rss_base": rss_base})


def worker_grpcio(address, model, stubs):
    import grpc
    import torch
    import xxhash
    sys.path.insert(0, stubs)
    import model_state_pb2 as pb
    import model_state_pb2_grpc as pb_grpc

    stub = pb_grpc.ModelStateStub(grpc.insecure_channel(address))
    described = stub.GetModel(pb.GetModelRequest(model=model)).tensors
    rss_base = _status_bytes("VmRSS")  # interpreter, torch, grpcio
    net = _net_for((t.name, list(t.shape)) for t in described)
    nbytes = sum(t.num_bytes for t in described)
    rss_before = _status_bytes("VmRSS")
    _peak_rss_reset()
    start = time.monotonic()
    _grpcio_refresh(stub, pb, model, dict(net.named_parameters()), xxhash)
    seconds = time.monotonic() - start
    _report(seconds, nbytes, {"rss_before": rss_before, "rss_base": rss_base})


def _grpcio_refresh(stub, pb, model, params, xxhash):
    """Streams StateDict and copies each chunk into `params`' memory (one
    memcpy per piece, through a writable byte view of each tensor), verifying
    each tensor's XXH3 as its last byte arrives; raises on any mismatch."""
    views = {k: memoryview(p.detach().numpy()).cast("B")
             for k, p in params.items()}
    tensors, index, filled, hasher, ended = [], 0, 0, None, False
    for response in stub.StateDict(pb.StateDictRequest(model=model)):
        kind = response.WhichOneof("kind")
        if kind == "manifest":
            tensors = list(response.manifest.tensors)
            hasher = xxhash.xxh3_64()
        elif kind == "chunk":
            data = memoryview(response.chunk.data)
            while len(data):
                info = tensors[index]
                take = min(len(data), info.num_bytes - filled)
                views[info.name][filled:filled + take] = data[:take]
                hasher.update(data[:take])
                filled += take
                data = data[take:]
                if filled == info.num_bytes:
                    if hasher.intdigest() != info.xxh3_64:
                        raise RuntimeError("checksum mismatch: " + info.name)
                    index, filled = index + 1, 0
                    hasher = xxhash.xxh3_64()
        else:
            ended = True
    if not ended or index != len(tensors):
        raise RuntimeError("stream ended early")


# ----------------------------------------------------------------- driver --

class Daemon:
    """modelstated on 127.0.0.1, port 0; its stderr drained by a thread."""

    def __init__(self, binary, local_socket):
        self.process = subprocess.Popen(
            [binary, "--listen=127.0.0.1:0", "--demo_model=",
             "--log_rpcs=false", "--retain_versions=1",
             "--local_socket=" + local_socket],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            match = re.search(r"serving on port (\d+)", line)
            if match:
                self.address = "127.0.0.1:" + match.group(1)
                return
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("modelstated did not start")

    def _drain(self, lines):
        """Keeps reading stderr so the daemon never blocks on a full pipe; an
        empty line marks its end."""
        for line in self.process.stderr:
            lines.put(line)
        lines.put("")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def create_model(address, model, tensors, model_bytes):
    import modelstate
    import torch
    elements = model_bytes // 4 // tensors
    net = torch.nn.Module()
    for i in range(tensors):
        net.register_parameter("w%d" % i, torch.nn.Parameter(
            torch.rand(elements), requires_grad=False))
    modelstate.connect(address).create(model, net)
    return elements * 4 * tensors


def generate_stubs(directory):
    """grpcio stubs from our proto with python3-grpc-tools' protoc."""
    proto_dir = os.path.dirname(PROTO)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I" + proto_dir,
                    "--python_out=" + directory,
                    "--grpc_python_out=" + directory,
                    os.path.basename(PROTO)], check=True)


def run_contender(name, args, address, stubs):
    if name in CPP_MODES:
        command = [args.bench_binary, "fetch-loop", address, args.model, "1",
                   CPP_MODES[name]]
    else:
        command = [sys.executable, __file__, "--worker=" + name,
                   "--address=" + address, "--model=" + args.model,
                   "--stubs=" + stubs, "--local_socket=" + args.local_socket]
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         timeout=WORKER_TIMEOUT_S).stdout.strip().splitlines()
    if name in CPP_MODES:
        return {"gbps": float(out[-1].split()[1])}
    return json.loads(out[-1])


def summarize(samples):
    return (statistics.median(samples), min(samples), max(samples))


def build_rows(samples, model_bytes):
    """The report: throughputs, per-repetition ratios and peak RSS."""
    rows = []
    gbps = {k: [s["gbps"] for s in v] for k, v in samples.items()}
    figures = {
        "cpp.state_dict": "C++ Client::StateDict, fresh memory",
        "cpp.into": "C++ Client::StateDictInto, preallocated, staged",
        "cpp.into_partial": "C++ Client::StateDictInto, preallocated, in place",
        "py.state_dict": "Python c.state_dict(model)",
        "py.refresh": "Python c.refresh(model, net)",
        "py.refresh_partial":
            "Python c.refresh(model, net, allow_partial_write=True)",
        "py.refresh_again": "Python c.refresh(model, net), the second in a "
                            "process",
        "py.state_dict_local": "Python c.state_dict(model) through the "
                               "same-host socket (a mapping)",
        "grpcio.refresh": "grpcio client into net's tensors, XXH3 verified",
    }
    for name in CONTENDERS:
        rows.append((name, figures[name], "GB/s", gbps[name], None))
    ratios = [
        ("py.state_dict/cpp", "py.state_dict", "cpp.state_dict", 0.95),
        ("py.refresh/cpp", "py.refresh", "cpp.into", 0.95),
        ("py.refresh_partial/cpp", "py.refresh_partial", "cpp.into_partial",
         0.95),
        ("py.refresh/grpcio", "py.refresh", "grpcio.refresh", 1.5),
        ("py.refresh_first/again", "py.refresh", "py.refresh_again", None),
        ("py.refresh_partial/grpcio", "py.refresh_partial", "grpcio.refresh",
         1.5),
    ]
    for rid, num, den, limit in ratios:
        per_rep = [a / b for a, b in zip(gbps[num], gbps[den])]
        rows.append((rid, "%s / %s, per repetition" % (num, den), "ratio",
                     per_rep, (">=", limit) if limit else None))
    anonymous = [s["anonymous"] / MiB for s in samples["py.state_dict_local"]]
    rows.append(("anon.py.state_dict_local", "anonymous memory the "
                 "shared-memory state_dict added (a private copy would add "
                 "the model)", "MiB", anonymous, ("<=", 64)))
    # The target bounds the process's peak; the runtime's own RSS (Debian's
    # python3 with torch imported, ~235 MiB before any tensor) is reported
    # apart, and the peak is also judged net of it (the data path's share).
    limit = (1.05 * model_bytes + 64 * MiB) / MiB
    for name in ["py.state_dict", "py.refresh", "py.refresh_partial",
                 "grpcio.refresh"]:
        target = ("<=", limit) if name.startswith("py.refresh") else None
        hwm = [s["hwm"] / MiB for s in samples[name]]
        base = [s["rss_base"] / MiB for s in samples[name]]
        rows.append(("rss." + name, "peak RSS of the process, " + name,
                     "MiB", hwm, target))
        rows.append(("rss-base." + name, "peak RSS minus the runtime's RSS "
                     "before the model's tensors, " + name, "MiB",
                     [h - b for h, b in zip(hwm, base)], target))
        rows.append(("base." + name, "runtime's RSS: interpreter, torch, "
                     "client, " + name, "MiB", base, None))
    return rows


def verdict(value, target):
    if target is None:
        return ""
    op, limit = target
    return "met" if (value >= limit if op == ">=" else value <= limit) \
        else "missed"


def to_markdown(rows):
    out = ["| id | figure | median | min | max | unit | target | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    for rid, figure, unit, samples, target in rows:
        med, lo, hi = summarize(samples)
        out.append("| %s | %s | %.3f | %.3f | %.3f | %s | %s | %s |" % (
            rid, figure, med, lo, hi, unit,
            "%s %.3f" % target if target else "", verdict(med, target)))
    return "\n".join(out) + "\n"


def to_json(rows):
    result = []
    for rid, figure, unit, samples, target in rows:
        med, lo, hi = summarize(samples)
        result.append({"id": rid, "figure": figure, "unit": unit,
                       "median": med, "min": lo, "max": hi,
                       "samples": len(samples), "values": samples,
                       "target": "%s %.3f" % target if target else "",
                       "verdict": verdict(med, target)})
    return result


def drive(args):
    work = tempfile.mkdtemp(prefix="pybench-")
    args.local_socket = os.path.join(work, "modelstated.local")
    daemon = Daemon(args.daemon_binary, args.local_socket)
    try:
        model_bytes = create_model(daemon.address, args.model, args.tensors,
                                   args.model_mib * MiB)
        samples = {name: [] for name in CONTENDERS}
        with tempfile.TemporaryDirectory(prefix="pybench-stubs-") as stubs:
            generate_stubs(stubs)
            for rep in range(args.reps):
                shift = rep % len(CONTENDERS)
                for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                    sample = run_contender(name, args, daemon.address, stubs)
                    samples[name].append(sample)
                    print("rep %d %-20s %.3f GB/s" % (rep, name,
                                                      sample["gbps"]),
                          file=sys.stderr, flush=True)
    finally:
        daemon.stop()
        os.rmdir(work)
    rows = build_rows(samples, model_bytes)
    table = to_markdown(rows)
    header = "Model: %d float32 tensors, %d MiB; %d repetitions.\n\n" % (
        args.tensors, model_bytes // MiB, args.reps)
    print(header + table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(header + table)
        with open(args.out + ".json", "w") as f:
            json.dump({"model_bytes": model_bytes, "tensors": args.tensors,
                       "reps": args.reps, "rows": to_json(rows)}, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_mib", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default="pybench")
    parser.add_argument("--out", default="bench/results/python")
    parser.add_argument("--build_dir", default="build")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--stubs", help=argparse.SUPPRESS)
    parser.add_argument("--local_socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "grpcio.refresh":
        return worker_grpcio(args.address, args.model, args.stubs)
    if args.worker == "py.state_dict_local":
        return worker_local(args.address, args.model, args.local_socket)
    if args.worker:
        return worker_modelstate(args.worker, args.address, args.model)
    args.bench_binary = os.path.join(args.build_dir, "bench", "modelstate_bench")
    args.daemon_binary = os.path.join(args.build_dir, "server", "modelstated")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
