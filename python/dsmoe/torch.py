"""dsmoe for PyTorch: the router and the MoE layer as nn.Modules whose forward and
backward run libdsmoe's kernels (CPU tensors) through torch.autograd.Function, with the
parameter names of Hugging Face's DeepseekV3 modules, so that load_state_dict takes an
HF state dict unchanged; and LossFreeBalancer, which nudges each layer's
e_score_correction_bias after every optimizer step (DeepSeek-V3's auxiliary-loss-free
balancing).

    router = dsmoe.torch.Router(hidden_size=1024, preset="deepseek-v3")
    idx, w = router(hidden)                      # (T, K) int64, (T, K) float32
    moe = dsmoe.torch.MoE(1024, 256, n_experts=64, top_k=6, groups=1, topk_groups=1)
    balancer = dsmoe.torch.LossFreeBalancer(model, gamma=1e-3).attach(optimizer)
"""
import math as _math

import numpy as _np
import torch as _torch
from torch import nn as _nn

import dsmoe as _d
from . import _dsmoe

__all__ = ["Router", "MoE", "LossFreeBalancer", "route"]


_F32 = _torch.float32


def _np32(t, name):
    """A float32 C-contiguous NumPy view of a CPU tensor (a copy only if needed; the
    checks on the NumPy side, which cost less than torch's per call)."""
    try:
        a = t.detach().numpy() if t.requires_grad else t.numpy()
    except (TypeError, RuntimeError):  # another device, or a dtype NumPy lacks (bf16)
        if t.device.type != "cpu":
            raise ValueError("%s: dsmoe runs on CPU tensors, got one on %s" % (name, t.device))
        a = t.detach().to(_F32).numpy()
    if a.dtype != _np.float32 or not a.flags.c_contiguous:
        a = _np.ascontiguousarray(a, _np.float32)
    return a


class _RouteFn(_torch.autograd.Function):
    """(indices, weights) = route(logits); d logits from d weights by dsmoe_router_backward."""

    @staticmethod
    def forward(ctx, logits, bias, cfg, threads, stats):
        if logits.dim() < 1 or logits.shape[-1] != cfg.n_experts:
            raise ValueError("logits: expected shape (T, %d) (the router's experts), got %s"
                             % (cfg.n_experts, tuple(logits.shape)))
        x = _np32(logits, "logits")
        b = None if bias is None else _np32(bias, "bias")
        idx, w, s, c = _d.route(x.reshape(-1, cfg.n_experts), b, cfg, threads=threads,
                                scores=True, counts=True)
        if stats is not None:
            stats.append(c)
        ctx.cfg, ctx.threads = cfg, threads
        ctx.save_for_backward(_torch.from_numpy(idx), _torch.from_numpy(s))
        shape = logits.shape[:-1] + (cfg.top_k,)
        i = _torch.from_numpy(idx).to(_torch.int64).reshape(shape)
        ctx.mark_non_differentiable(i)
        return i, _torch.from_numpy(w).to(logits.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, gi, gw):
        if gw is None:
            return None, None, None, None, None
        idx, s = ctx.saved_tensors
        cfg = ctx.cfg
        d = _d.router_backward(_np32(gw, "grad").reshape(-1, cfg.top_k), idx.numpy(), s.numpy(),
                               cfg, threads=ctx.threads)
        shape = gw.shape[:-1] + (cfg.n_experts,)
        return _torch.from_numpy(d).to(gw.dtype).reshape(shape), None, None, None, None


def _route_nograd(logits, bias, cfg, threads, stats):
    """The forward alone (no graph to record): no autograd Function, no saved scores."""
    if logits.dim() < 1 or logits.shape[-1] != cfg.n_experts:
        raise ValueError("logits: expected shape (T, %d) (the router's experts), got %s"
                         % (cfg.n_experts, tuple(logits.shape)))
    x = _np32(logits, "logits")
    b = None if bias is None else _np32(bias, "bias")
    r = _d.route(x.reshape(-1, cfg.n_experts), b, cfg, threads=threads, counts=stats is not None)
    if stats is not None:
        stats.append(r[2])
    i, w = _torch.from_numpy(r[0].astype(_np.int64)), _torch.from_numpy(r[1])
    if logits.dim() != 2:
        shape = logits.shape[:-1] + (cfg.top_k,)
        i, w = i.reshape(shape), w.reshape(shape)
    return i, (w if logits.dtype == _F32 else w.to(logits.dtype))


