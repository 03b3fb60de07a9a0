"""dsmoe.Model: the golden model directories (tests/golden/model, MANIFEST) give the
fp64 reference's logits through the binding, both attention paths agree, greedy
generation follows the logits, several Python threads get the same results, and bad
input raises dsmoe's message."""
import os
import subprocess
import tempfile
import threading
import unittest

import numpy as np

import dsmoe
from _util import CLI, GOLDEN

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
                # the head then runs on one row (another product: rounding differs)
                self.assertTrue(close(m.logits(t, last_only=True), lg[-1].astype(np.float64)))
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

    def test_sampling_equals_the_cli(self):
        """Seeded temperature / top-p sampling draws what `dsmoe generate` draws."""
        d = os.path.join(MODEL, "v3_dense_moe")
        m = dsmoe.Model.load(d, threads=1)
        prompt = np.load(os.path.join(d, "tokens.npy"))[:6]
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "prompt.npy")
            np.save(p, prompt.astype(np.int32))
            for temp, top_p, seed in ((0.8, 0.9, 3), (1.5, 1.0, 11), (0.0, 1.0, 0)):
                cli = subprocess.run([CLI, "generate", "--model", d, "--prompt-tokens", p,
                                      "--max-tokens", "10", "--temperature", str(temp),
                                      "--top-p", str(top_p), "--seed", str(seed),
                                      "--threads", "1"], check=True, capture_output=True,
                                     text=True).stdout.split()
                got = m.generate(prompt, 10, temperature=temp, top_p=top_p, seed=seed)
                self.assertEqual([int(v) for v in cli], list(got), (temp, top_p, seed))
        a = m.generate(prompt, 8, temperature=1.0, top_p=0.9, seed=5)
        np.testing.assert_array_equal(a, m.generate(prompt, 8, temperature=1.0, top_p=0.9, seed=5))
        with self.assertRaisesRegex(ValueError, "top_p"):
            m.generate(prompt, 2, temperature=1.0, top_p=0.0)

    def test_generate_stops_at_max_positions(self):
        d = os.path.join(MODEL, "v2lite_greedy")
        m = dsmoe.Model.load(d, threads=1)
        maxpos = m.config["max_position_embeddings"]
        out = m.generate(np.zeros(maxpos - 3, np.int32), 50)
        self.assertEqual(len(out), 4)  # positions maxpos-3 .. maxpos-1 fed, one more drawn
        with self.assertRaisesRegex(ValueError, "max_position_embeddings"):
            m.generate(np.zeros(maxpos + 1, np.int32), 2)

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
