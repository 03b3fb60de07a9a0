"""dsmoe from Python: DeepSeek-V3's MoE router, loss-free balancer, balance losses,
load statistics, the MoE layer and the model, called in libdsmoe on NumPy arrays.

Arrays are used in place, without a copy, when they are C-contiguous float32 (int32
for indices); anything else array-like is converted once. The GIL is released while
the library runs, so Python threads route in parallel. Errors raise ValueError
(bad argument, shape, dtype, config, non-finite value, malformed file) or
RuntimeError (I/O, memory) carrying dsmoe's message, which names the field, token or
tensor. PyTorch modules with autograd are in dsmoe.torch.

    import numpy as np, dsmoe
    logits = np.random.randn(4, 256).astype(np.float32)
    idx, w = dsmoe.route(logits)                        # DeepSeek-V3: (4, 8) each
    idx, w = dsmoe.route(logits[:, :64], preset="moonlight", top_k=4)
"""
import json as _json
import os as _os

import numpy as _np

from . import _dsmoe

__all__ = ["route", "route_hidden", "router_config", "router_backward", "Balancer",
           "balance_loss", "load_stats", "load_counts", "MoE", "Model", "version", "isa",
           "presets"]

__version__ = _dsmoe.version()
version = _dsmoe.version
isa = _dsmoe.isa


def presets():
    """Names of the router presets (deepseek-v3, deepseek-v2, moonlight, ...)."""
    return _dsmoe.preset_names()


_F32 = _np.dtype(_np.float32)
_I32 = _np.dtype(_np.int32)
_I64 = _np.dtype(_np.int64)
_empty = _np.empty
_zeros = _np.zeros
_ndarray = _np.ndarray
_cfg_cache = {}
_dsmoe.set_allocator(_np.empty, _F32, _I32, _I64)
_route_new = _dsmoe.route_new


def router_config(preset="deepseek-v3", **overrides):
    """A validated router config: the preset with the overrides applied (named as the
    CLI's router flags: experts, groups, topk_groups, top_k, score, group_score
    ("max", "top2sum", "topNsum"), mask ("exclude"/"zero"), normalize, norm_eps, scale,
    precision ("fp32"/"bf16"), use_bias; also group_topm, nonfinite). Cached. preset may
    also be a config returned by this function (then without overrides): every function
    taking preset= accepts one."""
    if type(preset) is _dsmoe.RouterConfig:
        if overrides:
            raise ValueError("router overrides cannot change a RouterConfig; pass a preset name")
        return preset
    key = (preset, tuple(sorted(overrides.items()))) if overrides else preset
    c = _cfg_cache.get(key)
    if c is None:
        if not isinstance(preset, str):
            raise ValueError("preset: expected a name, got %r" % (preset,))
        c = _dsmoe.router_config(preset, overrides)
        if len(_cfg_cache) < 1024:
            _cfg_cache[key] = c
    return c


_default_cfg = router_config()


def config_dict(cfg):
    """The config as a dict (dsmoe_router_config_json's fields)."""
    return _json.loads(cfg.json())


def _as(x, dtype, name, ndim=None):
    """x as a C-contiguous array of dtype (no copy when it already is one); rejects
    dtypes that are not real numbers (bool, complex, object, strings)."""
    if type(x) is _ndarray and x.dtype == dtype and x.flags.c_contiguous:
        a = x
    else:
        if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
            x = x.detach()
            if x.device.type != "cpu":
                raise ValueError("%s: dsmoe runs on CPU tensors, got one on %s" % (name, x.device))
            x = x.numpy()
        a = _np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise ValueError("%s: expected real numbers (float32%s), got dtype %s" % (
                name, "" if dtype == _F32 else " or int32", a.dtype))
        if a.dtype.kind == "f" and dtype != _F32:
            if not _np.all(a == _np.floor(a)):
                raise ValueError("%s: expected integers, got non-integer values" % name)
        a = _np.ascontiguousarray(a, dtype=dtype)
    if ndim is not None and a.ndim != ndim:
        raise ValueError("%s: expected %d dimensions, got shape %s" % (name, ndim, a.shape))
    return a


