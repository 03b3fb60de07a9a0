"""dsmoe.route / route_hidden / router_backward: the router golden cases of the fp64
reference (tests/golden/router), the CLI's outputs bit for bit, finite-difference
gradients, bad input raising dsmoe's message, no copies of ready arrays, no leak, and
several Python threads at once."""
import os
import subprocess
import tempfile
import threading
import unittest

import numpy as np

import dsmoe
from _util import CLI, load, read_config, router_cases, rss_kib


def close(got, ref, rtol, atol=1e-30):
    got = np.asarray(got, np.float64)
    return np.all(np.abs(got - ref) <= rtol * np.abs(ref) + atol), np.max(np.abs(got - ref))


class GoldenTest(unittest.TestCase):
    def test_router_golden_cases(self):
        n = 0
        for case in router_cases():
            o, kv = read_config(case)
            with self.subTest(case=case):
                bias = load(case, "bias.npy") if o["use_bias"] else None
                if kv["input"] == "hidden":
                    gate = load(case, "gate_weight.npy")
                    idx, w, s, lg, c = dsmoe.route_hidden(load(case, "hidden.npy"), gate, bias,
                                                          scores=True, logits=True,
                                                          counts=True, **o)
                    rtol = 2e-5
                else:
                    idx, w, s, c = dsmoe.route(load(case, "logits.npy"), bias, scores=True,
                                               counts=True, **o)
                    rtol = 2e-6
                self.assertEqual(idx.dtype, np.int32)
                self.assertEqual(w.dtype, np.float32)
                np.testing.assert_array_equal(idx, load(case, "indices.npy"))
                ok, err = close(w, load(case, "weights.npy"), rtol)
                self.assertTrue(ok, "weights differ by %g" % err)
                ok, err = close(s, load(case, "scores.npy"), rtol,
                                1e-7 if kv["input"] == "hidden" else 1e-30)
                self.assertTrue(ok, "scores differ by %g" % err)
                np.testing.assert_array_equal(
                    c, np.bincount(idx.ravel(), minlength=o["experts"]))
                # backward from the reference's scores and indices
                dref = load(case, "dlogits.npy")
                d = dsmoe.router_backward(load(case, "dweights.npy"), load(case, "indices.npy"),
                                          load(case, "scores.npy").astype(np.float32), **o)
                amax = np.max(np.abs(dref), axis=1, keepdims=True)
                self.assertTrue(np.all(np.abs(d - dref) <= 1e-5 * np.abs(dref) + 1e-35 + 1e-6 * amax))
                n += 1
        self.assertGreaterEqual(n, 30)

    def test_presets_match_config_txt(self):
        for case in ("preset_deepseek_v3", "preset_moonlight", "preset_deepseek_v2",
                     "preset_mixtral", "preset_qwen_moe", "preset_deepseek_v3_hf"):
            o, kv = read_config(case)
            bias = load(case, "bias.npy") if o["use_bias"] else None
            a = dsmoe.route(load(case, "logits.npy"), bias, preset=kv["preset"])
            b = dsmoe.route(load(case, "logits.npy"), bias, **o)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


class CliTest(unittest.TestCase):
    def run_cli(self, args, outs):
        with tempfile.TemporaryDirectory() as d:
            paths = [os.path.join(d, n + ".npy") for n in outs]
            argv = [CLI, "route", "--threads", "1"] + args
            for n, p in zip(outs, paths):
                argv += ["--out-" + n, p]
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            return [np.load(p) for p in paths]

    def test_equal_to_cli_bits(self):
        rng = np.random.default_rng(5)
        with tempfile.TemporaryDirectory() as d:
            x = rng.standard_normal((37, 64)).astype(np.float32)
            b = (0.01 * rng.standard_normal(64)).astype(np.float32)
            np.save(os.path.join(d, "x.npy"), x)
            np.save(os.path.join(d, "b.npy"), b)
            flags = ["--preset", "moonlight", "--groups", "4", "--topk-groups", "2",
                     "--group-score", "top2sum", "--top-k", "5", "--scale", "1.5"]
            ci, cw, cs = self.run_cli(["--logits", os.path.join(d, "x.npy"), "--bias",
                                       os.path.join(d, "b.npy")] + flags,
                                      ["indices", "weights", "scores"])
            pi, pw, ps = dsmoe.route(x, b, preset="moonlight", groups=4, topk_groups=2,
                                     group_score="top2sum", top_k=5, scale=1.5, scores=True)
            np.testing.assert_array_equal(pi, ci)
            self.assertEqual(pw.tobytes(), cw.tobytes())
            self.assertEqual(ps.tobytes(), cs.tobytes())
            # hidden input, bf16 precision, zero mask, no bias
            h = rng.standard_normal((9, 33)).astype(np.float32)
            g = (0.2 * rng.standard_normal((256, 33))).astype(np.float32)
            np.save(os.path.join(d, "h.npy"), h)
            np.save(os.path.join(d, "g.npy"), g)
            ci, cw, cl = self.run_cli(["--hidden", os.path.join(d, "h.npy"), "--gate-weight",
                                       os.path.join(d, "g.npy"), "--precision", "bf16",
                                       "--mask", "zero", "--no-bias"],
                                      ["indices", "weights", "logits"])
            pi, pw, pl = dsmoe.route_hidden(h, g, precision="bf16", mask="zero",
                                            use_bias=False, logits=True)
            np.testing.assert_array_equal(pi, ci)
            self.assertEqual(pw.tobytes(), cw.tobytes())
            self.assertEqual(pl.tobytes(), cl.tobytes())