def _route(logits, bias, cfg, threads, stats):
    if logits.requires_grad and _torch.is_grad_enabled():
        return _RouteFn.apply(logits, bias, cfg, threads, stats)
    return _route_nograd(logits, bias, cfg, threads, stats)


def route(logits, bias=None, preset="deepseek-v3", *, threads=1, **overrides):
    """dsmoe.route on a tensor of logits (..., E), differentiable in the weights:
    returns (indices int64 (..., K), weights (..., K))."""
    return _route(logits, bias, _d.router_config(preset, **overrides), threads, None)


def _linear_init_(w, fan_in):
    bound = 1.0 / _math.sqrt(fan_in)
    with _torch.no_grad():
        w.uniform_(-bound, bound)


class Router(_nn.Module):
    """DeepSeek-V3's gate (Hugging Face DeepseekV3TopkRouter's names): weight (E, D),
    buffer e_score_correction_bias (E) when the config uses a bias. forward(hidden
    (..., D)) -> (indices int64 (..., K), weights (..., K)); the logits are
    hidden · weightᵀ in float32 (autograd by torch), the routing and its backward
    are dsmoe's."""

    def __init__(self, hidden_size, n_experts=None, preset="deepseek-v3", *, threads=1,
                 **overrides):
        super().__init__()
        if n_experts is not None:
            overrides["experts"] = n_experts
        self.config = _d.router_config(preset, **overrides)
        E = self.config.n_experts
        self.hidden_size, self.n_experts, self.top_k = hidden_size, E, self.config.top_k
        self.threads = threads
        self.weight = _nn.Parameter(_torch.empty(E, hidden_size))
        _linear_init_(self.weight, hidden_size)
        if self.config.use_bias:
            self.register_buffer("e_score_correction_bias", _torch.zeros(E))
        else:
            self.e_score_correction_bias = None
        self._stats = None  # a list the counts go to when a LossFreeBalancer watches

    def forward(self, hidden):
        logits = _nn.functional.linear(hidden.to(_torch.float32), self.weight.to(_torch.float32))
        stats = self._stats if self.training else None
        return _route(logits, self.e_score_correction_bias, self.config, self.threads, stats)


