"""Speed and accuracy of this engine's LDDMM against STalign, on the same inputs, in one process.

For each dataset both methods get the same source image, the same target image on the same grid, the same
initial affine (from landmarks) and the same smoothness scale ``a``; each runs to its own stopping rule:
this engine to convergence (multi-scale L-BFGS with an energy-window test and iteration caps), STalign for its
fixed iteration count (default 5000, its own default; ``--stalign-niter`` changes it). The script prints
wall time of each, the time ratio, and the target registration error (TRE) of each:

* ``twin``: generated twin sections (``spatialdata_align.datasets.twin_sections``): Xenium cell density (source,
  µm) -> Visium H&E hires image (target, full-resolution pixels); TRE over every cell against the known truth.
* ``merfish``: real MERFISH mouse brain slice 2, replicate 3 -> replicate 2 (cell-density rasters, 15 µm
  pixels, from ``../shared/data/stalign_rasters``); affine from 4 landmarks, TRE on the 9 held-out landmarks.

STalign (GPL-3.0) comes from the optional ``bench`` extra (``pip install -e ".[bench]"``, the ``stalign-modern``
distribution); it is imported here only, never by the package.

Usage::

    python benchmarks/bench_lddmm.py [--datasets twin merfish] [--stalign-niter 5000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from _peers import run_stalign  # the STalign runner shared with accuracy.py

from spatialdata_align.registration import fit_affine, lddmm, rasterize

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stalign_rasters"


# ----------------------------------------------------------------------------------------------- inputs
def merfish():
    def load(name):
        d = np.load(DATA / f"{name}.npz")
        img = xr.DataArray(d["I"], dims=("c", "y", "x"), coords={"c": [0], "y": d["y"], "x": d["x"]})
        pts = np.load(DATA / f"{name}_points.npy", allow_pickle=True).item()
        return img, np.concatenate([np.asarray(pts[k], float).reshape(-1, 2) for k in sorted(pts)])

    src, sp = load("Merfish_S2_R3")
    tgt, tp = load("Merfish_S2_R2")
    fit_idx = [1, 5, 7, 12]  # well spread; the other 9 are held out
    held = [i for i in range(len(sp)) if i not in fit_idx]
    fit = fit_affine(sp[fit_idx], tp[fit_idx])
    return {
        "name": "MERFISH S2 R3 -> R2 (real, 15 um px, 9 held-out landmarks)",
        "source": src,
        "target": tgt,
        "affine": fit.matrix,
        "eval_src": sp[held],
        "eval_dst": tp[held],
        "um_per_target_unit": 1.0,
        "params": {"contrast_degree": 3, "sigma_r": 300.0},
    }


def twin(n_cells: int, n_spots: int, dx: float):
    import spatialdata_align as sda
    from spatialdata_align._constants import VISIUM_CS, VISIUM_HIRES, XENIUM_CELLS, XENIUM_CS
    from spatialdata_align._elements import element_xy, image_in_cs

    tmp = Path(tempfile.mkdtemp(prefix="bench_lddmm_"))
    tw = sda.datasets.twin_sections(tmp, n_cells=n_cells, n_spots=n_spots, seed=0)
    sdata = sda.io.read_pair(tw.xenium_path, tw.visium_path)
    cells = element_xy(sdata, XENIUM_CELLS, XENIUM_CS)
    src = rasterize(cells, dx=dx)
    tgt = image_in_cs(sdata, VISIUM_HIRES, VISIUM_CS)
    lm = slice(0, 4)
    fit = fit_affine(tw.truth.landmarks_source[lm], tw.truth.landmarks_target[lm])
    return {
        "name": f"twin sections ({len(cells)} cells, {n_spots} spots; TRE over every cell)",
        "source": src,
        "target": tgt,
        "affine": fit.matrix,
        "eval_src": cells,
        "eval_dst": tw.truth.forward(cells),
        "um_per_target_unit": tw.truth.um_per_px,
        "params": {},
    }


# ----------------------------------------------------------------------------------------------- runners
def run_ours(d):
    t = time.perf_counter()
    reg = lddmm(d["source"], d["target"], affine=d["affine"], progress=False, **d["params"])
    dt = time.perf_counter() - t
    err = np.linalg.norm(reg.transform_points(d["eval_src"]) - d["eval_dst"], axis=1) * d["um_per_target_unit"]
    return reg, dt, err


def fmt(err):
    return f"median {np.median(err):7.2f} um, p95 {np.percentile(err, 95):7.2f} um"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["twin", "merfish"], choices=["twin", "merfish"])
    ap.add_argument("--stalign-niter", type=int, default=5000, help="STalign iterations (its default: 5000)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both methods")
    ap.add_argument(
        "--stalign-steps",
        default='{"epV": 50.0, "diffeo_start": 100}',
        help="JSON dict of STalign step parameters. Its defaults (epL=2e-8, epT=0.2, epV=2e3) diverged on the "
        "twin sections (median TRE 192 um after 600 iterations); epV=50 with 100 affine-only iterations first "
        "was the best of a small search at 600 iterations (5.1 um). Pass '{}' for STalign's own defaults.",
    )
    ap.add_argument("--n-cells", type=int, default=60000, help="twin: Xenium cells (60k over 1500 spots ≈ 4600/mm²)")
    ap.add_argument("--n-spots", type=int, default=1500)
    ap.add_argument("--dx", type=float, default=30.0, help="twin: source raster pixel (um)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float64")
    # warm-up (first torch calls in a process pay one-off allocation costs) for both methods
    rng = np.random.default_rng(0)
    lddmm(rng.random((1, 40, 40)), rng.random((3, 40, 40)), progress=False, max_iter=(3, 3, 3), affine_iter=3)
    rows = []
    for name in args.datasets:
        if name == "merfish" and not DATA.exists():
            print(f"skip merfish: {DATA} not found")
            continue
        d = merfish() if name == "merfish" else twin(args.n_cells, args.n_spots, args.dx)
        print(f"\n== {d['name']} ==")
        err0 = (
            np.linalg.norm(d["eval_src"] @ d["affine"][:2, :2].T + d["affine"][:2, 2] - d["eval_dst"], axis=1)
            * d["um_per_target_unit"]
        )
        print(f"  landmark affine only      : {fmt(err0)}")
        reg, t_ours, err_ours = run_ours(d)
        lv = ", ".join(f"L{x['level']}/{x['stage']}:{x['iterations']}" for x in reg.params["levels"])
        print(f"  this engine               : {fmt(err_ours)}  {t_ours:8.1f} s  ({len(reg.energy)} iterations: {lv})")
        t_st, err_st, kw, shapes = run_stalign(d, reg, args.stalign_niter, json.loads(args.stalign_steps))
        label = f"STalign ({args.stalign_niter} it.)"
        print(f"  {label:26s}: {fmt(err_st)}  {t_st:8.1f} s  (steps {args.stalign_steps})")
        print(
            f"  grids: source {shapes[0]}, target {shapes[1]} (both methods); a = {kw['a']:.1f}, "
            f"sigma M/B/A = {kw['sigmaM']:.3g}/{kw['sigmaB']:.3g}/{kw['sigmaA']:.3g}"
        )
        print(
            f"  speed-up (STalign time / this engine's time): {t_st / t_ours:6.1f}x;  "
            f"median TRE ratio (this engine / STalign): {np.median(err_ours) / np.median(err_st):.2f}"
        )
        rows.append((name, t_ours, t_st, np.median(err_ours), np.median(err_st)))
    if rows:
        print("\nsummary: dataset, time ours (s), time STalign (s), speed-up, median TRE ours / STalign (um)")
        for name, t1, t2, e1, e2 in rows:
            print(f"  {name:8s} {t1:8.1f} {t2:9.1f} {t2 / t1:7.1f}x   {e1:.2f} / {e2:.2f}")


if __name__ == "__main__":
    main()