class GradTest(unittest.TestCase):
    """dL/dlogits of L = Σ c ⊙ weights against central differences in float64 around
    the float32 kernel, on perturbations that keep the chosen experts."""

    def check(self, **o):
        rng = np.random.default_rng(11)
        E = o.get("experts", 16)
        x = rng.standard_normal((6, E)).astype(np.float32)
        idx, w, s = dsmoe.route(x, scores=True, **o)
        cw = rng.standard_normal(w.shape).astype(np.float32)
        g = dsmoe.router_backward(cw, idx, s, **o)
        h = 1e-2
        checked = 0
        for t in range(x.shape[0]):
            for e in range(E):
                xp, xm = x.astype(np.float64), x.astype(np.float64)
                xp[t, e] += h
                xm[t, e] -= h
                ip, wp = dsmoe.route(xp, **o)
                im, wm = dsmoe.route(xm, **o)
                if not (np.array_equal(ip, idx) and np.array_equal(im, idx)):
                    continue  # the choice changed: not differentiable there
                fd = (np.sum(cw.astype(np.float64) * wp) - np.sum(cw.astype(np.float64) * wm)) / (2 * h)
                self.assertAlmostEqual(g[t, e], fd, delta=2e-3 + 2e-3 * abs(fd),
                                       msg="token %d expert %d" % (t, e))
                checked += 1
        self.assertGreater(checked, x.size // 2)

    def test_sigmoid_groups_normalized(self):
        self.check(experts=16, groups=4, topk_groups=2, top_k=4)

    def test_softmax(self):
        self.check(preset="mixtral", experts=12, top_k=3)

    def test_sigmoid_unnormalized(self):
        self.check(experts=16, groups=1, topk_groups=1, top_k=3, normalize=False, scale=1.7)


class ErrorTest(unittest.TestCase):
    def test_bad_shapes(self):
        x = np.zeros((3, 255), np.float32)
        with self.assertRaisesRegex(ValueError, r"logits: expected shape \(T, 256\)"):
            dsmoe.route(x)
        with self.assertRaisesRegex(ValueError, r"bias: expected shape \(256,\)"):
            dsmoe.route(np.zeros((3, 256), np.float32), np.zeros(8, np.float32))
        with self.assertRaisesRegex(ValueError, "logits: expected shape"):
            dsmoe.route(np.zeros((2, 3, 256), np.float32))
        with self.assertRaisesRegex(ValueError, "gate_weight"):
            dsmoe.route_hidden(np.zeros((2, 8), np.float32), np.zeros((255, 8), np.float32))
        with self.assertRaisesRegex(ValueError, "hidden: expected shape"):
            dsmoe.route_hidden(np.zeros((2, 7), np.float32), np.zeros((256, 8), np.float32))

    def test_bad_dtypes(self):
        with self.assertRaisesRegex(ValueError, "logits: expected real numbers"):
            dsmoe.route(np.zeros((1, 256), np.complex64))
        with self.assertRaisesRegex(ValueError, "logits: expected real numbers"):
            dsmoe.route(np.array([["a"] * 256]))
        with self.assertRaisesRegex(ValueError, "bias: expected real numbers"):
            dsmoe.route(np.zeros((1, 256), np.float32), np.zeros(256, bool))

    def test_bad_configs_carry_dsmoe_message(self):
        with self.assertRaisesRegex(ValueError, "n_groups"):
            dsmoe.route(np.zeros((1, 256), np.float32), groups=7)
        with self.assertRaisesRegex(ValueError, "top_k"):
            dsmoe.route(np.zeros((1, 256), np.float32), top_k=200)
        with self.assertRaisesRegex(ValueError, "deepseek-v3"):
            dsmoe.route(np.zeros((1, 256), np.float32), preset="nope")
        with self.assertRaisesRegex(ValueError, "score: unknown value 'tanh'"):
            dsmoe.route(np.zeros((1, 256), np.float32), score="tanh")
        with self.assertRaisesRegex(TypeError, "unknown router override 'topk'"):
            dsmoe.route(np.zeros((1, 256), np.float32), topk=3)
        with self.assertRaisesRegex(ValueError, "use_bias = 0"):
            dsmoe.route(np.zeros((1, 8), np.float32), np.zeros(8, np.float32), preset="mixtral")

    def test_nonfinite_names_the_token(self):
        x = np.zeros((4, 256), np.float32)
        x[2, 17] = np.nan
        with self.assertRaisesRegex(ValueError, r"token 2.*expert 17"):
            dsmoe.route(x)
        idx, w = dsmoe.route(x, nonfinite="sanitize")
        self.assertEqual(idx.shape, (4, 8))

    def test_error_changes_nothing(self):
        x = np.zeros((4, 256), np.float32)
        x[3, 0] = np.inf
        d = np.ones((4, 256), np.float32)
        with self.assertRaises(ValueError):
            dsmoe.router_backward(np.zeros((4, 7), np.float32), np.zeros((4, 8), np.int32),
                                  np.zeros((4, 256), np.float32), dlogits=d)
        self.assertTrue(np.all(d == 1))


class InterfaceTest(unittest.TestCase):
    def test_no_copy_and_conversion(self):
        x = np.random.default_rng(1).standard_normal((5, 256))
        a = dsmoe.route(x)                       # float64: converted once
        b = dsmoe.route(x.astype(np.float32))    # in place
        c = dsmoe.route(np.asfortranarray(x.astype(np.float32)))  # not C-contiguous
        d = dsmoe.route(x.astype(np.float32).tolist())
        for r in (b, c, d):
            np.testing.assert_array_equal(a[0], r[0])
            np.testing.assert_array_equal(a[1], r[1])
        one = dsmoe.route(x[0].astype(np.float32))  # one token as a vector
        np.testing.assert_array_equal(one[0], a[0][:1])

    def test_call_forms_agree(self):
        """The C fast path (ready arrays, default preset or a RouterConfig) and the
        Python path (everything else) give the same results and the same errors."""
        rng = np.random.default_rng(6)
        x = rng.standard_normal((7, 256)).astype(np.float32)
        b = (0.1 * rng.standard_normal(256)).astype(np.float32)
        cfg = dsmoe.router_config("deepseek-v3")
        want = dsmoe.route(x.astype(np.float64), b.astype(np.float64))  # Python path
        for r in (dsmoe.route(x, b), dsmoe.route(x, bias=b), dsmoe.route(x, b, "deepseek-v3"),
                  dsmoe.route(x, b, preset=cfg), dsmoe.route(logits=x, bias=b),
                  dsmoe.route(x, b, threads=np.int64(1)), dsmoe.route(x, b, scale=2.5),
                  dsmoe.route(x, b, threads=2, scores=True, counts=True)[:2]):
            np.testing.assert_array_equal(r[0], want[0])
            self.assertEqual(r[1].tobytes(), want[1].tobytes())
        with self.assertRaises(TypeError):
            dsmoe.route()
        with self.assertRaises(TypeError):
            dsmoe.route(x, b, bias=b)
        with self.assertRaisesRegex(ValueError, "router overrides cannot change a RouterConfig"):
            dsmoe.route(x, b, preset=cfg, top_k=4)

    def test_empty_batch(self):
        idx, w = dsmoe.route(np.zeros((0, 256), np.float32))
        self.assertEqual(idx.shape, (0, 8))

    def test_threads_arg_same_bits(self):
        x = np.random.default_rng(2).standard_normal((300, 256)).astype(np.float32)
        a = dsmoe.route(x, threads=1)
        b = dsmoe.route(x, threads=2)
        self.assertEqual(a[1].tobytes(), b[1].tobytes())

    def test_no_leak_over_10000_calls(self):
        x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
        b = np.zeros(256, np.float32)
        for _ in range(500):
            dsmoe.route(x, b, scores=True, counts=True)
        before = rss_kib()
        for _ in range(10000):
            dsmoe.route(x, b, scores=True, counts=True)
            dsmoe.route(x.astype(np.float64))
            try:
                dsmoe.route(x, groups=7)
            except ValueError:
                pass
        grown = rss_kib() - before
        self.assertLess(grown, 2048, "RSS grew by %d KiB over 10,000 calls" % grown)

    def test_python_threads_at_once(self):
        rng = np.random.default_rng(4)
        xs = [rng.standard_normal((64, 256)).astype(np.float32) for _ in range(8)]
        want = [dsmoe.route(x) for x in xs]
        bad = []

        def work(i):
            for _ in range(100):
                idx, w = dsmoe.route(xs[i])
                if not (np.array_equal(idx, want[i][0]) and np.array_equal(w, want[i][1])):
                    bad.append(i)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(bad, [])


if __name__ == "__main__":
    unittest.main()
