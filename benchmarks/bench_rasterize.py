"""Rasterisation speed: the vectorised ``rasterize`` against a per-point Python loop, in one process.

The peer is the straightforward loop a first implementation writes (for each point, add a Gaussian
footprint to the image), run on a subsample and reported per point, since looping over 10^6 points would
take minutes. Both produce the same blurred density (checked on the subsample).

Usage::

    python benchmarks/bench_rasterize.py [--n 1000000] [--loop-n 20000] [--genes 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from spatialdata_align.registration import rasterize


def loop_rasterize(xy, dx, blur, xs, ys):
    """Per-point loop: each point adds a normalised Gaussian (truncated at 4 sigma) to the image."""
    img = np.zeros((ys.size, xs.size))
    r = int(np.ceil(4 * blur / dx))
    for x, y in xy:
        j, i = round((x - xs[0]) / dx), round((y - ys[0]) / dx)
        i0, i1, j0, j1 = max(i - r, 0), min(i + r + 1, ys.size), max(j - r, 0), min(j + r + 1, xs.size)
        gy = np.exp(-((ys[i0:i1] - y) ** 2) / (2 * blur**2))
        gx = np.exp(-((xs[j0:j1] - x) ** 2) / (2 * blur**2))
        k = np.outer(gy, gx)
        img[i0:i1, j0:j1] += k / k.sum()
    return img


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="points for the vectorised rasteriser")
    ap.add_argument("--loop-n", type=int, default=20_000, help="points for the per-point loop")
    ap.add_argument("--genes", type=int, default=300, help="channels of the multi-channel case")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 8000, size=(args.n, 2))
    dx, blur = 20.0, 20.0

    rasterize(xy[:1000], dx=dx)  # warm-up
    t = time.perf_counter()
    img = rasterize(xy, dx=dx, blur=blur)
    t_vec = time.perf_counter() - t
    print(
        f"rasterize: {args.n:,} points -> {img.shape[1]}x{img.shape[2]} px in {t_vec:.2f} s "
        f"({t_vec / args.n * 1e9:.0f} ns/point); mass {float(img.sum()):,.1f}"
    )

    sub = xy[: args.loop_n]
    ref = rasterize(sub, dx=dx, blur=blur, extent=(0, 8000, 0, 8000))
    t = time.perf_counter()
    loop = loop_rasterize(sub, dx, blur, ref.x.values, ref.y.values)
    t_loop = time.perf_counter() - t
    rel = np.abs(loop - ref.values[0]).sum() / loop.sum()
    per_vec, per_loop = t_vec / args.n, t_loop / args.loop_n
    print(
        f"per-point loop: {args.loop_n:,} points in {t_loop:.2f} s ({per_loop * 1e9:.0f} ns/point); "
        f"relative L1 difference of the two images {rel:.3f} (splatting vs nearest-pixel footprint)"
    )
    print(
        f"speed-up per point (loop / vectorised): {per_loop / per_vec:.0f}x; "
        f"the loop would take ~{per_loop * args.n:.0f} s for {args.n:,} points"
    )

    counts = sp.random(args.n // 10, args.genes, density=0.05, format="csr", random_state=0) * 10
    t = time.perf_counter()
    img_g = rasterize(xy[: args.n // 10], weights=counts, dx=dx, blur=blur)
    print(
        f"rasterize: {args.n // 10:,} cells x {args.genes} genes (sparse weights) -> {img_g.shape} "
        f"in {time.perf_counter() - t:.2f} s"
    )


if __name__ == "__main__":
    main()
