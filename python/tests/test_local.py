"""The same-host shared-memory path (modelstated --local_socket) from Python.

The fast-path client is pointed at a TCP port where nothing listens, so every
call that succeeds provably went through the local socket.
"""
import os
import socket
import tempfile

import pytest
import torch

import modelstate
import torch_oracle
from conftest import Daemon

MODELS = dict(torch_oracle.MODELS)


def same(a, b):
    assert list(a.keys()) == list(b.keys())
    for key in a:
        x, y = a[key].detach(), b[key].detach()
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), key


@pytest.fixture(scope="module")
def local_daemon():
    directory = tempfile.mkdtemp(prefix="modelstate-local-", dir=os.environ.get("TMPDIR"))
    path = os.path.join(directory, "modelstated.local")
    d = Daemon(["--local_socket=" + path])
    d.local_socket = path
    yield d
    d.stop()
    assert not os.path.exists(path)
    os.rmdir(directory)


def unused_tcp_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % s.getsockname()[1]


def test_refresh_and_state_dict_through_shared_memory(local_daemon):
    tcp = modelstate.connect(local_daemon.address, timeout=60)
    torch.manual_seed(0)
    server_net = MODELS["llama"]()
    tcp.create("local_llama", server_net)
    expected = tcp.state_dict("local_llama")

    local = modelstate.connect(unused_tcp_address(), timeout=60,
                               local_socket=local_daemon.local_socket)
    same(local.state_dict("local_llama"), expected)
    same(local.state_dict("local_llama", dtype=torch.bfloat16),
         tcp.state_dict("local_llama", dtype=torch.bfloat16))

    torch.manual_seed(1)
    net = MODELS["llama"]()
    pointers = {k: v.data_ptr() for k, v in net.state_dict().items()}
    assert local.refresh("local_llama", net) == 1
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == pointers
    same(net.state_dict(), expected)

    with pytest.raises(modelstate.NotFound):
        local.refresh("no_such_model", net)


def test_absent_socket_falls_back_to_tcp(local_daemon):
    tcp = modelstate.connect(local_daemon.address, timeout=60)
    torch.manual_seed(0)
    tcp.create("local_mlp", MODELS["mlp"]())
    client = modelstate.connect(local_daemon.address, timeout=60,
                                local_socket=local_daemon.local_socket + ".absent")
    same(client.state_dict("local_mlp"), tcp.state_dict("local_mlp"))


def _private_bytes():
    """This process's anonymous memory: its own allocations and the pages it
    copied on write (a mapping's untouched pages are the file's)."""
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["Anonymous"].split()[0]) * 1024


def test_state_dict_through_shared_memory_is_a_copy_on_write_mapping(local_daemon):
    tcp = modelstate.connect(local_daemon.address, timeout=60)
    torch.manual_seed(0)
    big = {"w": torch.randn(8 << 20), "b": torch.randn(16)}  # 32 MiB
    tcp.load_state_dict("local_big", big, create=True)
    local = modelstate.connect(unused_tcp_address(), timeout=60,
                               local_socket=local_daemon.local_socket)
    local.state_dict("local_big")  # The daemon makes its export once.

    before = _private_bytes()
    mapped = local.state_dict("local_big")
    grown = _private_bytes() - before
    same(mapped, big)
    assert grown < (8 << 20), grown  # No private copy of the 32 MiB.

    # Writing a tensor copies only its pages; the daemon's state is untouched.
    mapped["w"][:1024].fill_(7.0)
    assert mapped["w"][0].item() == 7.0
    same(local.state_dict("local_big"), big)
    same(tcp.state_dict("local_big"), big)
