"""dsmoe.Balancer, dsmoe.balance_loss, dsmoe.load_stats against the fp64 reference's
golden files (tests/golden/balance), save/load, finite-difference gradients of the
losses, and bad input raising dsmoe's message."""
import os
import tempfile
import unittest

import numpy as np

import dsmoe
from _util import GOLDEN

E, G, TG, K, S, T = 16, 4, 2, 4, 8, 48
SIG = dict(experts=E, groups=G, topk_groups=TG, top_k=K, group_score="top2sum")
SMX = dict(experts=E, groups=G, topk_groups=TG, top_k=K, score="softmax", group_score="max",
           use_bias=False, normalize=False)


def gold(sub, name):
    return np.load(os.path.join(GOLDEN, "balance", sub, name + ".npy"))


VARIANTS = {  # name: (rule, gamma, recenter, until, after, masked)
    "sign": ("sign", 0.01, False, 0, 0.0, False),
    "prop": ("proportional", 0.01, False, 0, 0.0, False),
    "center": ("sign", 0.01, True, 0, 0.0, False),
    "sched": ("sign", 0.01, False, 3 * T, 0.002, False),
    "masked": ("sign", 0.01, False, 0, 0.0, True),
}


class BalancerTest(unittest.TestCase):
    def test_steps_golden(self):
        logits, bias0, mask = gold("steps", "logits"), gold("steps", "bias0"), gold("steps", "mask")
        for name, (rule, gamma, rec, until, after, masked) in VARIANTS.items():
            with self.subTest(variant=name):
                b = dsmoe.Balancer(E, gamma=gamma, rule=rule, recenter=rec,
                                   gamma_until_tokens=until, gamma_after=after)
                b.bias = bias0
                counts, biases = gold("steps", name + "_counts"), gold("steps", name + "_bias")
                maxvio = gold("steps", name + "_maxvio")
                for st in range(S):
                    for mb in range(2):  # two micro-batches per step
                        sl = slice(mb * T // 2, (mb + 1) * T // 2)
                        idx, w, c = dsmoe.route(logits[st, sl], b.bias, counts=True, **SIG)
                        if masked:
                            b.update(idx, mask[st, sl])
                        else:
                            b.update_counts(c, T // 2)
                    b.step()
                    np.testing.assert_array_equal(b.last_counts, counts[st])
                    np.testing.assert_allclose(b.bias, biases[st], rtol=0, atol=1e-6)
                    s = dsmoe.load_stats(b.last_counts, groups=G)
                    self.assertAlmostEqual(s["maxvio"], maxvio[st], delta=1e-12)
                    if name == "sign":
                        ref = gold("steps", "sign_stats")[st]
                        for k, v in zip(("maxvio", "cv", "entropy", "dead", "group_maxvio"), ref):
                            self.assertAlmostEqual(s[k], v, delta=1e-12, msg=k)
                self.assertEqual(b.info["steps"], S)

    def test_save_load_continues_exactly(self):
        rng = np.random.default_rng(0)
        a = dsmoe.Balancer(E, gamma=0.01, rule="proportional")
        for _ in range(3):
            a.update(rng.integers(0, E, size=(32, K)))
            a.step()
        a.update(rng.integers(0, E, size=(8, K)))  # pending counts are saved too
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "bal.safetensors")
            a.save(p)
            b = dsmoe.Balancer.load(p)
        self.assertEqual(a.info, b.info)
        np.testing.assert_array_equal(a.bias, b.bias)
        np.testing.assert_array_equal(a.pending_counts, b.pending_counts)
        a.step(), b.step()
        self.assertEqual(a.bias.tobytes(), b.bias.tobytes())
        np.testing.assert_array_equal(a.total_counts, b.total_counts)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "gamma"):
            dsmoe.Balancer(E, gamma=-1)
        with self.assertRaisesRegex(ValueError, "n_experts"):
            dsmoe.Balancer(0)
        b = dsmoe.Balancer(E)
        with self.assertRaisesRegex(ValueError, r"indices\[1, 3\] = 16"):
            b.update(np.array([[0, 1, 2, 3], [0, 1, 2, 16]]))
        self.assertEqual(b.info["pending_tokens"], 0)
        bad = np.zeros(E, np.float32)
        bad[5] = np.inf
        with self.assertRaisesRegex(ValueError, r"bias\[5\] = inf"):
            b.bias = bad
        with self.assertRaisesRegex(ValueError, r"bias: expected shape \(16,\)"):
            b.bias = np.zeros(3)
        with self.assertRaisesRegex(RuntimeError, "no_such_dir"):
            b.save("/no_such_dir/x.safetensors")
        with self.assertRaisesRegex(RuntimeError, "missing.safetensors"):
            dsmoe.Balancer.load("missing.safetensors")


