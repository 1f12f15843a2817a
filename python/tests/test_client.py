"""The modelstate Python client against a real modelstated, checked against torch 1.13."""
import collections
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import modelstate
import torch_oracle
from conftest import SOURCE_DIR

MODELS = dict(torch_oracle.MODELS)


def same(a, b):
    """Bitwise equality of two state dicts, key order included."""
    assert list(a.keys()) == list(b.keys())
    for key in a:
        x, y = a[key].detach(), b[key].detach()
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), key


def make(name):
    torch.manual_seed(0)
    return MODELS[name]()


class Net(nn.Module):
    """A custom class, so torch's messages say "for Net:"."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.head = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 3)])


def torch_error(net, state, strict=True):
    with pytest.raises(RuntimeError) as caught:
        net.load_state_dict(state, strict=strict)
    return str(caught.value)


@pytest.mark.parametrize("model", list(MODELS))
def test_round_trip_is_bit_exact_in_torch_key_order(client, fresh_name, model):
    name = fresh_name()
    net = make(model)
    info = client.create(name, net)
    assert info.version == 1 and info.root_class == type(net).__name__
    sd = client.state_dict(name)
    assert isinstance(sd, collections.OrderedDict) and sd.version == 1
    same(sd, net.state_dict())
    manifest = client.info(name)
    assert list(manifest.tensors) == list(net.state_dict())
    for key, tensor in net.state_dict().items():
        described = manifest.tensors[key]
        assert described.dtype == tensor.dtype and described.shape == tensor.shape
        assert described.nbytes == tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("model", list(MODELS))
def test_created_from_spec_has_torch_keys(client, fresh_name, model):
    name = fresh_name()
    spec = open(os.path.join(SOURCE_DIR, "tests", "models", model + ".json")).read()
    assert client.create(name, arch=spec, seed=3).version == 1
    sd = client.state_dict(name)
    expected = make(model).state_dict()
    assert list(sd) == list(expected)
    assert [t.shape for t in sd.values()] == [t.shape for t in expected.values()]


def test_partial_fetches_match_torch(client, fresh_name):
    name = fresh_name()
    net = make("gpt2")
    client.create(name, net)
    sub = net.get_submodule("h.1")
    same(client.state_dict(name, module="h.1", keep_module_prefix=False), sub.state_dict())
    same(client.state_dict(name, module="h.1"), sub.state_dict(prefix="h.1."))
    own = client.state_dict(name, module="h.1.ln_1", recurse=False, keep_module_prefix=False)
    same(own, net.get_submodule("h.1.ln_1").state_dict())
    keys = ["ln_f.bias", "wte.weight"]
    assert list(client.state_dict(name, keys=keys)) == keys
    with pytest.raises(modelstate.NotFound):
        client.state_dict(name, keys=["nope"])
    cnn = fresh_name("_cnn")
    client.create(cnn, make("cnn"))
    params = client.state_dict(cnn, include_buffers=False)
    assert list(params) == [k for k, _ in make("cnn").named_parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_casts_equal_tensor_to(client, fresh_name, dtype):
    name = fresh_name()
    net = make("cnn")
    client.create(name, net)
    cast = client.state_dict(name, dtype=dtype)
    expected = collections.OrderedDict(
        (k, v.to(dtype) if v.is_floating_point() else v) for k, v in net.state_dict().items())
    same(cast, expected)


def test_strict_and_size_errors_equal_torch_text(client, fresh_name):
    name = fresh_name()
    net = Net()
    client.create(name, net)
    good = net.state_dict()
    missing = collections.OrderedDict(list(good.items())[1:])
    extra = collections.OrderedDict(good, unexpected_top=torch.zeros(2))
    wrong = collections.OrderedDict(good)
    wrong["head.0.weight"] = torch.zeros(3, 8)
    for broken in (missing, extra, wrong):
        with pytest.raises(RuntimeError) as caught:
            client.load_state_dict(name, broken)
        assert isinstance(caught.value, modelstate.FailedPrecondition)
        assert str(caught.value) == torch_error(Net(), broken)
    with pytest.raises(RuntimeError) as caught:
        client.load_state_dict(name, wrong, strict=False)
    assert str(caught.value) == torch_error(Net(), wrong, strict=False)
    assert client.info(name).model.version == 1  # every refusal left it alone
    result = client.load_state_dict(name, extra, strict=False)
    assert result.unexpected_keys == ["unexpected_top"] and result.missing_keys == []
    assert result.version == 2
    assert isinstance(result, torch.nn.modules.module._IncompatibleKeys)


def test_refresh_in_place_keeps_data_ptrs_and_equals_load_state_dict(client, fresh_name):
    name = fresh_name()
    server_net = make("llama")
    client.create(name, server_net)
    server_sd = client.state_dict(name)
    for partial in (False, True):
        torch.manual_seed(1)
        local = MODELS["llama"]()
        pointers = {k: v.data_ptr() for k, v in local.state_dict().items()}
        assert client.refresh(name, local, allow_partial_write=partial) == 1
        assert {k: v.data_ptr() for k, v in local.state_dict().items()} == pointers
        expected = MODELS["llama"]()
        expected.load_state_dict(server_sd)
        same(local.state_dict(), expected.state_dict())


def test_refresh_casts_into_the_nets_dtype(client, fresh_name):
    name = fresh_name()
    net = make("transformer")
    client.create(name, net)
    for dtype in (torch.bfloat16, torch.float64):
        local = MODELS["transformer"]().to(dtype)
        client.refresh(name, local)
        expected = collections.OrderedDict((k, v.to(dtype)) for k, v in net.state_dict().items())
        same(local.state_dict(), expected)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _bytes_moved(client, name, net, **kwargs):
    """(version, total bytes the refresh's fetch carried)."""
    totals = []
    version = client.refresh(name, net, progress=lambda done, total: totals.append(total),
                             **kwargs)
    return version, (totals[-1] if totals else 0)


def test_refresh_fetches_only_the_keys_the_target_has(client, fresh_name):
    name = fresh_name()
    net = make("transformer")
    client.create(name, net)
    full = net.state_dict()
    smallest = sorted(full, key=lambda k: full[k].numel())[:3]
    adapter = collections.OrderedDict((k, torch.zeros_like(full[k])) for k in smallest)
    _, moved = _bytes_moved(client, name, adapter, strict=False)
    assert moved == _nbytes(adapter.values())
    assert moved < _nbytes(full.values()) / 4
    same(adapter, collections.OrderedDict((k, full[k]) for k in adapter))
    # Strict: the manifest decides missing and unexpected keys before a byte
    # moves, with torch's text.
    totals = []
    with pytest.raises(RuntimeError) as caught:
        client.refresh(name, adapter, progress=lambda d, t: totals.append(t))
    assert "Unexpected key(s) in state_dict" in str(caught.value)
    assert totals == []


def test_refresh_casts_on_the_server_to_each_tensors_dtype(client, fresh_name):
    name = fresh_name()
    net = make("transformer")
    client.create(name, net)
    stored = _nbytes(net.state_dict().values())
    on_server = MODELS["transformer"]().to(torch.bfloat16)
    _, moved = _bytes_moved(client, name, on_server)
    assert moved == stored // 2
    here = MODELS["transformer"]().to(torch.bfloat16)
    _, moved_here = _bytes_moved(client, name, here, cast_on_server=False)
    assert moved_here == stored
    same(on_server.state_dict(), here.state_dict())
    # Mixed dtypes: each tensor arrives as its own.
    mixed = MODELS["transformer"]()
    first = next(iter(mixed.parameters()))
    first.data = first.data.to(torch.float16)
    client.refresh(name, mixed)
    expected = collections.OrderedDict(
        (k, v.to(mixed.state_dict()[k].dtype)) for k, v in net.state_dict().items())
    same(mixed.state_dict(), expected)


class TiedLM(nn.Module):
    """An embedding shared with the output layer, as language models tie them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight


def test_tied_parameters_are_sent_once_and_refreshed_in_place(client, fresh_name):
    name = fresh_name()
    torch.manual_seed(0)
    net = TiedLM()
    client.create(name, net)
    embedding = net.embed.weight.numel() * 4
    unique = embedding + _nbytes(net.body.parameters())
    local = TiedLM()
    pointer = local.embed.weight.data_ptr()
    for partial in (False, True):
        with torch.no_grad():
            local.embed.weight.zero_()
        _, moved = _bytes_moved(client, name, local, allow_partial_write=partial)
        assert moved == unique
        assert local.head.weight.data_ptr() == local.embed.weight.data_ptr() == pointer
        same(local.state_dict(), net.state_dict())
    # A reader's state dict still has both keys, with equal values.
    fetched = client.state_dict(name)
    assert list(fetched) == list(net.state_dict())
    assert fetched["head.weight"].equal(fetched["embed.weight"])


def test_refresh_errors_equal_torch_and_leave_the_net_alone(client, fresh_name):
    name = fresh_name()
    client.create(name, Net())
    other = nn.Sequential(nn.Linear(4, 8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    server_sd = client.state_dict(name)
    with pytest.raises(RuntimeError) as caught:
        client.refresh(name, other)
    assert str(caught.value) == torch_error(nn.Sequential(nn.Linear(4, 8)), server_sd)
    same(other.state_dict(), before)
    # A submodule refresh: keys relative to it; non-strict fills what matches.
    head = nn.Linear(8, 2)
    client.refresh(name, head, module="head.0")
    same(head.state_dict(), client.state_dict(name, module="head.0", keep_module_prefix=False))
    partial = nn.Module()
    partial.body = nn.Sequential(nn.Linear(4, 8))
    client.refresh(name, partial, strict=False)
    same(partial.body[0].state_dict(),
         client.state_dict(name, module="body.0", keep_module_prefix=False))


def test_watch_sees_current_then_updated(client, fresh_name):
    name = fresh_name()
    net = make("mlp")
    client.create(name, net)
    events = []
    with client.watch(name) as watch:
        events.append(next(watch))
        client.load_state_dict(name, net)
        events.append(next(watch))
    assert events == [modelstate.Event("CURRENT", name, 1), modelstate.Event("UPDATED", name, 2)]
    assert list(watch) == []


def test_min_version_waits_for_the_version_or_raises_unavailable(daemon, client, fresh_name):
    name = fresh_name()
    net = make("mlp")
    client.create(name, net)
    loader = threading.Timer(0.2, lambda: client.load_state_dict(name, net))
    loader.start()
    try:
        fetched = client.state_dict(name, min_version=2)
    finally:
        loader.join()
    assert fetched.version == 2
    assert client.info(name, min_version=2).version == 2
    assert client.refresh(name, make("mlp"), min_version=2) == 2
    with client.watch(name, min_version=2) as watch:
        assert next(watch) == modelstate.Event("CURRENT", name, 2)
    impatient = modelstate.connect(daemon.address, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(modelstate.Unavailable, match="asked for min_version 3"):
        impatient.state_dict(name, min_version=3)
    assert time.monotonic() - start < 0.5
    with pytest.raises(modelstate.Unavailable, match="asked for min_version 3"):
        impatient.info(name, min_version=3)


def test_models_versions_rollback_delete(client, fresh_name):
    name = fresh_name()
    net = make("mlp")
    client.create(name, net)
    with pytest.raises(modelstate.AlreadyExists):
        client.create(name, net)
    first = client.state_dict(name)
    changed = collections.OrderedDict((k, v + 1) for k, v in net.state_dict().items())
    assert client.load_state_dict(name, changed, expected_version=1).version == 2
    with pytest.raises(modelstate.VersionConflict):
        client.load_state_dict(name, changed, expected_version=1)
    assert name in [m.name for m in client.models()]
    assert client.versions(name) == [2, 1]  # the fixture's daemon retains 4
    assert client.rollback(name, 1).version == 3
    same(client.state_dict(name), first)
    with pytest.raises(modelstate.NotFound):
        client.rollback(name, 99)
    client.delete(name)
    with pytest.raises(modelstate.NotFound) as caught:
        client.state_dict(name)
    assert isinstance(caught.value, LookupError) and caught.value.code == "NOT_FOUND"


def test_dtypes_torch_lacks_raise_type_error_naming_the_key(client, fresh_name):
    name = fresh_name()
    values = np.arange(6, dtype=np.uint16)
    float8 = np.array([0x38, 0x40, 0xC0, 0x00], dtype=np.uint8)  # e4m3: 1, 2, -2, 0
    args = {"module": "", "strict": True, "assign": False, "expected_version": 0,
            "create_if_missing": True, "buffer_keys": [], "class_names": {}}
    client._c.load(name, [("counts", "uint16", [6], values.ctypes.data, values.nbytes),
                          ("scale", "float8_e4m3fn", [4], float8.ctypes.data, 4)],
                   args, 0, None)
    with pytest.raises(TypeError, match='"counts" has dtype uint16'):
        client.state_dict(name)
    cast = client.state_dict(name, keys=["scale"], dtype=torch.float32)
    assert cast["scale"].tolist() == [1.0, 2.0, -2.0, 0.0]
    local = {"counts": torch.zeros(6, dtype=torch.int32), "scale": torch.zeros(4)}
    client.refresh(name, local)
    assert local["counts"].tolist() == list(range(6))
    assert local["scale"].tolist() == [1.0, 2.0, -2.0, 0.0]


def big_model(mib):
    return collections.OrderedDict(
        ("w%d" % i, torch.full((mib * 1024 * 1024 // 4 // 8,), float(i))) for i in range(8))


def test_keyboard_interrupt_cancels_and_the_next_call_works(client, fresh_name):
    name = fresh_name()
    state = big_model(64)
    client.load_state_dict(name, state, create=True)
    interrupted = []

    def interrupt_once(done, total):
        if not interrupted:
            interrupted.append(done)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # the waiting thread sees the signal within 50 ms

    with pytest.raises(KeyboardInterrupt):
        client.state_dict(name, chunk_bytes=65536, progress=interrupt_once)
    assert interrupted
    # A load interrupted midway leaves the model unchanged.
    interrupted.clear()
    changed = collections.OrderedDict((k, v + 1) for k, v in state.items())
    with pytest.raises(KeyboardInterrupt):
        client.load_state_dict(name, changed, chunk_bytes=65536, progress=interrupt_once)
    sd = client.state_dict(name)
    assert sd.version == 1
    same(sd, state)
    # refresh, staged: an interrupted refresh leaves the destination alone.
    interrupted.clear()
    local = collections.OrderedDict((k, torch.zeros_like(v)) for k, v in state.items())
    with pytest.raises(KeyboardInterrupt):
        client.refresh(name, local, chunk_bytes=65536, progress=interrupt_once)
    assert all(not v.any() for v in local.values())


def test_two_threads_fetch_concurrently(client, fresh_name):
    name = fresh_name()
    state = big_model(16)
    client.load_state_dict(name, state, create=True)
    results, errors = [None, None], []

    def fetch(i):
        try:
            results[i] = client.state_dict(name)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for r in results:
        same(r, state)


def test_errors_are_error_subclasses_with_codes(client):
    with pytest.raises(modelstate.NotFound) as caught:
        client.info("no_such_model")
    assert isinstance(caught.value, modelstate.Error)
    with pytest.raises(modelstate.InvalidArgument):
        client.create("bad name!", arch="{}")
    unreachable = modelstate.connect("127.0.0.1:1", timeout=5)
    with pytest.raises(modelstate.Unavailable):
        unreachable.models()


def test_rl_worker_example_follows_every_version(daemon, fresh_name):
    import subprocess
    import sys
    name = fresh_name()
    example = os.path.join(SOURCE_DIR, "python", "examples", "rl_worker.py")
    run = subprocess.run(
        [sys.executable, example, "--server", daemon.address, "--model", name, "--create",
         "--updates", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    versions = [int(line.split()[1]) for line in run.stdout.splitlines()
                if line.startswith("version ")]
    assert versions == sorted(versions) and versions[-1] == 4, run.stdout