def _tokens(a, name, width, what):
    """Checks a (T, width) array (a 1-D array of width is one token) and returns (a2d, T)."""
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError("%s: expected shape (T, %d) for %s, got %s" % (name, width, what, a.shape))
    return a, a.shape[0]


def _bias(bias, cfg):
    if bias is None:
        if cfg.use_bias:
            return _zeros(cfg.n_experts, _F32)
        return None
    b = _as(bias, _F32, "bias")
    if b.shape != (cfg.n_experts,):
        raise ValueError("bias: expected shape (%d,) (the router's experts), got %s" % (
            cfg.n_experts, b.shape))
    if not cfg.use_bias:
        raise ValueError("bias given but the router config has use_bias = 0 "
                         "(pass use_bias=True to route with it)")
    return b


def _route_py(logits, bias=None, preset="deepseek-v3", *, threads=1, scores=False,
              counts=False, **overrides):
    """dsmoe.route's general case (dsmoe.route is _dsmoe.route, which handles ready arrays
    with the default preset or a RouterConfig itself and hands everything else here).

    Routes T tokens from router logits (T, E) with dsmoe_router_forward.

    Returns (indices int32 (T, K), weights float32 (T, K)), plus scores (T, E) (the
    affinities before the bias) when scores=True and counts (E) int64 (tokens per
    expert) when counts=True. bias (E): the selection bias (e_score_correction_bias);
    None routes with zeros when the config uses one. preset / overrides: see
    router_config. threads: library threads (<= 0: all); the results are the same for
    any count."""
    cfg = _default_cfg if (preset == "deepseek-v3" and not overrides) \
        else router_config(preset, **overrides)
    r = _route_new(cfg, logits, bias, threads, scores, counts)
    if r is not None:
        return r
    # not a C-contiguous float32 (T, E) array (or no bias given): convert once, retry
    x, _ = _tokens(_as(logits, _F32, "logits"), "logits", cfg.n_experts,
                   "the router's %d experts" % cfg.n_experts)
    return _route_new(cfg, x, _bias(bias, cfg), threads, scores, counts)


_dsmoe.set_route_fallback(_route_py, _default_cfg)
route = _dsmoe.route


def route_hidden(hidden, gate_weight, bias=None, preset="deepseek-v3", *, threads=1,
                 scores=False, logits=False, counts=False, **overrides):
    """Routes T tokens from hidden states (T, D) and a gate weight (E, D) float32 (or
    bf16 given as uint16 words) with dsmoe_router_forward_hidden. Returns (indices,
    weights) plus scores (T, E), the projected logits (T, E) and counts (E) when asked,
    in that order."""
    cfg = router_config(preset, **overrides)
    E = cfg.n_experts
    if isinstance(gate_weight, _ndarray) and gate_weight.dtype == _np.uint16:
        g = _np.ascontiguousarray(gate_weight)
        bf16 = True
    else:
        g = _as(gate_weight, _F32, "gate_weight")
        bf16 = False
    if g.ndim != 2 or g.shape[0] != E:
        raise ValueError("gate_weight: expected shape (%d, D) (the router's experts), got %s"
                         % (E, g.shape))
    D = g.shape[1]
    h, T = _tokens(_as(hidden, _F32, "hidden"), "hidden", D,
                   "the gate weight's hidden size %d" % D)
    b = _bias(bias, cfg)
    K = cfg.top_k
    idx = _empty((T, K), _I32)
    w = _empty((T, K), _F32)
    s = _empty((T, E), _F32) if scores else None
    lg = _empty((T, E), _F32) if logits else None
    c = _empty(E, _I64) if counts else None
    _dsmoe.route_hidden(cfg, h, g, bf16, D, b, idx, w, s, lg, c, T, threads)
    out = [idx, w] + [a for a, want in ((s, scores), (lg, logits), (c, counts)) if want]
    return tuple(out)


