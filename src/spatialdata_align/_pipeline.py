"""The main job: read both 10x folders, align, apply, subset, compare, write a report.

The CLI (``spatialdata-align run`` / ``demo``) and the tutorial notebook make the same calls in the
same order, so the command line reproduces the Python API's result.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import spatialdata

from . import _checks, _store
from ._constants import (
    PSEUDO_SPOTS_KEY,
    SHARED_REGION_KEY,
    UNS_COMPARE_KEY,
    VISIUM_CS,
    VISIUM_HD_TABLE,
    VISIUM_TABLE,
    XENIUM_CELLS,
    XENIUM_CS,
    XENIUM_TABLE,
    XENIUM_TRANSCRIPTS,
)
from .io._visium_hd import default_bins
from .registration._quality import DEFAULT_MAX_REFITS
from .registration._result import _json_default
from .tl._bins import BINNED_CELLS_KEY, UNS_COMPARE_BINS_KEY

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
    assessment: Any = None

    @property
    def verdict(self) -> str:
        """``"good"``, ``"check"`` or ``"unreliable"`` (see ``summary["verdict"]["reasons"]``)."""
        return self.summary.get("verdict", {}).get("level", "check")


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
    gene: str | None = None,
    verbose: bool = True,
    progress: bool = True,
    lddmm_params: dict | None = None,
    flip: bool = False,
    force: bool = False,
    loo: str = "lddmm",
    max_refits: int | None = DEFAULT_MAX_REFITS,
    bin_size: int = 16,
    _before_report=None,
) -> PipelineResult:
    """Run the full alignment workflow on a Xenium folder and a Visium (or Visium HD) ``outs/`` folder.

    Inputs are checked before any work (:mod:`spatialdata_align._checks`): a wrong input stops the run with a
    message naming the file and the fix. Outputs are written to temporary paths and moved into place only when
    everything succeeded. The accuracy is estimated on the data (held-out landmark error, inverse consistency,
    Jacobian, match confidence) and summed up in a verdict: ``summary["verdict"]``.

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
        Folder for the report (``index.html``, PNGs, CSVs, summary, exports for R); ``None`` skips it.
    dx
        Raster pixel size (µm) of the Xenium cell density.
    gene
        Gene shown side by side in the report (any case). A gene not measured by both modalities is an input error,
        raised right after reading, before the alignment. ``None`` (default): EGFR when both measure it, else the
        shared gene with the highest correlation.
    verbose, progress
        Stage messages and tqdm progress bars.
    lddmm_params
        Extra parameters for :meth:`~spatialdata_align.AlignAccessor.lddmm`.
    flip
        Accept a mirrored (reflected) affine: the section is mounted upside down (CLI ``--allow-flip``).
    force
        Run despite suspect inputs (each is then a warning and the verdict "unreliable"; CLI ``--force``).
    loo
        Held-out landmark error: ``"lddmm"`` (refit affine + LDDMM without each landmark, at most
        ``max_refits`` refits), ``"affine"`` (the affine only, instant) or ``"none"``.
    max_refits
        Largest number of LDDMM refits for the held-out error (landmarks are held out in groups beyond it).
    bin_size
        Visium HD only (detected from the folder): the bin size (µm) the aligned Xenium cells are aggregated into
        and compared at (:func:`~spatialdata_align.tl.bin_cells`, :func:`~spatialdata_align.tl.compare_bins`),
        instead of the shared-region / pseudo-spot steps of Visium spots.
    """
    import spatialdata_align as sda

    from ._landmark_files import read_landmarks
    from ._report import assess_alignment, write_report

    if landmarks is None and not auto_init:
        raise ValueError("give a landmark file (--landmarks) or ask for automatic initialisation (--auto-init).")
    if landmarks is not None and auto_init:
        raise ValueError(AUTO_INIT_WITH_LANDMARKS)
    if landmark_units not in ("fullres", "hires"):
        raise ValueError(f"landmark_units must be 'fullres' or 'hires', got {landmark_units!r}.")
    if loo not in ("lddmm", "affine", "none"):
        raise ValueError(f"loo must be 'lddmm', 'affine' or 'none', got {loo!r}.")
    # fail before the work, not after it
    _checks.check_outputs(out, report, inputs=[xenium, visium, landmarks, landmarks_target])
    if (lddmm_params or {}).get("device") is not None:
        _checks.check_device(lddmm_params["device"])
    if not (isinstance(dx, int | float) and np.isfinite(dx) and dx > 0):
        raise ValueError(f"--dx must be a positive pixel size in µm, got {dx!r}.")
    hd = sda.io.is_visium_hd(visium)  # HD: bin + compare instead of region, pseudo-spots, compare, subset
    shared_cells = None  # HD: the cells over in-tissue bins (for Visium spots the shared subset tells them)
    stages = _Stages((7 if hd else 9) + (out is not None) + (report is not None), verbose)  # the stages below
    findings: list = []
    lm = inliers = None
    with _checks.collecting(findings, force=force):
        with stages("read Xenium + Visium"):
            # HD: the default bin sizes present, and the one compared (--bin-size)
            hd_kw = {"bins": default_bins(visium, include=(bin_size,))} if hd else {}
            sdata = sda.io.read_pair(xenium, visium, **hd_kw)
            target = sda.io.registration_target(sdata)  # the best Visium image present
            _check_raster_size(sdata, dx)
            if not hd:
                _check_in_tissue(sdata, visium)
            if gene is not None:  # a typo or a gene of one panel only: said now, not by a report without its plots
                gene = _checked_gene(sdata, gene, VISIUM_HD_TABLE.format(bin_size) if hd else VISIUM_TABLE)
            if landmarks is not None:
                src, dst, names = read_landmarks(landmarks, landmarks_target)
                sf = sda.io.visium_scalefactors(sdata)
                if landmark_units == "hires":
                    if "tissue_hires_scalef" not in sf:
                        raise ValueError(f"--landmark-units hires: {visium} has no tissue_hires_scalef scale factor.")
                    dst = dst / sf["tissue_hires_scalef"]
                checked = _checks.check_landmarks(
                    src,
                    dst,
                    file=landmarks_target if landmarks_target is not None else landmarks,
                    names=names,
                    um_per_px=sf.get("um_per_px"),
                    flip=flip,
                    scalefactors=sf,
                    landmark_units=landmark_units,
                )
                try:
                    extent = spatialdata.get_extent(sdata[target], coordinate_system=VISIUM_CS)
                except Exception:  # a layout get_extent does not know: the check is skipped, not the run
                    extent = None
                if extent is not None:
                    _checks.check_landmarks_on_image(
                        dst, extent, file=landmarks_target if landmarks_target is not None else landmarks, names=names
                    )
                lm = (src, dst, names)
                inliers = np.ones(len(src), bool)
                inliers[[int(i) for i in checked.outlier_index]] = False
        with stages("affine"):
            if lm is not None:
                # landmarks named as outliers (accepted only with force) stay out of the fit
                keep = np.flatnonzero(inliers)
                sdata.align.set_landmarks(source=lm[0][keep], target=lm[1][keep], names=[lm[2][i] for i in keep])
                # (flip=True: a mirrored fit was judged above, by check_landmarks, with --allow-flip / --force)
                with warnings.catch_warnings():  # the verdict and the report say it, with the held-out figures
                    warnings.simplefilter("ignore", _checks.LandmarkCoverageWarning)
                    fit = sdata.align.affine(XENIUM_CELLS, target, landmarks=True, flip=True)
                affine_info = {"method": "landmarks", "n_landmarks": len(lm[0]), "rms_residual_px": float(fit.rms)}
            else:
                fit = sdata.align.affine(XENIUM_CELLS, target, landmarks=False, auto=True, flip=True)
                affine_info = {"method": "auto", "score": float(fit.score), "rotation_deg": fit.rotation_deg}
                for name in ("margin", "coarse_margin", "expression_r"):  # (nan: not measured)
                    value = float(getattr(fit, name))
                    affine_info[name] = round(value, 4) if np.isfinite(value) else None
                if fit.reflection and not flip:
                    _checks.suspect(
                        "reflection",
                        "the automatic search found a mirrored (reflected) alignment to fit best.",
                        file=xenium,
                        fix="if the Visium section really is mounted upside down, pass --allow-flip (flip=True); "
                        "otherwise give landmarks (--landmarks).",
                    )
            affine_info["reflection"] = bool(fit.reflection)
    suspects = [f for f in findings if f.severity == "suspect"]
    soft = [f for f in findings if f.severity != "suspect"]
    with _checks.StagedOutputs({"out": out, "report": report}) as staged:
        with stages("LDDMM"):
            params = dict(PIPELINE_LDDMM, progress=progress)
            params.update(lddmm_params or {})
            reg = sdata.align.lddmm(XENIUM_CELLS, target, dx=dx, **params)
            lddmm_entry = _store.get_entry(sdata, sdata.align._key(None))
        with stages("apply to cells (and transcripts)"):
            sdata.align.apply(XENIUM_CELLS)
            if XENIUM_TRANSCRIPTS in sdata:
                sdata.align.apply(XENIUM_TRANSCRIPTS)
        # every result is written into sdata (scanpy convention), so the written store holds them all
        if hd:  # Visium HD: the cells aggregated into bins of one size, genes compared there
            hd_sizes = sda.tl._bins.hd_bin_sizes(sdata)
            if bin_size not in hd_sizes:
                raise ValueError(f"--bin-size {bin_size}: the Visium HD folder was read with bins {hd_sizes} µm.")
            shared, shared_poly = sdata, None
            with stages(f"bin cells ({bin_size} µm)"):
                sda.tl.bin_cells(sdata, bin_size)
                shared_cells = sda.tl._bins.cells_in_tissue_bins(sdata, bin_size)  # beyond the capture area: not shared
            with stages("compare genes"):
                sda.tl.compare_bins(sdata, bin_size, binned=BINNED_CELLS_KEY.format(bin_size))
                comparison = sdata.tables[VISIUM_HD_TABLE.format(bin_size)].uns[UNS_COMPARE_BINS_KEY]
        else:
            with stages("shared region"):
                sda.tl.shared_region(sdata)
                shared_poly = sdata.shapes[SHARED_REGION_KEY].geometry.iloc[0]
            with stages("pseudo-spots"):
                sda.tl.pseudo_spots(sdata, key_added=PSEUDO_SPOTS_KEY)
            with stages("compare genes"):
                sda.tl.compare_genes(sdata, pseudo=PSEUDO_SPOTS_KEY, key_added=UNS_COMPARE_KEY)
                comparison = sdata.tables[VISIUM_TABLE].uns[UNS_COMPARE_KEY]
            with stages("subset to shared region"):
                shared = sda.tl.subset_shared(sdata)
        with stages("accuracy estimate"):
            assessment = assess_alignment(
                sdata,
                target=target,
                landmarks=lm,
                inliers=inliers,
                loo=loo if lm is not None else "none",
                max_refits=max_refits,
                dx=dx,
                lddmm_params={k: v for k, v in (lddmm_params or {}).items() if k == "device"},
                findings=suspects,
                warnings_=soft,
                progress=progress,
            )
        if gene is None:  # EGFR when both modalities measure it, else the best-correlated shared gene
            names = list(comparison["gene"]) if "gene" in comparison else []
            gene = "EGFR" if "EGFR" in names or not names else names[0]
        summary = {
            "gene": gene,
            "xenium": str(xenium),
            "visium": str(visium),
            "n_cells": int(sdata.tables[XENIUM_TABLE].n_obs),
            "n_spots": int(sdata.tables[VISIUM_TABLE].n_obs) if VISIUM_TABLE in sdata.tables else None,
            "n_cells_shared": len(shared_cells)
            if shared_cells is not None
            else (int(shared.tables[XENIUM_TABLE].n_obs) if XENIUM_TABLE in shared.tables else None),
            "n_spots_shared": int(shared.tables[VISIUM_TABLE].n_obs) if VISIUM_TABLE in shared.tables else None,
            "n_shared_genes": len(comparison),
            "registration_target": target,
            "verdict": assessment.verdict.to_dict(),
            "accuracy": assessment.metrics,
            "affine": affine_info,
            "lddmm": {
                "iterations": len(reg.energy),
                "levels": reg.params.get("levels"),
                # the stopping rule used: the engine's defaults, or the longer optimisation of sparse sources
                "tol": reg.params.get("tol"),
                "max_iter": reg.params.get("max_iter"),
                **{k: lddmm_entry.get(k) for k in ("sparse_optimisation", "cells_per_mm2")},
                "runtime_s": round(float(reg.params.get("runtime_s", np.nan)), 3),
            },
            "input_problems": [str(f) for f in findings],
            "top_genes": comparison.head(5).to_dict(orient="records") if len(comparison) else [],
            "shared_region_area_px2": float(getattr(shared_poly, "area", np.nan)),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "version": sda.__version__,
        }
        if hd:
            binned = sdata.tables[BINNED_CELLS_KEY.format(bin_size)]
            summary["visium_hd"] = {
                "bin_size_um": int(bin_size),
                "bin_sizes_read_um": hd_sizes,
                "n_bins": int(binned.n_obs),
                "n_bins_with_cells": int((binned.obs["n_cells"] > 0).sum()),
                "n_bins_compared": int(comparison["n_spots"].iloc[0]) if len(comparison) else 0,
            }
        if _before_report is not None:
            summary.update(_before_report(sdata))
        if out is not None:
            # (not in the background, alongside the report: 1.5 s less on the demo, but at 168k cells 6 s more and
            # 1.7 GB more memory, both CPU-bound on 2 cores)
            with stages(f"write {out}"):
                from ._write import write_sdata

                write_sdata(sdata, staged.path("out"))
        files: dict[str, Path] = {}
        if report is not None:
            with stages(f"report {report}"):
                summary["time_per_stage_s"] = stages.times
                files = write_report(
                    sdata,
                    shared,
                    comparison,
                    summary,
                    staged.path("report"),
                    gene=gene,
                    assessment=assessment,
                    dx=dx,
                    stage_times=stages.times,
                    shared_cells=shared_cells,
                )
            summary["time_per_stage_s"] = stages.times
            (staged.path("report") / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        staged.commit()
    summary["time_per_stage_s"] = stages.times
    files = {k: Path(report) / v.name for k, v in files.items()}
    return PipelineResult(
        sdata=sdata,
        shared=shared,
        comparison=comparison,
        summary=summary,
        report_files=files,
        assessment=assessment,
    )


#: fewest raster pixels across the Xenium cells' smaller side that the LDDMM's levels can work with
MIN_RASTER_PX = 12


def _check_raster_size(sdata, dx: float) -> None:
    """Refuse a raster pixel (``--dx``) so coarse that the cells span fewer than :data:`MIN_RASTER_PX` pixels.

    At ``--dx 300`` on a 0.8 mm section the raster was 3 px across, the LDDMM's coarsest level had no pixels to
    fit, and the run ended with the affine alone.
    """
    from ._elements import element_xy

    if XENIUM_CELLS not in sdata:
        return
    xy = element_xy(sdata, XENIUM_CELLS, XENIUM_CS)
    if len(xy) < 2:
        return
    side = float(np.min(np.ptp(xy, axis=0)))
    if side / dx < MIN_RASTER_PX:
        raise ValueError(
            f"--dx {dx:g} µm is too coarse for these cells: their smaller side spans {side:.0f} µm, "
            f"{side / dx:.1f} raster pixels, and the alignment needs at least {MIN_RASTER_PX}. Use --dx "
            f"{side / (4 * MIN_RASTER_PX):.0f} or finer (the default is 20 µm)."
        )


def _check_in_tissue(sdata, visium) -> None:
    """Refuse a Visium table whose ``in_tissue`` flags are all 0.

    There is nothing to compare then, and the run failed only after the alignment, blaming it ("the modalities share
    no tissue").
    """
    from .tl import _data

    if VISIUM_TABLE not in sdata.tables or sdata.tables[VISIUM_TABLE].n_obs == 0:
        return
    vis = _data.visium(sdata, VISIUM_CS)
    if not _data.in_tissue(vis).any():  # the flag as every tl function reads it
        raise ValueError(
            f"{visium}: the tissue positions file marks none of the {vis.table.n_obs} spots as in tissue (in_tissue "
            "is 0 everywhere), so there is nothing to compare the Xenium cells with. Fix: use the tissue_positions "
            "file Space Ranger wrote (1 for spots under tissue)."
        )


def _checked_gene(sdata, gene: str, visium_table: str) -> str:
    """``gene`` as the Xenium table spells it, if both modalities measure it.

    Otherwise a :class:`ValueError` that says which modality lacks it and lists shared genes.
    """
    from .tl import _data

    if visium_table not in sdata.tables:
        return gene
    try:
        return str(_data._match(_data._xenium_table(sdata), sdata.tables[visium_table], [gene])["gene"].iloc[0])
    except KeyError as err:
        raise ValueError(f"--gene {gene}: {err.args[0]}") from None


def write_report(sdata, shared, comparison, summary, report, *, gene="EGFR", stage_times=None) -> dict[str, Path]:
    """Write the report folder (see :func:`spatialdata_align._report.write_report`)."""
    from . import _report

    return _report.write_report(sdata, shared, comparison, summary, report, gene=gene, stage_times=stage_times)


def run_demo(
    out,
    *,
    n_cells: int = 20000,
    n_spots: int = 500,
    seed: int = 0,
    auto_init: bool = False,
    visium_hd: bool = False,
    verbose: bool = True,
    progress: bool = True,
    **kwargs,
) -> PipelineResult:
    """Generate twin sections under ``out/data``, run the pipeline, and score it against the truth.

    ``auto_init=True`` ignores the generated landmarks and finds the affine automatically; ``visium_hd=True``
    writes the Visium section as a Visium HD folder (bins of 2, 8 and 16 µm) and compares genes at bin level;
    other keyword arguments go to :func:`run_pipeline`. The summary holds the TRE against the truth and the
    ``gene`` (EGFR) correlation.
    """
    import spatialdata_align as sda

    from ._elements import element_xy

    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if verbose:
        kind = "Visium HD" if visium_hd else "Visium"
        print(f"generating twin sections ({n_cells} cells, {kind}, {n_spots} spots of tissue, seed {seed})")
    try:
        twin = sda.datasets.twin_sections(
            out / "data", n_cells=n_cells, n_spots=n_spots, seed=seed, visium_hd=visium_hd
        )
    except ValueError:
        if made:  # bad sizes: no empty output folder left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    lm_csv = out / "data" / "truth" / "landmarks.csv"

    def truth_tre(sdata) -> dict:
        cells = element_xy(sdata, XENIUM_CELLS, "xenium")
        truth = twin.truth.forward(cells)
        tre = {}
        for label, key in (("affine", "xenium_to_visium_affine"), ("affine+lddmm", "xenium_to_visium_lddmm")):
            pred = sdata.align.get(key).transform_points(cells)
            err = np.linalg.norm(pred - truth, axis=1) * twin.truth.um_per_px
            tre[label] = {"median": round(float(np.median(err)), 2), "p95": round(float(np.percentile(err, 95)), 2)}
        if not auto_init:  # the error at the landmarks, to compare with the held-out estimate
            reg = sdata.align.get("xenium_to_visium_lddmm")
            err = np.linalg.norm(
                reg.transform_points(twin.truth.landmarks_source) - twin.truth.landmarks_target, axis=1
            )
            tre["affine+lddmm at the landmarks"] = {"median": round(float(np.median(err * twin.truth.um_per_px)), 2)}
        gene = kwargs.get("gene") or "EGFR"
        comp = (
            sdata.tables[VISIUM_HD_TABLE.format(kwargs.get("bin_size", 16))].uns[UNS_COMPARE_BINS_KEY]
            if visium_hd
            else sdata.tables[VISIUM_TABLE].uns[UNS_COMPARE_KEY]
        ).set_index("gene")
        level = f"{kwargs.get('bin_size', 16)} um bins" if visium_hd else "spots"
        pearson = float(comp.loc[gene, "pearson"]) if gene in comp.index else None
        return {"tre_um": tre, "gene_correlation": {"gene": gene, "level": level, "pearson": pearson}}

    res = run_pipeline(
        twin.xenium_path,
        twin.visium_path,
        landmarks=None if auto_init else lm_csv,
        auto_init=auto_init,
        out=out / "aligned.zarr",
        report=out / "report",
        verbose=verbose,
        progress=progress,
        _before_report=truth_tre,
        **kwargs,
    )
    if verbose:
        print("TRE against the known truth over every cell (µm):")
        for k, v in res.summary["tre_um"].items():
            if "p95" in v:
                print(f"  {k:>13}: median {v['median']:6.2f}   95th percentile {v['p95']:6.2f}")
        gc = res.summary["gene_correlation"]
        if gc["pearson"] is not None:
            vs = "Visium HD" if visium_hd else "Visium"
            print(f"{gc['gene']} correlation, Xenium vs {vs} ({gc['level']}): Pearson {gc['pearson']:.3f}")
        print(f"report: {out / 'report' / 'index.html'}   aligned data: {out / 'aligned.zarr'}")
    return res
