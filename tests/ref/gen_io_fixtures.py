#!/usr/bin/env python3
"""Generates the file-format fixtures read by tests/test_npy.c and
tests/test_safetensors.c, and the fuzzing seed corpora.

    /usr/bin/python3 tests/ref/gen_io_fixtures.py     # from the repository root

Writes tests/golden/io/*.npy and *.safetensors, fuzz/seeds/npy/*,
fuzz/seeds/safetensors/* and fuzz/seeds/layer/*. Needs only NumPy and the standard library; the outputs
are committed, so ctest never runs Python.

.npy files come from NumPy itself (np.save / np.lib.format.write_array), plus a
few hand-made headers. Safetensors files come from the small writer below, written
from the format description independently of dsmoe (json + struct only). It lays
files out as the reference implementation does: tensors sorted by element size
(descending) then name, data contiguous, compact JSON header with "__metadata__"
first, padded with spaces to a multiple of 8.

Element values (i = flat index), mirrored by the C tests:
    v(i)  = ((7*i) % 23 - 11) * 0.25          F32, BF16 (its top 16 bits), F16
    F64   = v(i) / 3
    I32   = ((7*i) % 23 - 11) * 100000 + i
    I64   = ((7*i) % 23 - 11) * 10**10 + i
    U8    = (37*i + 5) % 256
"""
import json
import os
import struct

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden", "io")
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def values(kind, shape):
    n = int(np.prod(shape, dtype=np.int64))
    i = np.arange(n, dtype=np.int64)
    base = (7 * i) % 23 - 11
    if kind == "F32":
        a = (base * 0.25).astype(np.float32)
    elif kind == "F16":
        a = (base * 0.25).astype(np.float16)
    elif kind == "BF16":  # bf16 words: the top half of the fp32 bits (exact here)
        a = ((base * 0.25).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    elif kind == "F64":
        a = base * 0.25 / 3.0
    elif kind == "I32":
        a = (base * 100000 + i).astype(np.int32)
    elif kind == "I64":
        a = base * 10**10 + i
    elif kind == "U8":
        a = ((37 * i + 5) % 256).astype(np.uint8)
    else:
        raise ValueError(kind)
    return a.reshape(shape)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def npy_bytes(a, version=None, fortran=False):
    import io
    buf = io.BytesIO()
    if fortran:
        a = np.asfortranarray(a)
    np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


def npy_handmade(header, data, align=16):
    """A version 1.0 file with the given header dict text, padded like NumPy < 1.23
    (16-byte alignment, no growth room)."""
    h = header.encode("latin1")
    pad = align - (10 + len(h) + 1) % align
    h += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


def gen_npy():
    files = {
        # name: bytes; readers must accept these
        "f32_3x4.npy": npy_bytes(values("F32", (3, 4))),
        "f32_v2_2x3.npy": npy_bytes(values("F32", (2, 3)), version=(2, 0)),
        "f32_v3_2x3.npy": npy_bytes(values("F32", (2, 3)), version=(3, 0)),
        "f32_2x1x3x2.npy": npy_bytes(values("F32", (2, 1, 3, 2))),
        "f32_scalar.npy": npy_bytes(values("F32", ())),
        "f32_0x3.npy": npy_bytes(values("F32", (0, 3))),
        "i32_5.npy": npy_bytes(values("I32", (5,))),
        "i64_2x3.npy": npy_bytes(values("I64", (2, 3))),
        "f64_7.npy": npy_bytes(values("F64", (7,))),
        "f16_3x3.npy": npy_bytes(values("F16", (3, 3))),
        "u8_2x5.npy": npy_bytes(values("U8", (2, 5))),
        "bf16_2x3.npy": npy_bytes(values("BF16", (2, 3))),  # '<u2'
        "f32_legacy16_4.npy": npy_handmade(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
            values("F32", (4,)).tobytes()),
        # readers must reject these with FORMAT
        "bad_fortran_3x4.npy": npy_bytes(values("F32", (3, 4)), fortran=True),
        "bad_bigendian_3.npy": npy_bytes(values("F32", (3,)).astype(">f4")),
        "bad_bool_3.npy": npy_bytes(np.array([True, False, True])),
        "bad_struct_2.npy": npy_bytes(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])),
    }
    for name, data in files.items():
        write(os.path.join(GOLDEN, name), data)
    for name in ["f32_3x4.npy", "f32_v2_2x3.npy", "f32_scalar.npy", "f32_0x3.npy",
                 "bf16_2x3.npy", "u8_2x5.npy", "bad_fortran_3x4.npy", "bad_struct_2.npy"]:
        write(os.path.join(SEEDS, "npy", name), files[name])


ELEM = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1}


