"""The main job: read both 10x folders, align, apply, subset, compare, write a report.

The CLI (``spatialdata-align run`` / ``demo``) and the tutorial notebook make the same calls in the
same order, so the command line reproduces the Python API's result.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._constants import VISIUM_TABLE, XENIUM_CELLS, XENIUM_TABLE, XENIUM_TRANSCRIPTS

#: the error for landmarks and automatic initialisation together (the CLI's --help says so too)
AUTO_INIT_WITH_LANDMARKS = (
    "--auto-init and --landmarks exclude each other: with landmarks the affine is fitted from them (a better start "
    "than the automatic search); drop --auto-init to use the landmarks, or drop --landmarks to search automatically."
)

#: LDDMM settings of the pipeline beyond the engine's defaults (none: the CLI, the notebook and a plain
#: ``sdata.align.lddmm`` call give the same result); see :func:`spatialdata_align.registration.lddmm`
PIPELINE_LDDMM: dict = {}


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    sdata: Any
    shared: Any
    comparison: Any
    summary: dict[str, Any]
    report_files: dict[str, Path] = field(default_factory=dict)


class _Stages:
    def __init__(self, n: int, verbose: bool):
        self.n, self.i, self.verbose = n, 0, verbose
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self.i += 1
        if self.verbose:
            print(f"[{self.i}/{self.n}] {name} ...", flush=True)
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        self.times[name] = round(dt, 3)
        if self.verbose:
            print(f"[{self.i}/{self.n}] {name} done ({dt:.1f} s)", flush=True)


def run_pipeline(
    xenium,
    visium,
    *,
    landmarks=None,
    landmarks_target=None,
    landmark_units: str = "fullres",
    auto_init: bool = False,
    out=None,
    report=None,
    dx: float = 20.0,
    gene: str = "EGFR",
    verbose: bool = True,
    progress: bool = True,
    lddmm_params: dict | None = None,
) -> PipelineResult:
    """Run the full alignment workflow on a Xenium folder and a Visium ``outs/`` folder.

    Parameters
    ----------
    xenium, visium
        Paths of the two 10x output folders.
    landmarks
        Landmark file: CSV ``source_x, source_y, target_x, target_y`` (Xenium µm → Visium
        full-resolution pixels) or, with ``landmarks_target``, an STalign-style ``.npy`` dict of
        the source points.
    landmarks_target
        The ``.npy`` dict of the target points.
    landmark_units
        Units of the target landmarks: ``"fullres"`` pixels or ``"hires"`` (hires-image pixels,
        converted with ``tissue_hires_scalef``).
    auto_init
        Find the affine without landmarks (giving ``landmarks`` too is an error).
    out
        Where to write the aligned SpatialData (``.zarr``); ``None`` skips writing.
    report
        Folder for the report (PNGs, CSV, summary); ``None`` skips it.
    dx
        Raster pixel size (µm) of the Xenium cell density.
    gene
        Gene shown side by side in the report.
    verbose, progress
        Stage messages and tqdm progress bars.
    lddmm_params
        Extra parameters for :meth:`~spatialdata_align.AlignAccessor.lddmm`.
    """
    import spatialdata_align as sda

    from ._landmark_files import read_landmarks

    if landmarks is None and not auto_init:
        raise ValueError("give a landmark file (--landmarks) or ask for automatic initialisation (--auto-init).")
    if landmarks is not None and auto_init:
        raise ValueError(AUTO_INIT_WITH_LANDMARKS)
    if landmark_units not in ("fullres", "hires"):
        raise ValueError(f"landmark_units must be 'fullres' or 'hires', got {landmark_units!r}.")
    if out is not None:
        _check_out(out)  # fail before the work, not after it
    stages = _Stages(8 + (out is not None) + (report is not None), verbose)
    with stages("read Xenium + Visium"):
        sdata = sda.io.read_pair(xenium, visium)
        target = sda.io.registration_target(sdata)  # the best Visium image present
    with stages("affine"):
        if landmarks is not None:
            src, dst, names = read_landmarks(landmarks, landmarks_target)
            if landmark_units == "hires":
                sf = sda.io.visium_scalefactors(sdata)
                if "tissue_hires_scalef" not in sf:
                    raise ValueError(f"--landmark-units hires: {visium} has no tissue_hires_scalef scale factor.")
                dst = dst / sf["tissue_hires_scalef"]
            sdata.align.set_landmarks(source=src, target=dst, names=names)
            fit = sdata.align.affine(XENIUM_CELLS, target, landmarks=True)
            affine_info = {"method": "landmarks", "n_landmarks": len(src), "rms_residual_px": float(fit.rms)}
        else:
            fit = sdata.align.affine(XENIUM_CELLS, target, landmarks=False, auto=True)
            affine_info = {"method": "auto", "score": float(fit.score), "rotation_deg": fit.rotation_deg}
    with stages("LDDMM"):
        params = dict(PIPELINE_LDDMM, progress=progress)
        params.update(lddmm_params or {})
        reg = sdata.align.lddmm(XENIUM_CELLS, target, dx=dx, **params)
    with stages("apply to cells (and transcripts)"):
        sdata.align.apply(XENIUM_CELLS)
        if XENIUM_TRANSCRIPTS in sdata:
            sdata.align.apply(XENIUM_TRANSCRIPTS)
    with stages("shared region"):
        shared_poly = sda.tl.shared_region(sdata)
    with stages("subset to shared region"):
        shared = sda.tl.subset_shared(sdata)
    with stages("pseudo-spots"):
        pseudo = sda.tl.pseudo_spots(shared, key_added="xenium_pseudo_spots")
    with stages("compare genes"):
        comparison = sda.tl.compare_genes(shared, pseudo=pseudo)
    if out is not None:
        with stages(f"write {out}"):
            write_zarr(sdata, out)
    summary = {
        "xenium": str(xenium),
        "visium": str(visium),
        "n_cells": int(sdata.tables[XENIUM_TABLE].n_obs),
        "n_spots": int(sdata.tables[VISIUM_TABLE].n_obs),
        "n_cells_shared": int(shared.tables[XENIUM_TABLE].n_obs) if XENIUM_TABLE in shared.tables else None,
        "n_spots_shared": int(shared.tables[VISIUM_TABLE].n_obs) if VISIUM_TABLE in shared.tables else None,
        "n_shared_genes": len(comparison),
        "registration_target": target,
        "affine": affine_info,
        "lddmm": {
            "iterations": len(reg.energy),
            "levels": reg.params.get("levels"),
            "runtime_s": round(float(reg.params.get("runtime_s", np.nan)), 3),
        },
        "top_genes": comparison.head(5).to_dict(orient="records") if len(comparison) else [],
        "shared_region_area_px2": float(getattr(shared_poly, "area", np.nan)),
    }
    files: dict[str, Path] = {}
    if report is not None:
        with stages(f"report {report}"):
            files = write_report(sdata, shared, comparison, summary, report, gene=gene, stage_times=stages.times)
    summary["time_per_stage_s"] = stages.times
    if report is not None:
        (Path(report) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return PipelineResult(sdata=sdata, shared=shared, comparison=comparison, summary=summary, report_files=files)


def _check_out(out) -> Path:
    """``out`` may be new or an earlier zarr store (replaced); anything else raises FileExistsError."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and ((out / "zarr.json").exists() or (out / ".zgroup").exists())):
        raise FileExistsError(f"{out} exists and is not a zarr store; choose another --out or remove it.")
    return out


