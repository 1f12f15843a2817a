"""Generates parity fixtures with real PyTorch (Debian's python3-torch 1.13).

    /usr/bin/python3 tests/torch_oracle.py OUTDIR

writes, for every parity model (whose architecture spec is tests/models/<model>.json),
OUTDIR/<model>.safetensors (torch's state_dict), and OUTDIR/<model>.cases.json: torch's
key order, shapes, dtypes, the keys whose default values are deterministic, and for a set of
broken state dicts (each in its own .safetensors file) torch's exact error text or its
missing/unexpected lists plus the state after a successful load. It also writes
OUTDIR/conversions.safetensors + conversions.json: inputs and torch's copy_ results for the
dtype conversions. Files are written with tests/safetensors_ref.py, not with our writer.
"""
import json
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_ref  # noqa: E402

ST_NAME = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}


def raw_bytes(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def save(path, state, order=None):
    keys = order if order is not None else list(state.keys())
    safetensors_ref.write(path, [(k, ST_NAME[state[k].dtype], list(state[k].shape), raw_bytes(state[k]))
                                 for k in keys])


# --- Parity models: torch constructors (specs in tests/models/) -------------------------------------

def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))





def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))





class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.packed = nn.MultiheadAttention(16, 4)
        self.separate = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, add_bias_kv=True)





def transformer():
    return nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32)





class Conv1D(nn.Module):  # Hugging Face's GPT-2 projection: weight is [in, out].
    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(nf))


class GPT2Attention(nn.Module):
    def __init__(self, h, n_pos):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos),
                             persistent=False)
        self.c_attn = Conv1D(3 * h, h)
        self.c_proj = Conv1D(h, h)


class GPT2MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.c_fc = Conv1D(4 * h, h)
        self.c_proj = Conv1D(h, 4 * h)


class GPT2Block(nn.Module):
    def __init__(self, h, n_pos):
        super().__init__()
        self.ln_1 = nn.LayerNorm(h)
        self.attn = GPT2Attention(h, n_pos)
        self.ln_2 = nn.LayerNorm(h)
        self.mlp = GPT2MLP(h)