def st_bytes(tensors, metadata=None, ensure_ascii=False, indent=None, align_each=1,
             reverse_keys=False):
    """tensors: list of (name, kind, shape) or (name, kind, shape, array) with the
    values given. Reference layout unless align_each > 1 (then each tensor starts at
    a multiple of align_each, leaving gaps)."""
    order = sorted(tensors, key=lambda t: (-ELEM[t[1]], t[0]))
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for t in order:
        name, kind, shape = t[:3]
        while off % align_each:
            blobs.append(b"\0")
            off += 1
        data = (t[3] if len(t) > 3 else values(kind, shape)).tobytes()
        entry = {"dtype": kind, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        if reverse_keys:
            entry = dict(reversed(list(entry.items())))
        header[name] = entry
        blobs.append(data)
        off += len(data)
    sep = (",", ":") if indent is None else (", ", ": ")
    text = json.dumps(header, ensure_ascii=ensure_ascii, indent=indent, separators=sep)
    h = text.encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


# One tensor per dtype, ranks 0..4, odd sizes, one empty tensor.
ST_TENSORS = [
    ("a.f64", "F64", (3,)),
    ("b.i64", "I64", (2, 2)),
    ("c.f32", "F32", (2, 3, 5)),
    ("d.i32", "I32", ()),
    ("e.bf16", "BF16", (1, 2, 3, 1)),
    ("f.f16", "F16", (5,)),
    ("g.u8", "U8", (3, 1)),
    ("h.empty", "F32", (0, 3)),
    ("i.u8", "U8", (7,)),
]


def gen_safetensors():
    files = {
        "st_ref.safetensors": st_bytes(ST_TENSORS, {"format": "pt", "dsmoe": "fixture"}),
        # Every JSON escape, non-ASCII names, pretty-printed, keys reversed, and
        # 8-byte-aligned tensors with gaps between them (dsmoe reads those).
        "st_escapes.safetensors": st_bytes(
            [("emb.\u00e9\U0001F600", "F32", (2, 2)), ("q\"uote\\back", "U8", (3,)),
             ("s", "BF16", (3,))],
            {"note": "tab\there\nnewline \"q\" \\ /", "\u00e9t\u00e9": "\U0001F600"},
            ensure_ascii=True, indent=1, align_each=8, reverse_keys=True),
        "st_empty.safetensors": st_bytes([]),
    }
    for name, data in files.items():
        write(os.path.join(GOLDEN, name), data)
        write(os.path.join(SEEDS, "safetensors", name), data)
    # Seeds one mutation away from overlapping ranges (same-size neighbours whose
    # offsets can be copied over each other) and from overflowing shapes.
    seeds = {
        "seed_u8s.safetensors": st_bytes([("a", "U8", (4,)), ("b", "U8", (4,)), ("c", "U8", (4,)),
                                          ("z", "U8", (0,))], {"k": "v"}),
        "seed_zero_big.safetensors": st_bytes([("t", "F32", (0, 2**40)), ("u", "F64", (1, 2**20, 0))]),
    }
    for name, data in seeds.items():
        write(os.path.join(SEEDS, "safetensors", name), data)


def layer_tensors(E, D, F, n_shared, kind, prefix="", bias=True, balancer=True):
    """A DeepSeek-V3 MoE layer in Hugging Face names (what dsmoe_moe_load_safetensors
    reads), optionally with the balancer's state under gate. (dsmoe_balancer_read)."""
    small = lambda shape, k: (values(k, shape).astype(np.float32) * 0.1).astype(np.float32) \
        if k == "F32" else values(k, shape)
    t = [(prefix + "gate.weight", kind, (E, D), small((E, D), kind))]
    for e in range(E):
        t += [(prefix + f"experts.{e}.gate_proj.weight", kind, (F, D), small((F, D), kind)),
              (prefix + f"experts.{e}.up_proj.weight", kind, (F, D), small((F, D), kind)),
              (prefix + f"experts.{e}.down_proj.weight", kind, (D, F), small((D, F), kind))]
    if n_shared:
        S = n_shared * F
        t += [(prefix + "shared_experts.gate_proj.weight", kind, (S, D), small((S, D), kind)),
              (prefix + "shared_experts.up_proj.weight", kind, (S, D), small((S, D), kind)),
              (prefix + "shared_experts.down_proj.weight", kind, (D, S), small((D, S), kind))]
    if bias:
        b = (np.arange(E, dtype=np.float32) - E / 2) * 0.01
        t.append((prefix + "gate.e_score_correction_bias", "F32", (E,), b.astype(np.float32)))
    if balancer:
        # format 1, E experts, sign rule, no re-centring, no rate switch, 3 steps,
        # 96 tokens, none pending; rates: gamma, gamma_after, last gamma
        state = np.array([1, E, 0, 0, 0, 3, 96, 0], dtype=np.int64)
        rates = np.array([0.001, 0.001, 0.001], dtype=np.float32)
        counts = np.arange(3 * E, dtype=np.int64).reshape(3, E) % 7
        t += [(prefix + "gate.balancer.state", "I64", (8,), state),
              (prefix + "gate.balancer.rates", "F32", (3,), rates),
              (prefix + "gate.balancer.counts", "I64", (3, E), counts)]
    return t


def gen_layer_seeds():
    """Seeds of fuzz_layer: small layers a mutation away from every check of the
    layer's and the balancer's load paths."""
    meta = {"format": "pt", "dsmoe.format_version": "1"}
    seeds = {
        "layer_f32_shared.safetensors": st_bytes(layer_tensors(4, 8, 4, 1, "F32"), meta),
        "layer_bf16_prefix.safetensors": st_bytes(
            layer_tensors(4, 8, 2, 0, "BF16", prefix="model.layers.1.mlp.", bias=False,
                          balancer=False)),
        "layer_f16_two_shared.safetensors": st_bytes(layer_tensors(2, 4, 2, 2, "F16"), meta),
    }
    for name, data in seeds.items():
        write(os.path.join(SEEDS, "layer", name), data)


if __name__ == "__main__":
    gen_npy()
    gen_safetensors()
    gen_layer_seeds()
    print("wrote", GOLDEN, "and", SEEDS)
