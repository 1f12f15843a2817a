#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (run from anywhere; rewrites the files it
names, leaves others). Seeds are small valid inputs of each format, plus the reproducers of the
crashes the abuse tests once found, which must stay rejected with an error, not a crash."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, wire_type, payload):
    key = varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + varint(payload)
    if wire_type == 1:
        return key + struct.pack("<Q", payload)
    return key + varint(len(payload)) + payload


def factory_seeds():
    t = "module_factory_fuzz"
    models = os.path.join(ROOT, "tests", "models")
    for name in sorted(os.listdir(models)):
        with open(os.path.join(models, name)) as f:
            write(t, name, json.dumps(json.load(f), separators=(",", ":")))
    layers = [
        {"type": "Linear", "args": [4, 3], "bias": False, "dtype": "float16"},
        {"type": "Conv1d", "args": [3, 6, 4]},
        {"type": "Conv3d", "args": [2, 4, [1, 2, 3]], "groups": 2},
        {"type": "ConvTranspose2d", "args": [4, 6, 3], "groups": 2, "bias": False},
        {"type": "BatchNorm1d", "args": [3], "affine": False},
        {"type": "LayerNorm", "normalized_shape": [4, 5]},
        {"type": "GroupNorm", "args": [2, 6]},
        {"type": "Embedding", "args": [10, 4], "padding_idx": -1},
        {"type": "MultiheadAttention", "args": [8, 2], "kdim": 3, "vdim": 5},
        {"type": "TransformerEncoderLayer", "d_model": 8, "nhead": 2,
         "dim_feedforward": 16},
        {"type": "ModuleDict", "modules": {"a": {"type": "ReLU"},
                                           "b": {"type": "Identity"}}},
        {"type": "Module", "class_name": "Net", "dtype": "bfloat16",
         "parameters": {"w": {"shape": [2, 3], "init": "normal"}},
         "buffers": {"b": {"shape": [3], "dtype": "int64"}}},
    ]
    for i, layer in enumerate(layers):
        write(t, "layer_%02d.json" % i, json.dumps(layer, separators=(",", ":")))
    # A crash once found: Builder::Build <-> the Sequential factory recursed once per level.
    depth = 10000
    write(t, "repro_nested_10000_deep.json",
          '{"type":"Sequential","modules":[' * depth + '{"type":"ReLU"}' + "]}" * depth)
    # A crash once found: signed overflow in the Conv fan-in product before the shape check.
    write(t, "repro_conv_fan_in_overflow.json",
          '{"type":"Conv2d","args":[4,8,[4611686018427387904,4]]}')
    write(t, "repro_conv_transpose_fan_in_overflow.json",
          '{"type":"ConvTranspose1d","args":[3037000500,3037000500,3037000500]}')
    write(t, "repro_attention_overflow.json",
          '{"type":"MultiheadAttention","args":[4611686018427387904,1]}')


def tree_seeds():
    t = "module_tree_fuzz"
    write(t, "net.txt", "\n".join([
        "fc.weight", "fc.bias", "bn.weight", "bn.running_mean", "bn.num_batches_tracked",
        "b bn.running_mean", "b bn.num_batches_tracked", "c =Net", "c fc=Linear",
        "c bn=BatchNorm2d", "c act=ReLU"]))
    write(t, "nested.txt", "encoder.layers.0.attn.in_proj_weight\nencoder.layers.1.w\nhead")
    write(t, "conflict.txt", "a\na.b")
    write(t, "empty_component.txt", "a..b\n.x\ny.")
    # A crash once found: FreezeFlatNode recursed once per dotted component.
    write(t, "repro_key_100000_components.txt", ".".join(["a"] * 100000))
    write(t, "repro_key_too_long.txt", "k" * 5000)


