"""refresh's key and shape checks are the daemon's C++ rule (PlanLoad), run on
the local net's layout: each case is held against torch's own load_state_dict.
No daemon is needed."""
import collections

import pytest
import torch
from torch import nn

import modelstate


def described(state):
    """What a manifest gives refresh: (key, kind, dtype, shape) per tensor."""
    return [(key, "parameter", str(t.dtype).replace("torch.", ""), list(t.shape))
            for key, t in state.items()]


def torch_outcome(net, state, strict):
    """torch's error text, or the keys whose tensors load_state_dict wrote."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        net.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        return str(error), None
    written = [k for k, v in net.state_dict().items() if k in state]
    for key, value in before.items():
        net.state_dict()[key].copy_(value)
    return None, written


def ours(net, state, strict):
    try:
        targets = modelstate._load_targets(net, described(state), strict)
    except RuntimeError as error:
        return str(error), None
    return None, list(targets)


class WithScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.body = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        self.skip = None


def cases():
    base = WithScalar().state_dict()
    renamed = collections.OrderedDict(
        ("trunk" + k[4:] if k.startswith("body") else k, v) for k, v in base.items())
    wrong_shape = collections.OrderedDict(base)
    wrong_shape["body.0.weight"] = torch.zeros(4, 2)
    squeezed = collections.OrderedDict(base)
    squeezed["scale"] = torch.ones(1)
    extra = collections.OrderedDict(base)
    extra["cache"] = torch.zeros(3)           # a non-persistent buffer's name
    extra["body"] = torch.zeros(1)            # a child's name
    extra["skip.weight"] = torch.zeros(1)     # under a child that is None
    extra["body.0.nothing"] = torch.zeros(1)  # no such tensor
    return {"equal": base, "renamed": renamed, "wrong_shape": wrong_shape,
            "squeezed": squeezed, "extra": extra}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", list(cases()))
def test_the_cpp_rule_agrees_with_torch(case, strict):
    state = cases()[case]
    assert ours(WithScalar(), state, strict) == torch_outcome(WithScalar(), state, strict)


def test_a_lazy_parameter_takes_any_shape():
    net = nn.Sequential(nn.LazyLinear(4))
    state = {"0.weight": torch.zeros(4, 7), "0.bias": torch.zeros(4)}
    assert ours(net, state, True) == (None, ["0.weight", "0.bias"])


def test_a_dict_of_tensors_is_a_tree_of_its_dotted_keys():
    local = collections.OrderedDict(
        [("a.w", torch.zeros(2)), ("b", torch.zeros(3)), ("a.v", torch.zeros(1))])
    assert ours(local, {"a.w": torch.zeros(2), "b": torch.zeros(3), "a.v": torch.zeros(1)},
                True) == (None, ["b", "a.w", "a.v"])
    error, _ = ours(local, {"a.w": torch.zeros(5), "c": torch.zeros(1)}, True)
    assert error == (
        "Error(s) in loading state_dict for OrderedDict:\n\t"
        'Missing key(s) in state_dict: "b", "a.v". \n\t'
        'Unexpected key(s) in state_dict: "c". \n\t'
        "size mismatch for a.w: copying a param with shape torch.Size([5]) from "
        "checkpoint, the shape in current model is torch.Size([2]).")
