"""Shared helpers of the Python tests: where the golden files and the CLI are, and
the router golden cases' config.txt as dsmoe.route overrides."""
import importlib.util
import os
import unittest

import numpy as np

SOURCE = os.environ.get("DSMOE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDEN = os.path.join(SOURCE, "tests", "golden")
CLI = os.environ.get("DSMOE_CLI") or os.path.join(SOURCE, "build", "dsmoe")

# found without importing it (torch takes seconds to import: only its tests pay that)
HAVE_TORCH = importlib.util.find_spec("torch") is not None

needs_torch = unittest.skipUnless(
    HAVE_TORCH, "python3-torch is not installed (apt-get install python3-torch; "
    "scripts/install-deps.sh installs it for the tests)")


def router_cases():
    with open(os.path.join(GOLDEN, "router", "MANIFEST")) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith("#")]


def read_config(case):
    """(overrides for dsmoe.route, the raw key/value dict) of a router golden case."""
    kv = {}
    with open(os.path.join(GOLDEN, "router", case, "config.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                kv[k.strip()] = v.strip()
    o = {"experts": int(kv["experts"]), "groups": int(kv["groups"]),
         "topk_groups": int(kv["topk_groups"]), "top_k": int(kv["top_k"]),
         "score": kv["score"], "mask": kv["mask"], "normalize": kv["normalize"] == "1",
         "norm_eps": float(kv["norm_eps"]), "scale": float(kv["scale"]),
         "use_bias": kv["use_bias"] == "1", "precision": kv["precision"]}
    o["group_score"] = "max" if kv["group_score"] == "max" else "top%ssum" % kv["group_topm"]
    if "nonfinite" in kv:
        o["nonfinite"] = kv["nonfinite"]
    return o, kv


def load(case, name):
    return np.load(os.path.join(GOLDEN, "router", case, name))


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def read_safetensors(path):
    """(tensors as NumPy arrays, metadata) of a safetensors file (F64, F32, I32, I64,
    BF16 as uint16), read with the standard library and NumPy only."""
    import json
    import struct
    dt = {"F64": np.float64, "F32": np.float32, "I32": np.int32, "I64": np.int64,
          "BF16": np.uint16, "F16": np.float16, "U8": np.uint8}
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        out[name] = np.frombuffer(data[base + b:base + e], dtype=dt[t["dtype"]]).reshape(t["shape"]).copy()
    return out, meta


def moe_overrides(meta):
    """dsmoe router overrides from a MoE golden file's metadata."""
    return {"experts": int(meta["E"]), "top_k": int(meta["K"]), "groups": int(meta["G"]),
            "topk_groups": int(meta["TG"]), "score": meta["score"],
            "group_score": "max" if meta["group_score"] == "max" else "top%ssum" % meta["group_topm"],
            "mask": meta["mask"], "normalize": meta["normalize"] == "1",
            "norm_eps": float(meta["norm_eps"]), "scale": float(meta["scale"]),
            "use_bias": meta["use_bias"] == "1"}


MOE_CASES = ["v3_groups", "moonlight", "v2_softmax", "odd_t1", "hf_zero_mask", "capacity",
             "decode_t8"]