def router_backward(dweights, indices, scores, preset="deepseek-v3", *, threads=1,
                    dlogits=None, **overrides):
    """dL/dlogits (T, E) from dL/dweights (T, K), the forward's indices (T, K) and
    scores (T, E) (dsmoe_router_backward). With dlogits given it is accumulated into
    (+=, float32 C-contiguous, in place) and returned."""
    cfg = router_config(preset, **overrides)
    E, K = cfg.n_experts, cfg.top_k
    dw, T = _tokens(_as(dweights, _F32, "dweights"), "dweights", K, "top_k = %d" % K)
    idx, Ti = _tokens(_as(indices, _I32, "indices"), "indices", K, "top_k = %d" % K)
    s, Ts = _tokens(_as(scores, _F32, "scores"), "scores", E, "%d experts" % E)
    if Ti != T or Ts != T:
        raise ValueError("dweights, indices and scores: token counts differ (%d, %d, %d)"
                         % (T, Ti, Ts))
    if dlogits is None:
        dlogits = _zeros((T, E), _F32)
    elif not (isinstance(dlogits, _ndarray) and dlogits.dtype == _F32
              and dlogits.flags.c_contiguous and dlogits.shape == (T, E)):
        raise ValueError("dlogits: expected a C-contiguous float32 array of shape (%d, %d)"
                         % (T, E))
    _dsmoe.router_backward(cfg, dlogits, dw, idx, s, T, threads)
    return dlogits


# ----------------------------------------------------------------- balancer --

_RULES = {"sign": 0, "proportional": 1, "prop": 1}


class Balancer:
    """The auxiliary-loss-free bias controller (dsmoe_balancer): feed it each
    micro-batch's counts (update_counts) or routed indices (update), then step() once
    per training step; .bias is the (E) float32 selection bias to route with.

        bal = dsmoe.Balancer(256, gamma=0.001)
        idx, w = dsmoe.route(logits, bal.bias)
        bal.update(idx); bal.step()
    """

    def __init__(self, n_experts, gamma=0.001, rule="sign", gamma_until_tokens=0,
                 gamma_after=0.0, recenter=False, _handle=None):
        if _handle is not None:
            self._h = _handle
        else:
            if rule not in _RULES:
                raise ValueError("rule: expected sign or proportional, got %r" % (rule,))
            self._h = _dsmoe.balancer_create(int(n_experts), _RULES[rule], float(gamma),
                                             int(gamma_until_tokens), float(gamma_after),
                                             bool(recenter))
        self.n_experts = self._h.info()[0]

    @classmethod
    def load(cls, path):
        """A balancer saved by save() (dsmoe_balancer_load): it continues exactly."""
        return cls(0, _handle=_dsmoe.balancer_load(_os.fspath(path)))

    def save(self, path):
        """Saves the whole state atomically as safetensors (dsmoe_balancer_save)."""
        self._h.save(_os.fspath(path))

    @property
    def bias(self):
        """A copy of the bias (E) float32."""
        b = _empty(self.n_experts, _F32)
        self._h.bias(b)
        return b

    @bias.setter
    def bias(self, value):
        b = _as(value, _F32, "bias")
        if b.shape != (self.n_experts,):
            raise ValueError("bias: expected shape (%d,), got %s" % (self.n_experts, b.shape))
        self._h.set_bias(b)

    def center_bias(self):
        self._h.center_bias()

    def update_counts(self, counts, n_tokens):
        """Adds one micro-batch's tokens per expert (E) and its token count."""
        c = _as(counts, _I64, "counts")
        if c.shape != (self.n_experts,):
            raise ValueError("counts: expected shape (%d,), got %s" % (self.n_experts, c.shape))
        self._h.accumulate_counts(c, int(n_tokens))

    def update(self, indices, mask=None):
        """Adds the routed indices (T, K) of one micro-batch; tokens with mask == 0 skipped."""
        idx = _as(indices, _I32, "indices")
        if idx.ndim == 1:
            idx = idx.reshape(1, -1)
        if idx.ndim != 2:
            raise ValueError("indices: expected shape (T, K), got %s" % (idx.shape,))
        T, K = idx.shape
        m = None
        if mask is not None:
            m = _np.ascontiguousarray(_np.asarray(mask) != 0, dtype=_np.uint8)
            if m.shape != (T,):
                raise ValueError("mask: expected shape (%d,), got %s" % (T, m.shape))
        self._h.accumulate(idx, m, T, K)

    def step(self):
        """Ends a training step: applies the update rule to the pending counts."""
        self._h.step()

    def _counts(self, which):
        c = _empty(self.n_experts, _I64)
        self._h.counts(which, c)
        return c

    @property
    def pending_counts(self):
        return self._counts(0)

    @property
    def last_counts(self):
        return self._counts(1)

    @property
    def total_counts(self):
        return self._counts(2)

    @property
    def info(self):
        E, steps, tokens, pending, last_gamma, rule, gamma, until, after, rec = self._h.info()
        return {"n_experts": E, "steps": steps, "tokens": tokens, "pending_tokens": pending,
                "last_gamma": last_gamma, "rule": "sign" if rule == 0 else "proportional",
                "gamma": gamma, "gamma_until_tokens": until, "gamma_after": after,
                "recenter": bool(rec)}