LOSSES = {  # name: (kind, alpha, seq_len, count_from, normalize)
    "seq": ("seq", 0.3, 8, "routed", True),
    "seqtopk": ("seq", 0.3, 8, "topk", True),
    "seqraw": ("seq", 0.3, 8, "routed", False),
    "expert": ("expert", 0.2, 0, "routed", True),
    "device": ("device", 0.1, 8, "routed", True),
    "comm": ("comm", 0.15, 8, "routed", True),
    "switch": ("switch", 0.05, 0, "routed", True),
    "zloss": ("zloss", 0.01, 0, "routed", True),
}


class LossTest(unittest.TestCase):
    def test_losses_golden(self):
        for rname, rc in (("sig", SIG), ("smx", SMX)):
            logits, scores = gold("losses", rname + "_logits"), gold("losses", rname + "_scores")
            indices = gold("losses", rname + "_indices")
            bias = gold("losses", rname + "_bias") if rname == "sig" else None
            idx, w, s = dsmoe.route(logits, bias, scores=True, **rc)
            np.testing.assert_array_equal(idx, indices)
            for cname, (kind, alpha, seq_len, cf, norm) in LOSSES.items():
                with self.subTest(router=rname, loss=cname):
                    L, d = dsmoe.balance_loss(scores, None if cf == "topk" else indices, logits,
                                              kind=kind, alpha=alpha, seq_len=seq_len,
                                              count_from=cf, normalize_scores=norm, n_devices=4,
                                              device_topm=2, grad=True, **rc)
                    lref = gold("losses", "%s_%s_loss" % (rname, cname))[0]
                    gref = gold("losses", "%s_%s_dlogits" % (rname, cname))
                    self.assertLessEqual(abs(L - lref), 1e-6 * abs(lref) + 1e-12)
                    np.testing.assert_allclose(d, gref, rtol=1e-4,
                                               atol=1e-5 * np.max(np.abs(gref)))

    def test_seq_loss_gradcheck(self):
        """dL/dlogits against central differences in float64 (counts held fixed: the
        chosen experts do not move under these perturbations)."""
        rng = np.random.default_rng(9)
        x = rng.standard_normal((8, E))
        idx, w = dsmoe.route(x, **SIG)

        def loss(xx):
            _, _, s = dsmoe.route(xx, scores=True, **SIG)
            return dsmoe.balance_loss(s.astype(np.float64), idx, kind="seq", alpha=1.0, **SIG)
        _, _, s = dsmoe.route(x, scores=True, **SIG)
        _, g = dsmoe.balance_loss(s, idx, kind="seq", alpha=1.0, grad=True, **SIG)
        h = 1e-3
        for t, e in [(0, 0), (1, 5), (3, 15), (7, 9), (5, 2)]:
            xp, xm = x.copy(), x.copy()
            xp[t, e] += h
            xm[t, e] -= h
            fd = (loss(xp) - loss(xm)) / (2 * h)
            self.assertAlmostEqual(g[t, e], fd, delta=1e-4 + 1e-2 * abs(fd))

    def test_loss_errors(self):
        s = np.full((6, E), 0.5, np.float32)
        with self.assertRaisesRegex(ValueError, "seq_len"):
            dsmoe.balance_loss(s, np.zeros((6, K), np.int32), seq_len=4, **SIG)
        with self.assertRaisesRegex(ValueError, "alpha"):
            dsmoe.balance_loss(s, np.zeros((6, K), np.int32), alpha=-1.0, **SIG)
        with self.assertRaisesRegex(ValueError, "seq.*expert"):
            dsmoe.balance_loss(s, kind="nope", **SIG)
        with self.assertRaisesRegex(ValueError, r"scores: expected shape \(T, 16\)"):
            dsmoe.balance_loss(s[:, :5], **SIG)


class StatsTest(unittest.TestCase):
    def test_stats(self):
        c = np.array([4, 0, 2, 2], np.int64)
        s = dsmoe.load_stats(c, groups=2)
        self.assertEqual(s["total"], 8)
        self.assertEqual(s["dead"], 1)
        self.assertAlmostEqual(s["maxvio"], 1.0)
        self.assertAlmostEqual(s["group_maxvio"], 0.0)
        s2 = dsmoe.load_stats(indices=np.array([[0, 2], [0, 3], [0, 0]]), n_experts=4)
        self.assertEqual(s2["max"], 4)
        with self.assertRaisesRegex(ValueError, r"counts\[1\] = -1"):
            dsmoe.load_stats(np.array([1, -1, 0]))
        with self.assertRaisesRegex(ValueError, r"= 7 outside"):
            dsmoe.load_counts(np.array([[7]]), 4)


if __name__ == "__main__":
    unittest.main()