def safetensors_file(tensors, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds():
    t = "safetensors_fuzz"
    write(t, "two_tensors.safetensors", safetensors_file(
        [("w", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
         ("b", "I64", [1], struct.pack("<q", 7))], {"format": "pt"}))
    write(t, "all_dtypes.safetensors", safetensors_file(
        [("t_" + d, d, [2], b"\x01" * (2 * s)) for d, s in [
            ("F64", 8), ("F16", 2), ("BF16", 2), ("I32", 4), ("I16", 2), ("I8", 1),
            ("U8", 1), ("U16", 2), ("U32", 4), ("U64", 8), ("BOOL", 1),
            ("F8_E4M3", 1), ("F8_E5M2", 1)]]))
    write(t, "scalar_and_empty.safetensors", safetensors_file(
        [("s", "F32", [], b"\0\0\x80\x3f"), ("e", "F32", [0, 3], b"")]))
    write(t, "huge_shape.safetensors", safetensors_file(
        [("x", "F32", [4611686018427387904, 4], b"")]))
    write(t, "header_length_huge.bin", struct.pack("<Q", 1 << 62) + b"{}")
    write(t, "short.bin", b"\x02\0\0")


def frame_seeds():
    t = "chunk_frame_fuzz"
    # FuzzedDataProvider takes the slice cuts from the end; a trailing 0 byte means none.
    chunk = field(1, 0, 4096) + field(2, 2, b"abcdefgh" * 4)
    write(t, "chunk.bin", field(2, 2, chunk) + b"\0")
    write(t, "chunk_at_zero.bin", field(2, 2, field(2, 2, b"xyz")) + b"\0")
    write(t, "chunk_data_first.bin", field(2, 2, field(2, 2, b"xyz") + field(1, 0, 3)) + b"\0")
    info = field(1, 2, b"fc.weight") + field(3, 0, 2) + field(4, 2, varint(2) + varint(3)) + \
        field(5, 0, 24) + field(6, 1, 0x0123456789ABCDEF)
    manifest = field(1, 2, b"m") + field(2, 0, 3) + field(3, 2, info) + field(4, 0, 24)
    write(t, "manifest.bin", field(1, 2, manifest) + b"\0")
    write(t, "end.bin", field(3, 2, field(1, 0, 24)) + b"\0")
    write(t, "chunk_sliced.bin", field(2, 2, chunk) + bytes([5, 9, 3]) + b"\x03")


def load_frame_seeds():
    t = "load_frame_fuzz"
    # As frame_seeds: LoadStateDictRequest holds its chunk in field 2 too; trailing cuts.
    chunk = field(1, 0, 4096) + field(2, 2, b"abcdefgh" * 4)
    write(t, "chunk.bin", field(2, 2, chunk) + b"\0")
    write(t, "chunk_at_zero.bin", field(2, 2, field(2, 2, b"xyz")) + b"\0")
    write(t, "empty_chunk.bin", field(2, 2, field(1, 0, 128)) + b"\0")
    write(t, "two_chunks_merged.bin", field(2, 2, chunk) + field(2, 2, field(1, 0, 8)) + b"\0")
    header = field(1, 2, b"victim") + field(2, 0, 1) + field(9, 0, 24)
    write(t, "header.bin", field(1, 2, header) + b"\0")
    write(t, "end.bin", field(3, 2, field(1, 0, 24) + field(2, 2, (12345).to_bytes(8, "little")))
          + b"\0")
    write(t, "chunk_sliced.bin", field(2, 2, chunk) + bytes([5, 9, 3]) + b"\x03")


def convert_seeds():
    t = "convert_fuzz"
    info = field(1, 2, b"bn.running_mean") + field(2, 0, 2) + field(3, 0, 2) + \
        field(4, 2, varint(3)) + field(5, 0, 12)
    header = field(1, 2, b"net") + field(2, 0, 1) + field(4, 2, b"encoder") + \
        field(5, 0, 1) + field(6, 0, 4) + field(7, 0, 1) + field(8, 2, info) + \
        field(9, 0, 12) + field(10, 2, field(1, 2, b"") + field(2, 2, b"Net"))
    write(t, "load_header.bin", b"\x01" + header)
    write(t, "load_header_bad_kind.bin", b"\x01" + field(8, 2, field(2, 0, 99)))
    request = field(1, 2, b"net") + field(2, 2, b"encoder") + field(3, 2, b"encoder.w") + \
        field(4, 0, 1) + field(5, 0, 1) + field(6, 0, 3) + field(7, 0, 4096) + \
        field(8, 0, 1) + field(9, 0, 2)
    write(t, "state_dict_request.bin", b"\x00" + request)
    write(t, "state_dict_request_bad_dtype.bin", b"\x00" + field(6, 0, 1000))


def receiver_seeds():
    t = "chunk_receiver_fuzz"
    # FuzzedDataProvider: bytes from the front are the stream, integers from the back.
    write(t, "empty.bin", b"")
    write(t, "one_tensor.bin", bytes(range(64)) + bytes([3, 1, 2, 2, 0, 0, 1, 1]))
    write(t, "several.bin", bytes(range(200)) * 3 + bytes([7, 9, 40, 3, 2, 1, 5, 4, 4, 3]))


if __name__ == "__main__":
    factory_seeds()
    tree_seeds()
    safetensors_seeds()
    frame_seeds()
    load_frame_seeds()
    convert_seeds()
    receiver_seeds()
