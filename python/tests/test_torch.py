"""dsmoe.torch: Router and MoE modules load Hugging Face-named state dicts unchanged,
match the fp64 reference's golden outputs and gradients, pass
torch.autograd.gradcheck against finite differences, refuse bad input with dsmoe's
message, and LossFreeBalancer lowers MaxVio (the example's too); the documentation's
Python examples run."""
import contextlib
import importlib.util
import io
import os
import re
import sys
import unittest

import numpy as np

import dsmoe
from _util import GOLDEN, HAVE_TORCH, SOURCE, MOE_CASES, moe_overrides, needs_torch, read_safetensors

if HAVE_TORCH:
    import torch
    import dsmoe.torch as dt


def separated_logits(T, E, seed):
    """Logits whose sorted values are at least 0.1 apart in every row, so that a
    finite-difference step never changes the chosen experts."""
    rng = np.random.default_rng(seed)
    base = np.linspace(-2.0, 2.0, E)
    return np.stack([rng.permutation(base) + 0.01 * rng.standard_normal(E) for _ in range(T)])


@needs_torch
class RouterTest(unittest.TestCase):
    def test_hf_state_dict_and_equal_to_numpy_api(self):
        torch.manual_seed(0)
        D, E = 24, 32
        sd = {"weight": torch.randn(E, D) * 0.2, "e_score_correction_bias": torch.randn(E) * 0.01}
        r = dt.Router(D, n_experts=E, groups=4, topk_groups=2, top_k=4)
        r.load_state_dict(sd)  # strict: exactly HF DeepseekV3TopkRouter's names
        h = torch.randn(2, 5, D)
        i, w = r(h)
        self.assertEqual(i.shape, (2, 5, 4))
        self.assertEqual(i.dtype, torch.int64)
        logits = (h.reshape(-1, D) @ sd["weight"].T).numpy()
        ni, nw = dsmoe.route(logits, sd["e_score_correction_bias"].numpy(), experts=E, groups=4,
                             topk_groups=2, top_k=4)
        np.testing.assert_array_equal(i.reshape(-1, 4).numpy(), ni)
        np.testing.assert_allclose(w.reshape(-1, 4).detach().numpy(), nw, rtol=1e-6, atol=1e-7)

    def test_gradcheck_route(self):
        for o in (dict(experts=16, groups=4, topk_groups=2, top_k=4),
                  dict(preset="mixtral", experts=10, top_k=3),
                  dict(experts=12, groups=1, topk_groups=1, top_k=3, normalize=False, scale=2.0)):
            with self.subTest(**o):
                x = torch.tensor(separated_logits(5, o["experts"], 1), dtype=torch.float64,
                                 requires_grad=True)
                f = lambda t: dt.route(t, **o)[1]  # noqa: E731
                self.assertTrue(torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=1e-4, rtol=1e-3))

    def test_gradcheck_router_weight(self):
        torch.manual_seed(1)
        r = dt.Router(6, n_experts=8, groups=1, topk_groups=1, top_k=2, normalize=False)
        h = torch.randn(4, 6, dtype=torch.float64)
        c = torch.randn(4, 2, dtype=torch.float64)
        w0 = r.weight.detach().clone()

        def loss(wt):
            logits = h @ wt.T
            return (dt.route(logits, r.e_score_correction_bias, r.config)[1] * c).sum()
        wt = w0.double().requires_grad_(True)
        i0 = dt.route(h @ wt.T, r.e_score_correction_bias, r.config)[0]
        # the chosen experts must be stable under the steps (else pick another seed)
        for s in (-1e-2, 1e-2):
            self.assertTrue(torch.equal(i0, dt.route(h @ (wt + s).T, r.e_score_correction_bias,
                                                     r.config)[0]))
        self.assertTrue(torch.autograd.gradcheck(loss, (wt,), eps=1e-2, atol=1e-3, rtol=1e-3))

    def test_errors(self):
        r = dt.Router(8, n_experts=16, groups=4, topk_groups=2, top_k=4)
        with self.assertRaisesRegex(RuntimeError, "size mismatch|shape"):
            r.load_state_dict({"weight": torch.zeros(16, 9), "e_score_correction_bias": torch.zeros(16)})
        with self.assertRaisesRegex(ValueError, r"logits: expected shape \(T, 16\)"):
            dt.route(torch.zeros(3, 15), experts=16, groups=4, topk_groups=2, top_k=4)
        x = torch.zeros(3, 16)
        x[1, 3] = float("nan")
        with self.assertRaisesRegex(ValueError, "token 1"):
            dt.route(x, experts=16, groups=4, topk_groups=2, top_k=4)
        with self.assertRaisesRegex(ValueError, "n_groups"):
            dt.Router(8, n_experts=16, groups=5)


