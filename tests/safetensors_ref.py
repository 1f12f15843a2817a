"""An independent safetensors reader and writer in plain Python + numpy.

It shares no code with model/safetensors.cc, so files that pass through both prove the two
implementations agree on the format. Used by tests/torch_oracle.py and by the C++ interop test:

    python3 tests/safetensors_ref.py dump FILE      # prints {"tensors": {name: {dtype, shape, hex}},
                                                   #          "metadata": {...}} as JSON
"""
import json
import struct
import sys

import numpy as np

# safetensors dtype name -> numpy dtype (bfloat16 and float8 travel as raw unsigned ints).
NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "BOOL": np.bool_, "C64": np.complex64, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
SIZE = {k: np.dtype(v).itemsize for k, v in NUMPY.items()}


def write(path, tensors, metadata=None):
    """tensors: list of (name, dtype_name, shape, raw_bytes) in the order to lay them out."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        assert len(raw) == SIZE[dtype] * int(np.prod(shape, dtype=np.int64)), name
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)


def read(path):
    """Returns ({name: (dtype, shape, raw_bytes)}, metadata), validating the layout."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {})
    body = data[8 + n:]
    spans = sorted((info["data_offsets"], name) for name, info in header.items())
    cursor = 0
    for (begin, end), name in spans:
        assert begin == cursor, f"{name}: gap or overlap at {begin}"
        cursor = end
    assert cursor == len(body), "trailing or missing bytes"
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = body[begin:end]
        assert len(raw) == SIZE[info["dtype"]] * int(np.prod(info["shape"], dtype=np.int64)), name
        out[name] = (info["dtype"], info["shape"], raw)
    return out, metadata


def main():
    if len(sys.argv) != 3 or sys.argv[1] != "dump":
        sys.exit("usage: safetensors_ref.py dump FILE")
    tensors, metadata = read(sys.argv[2])
    print(json.dumps({
        "tensors": {k: {"dtype": d, "shape": s, "hex": r.hex()} for k, (d, s, r) in tensors.items()},
        "metadata": metadata,
    }))


if __name__ == "__main__":
    main()
