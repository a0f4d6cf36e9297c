"""Where one LDDMM iteration spends its time (``torch.profiler``), per grid size.

A single-level problem (``scales=(1,)``, no affine-only stage, a fixed iteration count) on a synthetic
smooth source (1 channel) and target (3 channels) of ``n x n`` pixels is profiled; the time of every
evaluation is split into the engine's labelled scopes:

* ``flow``: the velocity from its per-scale parameters (FFT regulariser) and the inverse flow on the grid;
* ``deform``: the pulled-back pixel positions and the interpolation of the source there;
* ``data_term``: the mixture (contrast fit, class log-likelihoods, posteriors, closed-form gradient);
* ``backward``: autograd through the interpolations, the flow and the FFTs;
* the rest: the optimiser (L-BFGS two-loop, line search bookkeeping, EM updates) and Python overhead.

It also prints energy evaluations per iteration (line-search trials; the gradient is taken for accepted ones
and after each M-step) and the top operators.

Usage::

    python benchmarks/profile_lddmm.py [--sizes 200 400 1000] [--iters 10] [--threads 2] [--dtype float32]
                                       [--channels 4] [--data-term]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.profiler import ProfilerActivity, profile

from spatialdata_align.registration import lddmm

SCOPES = ("lddmm.flow", "lddmm.deform", "lddmm.data_term", "lddmm.backward")


def problem(n: int, seed: int = 0, channels: int = 1):
    rng = np.random.default_rng(seed)
    src = np.stack([gaussian_filter(rng.random((n, n)), 3) for _ in range(channels)])
    tgt = np.stack([gaussian_filter(rng.random((n, n)), 3) for _ in range(3)])
    return src, tgt


def data_term_ms(src: np.ndarray, tgt: np.ndarray, dtype) -> float:
    """Best-of-8 time (ms) of one evaluation of the mixture term (energy and gradient) on these pixels."""
    from spatialdata_align.registration._data import MixtureTerm

    J = torch.as_tensor(tgt.reshape(tgt.shape[0], -1), dtype=dtype)
    Iw = torch.as_tensor(src.reshape(src.shape[0], -1), dtype=dtype)
    term = MixtureTerm(J, (0.5 * float(J.std()), float(J.std()), None), 3, (True, True, True))
    term.init_colours(J[:, :1000])
    _, _, post = term.evaluate(Iw, want_post=True)
    term.m_step(post, term.occupancy(Iw), update_priors=False)
    best = float("inf")
    for _ in range(8):
        t = time.perf_counter()
        term.evaluate(Iw)
        best = min(best, time.perf_counter() - t)
    return best * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 1000])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--top", type=int, default=12, help="operators listed per size")
    ap.add_argument(
        "--channels", type=int, default=1, help="source channels (the default cell-type source has 4: density + 3)"
    )
    ap.add_argument(
        "--data-term", action="store_true", help="also time one evaluation of the mixture term alone (best of 8)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    kw = dict(
        scales=(1,), max_iter=(args.iters,), affine_iter=0, tol=0, min_iter=args.iters, progress=False, dtype=dtype
    )
    lddmm(*problem(64), **dict(kw, max_iter=(2,)))  # warm-up
    for n in args.sizes:
        src, tgt = problem(n, channels=args.channels)
        if args.data_term:
            print(f"\n{n} x {n}, {args.channels} source channels: mixture term {data_term_ms(src, tgt, dtype):.1f} ms")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            reg = lddmm(src, tgt, **kw)
            wall = time.perf_counter() - t
        it = len(reg.energy)
        ev, ng = reg.params["evaluations"], reg.params.get("gradients", reg.params["evaluations"])
        events = {e.key: e for e in prof.key_averages()}
        total_ms = wall * 1000
        print(
            f"\n== {n} x {n}: {wall / it * 1000:.1f} ms per iteration, {ev / it:.2f} evaluations and "
            f"{ng / it:.2f} gradients per iteration, "
            f"velocity grid {reg.velocity_values.shape[2]} x {reg.velocity_values.shape[3]} "
            f"(+{len(reg.params['kernel_scales']) - 1} coarser scales)"
        )
        scoped = 0.0
        for s in SCOPES:
            ms = events[s].cpu_time_total / 1000 if s in events else 0.0
            scoped += ms
            print(f"  {s[6:]:10s} {ms / it:8.1f} ms/iteration  {100 * ms / total_ms:5.1f} %")
        print(
            f"  {'other':10s} {(total_ms - scoped) / it:8.1f} ms/iteration  "
            f"{100 * (total_ms - scoped) / total_ms:5.1f} %"
            "  (optimiser, EM, Python)"
        )
        ops = [e for e in prof.key_averages() if not e.key.startswith("lddmm.")]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        print("  top operators (self time per iteration):")
        for e in ops[: args.top]:
            print(f"    {e.key:40s} {e.self_cpu_time_total / 1000 / it:8.1f} ms  ({e.count // it} calls)")


if __name__ == "__main__":
    main()
