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
    python benchmarks/profile_lddmm.py --compile [--threads 1]

``--compile`` asks whether ``torch.compile`` pays on the CPU (issue 11 lists it "only if it pays"): the deformation's
forward pass (inverse flow on the velocity grid, pulled-back pixel positions, sampling of a 4-channel source) and its
backward, eager against ``torch.compile(dynamic=False)``, at the sizes of the pipeline's levels (velocity grid 48² with
a 150² image, 96² with 300²). On a 2-core machine, one thread, torch 2.13 (2026-12-01), two runs: eager 2.8-3.1 /
10.4-14.0 ms per forward + backward, compiled 4.4-6.3 / 15.8-19.3 ms (1.4-2.3x slower), and the first compiled call
took 52 / 38 s with an empty inductor cache, 5.4 / 4.4 s with a warm one (every level and shape compiles anew).
Not used.
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


def _deform(vn, nodes, image, grid):
    """The engine's deformation: inverse flow on the velocity grid, the source sampled at the pulled-back pixels."""
    from spatialdata_align.registration._flow import inverse_displacement_normalised, sample_grid

    disp = inverse_displacement_normalised(vn, nodes)
    z = grid + sample_grid(disp, grid).permute(1, 2, 0)
    return sample_grid(image, z, padding="zeros")


def compile_ms(n_grid: int, n_image: int, fn, reps: int = 50) -> tuple[float, float]:
    """(first call s, ms per later forward + backward) of ``fn`` = :func:`_deform` or a compiled version of it."""
    vn = (torch.randn(5, 2, n_grid, n_grid, generator=torch.Generator().manual_seed(0)) * 0.01).requires_grad_(True)
    lin = torch.linspace(-1, 1, n_grid)
    nodes = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)
    lin = torch.linspace(-1, 1, n_image)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)
    image = torch.rand(4, n_image, n_image, generator=torch.Generator().manual_seed(1))

    def once():
        (g,) = torch.autograd.grad(fn(vn, nodes, image, grid).sum(), vn)
        return g

    t = time.perf_counter()
    once()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return first, (time.perf_counter() - t) / reps * 1000


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
    ap.add_argument(
        "--compile", action="store_true", help="only compare torch.compile with eager on the deformation (see above)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        for n_grid, n_image in ((48, 150), (96, 300)):
            _, eager = compile_ms(n_grid, n_image, _deform)
            first, compiled = compile_ms(n_grid, n_image, torch.compile(_deform, dynamic=False))
            print(
                f"velocity grid {n_grid}², image {n_image}²: eager {eager:.2f} ms, compiled {compiled:.2f} ms per "
                f"forward + backward (first compiled call {first:.1f} s)"
            )
        return
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