class GPT2Model(nn.Module):
    def __init__(self, vocab=50, n_pos=16, h=8, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(n_pos, h)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([GPT2Block(h, n_pos) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(h)





class RMSNorm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))


class LlamaAttention(nn.Module):
    def __init__(self, h, heads, kv_heads, head_dim):
        super().__init__()
        self.q_proj = nn.Linear(h, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(h, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(h, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, h, bias=False)
        self.register_buffer("inv_freq", torch.ones(head_dim // 2), persistent=False)


class LlamaMLP(nn.Module):
    def __init__(self, h, inter):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, h, heads, kv_heads, head_dim, inter):
        super().__init__()
        self.self_attn = LlamaAttention(h, heads, kv_heads, head_dim)
        self.mlp = LlamaMLP(h, inter)
        self.input_layernorm = RMSNorm(h)
        self.post_attention_layernorm = RMSNorm(h)


class LlamaModel(nn.Module):
    def __init__(self, vocab, h, heads, kv_heads, head_dim, inter, layers):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([LlamaDecoderLayer(h, heads, kv_heads, head_dim, inter)
                                     for _ in range(layers)])
        self.norm = RMSNorm(h)


class LlamaForCausalLM(nn.Module):
    def __init__(self, vocab=64, h=16, heads=4, kv_heads=2, head_dim=4, inter=40, layers=2):
        super().__init__()
        self.model = LlamaModel(vocab, h, heads, kv_heads, head_dim, inter, layers)
        self.lm_head = nn.Linear(h, vocab, bias=False)





# Each torch model's architecture spec is tests/models/<name>.json, shared with the C++ tests.
MODELS = [
    ("mlp", mlp),
    ("cnn", cnn),
    ("attention", Attention),
    ("transformer", transformer),
    ("gpt2", GPT2Model),
    ("llama", LlamaForCausalLM),
]


# --- Broken state dicts ---------------------------------------------------------------------

def broken_cases(reference):
    """Yields (case name, state dict) variants of a model's state dict."""
    keys = list(reference.keys())
    yield "exact", dict(reference)
    dropped = dict(reference)
    del dropped[keys[0]]
    del dropped[keys[-1]]
    yield "missing", dropped
    extra = dict(reference)
    extra["unexpected_top"] = torch.zeros(2)
    first_child = keys[0].split(".")[0] if "." in keys[0] else None
    if first_child:
        extra[first_child + ".bogus"] = torch.zeros(1)
        extra[first_child + "x.weight"] = torch.zeros(1)
    yield "unexpected", extra
    if first_child:
        # torch 1.13 ignores a key that names a child module.
        child_key = dict(reference)
        child_key[first_child] = torch.zeros(1)
        yield "child_key", child_key
    mismatched = dict(reference)
    two_d = [k for k in keys if reference[k].dim() >= 1]
    for k in (two_d[0], two_d[-1]):
        shape = list(reference[k].shape)
        shape[0] += 1
        mismatched[k] = torch.zeros(shape, dtype=reference[k].dtype)
    yield "size_mismatch", mismatched
    combined = dict(mismatched)
    del combined[keys[1]]
    combined["zzz.extra"] = torch.zeros(3)
    yield "combined", combined
    wide = {k: (v.double() if v.is_floating_point() else v) for k, v in reference.items()}
    yield "float64", wide
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in reference.items()}
    yield "float16", half
    scalars = {k: (v.reshape(1) if v.dim() == 0 else v) for k, v in reference.items()}
    if any(v.dim() == 0 for v in reference.values()):
        yield "scalar_as_shape_1", scalars
        no_count = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
        yield "old_batchnorm", no_count


def outcome(make, state, strict):
    torch.manual_seed(1)
    model = make()
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
            "after": model.state_dict()}


def submodule_load(out, name, model):
    """A strict load into the model's first child that torch refuses: its message names the
    child's class ("for Linear:")."""
    child = next(c for c, m in model.named_children() if m.state_dict())
    state = dict(model.get_submodule(child).state_dict())
    keys = list(state)
    if len(keys) > 1:
        del state[keys[-1]]
    shape = list(state[keys[0]].shape)
    shape[0] += 1
    state[keys[0]] = torch.zeros(shape, dtype=state[keys[0]].dtype)
    file = f"{name}.submodule_load.safetensors"
    save(os.path.join(out, file), state)
    try:
        model.get_submodule(child).load_state_dict(state)
    except RuntimeError as error:
        return {"module": child, "file": file, "error": str(error)}
    raise AssertionError(f"{name}: the bad submodule load was accepted")


def model_fixtures(out, name, make):
    torch.manual_seed(0)
    model = make()
    reference = model.state_dict()
    torch.manual_seed(12345)
    other = make().state_dict()
    deterministic = [k for k in reference if torch.equal(reference[k], other[k])]
    save(os.path.join(out, f"{name}.safetensors"), reference)
    cases = []
    for case, state in broken_cases(reference):
        file = f"{name}.{case}.safetensors"
        save(os.path.join(out, file), state)
        entry = {"name": case, "file": file}
        for strict in (True, False):
            result = outcome(make, state, strict)
            tag = "strict" if strict else "loose"
            if "after" in result:
                after_file = f"{name}.{case}.{tag}.after.safetensors"
                save(os.path.join(out, after_file), result.pop("after"))
                result["after_file"] = after_file
            entry[tag] = result
        cases.append(entry)
    buffers = dict(model.named_buffers())
    manifest = {
        "class": type(model).__name__,
        "class_names": {path: type(m).__name__ for path, m in model.named_modules()},
        "buffers": [k for k in reference if k in buffers],
        "submodule_load": submodule_load(out, name, model),
        "keys": list(reference.keys()),
        "shapes": [list(v.shape) for v in reference.values()],
        "dtypes": [ST_NAME[v.dtype] for v in reference.values()],
        "deterministic": deterministic,
        "cases": cases,
    }
    with open(os.path.join(out, f"{name}.cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)


# --- Dtype conversions ----------------------------------------------------------------------

def special_floats():
    bits = np.array([
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,  # 0, inf, NaN
        0x00000001, 0x00400000, 0x007FFFFF, 0x80000001,  # float32 subnormals
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0xBF808000,  # bfloat16 ties
        0x7F7FFFFF, 0x7F7F8000, 0x477FE000, 0x477FF000, 0x477FEFFF,  # overflow edges
        0x33800000, 0x33000000, 0x33C00000, 0x38800000, 0x387FC000,  # float16 subnormal edges
        0x3F801000, 0x3F803000, 0x3F800800,  # float16 ties near 1
    ], dtype=np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    randoms = np.concatenate([
        rng.standard_normal(4000).astype(np.float32),
        (rng.standard_normal(2000) * 1e-5).astype(np.float32),
        (rng.standard_normal(2000) * 1e4).astype(np.float32),
        rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ])
    return np.concatenate([bits, randoms])


def conversion_fixtures(out):
    f32 = torch.from_numpy(special_floats())
    finite = f32[torch.isfinite(f32)]
    all16 = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    f64 = torch.from_numpy(np.random.default_rng(1).standard_normal(5000) * 1e3)
    f64 = torch.cat([f64, torch.tensor([1.0 + 2**-11 + 2**-40, 2**-149, 1e300, -1e-300])])
    small = torch.from_numpy(np.random.default_rng(2).uniform(-300, 300, 5000).astype(np.float32))
    int64 = torch.tensor([0, 1, -1, 2**24 + 1, 2**53 + 1, 2**63 - 1, -2**63, 123456789012345],
                         dtype=torch.int64)
    bools = torch.tensor([True, False, True])
    cases = [
        ("f32_to_bf16", f32, torch.bfloat16),
        ("f32_to_f16", f32, torch.float16),
        ("bf16_to_f32", all16.view(torch.bfloat16), torch.float32),
        ("f16_to_f32", all16.view(torch.float16), torch.float32),
        ("f64_to_f32", f64, torch.float32),
        ("f64_to_f16", f64, torch.float16),
        ("f64_to_bf16", f64, torch.bfloat16),
        ("f32_to_f64", f32, torch.float64),
        ("f16_to_bf16", all16.view(torch.float16), torch.bfloat16),
        ("f32_to_i32", small, torch.int32),
        ("f32_to_i64", finite[finite.abs() < 9e18], torch.int64),
        ("f32_to_i16", small, torch.int16),
        ("f32_to_i8", small[small.abs() < 128], torch.int8),
        ("f32_to_u8", small[(small > -1) & (small < 256)], torch.uint8),
        ("f32_to_bool", f32, torch.bool),
        ("i64_to_f32", int64, torch.float32),
        ("i64_to_f16", int64[int64.abs() < 60000], torch.float16),
        ("i64_to_f64", int64, torch.float64),
        ("bool_to_f32", bools, torch.float32),
        ("i32_to_i8", torch.arange(-1000, 1000, dtype=torch.int32), torch.int8),
        ("f32_to_c64", f32[:100], torch.complex64),
        ("c64_to_f32", torch.complex(f32[:100], f32[100:200]), torch.float32),
    ]
    tensors, manifest = [], []
    for name, src, dtype in cases:
        dst = src.to(dtype)
        tensors.append((f"{name}.src", ST_NAME[src.dtype], list(src.shape), raw_bytes(src)))
        tensors.append((f"{name}.dst", ST_NAME[dst.dtype], list(dst.shape), raw_bytes(dst)))
        manifest.append({"name": name, "from": ST_NAME[src.dtype], "to": ST_NAME[dst.dtype]})
    safetensors_ref.write(os.path.join(out, "conversions.safetensors"), tensors)
    with open(os.path.join(out, "conversions.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    for name, make in MODELS:
        model_fixtures(out, name, make)
    conversion_fixtures(out)
    with open(os.path.join(out, "torch_version.txt"), "w") as f:
        f.write(torch.__version__)


if __name__ == "__main__":
    main()