def write_zarr(sdata, out) -> Path:
    """Write ``sdata`` to the zarr store ``out``, replacing an earlier store of that name.

    Only a zarr store (a folder holding ``zarr.json`` or ``.zgroup``) is replaced; any other existing
    path raises :class:`FileExistsError`, so a mistyped ``--out`` never deletes user data. (The
    pipeline's object is read from the 10x folders, never backed by ``out``.)
    """
    import shutil
    import warnings

    out = _check_out(out)
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(out)
    return out


def write_report(sdata, shared, comparison, summary, report, *, gene="EGFR", stage_times=None) -> dict[str, Path]:
    """Write the report folder: overlay, gene side-by-side, energy trace, correlation CSV, summary."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    import spatialdata_align as sda

    report = Path(report)
    report.mkdir(parents=True, exist_ok=True)
    files = {}
    files["overlay"] = report / "overlay.png"
    sda.pl.overlay(sdata, save=files["overlay"])
    plt.close("all")
    files["energy"] = report / "energy.png"
    sda.pl.energy(sdata, save=files["energy"])
    plt.close("all")
    if gene in set(comparison["gene"]) if "gene" in comparison else False:
        files["gene"] = report / f"{gene}_side_by_side.png"
        sda.pl.gene(shared, gene, save=files["gene"])
        plt.close("all")
        files["compare"] = report / f"{gene}_pseudospot_vs_spot.png"
        sda.pl.compare(shared, gene, save=files["compare"])
        plt.close("all")
    files["correlations"] = report / "gene_correlations.csv"
    comparison.to_csv(files["correlations"], index=False)
    files["summary"] = report / "summary.md"
    lines = ["# spatialdata-align report", ""]
    for k in ("xenium", "visium", "n_cells", "n_spots", "n_cells_shared", "n_spots_shared", "n_shared_genes"):
        lines.append(f"- **{k}**: {summary.get(k)}")
    lines.append(f"- **affine**: {summary.get('affine')}")
    lines.append(f"- **lddmm**: {summary.get('lddmm')}")
    if "tre_um" in summary:
        lines.append(f"- **TRE against truth (µm)**: {summary['tre_um']}")
    if stage_times:
        lines += ["", "## Time per stage (s)", ""] + [f"- {k}: {v}" for k, v in stage_times.items()]
    lines += ["", "## Top genes", "", _markdown_table(comparison.head(10)) if len(comparison) else "none"]
    files["summary"].write_text("\n".join(lines) + "\n")
    return files


def _markdown_table(df) -> str:
    """A small DataFrame as a Markdown table (no optional dependency)."""
    cols = list(df.columns)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(fmt(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(rows)


def run_demo(
    out,
    *,
    n_cells: int = 20000,
    n_spots: int = 500,
    seed: int = 0,
    auto_init: bool = False,
    verbose: bool = True,
    progress: bool = True,
    **kwargs,
) -> PipelineResult:
    """Generate twin sections under ``out/data``, run the pipeline, and score it against the truth.

    ``auto_init=True`` ignores the generated landmarks and finds the affine automatically; other keyword
    arguments go to :func:`run_pipeline`.
    """
    import spatialdata_align as sda

    from ._elements import element_xy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"generating twin sections ({n_cells} cells, {n_spots} spots, seed {seed}) in {out / 'data'}")
    twin = sda.datasets.twin_sections(out / "data", n_cells=n_cells, n_spots=n_spots, seed=seed)
    lm_csv = out / "data" / "truth" / "landmarks.csv"
    res = run_pipeline(
        twin.xenium_path,
        twin.visium_path,
        landmarks=None if auto_init else lm_csv,
        auto_init=auto_init,
        out=out / "aligned.zarr",
        report=None,
        verbose=verbose,
        progress=progress,
        **kwargs,
    )
    sdata = res.sdata
    cells = element_xy(sdata, XENIUM_CELLS, "xenium")
    truth = twin.truth.forward(cells)
    um_per_px = twin.truth.um_per_px
    tre = {}
    for label, key in (("affine", "xenium_to_visium_affine"), ("affine+lddmm", "xenium_to_visium_lddmm")):
        pred = sdata.align.get(key).transform_points(cells)
        err = np.linalg.norm(pred - truth, axis=1) * um_per_px
        tre[label] = {"median": round(float(np.median(err)), 2), "p95": round(float(np.percentile(err, 95)), 2)}
    res.summary["tre_um"] = tre
    report = out / "report"
    res.report_files = write_report(
        sdata, res.shared, res.comparison, res.summary, report, stage_times=res.summary.get("time_per_stage_s")
    )
    (report / "summary.json").write_text(json.dumps(res.summary, indent=2, default=str))
    if verbose:
        print("TRE against the known truth over every cell (µm):")
        for k, v in tre.items():
            print(f"  {k:>13}: median {v['median']:6.2f}   95th percentile {v['p95']:6.2f}")
        print(f"report: {out / 'report'}   aligned data: {out / 'aligned.zarr'}")
    return res