# ----------------------------------------------------------- balance losses --

def balance_loss(scores, indices=None, logits=None, kind="seq", alpha=None, seq_len=0,
                 preset="deepseek-v3", *, count_from="routed", normalize_scores=True,
                 n_devices=0, device_topm=0, grad=False, threads=1, **overrides):
    """A balance loss (dsmoe_balance_loss) of the router's scores (T, E) and indices
    (T, K): kind "seq" (DeepSeek-V3 sequence-wise), "expert", "device", "comm" (V2),
    "switch", "zloss" (needs logits). alpha None: the kind's default. seq_len 0: the
    batch is one sequence. Returns the loss, or (loss, dL/dlogits (T, E)) with
    grad=True."""
    cfg = router_config(preset, **overrides)
    E, K = cfg.n_experts, cfg.top_k
    s, T = _tokens(_as(scores, _F32, "scores"), "scores", E, "%d experts" % E)
    idx = None
    if indices is not None:
        idx, Ti = _tokens(_as(indices, _I32, "indices"), "indices", K, "top_k = %d" % K)
        if Ti != T:
            raise ValueError("indices: %d tokens, scores: %d" % (Ti, T))
    lg = None
    if logits is not None:
        lg, Tl = _tokens(_as(logits, _F32, "logits"), "logits", E, "%d experts" % E)
        if Tl != T:
            raise ValueError("logits: %d tokens, scores: %d" % (Tl, T))
    if count_from not in ("routed", "topk"):
        raise ValueError("count_from: expected routed or topk, got %r" % (count_from,))
    d = _zeros((T, E), _F32) if grad else None
    loss = _dsmoe.balance_loss(kind, float("nan") if alpha is None else float(alpha), int(seq_len),
                               0 if count_from == "routed" else 1, bool(normalize_scores),
                               int(n_devices), int(device_topm), cfg, s, idx, lg, d, T,
                               threads)
    return (loss, d) if grad else loss


def load_counts(indices, n_experts, mask=None):
    """Tokens per expert (E) int64 from routed indices (T, K)."""
    idx = _as(indices, _I32, "indices")
    if idx.ndim == 1:
        idx = idx.reshape(1, -1)
    T, K = idx.shape
    m = None if mask is None else _np.ascontiguousarray(_np.asarray(mask) != 0, dtype=_np.uint8)
    c = _empty(int(n_experts), _I64)
    _dsmoe.load_counts(c, idx, m, T, K, int(n_experts))
    return c