class _Linear(_nn.Module):
    """A bias-free linear layer whose weight is a view into the layer's flat parameters."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight


class _MLP(_nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _Linear(gate), _Linear(up), _Linear(down)


class _Gate(_nn.Module):
    def __init__(self, weight, use_bias, E):
        super().__init__()
        self.weight = weight
        if use_bias:
            self.register_buffer("e_score_correction_bias", _torch.zeros(E))
        else:
            self.e_score_correction_bias = None


def _aligned_zeros(n):
    """n float32 zeros, 64-byte aligned (what libdsmoe asks of caller buffers)."""
    raw = _np.zeros(n + 16, _np.float32)
    off = (-raw.ctypes.data % 64) // 4
    return raw[off:off + n]


class _MoEFn(_torch.autograd.Function):
    """(y, router logits) = layer(x); the backward takes dL/dy and dL/dlogits (e.g. of
    a balance loss on the logits) into dsmoe_moe_backward."""

    @staticmethod
    def forward(ctx, x, mod, *params):
        xs = x.shape
        if x.dim() < 1 or xs[-1] != mod.hidden_size:
            raise ValueError("x: expected shape (..., %d) (the layer's hidden size), got %s"
                             % (mod.hidden_size, tuple(xs)))
        xx = _np32(x, "x").reshape(-1, mod.hidden_size)
        T = xx.shape[0]
        if T > mod.max_tokens:
            raise ValueError("MoE: %d tokens in one forward, more than max_tokens = %d (set "
                             "max_tokens when making the layer)" % (T, mod.max_tokens))
        y = _np.empty_like(xx)
        lg = _np.empty((T, mod.n_experts), _np.float32)
        c = _np.empty(mod.n_experts, _np.int64)
        _, fid = mod._h.forward(y, xx, T, mod.threads, None, None, None, lg, c)
        if mod.training and mod._stats is not None:
            mod._stats.append(c)
        mod.last_counts = c
        ctx.mod, ctx.fid, ctx.xx, ctx.xs = mod, fid, xx, xs
        ctx.bias = mod._bias_used
        ctx.versions = [p._version for p in params]
        return (_torch.from_numpy(y).to(x.dtype).reshape(xs),
                _torch.from_numpy(lg).reshape(xs[:-1] + (mod.n_experts,)))

    @staticmethod
    def backward(ctx, dy, dlogits):
        mod = ctx.mod
        xx = ctx.xx
        T = xx.shape[0]
        dyy = (_np.zeros_like(xx) if dy is None else
               _np32(dy, "grad").reshape(T, mod.hidden_size))
        extra = None if dlogits is None else _np32(dlogits, "grad").reshape(T, mod.n_experts)
        dx = _np.zeros_like(xx)
        fid = ctx.fid
        if fid != mod._h.forwards():
            # the layer ran another forward since (the layer used twice in a graph, or
            # gradcheck): run this one again, with the same weights and bias, to restore
            # the activations the backward reads
            if [p._version for p in mod._params] != ctx.versions:
                raise RuntimeError("dsmoe MoE backward: the weights changed in place since "
                                   "the forward being differentiated")
            if ctx.bias is not None:
                mod._h.set_bias(ctx.bias)
            y = _np.empty_like(xx)
            _, fid = mod._h.forward(y, xx, T, mod.threads, None, None, None, None, None)
            if mod._bias_used is not None:
                mod._h.set_bias(mod._bias_used)
        mod._h.zero_grad()
        mod._h.backward(dx, dyy, xx, extra, T, mod.threads, fid)
        grads = [mod._grads_t[o:o + p.numel()].view(p.shape).clone()
                 for p, o in zip(mod._params, mod._goffs)]
        return (_torch.from_numpy(dx).reshape(ctx.xs), None) + tuple(grads)


class MoE(_nn.Module):
    """The DeepSeekMoE layer (Hugging Face DeepseekV3MoE's names): gate.weight (E, D),
    gate.e_score_correction_bias (E) buffer, experts.{e}.{gate,up,down}_proj.weight,
    shared_experts.{gate,up,down}_proj.weight. forward(x (..., D)) -> (..., D); forward
    and backward (input and every weight gradient) run in libdsmoe on fp32 CPU tensors.
    The parameters are views into one flat buffer that the C layer reads directly (no
    copy per call); an optimizer's in-place updates and load_state_dict keep it so.
    A backward whose forward is not the layer's last one (the layer used twice in a
    graph) runs that forward again first; x's gradient comes back in float32."""

    def __init__(self, hidden_size, expert_size, n_experts=None, n_shared=1,
                 preset="deepseek-v3", *, max_tokens=512, threads=0, capacity_factor=0.0,
                 seed=0, **overrides):
        super().__init__()
        if n_experts is not None:
            overrides["experts"] = n_experts
        cfg = _d.router_config(preset, **overrides)
        self.config = cfg
        self.hidden_size, self.expert_size, self.n_shared = hidden_size, expert_size, n_shared
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.max_tokens, self.threads = max_tokens, threads
        n = _dsmoe.moe_param_count(cfg, hidden_size, expert_size, n_shared)
        self._pflat = _aligned_zeros(n)
        self._gflat = _aligned_zeros(n)
        self._h = _dsmoe.moe_create(cfg, hidden_size, expert_size, n_shared, True, max_tokens,
                                    threads, float(capacity_factor), self._pflat, self._gflat)
        self._h.init_random(seed)
        flat = _torch.from_numpy(self._pflat)
        self._grads_t = _torch.from_numpy(self._gflat)
        views = {}
        goffs = {}
        for name, shape, off, goff, trainable in self._h.tensors():
            if trainable:
                k = int(_np.prod(shape))
                views[name] = _nn.Parameter(flat[off:off + k].view(shape))
                goffs[name] = goff
        E = cfg.n_experts
        self.gate = _Gate(views["gate.weight"], cfg.use_bias, E)
        self.experts = _nn.ModuleList(
            _MLP(*(views["experts.%d.%s.weight" % (e, p)] for p in ("gate_proj", "up_proj", "down_proj")))
            for e in range(E))
        if n_shared > 0:
            self.shared_experts = _MLP(*(views["shared_experts.%s.weight" % p]
                                         for p in ("gate_proj", "up_proj", "down_proj")))
        # the order handed to autograd, with each one's offset into the flat buffers
        names = [n for n, *_ in self._h.tensors() if n in views]
        self._params = [views[n] for n in names]
        self._views = [p.data for p in self._params]
        self._goffs = [goffs[n] for n in names]
        self._stats = None
        self._bias_used = None
        self.last_counts = None

    def _sync(self):
        """Puts parameters whose storage was replaced (param.data = ..., .to(), a
        load that rebinds) back into the flat buffer the C layer reads."""
        for p, v in zip(self._params, self._views):
            if p.data_ptr() != v.data_ptr():
                with _torch.no_grad():
                    v.copy_(p.data)
                p.data = v
        b = self.gate.e_score_correction_bias
        if b is not None:
            self._bias_used = _np32(b, "gate.e_score_correction_bias").copy()
            self._h.set_bias(self._bias_used)

    def forward(self, x, return_logits=False):
        """y (..., D); with return_logits also the router logits (..., E), through
        which a loss on the logits (a balance or z-loss) back-propagates into the
        gate weight and x."""
        self._sync()
        y, logits = _MoEFn.apply(x, self, *self._params)
        return (y, logits) if return_logits else y


class LossFreeBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing for every dsmoe Router and MoE with
    a correction bias inside `model` (or a list of them): while they train, each
    forward's tokens per expert are collected; step() — called by the optimizer after
    each of its steps once attach(optimizer) ran, or by hand — feeds them to one
    dsmoe.Balancer per layer and writes the new bias into the layer's
    e_score_correction_bias. maxvio() is each layer's MaxVio of the last step."""

    def __init__(self, model, gamma=0.001, rule="sign", **kwargs):
        mods = model.modules() if isinstance(model, _nn.Module) else model
        self.layers = []
        for m in mods:
            bias = m.e_score_correction_bias if isinstance(m, Router) else (
                m.gate.e_score_correction_bias if isinstance(m, MoE) else None)
            if bias is None:
                continue
            bal = _d.Balancer(m.n_experts, gamma=gamma, rule=rule, **kwargs)
            bal.bias = _np32(bias, "e_score_correction_bias")
            m._stats = []
            self.layers.append((m, bias, bal))
        if not self.layers:
            raise ValueError("LossFreeBalancer: no dsmoe Router or MoE with a correction bias")
        self._hook = None

    def step(self):
        for m, bias, bal in self.layers:
            for c in m._stats:
                bal.update_counts(c, int(c.sum()) // m.top_k)
            m._stats.clear()
            bal.step()
            with _torch.no_grad():
                bias.copy_(_torch.from_numpy(bal.bias))

    def maxvio(self):
        """MaxVio_batch of each layer's last step (0 before the first)."""
        return [_d.load_stats(bal.last_counts)["maxvio"] for _, _, bal in self.layers]

    def attach(self, optimizer):
        """Runs step() after every optimizer.step(); returns self."""
        if hasattr(optimizer, "register_step_post_hook"):
            self._hook = optimizer.register_step_post_hook(lambda *a, **k: self.step())
        else:  # torch < 2.0: wrap the bound method
            inner = optimizer.step

            def step(*a, **k):
                r = inner(*a, **k)
                self.step()
                return r
            optimizer.step = step
        return self
