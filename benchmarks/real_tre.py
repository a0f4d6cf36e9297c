"""Held-out-landmark TRE of the engine on real tissue (shared/data/stalign_rasters).

MERFISH mouse brain slice 2: replicate 3 (source) -> replicate 2 (target), cell-density rasters at
15 µm, 13 matched landmarks. For several 4-landmark subsets the affine is fitted on the 4 and the
error measured on the other 9, for the affine alone and after LDDMM (which never sees the held-out
points). Xenium breast Rep2 -> Rep1 (30 µm, 3 landmarks): leave-one-out with a similarity fit.

Usage: python benchmarks/real_tre.py [--data ../shared/data/stalign_rasters] [--subsets 5]
Data: Vizgen MERFISH Mouse Brain Receptor Map (slice 2, replicates 2/3); 10x Genomics Xenium FFPE
Human Breast Cancer preview (Rep1/Rep2, CC BY 4.0); rasters from the STalign tutorial data folders.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import xarray as xr

from spatialdata_align._accessor import landmark_sigma
from spatialdata_align.registration import fit_affine, lddmm


def load(data: Path, name: str):
    d = np.load(data / f"{name}.npz")
    img = xr.DataArray(d["I"], dims=("c", "y", "x"), coords={"c": [0], "y": d["y"], "x": d["x"]})
    pts = np.load(data / f"{name}_points.npy", allow_pickle=True).item()
    pts = np.concatenate([np.asarray(pts[k], float).reshape(-1, 2) for k in sorted(pts)])
    return img, pts


def spread_subsets(pts: np.ndarray, k: int, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The n k-subsets with the largest spread (smallest singular value of the centred points)."""
    combos = list(itertools.combinations(range(len(pts)), k))
    score = [np.linalg.svd(pts[list(c)] - pts[list(c)].mean(0), compute_uv=False)[-1] for c in combos]
    order = np.argsort(score)[::-1]
    rng = np.random.default_rng(seed)
    top = [combos[i] for i in order[: max(n * 5, n)]]
    return [top[i] for i in sorted(rng.choice(len(top), size=min(n, len(top)), replace=False))]


def run(source, target, src_pts, dst_pts, fit_idx, kind, landmark_term: bool = True, **kw):
    """Affine from the ``fit_idx`` landmarks, then LDDMM; errors at the others.

    With ``landmark_term`` (the pipeline's default, ``sdata.align.lddmm(landmarks="auto")``) the LDDMM is also
    pulled through the fitting landmarks, with ``sigma_p`` = ``LANDMARK_SIGMA_UM`` µm (never the held-out ones).
    """
    held = [i for i in range(len(src_pts)) if i not in fit_idx]
    fit = fit_affine(src_pts[list(fit_idx)], dst_pts[list(fit_idx)], kind=kind)
    e_aff = np.linalg.norm(fit.transform_points(src_pts[held]) - dst_pts[held], axis=1)
    if landmark_term:
        kw.setdefault("source_landmarks", src_pts[list(fit_idx)])
        kw.setdefault("target_landmarks", dst_pts[list(fit_idx)])
        kw.setdefault("sigma_p", landmark_sigma(fit.matrix))
    t = time.perf_counter()
    reg = lddmm(source, target, affine=fit.matrix, progress=False, source_units="um", target_units="um", **kw)
    dt = time.perf_counter() - t
    e_reg = np.linalg.norm(reg.transform_points(src_pts[held]) - dst_pts[held], axis=1)
    return e_aff, e_reg, dt, len(reg.energy)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/stalign_rasters"))
    ap.add_argument("--subsets", type=int, default=5)
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.exists():
        raise SystemExit(f"no real data at {data} (shared/data is not part of the package)")
    kw = {"contrast_degree": 3, "sigma_r": 300.0}

    print("== MERFISH slice 2: R3 (source) -> R2 (target), 15 um pixels, 13 landmarks ==")
    src, sp = load(data, "Merfish_S2_R3")
    tgt, tp = load(data, "Merfish_S2_R2")
    rows = []
    for idx in spread_subsets(sp, 4, args.subsets):
        e_aff, e_reg, dt, nit = run(src, tgt, sp, tp, idx, "affine", **kw)
        rows.append((np.median(e_aff), np.median(e_reg), dt, nit))
        print(
            f"  fit on {idx}: held-out median TRE affine {np.median(e_aff):7.1f} um -> LDDMM "
            f"{np.median(e_reg):7.1f} um  ({dt:.1f} s, {nit} iterations)"
        )
    r = np.array(rows)
    print(
        f"  median over subsets: affine {np.median(r[:, 0]):.1f} um, LDDMM {np.median(r[:, 1]):.1f} um, "
        f"time {np.median(r[:, 2]):.1f} s"
    )

    print("== Xenium breast: Rep2 (source) -> Rep1 (target), 30 um pixels, 3 landmarks, leave-one-out ==")
    src, sp = load(data, "Xenium_Breast_Cancer_Rep2")
    tgt, tp = load(data, "Xenium_Breast_Cancer_Rep1")
    rows = []
    for held in range(len(sp)):
        idx = tuple(i for i in range(len(sp)) if i != held)
        e_aff, e_reg, dt, nit = run(src, tgt, sp, tp, idx, "similarity", **kw)
        rows.append((e_aff[0], e_reg[0], dt))
        print(f"  hold out {held}: TRE similarity {e_aff[0]:7.1f} um -> LDDMM {e_reg[0]:7.1f} um ({dt:.1f} s)")
    r = np.array(rows)
    print(f"  median: similarity {np.median(r[:, 0]):.1f} um, LDDMM {np.median(r[:, 1]):.1f} um")


if __name__ == "__main__":
    main()