def load_stats(counts=None, indices=None, n_experts=None, groups=1):
    """Load statistics (dsmoe_load_stats_compute) of per-expert counts (E), or of
    routed indices (T, K) with n_experts: total, mean, max, min, argmax, maxvio, cv,
    entropy, dead, group_maxvio, group_cv (over `groups` groups of experts)."""
    if counts is None:
        if indices is None or n_experts is None:
            raise ValueError("load_stats: give counts, or indices and n_experts")
        counts = load_counts(indices, n_experts)
    c = _as(counts, _I64, "counts", ndim=1)
    return _dsmoe.load_stats(c, int(groups))


# ------------------------------------------------------------------------ MoE --

class MoE:
    """A DeepSeekMoE layer (dsmoe_moe) loaded from a safetensors file in Hugging Face
    names; .forward(x) runs it on (T, D) float32 tokens. For training with autograd
    use dsmoe.torch.MoE."""

    def __init__(self, handle):
        self._h = handle
        D, F, ns, E, K, train, max_tokens, rc = handle.config()
        self.hidden_size, self.expert_size, self.n_shared = D, F, ns
        self.n_experts, self.top_k, self.max_tokens = E, K, max_tokens
        self.router = rc
        self.last_routing = None

    @classmethod
    def load(cls, path, prefix=None, preset="deepseek-v3", *, n_shared=-1, max_tokens=512,
             threads=0, bf16=False, capacity_factor=0.0, **overrides):
        """Loads a layer (dsmoe_moe_load): prefix None takes the file's only layer.
        The routing config is the file's when dsmoe saved it, else preset/overrides."""
        rc = router_config(preset, **overrides)
        return cls(_dsmoe.moe_load(_os.fspath(path), prefix, rc, int(n_shared),
                                   int(max_tokens), int(threads), bool(bf16),
                                   float(capacity_factor)))

    def forward(self, x, *, threads=0, routing=False):
        """y (T, D) = layer(x (T, D)); any T (chunks of max_tokens). With routing=True
        returns (y, dict of indices, weights, scores, logits, counts, n_dropped)."""
        D, E, K = self.hidden_size, self.n_experts, self.top_k
        xx, T = _tokens(_as(x, _F32, "x"), "x", D, "the layer's hidden size %d" % D)
        y = _empty((T, D), _F32)
        r = None
        if routing:
            r = {"indices": _empty((T, K), _I32), "weights": _empty((T, K), _F32),
                 "scores": _empty((T, E), _F32), "logits": _empty((T, E), _F32),
                 "counts": _empty(E, _I64)}
            dropped, _ = self._h.forward(y, xx, T, threads, r["indices"], r["weights"],
                                         r["scores"], r["logits"], r["counts"])
            r["n_dropped"] = dropped
            return y, r
        self._h.forward(y, xx, T, threads, None, None, None, None, None)
        return y

    __call__ = forward

    def state_dict(self):
        """Every tensor of the layer as float32 arrays, Hugging Face names without prefix."""
        out = {}
        for name, shape, _, _, _ in self._h.tensors():
            a = _empty(shape, _F32)
            self._h.tensor_copy(name, a)
            out[name] = a
        return out

    @property
    def bias(self):
        b = _empty(self.n_experts, _F32)
        return b if self._h.get_bias(b) else None

    @bias.setter
    def bias(self, value):
        b = _as(value, _F32, "bias")
        if b.shape != (self.n_experts,):
            raise ValueError("bias: expected shape (%d,), got %s" % (self.n_experts, b.shape))
        self._h.set_bias(b)

    def save(self, path, prefix=""):
        self._h.save(_os.fspath(path), prefix)


from ._model import Model  # noqa: E402  (needs the helpers above)
