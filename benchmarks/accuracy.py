"""The validation table: alignment accuracy and time on every synthetic pair family, the twin sections and real tissue.

For each family (``sda.datasets.FAMILIES`` plus ``twin``; ``breast-arch`` and ``brain-arch`` of ``_realarch.py``,
whose tissue is a real density raster, when named and ``../shared/data`` is present) x cell density x seed, a pair is
generated (real 10x folders, cached with ``--cache``) and read with ``sda.io.read_pair``; then, through the public
path users take:

* **affine**: the landmark affine, ``sdata.align.affine(..., flip=True)`` from ``truth/landmarks.csv`` (3-6
  landmarks with 8-15 µm click noise for the families; the twin's landmarks are exact); unlike
  ``spatialdata-align run`` no landmark is dropped as an outlier by the input checks (``--allow-flip`` assumed:
  half the pairs are mirrored);
* **engine**: ``sdata.align.lddmm(...)`` with the DEFAULT settings, as ``spatialdata-align run`` calls it;
* **auto-init**: no landmarks, ``sdata.align.affine(..., landmarks=False, auto=True)`` then ``lddmm`` (``--auto-init``);
* **STalign** (unless ``--no-stalign``): on the grids the engine used, from the landmark affine, swept over
  ``_peers.STALIGN_BUDGETS`` iterations with its tuned steps; reported: its fastest run whose median AND p95 are
  both <= the engine's, or its best run if none is, and that run's time over the engine's.

TRE (µm) is measured over the Xenium cells that have a true counterpart in the Visium tissue
(``truth.valid``), against ``truth.forward``; errors are pooled over seeds. Real tissue (``../shared/data``):
MERFISH slice 2 R3 -> R2 held-out landmarks (affine on 4, TRE on 9, over ``--subsets`` subsets) and Xenium breast
Rep2 -> Rep1 leave-one-out, with the engine's defaults (functions of ``real_tre.py``).

Acceptance bounds (issue 10) are marked per row: >= 2000 cells/mm² median <= 10 / p95 <= 25 µm, ~900/mm²
<= 15 / 35 µm, never worse than the landmark affine; auto-init the same + 5 µm. ``TUNED_ON`` lists what
the engine defaults were chosen on (the twin sections, and seed 0 of each family at its own density); the column
*tuned on* says yes, partly or no per row, and everything else is held out.

Usage::

    python benchmarks/accuracy.py --quick                      # one seed, family density, no STalign (minutes)
    python benchmarks/accuracy.py --families stroma twin --seeds 0 1 2 --densities 900 2000 own
    python benchmarks/accuracy.py --json acc.json --markdown docs/accuracy_table.md --cache /tmp/acc_pairs
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import spatialdata_align as sda
from spatialdata_align._accessor import source_image, target_image
from spatialdata_align._constants import VISIUM_CS, VISIUM_HIRES, XENIUM_CELLS, XENIUM_CS
from spatialdata_align._elements import element_xy
from spatialdata_align._landmark_files import read_landmarks
from spatialdata_align._pipeline import PIPELINE_LDDMM, run_pipeline
from spatialdata_align.registration import fit_affine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers
import _realarch
import real_tre

#: what the engine defaults were chosen on (the lead keeps this up to date): family -> "all" or the set of
#: (density setting, seed) pairs looked at. The twin sections first; then seed 0 of every family at its own density
#: (source-dependent class priors, the affine prior, cell-type channels); then the landmark term's tolerance
#: (``LANDMARK_SIGMA_UM``), chosen on seeds 0-1 at both densities. Seed 2 and 2000 cells/mm² are held out. Of the
#: real rasters, MERFISH is tuned on: the kernel scale's share of the tissue side (``A_TISSUE``) was chosen on its
#: subsets; the Xenium breast rasters are held out
TUNED_ON: dict = {
    "twin": "all",
    "merfish": "all",
    **{
        f: {("own", 0), ("own", 1), ("900", 0), ("900", 1)}
        for f in ("stroma", "cortex", "tumour", "adipose", "texture", "damaged")
    },
}
#: acceptance bounds (median, p95) in µm by density class, issue 10; auto-init: + AUTO_SLACK
BOUNDS = {"low": (15.0, 35.0), "high": (10.0, 25.0)}
AUTO_SLACK = 5.0
#: the pipeline's raster pixel (µm): what ``spatialdata-align run`` passes to ``sdata.align.lddmm``
PIPELINE_DX = float(inspect.signature(run_pipeline).parameters["dx"].default)
#: twin sections: Xenium-section area (mm²) at their defaults (500 spots of 8660 µm², 8 % outside the capture
#: area, 5 % outside the Xenium region), to turn a density into ``n_cells``
TWIN_AREA_MM2 = 500 * 8660.0 / (1 - 0.08) * (1 - 0.05) / 1e6
REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stalign_rasters"


# ---------------------------------------------------------------------------------------------- pairs
def density_value(family: str, setting: str) -> float | None:
    """Cells/mm² of a density setting (``"own"``: the family's default, returned as None)."""
    return None if setting == "own" else float(setting)


def generator_digest(family: str = "") -> str:
    """A digest of the generators' source (``spatialdata_align/datasets/*.py``, plus ``_realarch.py`` for its families).

    A cached pair is reused only when it was written by the same generators: a table once mixed pairs of an older
    generator version (the own-density seed-0 pairs of every family, left in a ``--cache`` folder) with fresh ones.
    """
    h = hashlib.blake2b(digest_size=8)
    files = sorted(Path(sda.datasets.__file__).parent.glob("*.py"))
    if family in _realarch.MODELS:
        files.append(Path(_realarch.__file__))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def make_pair(family: str, setting: str, seed: int, cache: Path):
    """Generate (or reuse from ``cache``) one pair; returns ``(SyntheticPair, generation seconds)``."""
    folder = cache / f"{family}-{setting}-s{seed}"
    done = folder / "truth" / "done.json"
    digest = generator_digest(family)
    if done.is_file():
        stamp = json.loads(done.read_text())
        if stamp.get("generator") == digest:
            return sda.datasets.load_pair(folder), stamp["seconds"]
        print(f"  {folder.name}: cached by other generators ({stamp.get('generator')}), generated again")
        shutil.rmtree(folder)
    t = time.perf_counter()
    dens = density_value(family, setting)
    if family == "twin":
        n = 20000 if dens is None else round(dens * TWIN_AREA_MM2)
        sda.datasets.twin_sections(folder, n_cells=n, seed=seed)
    elif family in _realarch.MODELS:
        _realarch.realarch_pair(family, folder, seed=seed, density=dens)
    else:
        sda.datasets.pair_family(family, folder, seed=seed, density=dens)
    dt = time.perf_counter() - t
    done.write_text(json.dumps({"seconds": dt, "generator": digest}))
    return sda.datasets.load_pair(folder), dt


#: the boundary between the issue's two density classes (~900 and >= 2000 cells/mm²): a pair generated at 2000
#: realises 1999.9 or 2000.1, so a boundary at 2000 itself judged half of those pairs by the lenient ~900 bounds
DENSITY_CLASS_BOUNDARY = 1500.0


def density_class(density: float) -> str:
    """``"high"`` (the >= 2000 cells/mm² bounds) or ``"low"`` (the ~900 bounds) for a realised density."""
    return "high" if density >= DENSITY_CLASS_BOUNDARY else "low"


# ---------------------------------------------------------------------------------------------- runs
def _score(truth, xy, pred, valid) -> dict:
    err = np.linalg.norm(pred[valid] - truth.forward(xy[valid]), axis=1) * truth.um_per_px
    return {"median": float(np.median(err)), "p95": float(np.percentile(err, 95)), "errors": err}


def _levels(reg) -> str:
    lv = reg.params.get("levels") or []
    return ", ".join(f"L{x.get('level')}/{x.get('stage')}:{x.get('iterations')}" for x in lv)


def run_pair(pair, *, auto: bool, stalign: bool, budgets) -> list[dict]:
    """All methods on one pair; one row per method (errors over the valid cells kept for pooling)."""
    truth = pair.truth
    sdata = sda.io.read_pair(pair.xenium_path, pair.visium_path, transcripts=False)
    xy = element_xy(sdata, XENIUM_CELLS, XENIUM_CS)
    valid = truth.valid(xy)
    base = {"family": pair.family, "seed": pair.seed, "n_cells": len(xy), "n_valid": int(valid.sum())}
    rows = []
    # (a) landmark affine
    src, dst, names = read_landmarks(pair.landmarks_path)
    t = time.perf_counter()
    sdata.align.set_landmarks(source=src, target=dst, names=names)
    fit = sdata.align.affine(XENIUM_CELLS, VISIUM_HIRES, landmarks=True, flip=True)  # half the pairs are mirrored
    t_aff = time.perf_counter() - t
    pred = xy @ fit.matrix[:2, :2].T + fit.matrix[:2, 2]
    rows.append(
        {**base, "method": "affine", "time_s": t_aff, "n_landmarks": len(src), **_score(truth, xy, pred, valid)}
    )
    # the same affine from the exact landmarks (JSON only: separates click noise from the non-linear part)
    clean = pair.truth_path / "landmarks_clean.csv"
    if clean.is_file():
        cs, cd, _ = read_landmarks(clean)
        m = fit_affine(cs, cd, shape_prior=0.0).matrix  # plain least squares: the exact landmarks need no prior
        pred = xy @ m[:2, :2].T + m[:2, 2]
        rows.append({**base, "method": "affine-clean", "time_s": 0.0, **_score(truth, xy, pred, valid)})
    # (b) the engine with the defaults of `spatialdata-align run`
    t, c = time.perf_counter(), time.process_time()
    reg = sdata.align.lddmm(XENIUM_CELLS, VISIUM_HIRES, dx=PIPELINE_DX, progress=False, **PIPELINE_LDDMM)
    t_eng, c_eng = time.perf_counter() - t, time.process_time() - c
    rows.append(
        {
            **base,
            "method": "engine",
            "time_s": t_eng,
            "cpu_s": c_eng,
            "iterations": len(reg.energy),
            "levels": _levels(reg),
            **_score(truth, xy, reg.transform_points(xy), valid),
        }
    )
    # (c) automatic initialisation, no landmarks
    if auto:
        t = time.perf_counter()
        init = sdata.align.affine(XENIUM_CELLS, VISIUM_HIRES, landmarks=False, auto=True, key="auto_affine", flip=True)
        reg_a = sdata.align.lddmm(
            XENIUM_CELLS, VISIUM_HIRES, init="auto_affine", key="auto_lddmm", dx=PIPELINE_DX, progress=False,
            **PIPELINE_LDDMM,
        )  # fmt: skip
        t_auto = time.perf_counter() - t
        m = sdata.align.get("auto_affine").transform_points(xy)
        rows.append(
            {
                **base,
                "method": "auto-init",
                "time_s": t_auto,
                "iterations": len(reg_a.energy),
                "init_rotation_deg": float(getattr(init, "rotation_deg", np.nan)),
                "init_median": float(np.median(np.linalg.norm(m[valid] - truth.forward(xy[valid]), axis=1)))
                * truth.um_per_px,
                **_score(truth, xy, reg_a.transform_points(xy), valid),
            }
        )
    # (d) STalign over budgets, on the grids the engine used
    if stalign:
        d = {
            "source": source_image(sdata, XENIUM_CELLS, XENIUM_CS, dx=PIPELINE_DX, xy=xy)[0],  # the engine's channels
            "target": target_image(sdata, VISIUM_HIRES, VISIUM_CS)[0],  # the engine's channels (H&E stain densities)
            "affine": fit.matrix,
            "eval_src": xy[valid],
            "eval_dst": truth.forward(xy[valid]),
            "um_per_target_unit": truth.um_per_px,
        }
        if reg.params.get("n_landmarks"):  # the engine pulled its map through the landmarks: STalign does too
            d.update(points_src=src, points_dst=dst)
        for r in _peers.stalign_sweep(d, reg, budgets):
            rows.append({**base, "method": f"stalign-{r['niter']}", **r})
    return rows


def run_real(subsets: int, stalign: bool, budgets) -> list[dict]:
    """Engine defaults on the real rasters (held-out landmarks); rows like :func:`run_pair`'s."""
    rows = []
    if not REAL_DATA.exists():
        print(f"skip real tissue: {REAL_DATA} not found")
        return rows
    src, sp = real_tre.load(REAL_DATA, "Merfish_S2_R3")
    tgt, tp = real_tre.load(REAL_DATA, "Merfish_S2_R2")
    for i, idx in enumerate(real_tre.spread_subsets(sp, 4, subsets)):
        e_aff, e_reg, dt, nit = real_tre.run(src, tgt, sp, tp, idx, "affine")
        base = {"family": "merfish", "seed": i, "n_cells": len(sp) - 4, "n_valid": len(sp) - 4}
        rows.append({**base, "method": "affine", "time_s": 0.0, "errors": e_aff, **_stats(e_aff)})
        rows.append({**base, "method": "engine", "time_s": dt, "iterations": nit, "errors": e_reg, **_stats(e_reg)})
    src, sp = real_tre.load(REAL_DATA, "Xenium_Breast_Cancer_Rep2")
    tgt, tp = real_tre.load(REAL_DATA, "Xenium_Breast_Cancer_Rep1")
    for held in range(len(sp)):
        idx = tuple(i for i in range(len(sp)) if i != held)
        e_aff, e_reg, dt, nit = real_tre.run(src, tgt, sp, tp, idx, "similarity")
        base = {"family": "xenium-breast", "seed": held, "n_cells": 1, "n_valid": 1}
        rows.append({**base, "method": "affine", "time_s": 0.0, "errors": e_aff, **_stats(e_aff)})
        rows.append({**base, "method": "engine", "time_s": dt, "iterations": nit, "errors": e_reg, **_stats(e_reg)})
    del stalign, budgets  # STalign on the real rasters: bench_lddmm.py --datasets merfish
    return rows


def _stats(err) -> dict:
    err = np.asarray(err, float)
    return {"median": float(np.median(err)), "p95": float(np.percentile(err, 95))}


# ---------------------------------------------------------------------------------------------- table
def _pooled(rs: list[dict], method: str) -> dict | None:
    sel = [r for r in rs if r["method"] == method]
    if not sel:
        return None
    if any("errors" not in r for r in sel):  # a run that failed (a peer raising): the pooled run failed
        return {"median": np.inf, "p95": np.inf, "time_s": np.nan, "n_seeds": len(sel)}
    err = np.concatenate([np.asarray(r["errors"], float) for r in sel])
    return {
        "median": float(np.median(err)),
        "p95": float(np.percentile(err, 95)),
        "time_s": float(np.mean([r["time_s"] for r in sel])),
        "n_seeds": len(sel),
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """One table row per (family, density setting): errors pooled over seeds, times averaged."""
    out = []
    rank = {f: i for i, f in enumerate([*sda.datasets.FAMILIES, "twin", *_realarch.MODELS, "merfish", "xenium-breast"])}
    keys = sorted(
        {(r["family"], r.get("setting", "")) for r in rows},
        key=lambda k: (rank.get(k[0], len(rank)), k[0], float(k[1]) if k[1].replace(".", "").isdigit() else np.inf),
    )
    for fam, setting in keys:
        rs = [r for r in rows if r["family"] == fam and r.get("setting", "") == setting]

        row = {"family": fam, "setting": setting, "tuned": _tuned(fam, rs)}
        dens = [r.get("density") for r in rs if r.get("density") is not None]
        row["density"] = float(np.mean(dens)) if dens else None
        for m in ("affine", "engine", "auto-init"):
            row[m] = _pooled(rs, m)
        peers = [
            _pooled(rs, m) | {"niter": int(m.split("-")[1])}
            for m in sorted({r["method"] for r in rs})
            if m.startswith("stalign-")
        ]
        if peers and row["engine"]:
            chosen = _peers.pick_run(peers, row["engine"]["median"], row["engine"]["p95"])
            row["stalign"] = chosen
            row["ratio"] = chosen["time_s"] / row["engine"]["time_s"] if chosen else None
        row["ok"] = _acceptance(row)
        out.append(row)
    return out


def _tuned(family: str, rs: list[dict]) -> str:
    """``yes`` / ``partly`` / ``no``: whether the runs of a table row were looked at to choose the defaults."""
    spec = TUNED_ON.get(family)
    if spec is None:
        return "no"
    if spec == "all":
        return "yes"
    looked = {(r.get("setting"), r.get("seed")) for r in rs}
    common = looked & spec
    return "no" if not common else ("yes" if common == looked else "partly")


#: real tissue: engine median bound (µm)
REAL_BOUNDS = {"merfish": 120.0, "xenium-breast": 25.0}


def _acceptance(row) -> str:
    if row["engine"] is None:
        return ""
    if row["family"] in REAL_BOUNDS:
        return "pass" if row["engine"]["median"] <= REAL_BOUNDS[row["family"]] else "FAIL"
    if row["density"] is None:
        return ""
    med, p95 = BOUNDS[density_class(row["density"])]
    e, a = row["engine"], row["affine"]
    ok = e["median"] <= med and e["p95"] <= p95 and (a is None or e["median"] <= a["median"])
    marks = "pass" if ok else "FAIL"
    if row.get("auto-init"):
        x = row["auto-init"]
        ok_a = x["median"] <= med + AUTO_SLACK and x["p95"] <= p95 + AUTO_SLACK
        marks += " / " + ("pass" if ok_a else "FAIL")
    return marks


def _mp(x) -> str:
    return "—" if not x else f"{x['median']:.1f} / {x['p95']:.1f}"


def _t(x) -> str:
    return "—" if not x else f"{x['time_s']:.1f}"


def markdown(table: list[dict]) -> str:
    head = (
        "| family | tuned on | cells/mm² | seeds | affine (landmarks) | engine | engine s | auto-init | auto s "
        "| STalign | STalign it. | STalign s | time ratio | accept (engine / auto) |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in table:
        st = r.get("stalign")
        st_txt = "—" if not st else _mp(st) + ("" if st.get("matched") else " (best)")
        dens = "—" if r["density"] is None else f"{r['density']:.0f}"
        seeds = max((r[m]["n_seeds"] for m in ("affine", "engine") if r.get(m)), default=0)
        lines.append(
            f"| {r['family']} | {r['tuned']} | {dens} | {seeds} | {_mp(r['affine'])} | "
            f"{_mp(r['engine'])} | {_t(r['engine'])} | {_mp(r.get('auto-init'))} | {_t(r.get('auto-init'))} | "
            f"{st_txt} | {st['niter'] if st else '—'} | {_t(st)} | "
            f"{'—' if not r.get('ratio') else format(r['ratio'], '.2f') + 'x'} | {r['ok']} |"
        )
    return "\n".join(lines)


def _jsonable(rows):
    return [{k: v for k, v in r.items() if k != "errors"} for r in rows]


def main(argv=None) -> list[dict]:
    all_fams = [*sda.datasets.FAMILIES, "twin"]
    real_arch = list(_realarch.MODELS) if _realarch.available() else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--families",
        nargs="+",
        default=all_fams,
        choices=all_fams + real_arch,
        help="pair families (default: the package's six and twin); "
        f"{' and '.join(_realarch.MODELS)} (tissue from real density rasters, never tuned on) run only when named "
        "and ../shared/data is present",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--densities", nargs="+", default=["900", "2000", "own"], help="cells/mm² settings; 'own' = family default"
    )
    ap.add_argument("--no-stalign", action="store_true", help="skip the STalign sweep")
    ap.add_argument("--no-auto", action="store_true", help="skip the landmark-free (--auto-init) runs")
    ap.add_argument("--no-real", action="store_true", help="skip the real-tissue rasters")
    ap.add_argument("--budgets", nargs="+", type=int, default=list(_peers.STALIGN_BUDGETS))
    ap.add_argument("--subsets", type=int, default=5, help="MERFISH 4-landmark subsets")
    ap.add_argument(
        "--quick", action="store_true", help="one seed, the family's density, no STalign, 2 MERFISH subsets"
    )
    ap.add_argument("--cache", default=None, help="keep generated pairs here and reuse them")
    ap.add_argument("--json", default=None, help="write per-run rows and the table as JSON")
    ap.add_argument("--markdown", default=None, help="write the table as Markdown")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.densities, args.no_stalign, args.subsets = args.seeds[:1], ["own"], True, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="sda_accuracy_"))
    cache.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; pipeline dx {PIPELINE_DX} um; cache {cache}")
    rows, gen_times = [], []
    t0 = time.perf_counter()
    try:
        for fam in args.families:
            for setting in args.densities:
                for seed in args.seeds:
                    pair, gen_s = make_pair(fam, setting, seed, cache)
                    gen_times.append({"family": fam, "setting": setting, "seed": seed, "seconds": gen_s})
                    dens = pair.density if np.isfinite(pair.density) else pair.n_cells / TWIN_AREA_MM2
                    rs = run_pair(pair, auto=not args.no_auto, stalign=not args.no_stalign, budgets=args.budgets)
                    for r in rs:
                        r.update(setting=setting, density=dens)
                    rows += rs
                    msg = ", ".join(f"{r['method']} {r['median']:.1f}/{r['p95']:.1f} ({r['time_s']:.0f} s)" for r in rs)
                    print(f"{fam:8s} {setting:>5s} seed {seed}: {dens:6.0f}/mm², gen {gen_s:.1f} s; {msg}", flush=True)
        if not args.no_real:
            real = run_real(args.subsets, not args.no_stalign, args.budgets)
            rows += real
            for r in real:
                print(f"{r['family']} {r['seed']}: {r['method']} {r['median']:.1f} um ({r['time_s']:.1f} s)")
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    table = aggregate(rows)
    md = markdown(table)
    print()
    print(md)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; TRE over valid Xenium cells (pooled over seeds), um")
    if args.markdown:
        meta = (
            f"Measured with `python benchmarks/accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"on {platform.machine()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}. TRE median / p95 (µm) over the Xenium cells with a true counterpart in "
            "the Visium tissue, pooled over seeds; times in seconds per pair. Real tissue: held-out landmarks "
            "(MERFISH: 9 per 4-landmark subset; Xenium breast: leave-one-out of 3).\n"
        )
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(meta + "\n" + md + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": _jsonable(rows), "table": table, "generation": gen_times}, indent=1, default=float)
        )
    return table


if __name__ == "__main__":
    main()