def golden_moe(case, **kw):
    t, meta = read_safetensors(os.path.join(GOLDEN, "moe", case + ".safetensors"))
    p = meta["prefix"]
    sd = {k[len(p):]: torch.from_numpy(v) for k, v in t.items() if k.startswith(p)}
    m = dt.MoE(int(meta["D"]), int(meta["F"]), n_shared=int(meta["n_shared"]),
               capacity_factor=float(meta["capacity_factor"]), threads=1, **moe_overrides(meta), **kw)
    return m, sd, t


@needs_torch
class MoETest(unittest.TestCase):
    def test_golden_forward_backward_from_hf_state_dict(self):
        for case in MOE_CASES:
            with self.subTest(case=case):
                m, sd, t = golden_moe(case)
                m.load_state_dict(sd)  # strict: the HF DeepseekV3MoE names, unchanged
                x = torch.from_numpy(t["x"]).clone().requires_grad_(True)
                y, logits = m(x, return_logits=True)
                s = max(1.0, np.abs(t["y"]).max())
                np.testing.assert_allclose(y.detach().numpy(), t["y"], rtol=2e-5, atol=3e-6 * s)
                loss = (y * torch.from_numpy(t["dy"])).sum() + \
                    (logits * torch.from_numpy(t["dlogits_extra"])).sum()
                loss.backward()
                s = max(1.0, np.abs(t["dx"]).max())
                np.testing.assert_allclose(x.grad.numpy(), t["dx"], rtol=2e-5, atol=3e-6 * s)
                for name, p in m.named_parameters():
                    ref = t["grad." + name]
                    s = max(1.0, np.abs(ref).max())
                    np.testing.assert_allclose(p.grad.numpy(), ref, rtol=2e-5, atol=3e-6 * s,
                                               err_msg=name)

    def test_gradcheck_input(self):
        torch.manual_seed(3)
        m = dt.MoE(6, 4, n_experts=4, n_shared=1, top_k=2, groups=1, topk_groups=1, seed=7)
        x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        base = m(x.float()).detach()
        self.assertEqual(base.shape, (3, 6))
        self.assertTrue(torch.autograd.gradcheck(lambda t: m(t), (x,), eps=1e-3, atol=2e-3,
                                                 rtol=2e-2))

    def test_finite_differences_weights(self):
        """A few entries of every kind of weight against central differences (the
        float32 layer evaluated at float64-chosen points)."""
        m = dt.MoE(6, 4, n_experts=4, n_shared=1, top_k=2, groups=1, topk_groups=1, seed=5,
                   normalize=False)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
        c = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
        m.zero_grad()
        (m(x) * c).sum().backward()
        h = 1e-2
        for name, p in m.named_parameters():
            g = p.grad.reshape(-1)
            flat = p.data.reshape(-1)
            for j in (0, flat.numel() // 2, flat.numel() - 1):
                old = flat[j].item()
                with torch.no_grad():
                    flat[j] = old + h
                    lp = (m(x) * c).sum().double().item()
                    flat[j] = old - h
                    lm = (m(x) * c).sum().double().item()
                    flat[j] = old
                fd = (lp - lm) / (2 * h)
                self.assertAlmostEqual(g[j].item(), fd, delta=2e-3 + 1e-2 * abs(fd),
                                       msg="%s[%d]" % (name, j))

    def test_optimizer_updates_reach_the_c_layer(self):
        m = dt.MoE(8, 4, n_experts=4, top_k=2, groups=1, topk_groups=1, seed=1)
        x = torch.randn(6, 8)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        y0 = m(x).detach()
        (m(x) ** 2).sum().backward()
        opt.step()
        y1 = m(x).detach()
        self.assertFalse(torch.equal(y0, y1))
        # a parameter rebound to new storage is copied back before the next forward
        with torch.no_grad():
            m.experts[1].down_proj.weight.data = torch.zeros(8, 4)
        y2 = m(x).detach()
        self.assertTrue(torch.all(m.experts[1].down_proj.weight == 0))
        w = np.empty((8, 4), np.float32)
        m._h.tensor_copy("experts.1.down_proj.weight", w)  # what the C layer reads
        self.assertTrue(np.all(w == 0))
        self.assertFalse(torch.equal(y1, y2))

    def test_errors(self):
        m = dt.MoE(8, 4, n_experts=4, top_k=2, groups=1, topk_groups=1, max_tokens=4)
        with self.assertRaisesRegex(ValueError, r"x: expected shape \(\.\.\., 8\)"):
            m(torch.zeros(2, 7))
        with self.assertRaisesRegex(ValueError, "max_tokens = 4"):
            m(torch.zeros(5, 8))
        x = torch.randn(3, 8, requires_grad=True)
        y1 = m(x)
        m(x * 2)  # a second forward before y1's backward: y1's is run again
        y1.sum().backward()
        g1 = x.grad.clone()
        x.grad = None
        m(x).sum().backward()
        self.assertTrue(torch.equal(g1, x.grad))
        y1 = m(x)
        with torch.no_grad():
            m.experts[0].up_proj.weight.add_(1.0)
        m(x)
        with self.assertRaisesRegex(RuntimeError, "weights changed in place"):
            y1.sum().backward()
        with self.assertRaisesRegex(RuntimeError, "size mismatch"):
            m.load_state_dict({**m.state_dict(), "gate.weight": torch.zeros(4, 9)})
        with self.assertRaisesRegex(ValueError, "top_k"):
            dt.MoE(8, 4, n_experts=4, top_k=9, groups=1, topk_groups=1)


@needs_torch
class BalancerTest(unittest.TestCase):
    def test_loss_free_balancer_lowers_maxvio(self):
        torch.manual_seed(0)
        m = dt.MoE(16, 8, n_experts=16, top_k=2, groups=1, topk_groups=1, n_shared=0)
        with torch.no_grad():  # a gate that prefers a few experts
            m.gate.weight.add_(torch.linspace(0, 1.5, 16)[:, None] * torch.ones(16) / 4)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # routing changes only through the bias
        bal = dt.LossFreeBalancer(m, gamma=0.01).attach(opt)
        x = torch.randn(256, 16) + 1.0
        mv = []
        for _ in range(60):
            opt.zero_grad()
            m(x).sum().backward()
            opt.step()
            mv.append(bal.maxvio()[0])
        self.assertGreater(mv[0], 1.0)
        self.assertLess(mv[-1], 0.5 * mv[0])
        self.assertFalse(torch.all(m.gate.e_score_correction_bias == 0))

    def test_example_trains_and_maxvio_falls(self):
        """python/examples/train_moe_torch.py, run in this process (torch is imported
        once), with fewer steps."""
        ex = os.path.join(SOURCE, "python", "examples", "train_moe_torch.py")
        spec = importlib.util.spec_from_file_location("train_moe_torch", ex)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        buf = io.StringIO()
        argv = sys.argv
        try:
            sys.argv = [ex, "--steps", "60", "--every", "30"]
            with contextlib.redirect_stdout(buf):
                mod.main()
        finally:
            sys.argv = argv
        out = buf.getvalue()
        m = re.search(r"layer 1 ([\d.]+) -> ([\d.]+), layer 2 ([\d.]+) -> ([\d.]+)", out)
        self.assertIsNotNone(m, out)
        a, b, c, d = map(float, m.groups())
        self.assertLess(b, 0.6 * a, out)
        self.assertLess(d, 0.6 * c, out)


def blocks(path):
    with open(os.path.join(SOURCE, path)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


class DocsTest(unittest.TestCase):
    """The documentation's Python examples (README's quick start, docs/python.md) run as
    written, so that they cannot drift from the API (here, where torch is imported
    once)."""

    def test_examples_run(self):
        n = 0
        for path in ("README.md", os.path.join("docs", "python.md")):
            for i, code in enumerate(blocks(path)):
                if "torch" in code and not HAVE_TORCH:
                    self.skipTest("python3-torch is not installed: %s example %d needs it" % (path, i))
                with self.subTest(path=path, block=i):
                    exec(compile(code, "%s[%d]" % (path, i), "exec"), {})
                    n += 1
        self.assertGreaterEqual(n, 2)


if __name__ == "__main__":
    unittest.main()
