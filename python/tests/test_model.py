"""dsmoe.Model: the golden model directories (tests/golden/model, MANIFEST) give the
fp64 reference's logits through the binding, both attention paths agree, greedy
generation follows the logits, several Python threads get the same results, and bad
input raises dsmoe's message."""
import os
import threading
import unittest

import numpy as np

import dsmoe
from _util import GOLDEN

MODEL = os.path.join(GOLDEN, "model")


def cases():
    with open(os.path.join(MODEL, "MANIFEST")) as f:
        return [l.split()[0] for l in f if l.strip() and not l.startswith("#")]


def close(got, ref, rel=2e-5):
    s = max(1.0, float(np.abs(ref).max()))
    return float(np.abs(got - ref).max()) <= rel * s


class ModelTest(unittest.TestCase):
    def test_golden_logits(self):
        n = 0
        for case in cases():
            with self.subTest(case=case):
                d = os.path.join(MODEL, case)
                m = dsmoe.Model.load(d, threads=1)
                t, ref = np.load(os.path.join(d, "tokens.npy")), np.load(os.path.join(d, "logits.npy"))
                self.assertEqual(m.vocab_size, ref.shape[1])
                lg = m.logits(t)
                self.assertEqual(lg.dtype, np.float32)
                self.assertTrue(close(lg, ref), "max diff %g" % np.abs(lg - ref).max())
                self.assertTrue(close(m.logits(t, attention="absorbed"), ref))
                self.assertTrue(close(m.logits(t, attention="naive"), ref))
                np.testing.assert_array_equal(m.logits(t, last_only=True), lg[-1])
                n += 1
        self.assertGreaterEqual(n, 5)

    def test_greedy_generate_follows_the_logits(self):
        d = os.path.join(MODEL, "v3_dense_moe")
        m = dsmoe.Model.load(d, threads=1)
        prompt = np.load(os.path.join(d, "tokens.npy"))[:5]
        new = m.generate(prompt, 6)
        self.assertEqual(len(new), 6)
        seq = list(prompt)
        for tok in new:  # each token is the argmax after the sequence so far
            self.assertEqual(tok, int(np.argmax(m.logits(seq)[-1])))
            seq.append(tok)
        s = int(new[2])
        first = list(new).index(s)
        self.assertEqual(list(m.generate(prompt, 6, stop=s)), list(new[:first + 1]))
        self.assertEqual(len(m.generate(prompt, 0)), 0)

    @unittest.skipUnless(dsmoe._dsmoe.has_sample(), "this libdsmoe has no dsmoe_sample yet")
    def test_sampling_is_seeded(self):
        m = dsmoe.Model.load(os.path.join(MODEL, "v3_dense_moe"), threads=1)
        a = m.generate([1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=5)
        b = m.generate([1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=5)
        np.testing.assert_array_equal(a, b)

    def test_threads(self):
        d = os.path.join(MODEL, "moonlight_freq")
        t = np.load(os.path.join(d, "tokens.npy"))
        shared = dsmoe.Model.load(d, threads=1)
        want = shared.logits(t)
        bad = []

        def work(own):
            m = dsmoe.Model.load(d, threads=1) if own else shared
            for _ in range(5):
                if m.logits(t).tobytes() != want.tobytes():
                    bad.append(own)
        ts = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        self.assertEqual(bad, [])

    def test_errors(self):
        d = os.path.join(MODEL, "v2lite_greedy")
        m = dsmoe.Model.load(d, threads=1)
        with self.assertRaisesRegex(ValueError, "37"):
            m.logits([1, 2, 37])
        with self.assertRaisesRegex(ValueError, "tokens: expected integer"):
            m.logits([1.5, 2.0])
        with self.assertRaisesRegex(ValueError, "tokens: empty"):
            m.logits([])
        with self.assertRaisesRegex(ValueError, "attention"):
            m.logits([1], attention="flash")
        with self.assertRaisesRegex(ValueError, "_scale_inv"):
            dsmoe.Model.load(os.path.join(MODEL, "fp8_noscale"))
        with self.assertRaisesRegex(ValueError, r"weight_scale_inv.*\(1, 1\)"):
            dsmoe.Model.load(os.path.join(MODEL, "fp8_badscale"))
        with self.assertRaisesRegex((ValueError, RuntimeError), "no_such_model"):
            dsmoe.Model.load("no_such_model")
        ok = m.logits([1, 2])  # the model still works after the errors
        self.assertEqual(ok.shape, (2, 37))


if __name__ == "__main__":
    unittest.main()
