"""dsmoe.MoE (NumPy API): layers loaded from the MoE golden files (Hugging Face names
under a prefix) give the fp64 reference's output and routing; bad input raises
dsmoe's message."""
import os
import tempfile
import threading
import unittest

import numpy as np

import dsmoe
from _util import GOLDEN, MOE_CASES, moe_overrides, read_safetensors, rss_kib


def path(case):
    return os.path.join(GOLDEN, "moe", case + ".safetensors")


class MoETest(unittest.TestCase):
    def test_golden_forward(self):
        for case in MOE_CASES:
            with self.subTest(case=case):
                t, meta = read_safetensors(path(case))
                m = dsmoe.MoE.load(path(case), meta["prefix"],
                                   capacity_factor=float(meta["capacity_factor"]),
                                   **moe_overrides(meta))
                self.assertEqual((m.hidden_size, m.expert_size, m.n_shared),
                                 (int(meta["D"]), int(meta["F"]), int(meta["n_shared"])))
                y, r = m.forward(t["x"], routing=True, threads=1)
                ref = t["y"]
                s = max(1.0, np.max(np.abs(ref)))
                np.testing.assert_allclose(y, ref, rtol=2e-5, atol=3e-6 * s)
                np.testing.assert_array_equal(r["indices"], t["indices"])
                np.testing.assert_allclose(r["weights"], t["weights"], rtol=2e-5, atol=1e-6)
                np.testing.assert_allclose(r["logits"], t["logits"], rtol=2e-5, atol=1e-5)
                self.assertEqual(r["n_dropped"], int(meta["dropped"]))
                y3 = m.forward(t["x"], threads=3)
                self.assertEqual(y.tobytes(), y3.tobytes())

    def test_state_dict_and_save_roundtrip(self):
        t, meta = read_safetensors(path("v3_groups"))
        m = dsmoe.MoE.load(path("v3_groups"), meta["prefix"], **moe_overrides(meta))
        sd = m.state_dict()
        p = meta["prefix"]
        for k, v in sd.items():
            np.testing.assert_array_equal(v, t[p + k], err_msg=k)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "layer.safetensors")
            m.save(f, "model.layers.5.mlp.")
            m2 = dsmoe.MoE.load(f)  # the only layer; its saved routing config
            self.assertEqual(m2.forward(t["x"]).tobytes(), m.forward(t["x"]).tobytes())

    def test_long_input_in_chunks(self):
        t, meta = read_safetensors(path("moonlight"))
        m = dsmoe.MoE.load(path("moonlight"), meta["prefix"], max_tokens=4, **moe_overrides(meta))
        y = m.forward(t["x"])  # 9 tokens, chunks of 4
        np.testing.assert_allclose(y, t["y"], rtol=2e-5, atol=3e-6 * max(1, np.abs(t["y"]).max()))

    def test_threads_own_and_shared_layers(self):
        t, meta = read_safetensors(path("v3_groups"))
        o = moe_overrides(meta)
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal((400, 20)).astype(np.float32) for _ in range(6)]
        m0 = dsmoe.MoE.load(path("v3_groups"), meta["prefix"], **o)
        want = [m0.forward(x, threads=1) for x in xs]
        bad = []

        def work(i):
            # even threads: a layer of their own; odd ones share m0 (its lock
            # serialises their calls)
            m = dsmoe.MoE.load(path("v3_groups"), meta["prefix"], **o) if i % 2 == 0 else m0
            for _ in range(30):
                if m.forward(xs[i], threads=1).tobytes() != want[i].tobytes():
                    bad.append(i)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        self.assertEqual(bad, [])

    def test_no_leak(self):
        t, meta = read_safetensors(path("odd_t1"))
        o = moe_overrides(meta)
        m = dsmoe.MoE.load(path("odd_t1"), meta["prefix"], threads=1, **o)
        x = t["x"]
        for _ in range(200):
            m.forward(x, routing=True, threads=1)
        before = rss_kib()
        for i in range(10000):
            m.forward(x, routing=True, threads=1)
            if i % 50 == 0:
                dsmoe.MoE.load(path("odd_t1"), meta["prefix"], **o)
                b = dsmoe.Balancer(6)
                b.update(np.array([[0, 1]]))
                b.step()
        grown = rss_kib() - before
        self.assertLess(grown, 2048, "RSS grew by %d KiB over 10,000 calls" % grown)

    def test_errors(self):
        t, meta = read_safetensors(path("v3_groups"))
        m = dsmoe.MoE.load(path("v3_groups"), meta["prefix"], **moe_overrides(meta))
        with self.assertRaisesRegex(ValueError, r"x: expected shape \(T, 20\)"):
            m.forward(np.zeros((3, 19), np.float32))
        x = np.array(t["x"])
        x[4, 2] = np.nan
        with self.assertRaisesRegex(ValueError, "token 4"):
            m.forward(x)
        with self.assertRaisesRegex(ValueError, "model.layers.2.mlp.gate.weight. not found"):
            dsmoe.MoE.load(path("v3_groups"), "model.layers.2.mlp.", **moe_overrides(meta))
        with self.assertRaisesRegex(ValueError, "cli_bad_shape|shape"):
            dsmoe.MoE.load(os.path.join(GOLDEN, "moe", "cli_bad_shape.safetensors"))
        with self.assertRaisesRegex(RuntimeError, "nothing_here"):
            dsmoe.MoE.load("nothing_here.safetensors")


if __name__ == "__main__":
    unittest.main()
