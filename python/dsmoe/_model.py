"""dsmoe.Model: a DeepSeek-V2/V3-family model directory run by libdsmoe (dsmoe_model):
the logits of a token sequence and generation with the compressed-latent cache."""
import os
import threading

import numpy as np

from . import _dsmoe

_ATTN = {"auto": 0, "naive": 1, "absorbed": 2}
_LOGITS_LAST = 4


def _tokens(tokens, V):
    t = np.asarray(tokens)
    if t.size == 0:
        raise ValueError("tokens: empty sequence")
    if t.dtype.kind not in "iu":
        raise ValueError("tokens: expected integer token ids, got dtype %s" % t.dtype)
    if t.ndim != 1:
        raise ValueError("tokens: expected a 1-D sequence of token ids, got shape %s" % (t.shape,))
    if t.min() < -2**31 or t.max() >= 2**31:
        raise ValueError("tokens: ids outside int32 (vocab_size = %d)" % V)
    return np.ascontiguousarray(t, dtype=np.int32)


class Model:
    """A model directory (config.json and safetensors weights, as Hugging Face stores
    them; fp8 blocks dequantised as they stream) opened by dsmoe_model_open.

        m = dsmoe.Model.load("DeepSeek-V3")
        logits = m.logits([1, 2, 3])                 # (3, vocab_size) float32
        new = m.generate([1, 2, 3], max_new_tokens=8)  # greedy by default

    One forward runs at a time per Model (a lock serialises calls from several threads;
    the GIL is released while it runs). threads: the library's threads (<= 0: all)."""

    def __init__(self, handle):
        self._h = handle
        self._lock = threading.Lock()
        self.config = handle.config()
        self.vocab_size = self.config["vocab_size"]

    @classmethod
    def load(cls, path, *, threads=0, max_tokens=256, widen_f32=False):
        """Opens a model directory (dsmoe_model_open): weights checked (NaN/Inf name the
        tensor), kept mapped as stored unless widen_f32."""
        return cls(_dsmoe.model_open(os.fspath(path), int(threads), int(max_tokens),
                                     bool(widen_f32)))

    def logits(self, tokens, *, attention="auto", last_only=False):
        """Logits (T, vocab_size) float32 of the tokens as one sequence from position 0
        (or of the last token only, (vocab_size), with last_only). attention: "auto",
        "naive" or "absorbed" (the same math; see docs/model.md)."""
        t = _tokens(tokens, self.vocab_size)
        if attention not in _ATTN:
            raise ValueError("attention: expected auto, naive or absorbed, got %r" % (attention,))
        flags = _ATTN[attention] | (_LOGITS_LAST if last_only else 0)
        out = np.empty(self.vocab_size if last_only else (t.size, self.vocab_size), np.float32)
        with self._lock:
            self._h.reset(t.size)
            self._h.forward(t, out, flags)
        return out

    def generate(self, prompt, max_new_tokens=16, *, temperature=0.0, top_p=1.0, seed=0,
                 stop=None, attention="auto"):
        """Continues the prompt by up to max_new_tokens tokens (one forward for the
        prompt, then one per token through the cache), sampling with dsmoe_sample:
        temperature <= 0 is greedy (the lowest id among equal logits), otherwise
        softmax(logits / temperature) within the top_p nucleus, drawn from a splitmix64
        stream seeded by seed (dsmoe generate's draws for the same seed). Stops after a
        token in stop (an id or a collection; default the config's eos_token_id) or when
        max_position_embeddings positions are used. Returns the new tokens (int32)."""
        t = _tokens(prompt, self.vocab_size)
        n = int(max_new_tokens)
        if n < 0:
            raise ValueError("max_new_tokens: expected >= 0, got %d" % n)
        if stop is None:
            eos = self.config["eos_token_id"]
            stop = set() if eos < 0 else {eos}
        elif isinstance(stop, (int, np.integer)):
            stop = {int(stop)}
        else:
            stop = set(int(s) for s in stop)
        if attention not in _ATTN:
            raise ValueError("attention: expected auto, naive or absorbed, got %r" % (attention,))
        flags = _ATTN[attention] | _LOGITS_LAST
        maxpos = self.config["max_position_embeddings"]
        if t.size > maxpos:
            raise ValueError("prompt: %d tokens exceed max_position_embeddings = %d"
                             % (t.size, maxpos))
        if n == 0:
            return np.zeros(0, np.int32)
        # positions: the prompt and every new token but the last, which is never fed
        capacity = min(t.size + n - 1, maxpos)
        state = _dsmoe.rng_seed(int(seed) & (2**64 - 1))
        lg = np.empty(self.vocab_size, np.float32)
        one = np.empty(1, np.int32)
        out = []
        with self._lock:
            self._h.reset(capacity)
            self._h.forward(t, lg, flags)
            while True:
                tok, state = _dsmoe.sample(lg, float(temperature), float(top_p), state)
                out.append(tok)
                if tok in stop or len(out) >= n or self._h.length() >= capacity:
                    break
                one[0] = tok
                self._h.forward(one, lg, flags)
        return np.array(out, np.int32)
