#!/usr/bin/python3
"""gen_optim_golden.py — writes tests/golden/train/adamw_*.npy with PyTorch's own
optimizer (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_), the reference that
dsmoe's AdamW (src/train/optim.c) must agree with.

    /usr/bin/python3 tests/ref/gen_optim_golden.py

Three float32 tensors — a matrix with weight decay, a vector without, a matrix of
tiny gradients (so eps matters) — go through S = 12 steps of random gradients
(float32, stored), clipped to a global norm of 1.5, with the learning rate of each
step set from the schedule (linear warm-up over 3 steps, cosine to 0.2·lr at step 10,
then flat) computed here independently. Files:
    adamw_p0.npy (N) f32        the initial parameters of the three tensors, concatenated
    adamw_grads.npy (S, N) f32  the gradient of each step
    adamw_sizes.npy (3) i32     the tensors' sizes
    adamw_wd.npy (3) f64        their weight decay
    adamw_hyper.npy (9) f64     lr, beta1, beta2, eps, clip, warmup, total, min_ratio, S
    adamw_lr.npy (S) f64        the learning rate of each step
    adamw_norm.npy (S) f64      the global gradient norm before clipping (torch's, f32)
    adamw_p.npy (S, N) f32      the parameters after each step
    adamw_m.npy, adamw_v.npy (N) f32  the moments after the last step
Deterministic (fixed seed).
"""

import math
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "train")


def lr_at(t, lr, warm, total, ratio):
    lo = lr * ratio
    if t <= warm:
        return lr * t / warm
    if t > total:
        return lo
    prog = (t - warm) / (total - warm)
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * prog))


def main():
    rng = np.random.default_rng(20261206)
    sizes = [7 * 5, 9, 4 * 3]
    wds = [0.1, 0.0, 0.05]
    lr, b1, b2, eps, clip, warm, total, ratio, S = 0.01, 0.9, 0.95, 1e-8, 1.5, 3, 10, 0.2, 12
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = np.zeros((S, sum(sizes)), np.float32)
    for s in range(S):
        parts = [rng.standard_normal(sizes[0]) * 0.4, rng.standard_normal(sizes[1]) * 0.3,
                 rng.standard_normal(sizes[2]) * 1e-7]
        grads[s] = np.concatenate(parts).astype(np.float32)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": w} for p, w in zip(params, wds)],
                            lr=lr, betas=(b1, b2), eps=eps)
    lrs, norms, traj = [], [], []
    for s in range(S):
        off = 0
        for p, n in zip(params, sizes):
            p.grad = torch.from_numpy(grads[s, off:off + n].copy())
            off += n
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        norms.append(float(norm))
        lr_s = lr_at(s + 1, lr, warm, total, ratio)
        lrs.append(lr_s)
        for g in opt.param_groups:
            g["lr"] = lr_s
        opt.step()
        traj.append(np.concatenate([p.detach().numpy() for p in params]))
    m = np.concatenate([opt.state[p]["exp_avg"].numpy() for p in params])
    v = np.concatenate([opt.state[p]["exp_avg_sq"].numpy() for p in params])
    os.makedirs(OUT, exist_ok=True)
    save = lambda name, a: np.save(os.path.join(OUT, name), a)  # noqa: E731
    save("adamw_p0.npy", np.concatenate(p0))
    save("adamw_grads.npy", grads)
    save("adamw_sizes.npy", np.array(sizes, np.int32))
    save("adamw_wd.npy", np.array(wds, np.float64))
    save("adamw_hyper.npy", np.array([lr, b1, b2, eps, clip, warm, total, ratio, S], np.float64))
    save("adamw_lr.npy", np.array(lrs, np.float64))
    save("adamw_norm.npy", np.array(norms, np.float64))
    save("adamw_p.npy", np.stack(traj).astype(np.float32))
    save("adamw_m.npy", m.astype(np.float32))
    save("adamw_v.npy", v.astype(np.float32))


if __name__ == "__main__":
    main()
