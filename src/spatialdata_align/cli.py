"""The ``spatialdata-align`` console script.

``spatialdata-align run``  aligns a Xenium output folder onto a Visium ``outs/`` folder and writes the
aligned SpatialData plus a report; ``spatialdata-align demo`` does the same on generated twin sections
and scores the result against the known truth; ``spatialdata-align batch`` runs many pairs of a manifest
on a dask.distributed cluster (:mod:`spatialdata_align._batch`). All call
:func:`spatialdata_align._pipeline.run_pipeline`, the same functions, in the same order, as the tutorial
notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="spatialdata-align",
        description="Cross-technology alignment (Xenium -> Visium) inside SpatialData: affine + LDDMM.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="align a Xenium folder onto a Visium or Visium HD outs/ folder")
    run.add_argument("--xenium", required=True, type=Path, help="Xenium output folder (full or minimal download)")
    run.add_argument(
        "--visium",
        required=True,
        type=Path,
        help="Space Ranger outs/ folder: Visium (any image subset; the registration target is the best image "
        "present: hires, lowres, full resolution, CytAssist) or Visium HD (binned_outputs/ detected; genes are "
        "compared at --bin-size bins)",
    )
    run.add_argument(
        "--landmarks",
        type=Path,
        help="landmark pairs: CSV with columns source_x, source_y (Xenium µm), target_x, target_y (Visium px), "
        "or an STalign-style .npy dict of named Xenium points (then also --landmarks-target)",
    )
    run.add_argument("--landmarks-target", type=Path, help="STalign-style .npy dict of the matching Visium points")
    run.add_argument(
        "--landmark-units",
        choices=("fullres", "hires"),
        default="fullres",
        help="units of the Visium landmarks: full-resolution pixels (default) or hires-image pixels",
    )
    run.add_argument(
        "--auto-init",
        action="store_true",
        help="find the affine automatically, without landmarks; an error together with --landmarks (the landmarks "
        "then give the affine: use one or the other)",
    )
    run.add_argument("--out", required=True, type=Path, help="output SpatialData zarr store (e.g. aligned.zarr)")
    run.add_argument(
        "--report", type=Path, help="report folder: index.html (open it in a browser), PNGs, CSVs, exports for R"
    )
    run.add_argument(
        "--allow-flip",
        action="store_true",
        help="accept a mirrored alignment (the Visium section is mounted upside down); refused by default",
    )
    _common(run)

    demo = sub.add_parser("demo", help="generate twin sections, align them and score against the truth")
    demo.add_argument("--out", required=True, type=Path, help="output folder (data, aligned.zarr, report/)")
    demo.add_argument(
        "--n-cells",
        type=int,
        default=20000,
        help="number of Xenium cells (default 20000, ~4000 per mm², as in real tissue)",
    )
    demo.add_argument("--n-spots", type=int, default=500, help="number of Visium spots (default 500)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the generated tissue")
    demo.add_argument("--auto-init", action="store_true", help="ignore the landmarks; find the affine automatically")
    demo.add_argument(
        "--visium-hd",
        action="store_true",
        help="make the Visium section a Visium HD folder (2/8/16 µm bins) and compare genes at --bin-size bins",
    )
    _common(demo)

    batch = sub.add_parser(
        "batch",
        help="align many section pairs, one dask.distributed task each",
        description="Align every pair of a manifest CSV (columns xenium, visium, landmarks, name; relative paths are "
        "relative to the CSV; an empty landmarks cell means --auto-init) as one task each on a dask.distributed "
        "cluster: a LocalCluster by default, or an existing one with --scheduler. Each pair writes "
        "OUT_DIR/<name>/aligned.zarr, report/ and status.json; OUT_DIR/summary.csv has one row per pair. A failing "
        "pair is a row of the summary and does not stop the others; a re-run skips finished pairs unless --force. "
        "Exit status: 0 if at least one pair is aligned (now or earlier), 1 if every pair failed, 2 for a bad "
        "manifest or arguments.",
    )
    batch.add_argument("manifest", type=Path, help="CSV with columns xenium, visium, landmarks (optional), name")
    batch.add_argument("--out-dir", required=True, type=Path, help="output folder (one subfolder per pair)")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="address of a running dask scheduler (tcp://host:8786)")
    batch.add_argument("--workers", type=int, help="workers of the local cluster (default: one per pair, <= CPUs)")
    batch.add_argument("--force", action="store_true", help="redo pairs that finished in an earlier run")
    batch.add_argument(
        "--force-inputs",
        action="store_true",
        help="run pairs despite suspect inputs (as run --force: the verdict is then 'unreliable')",
    )
    batch.add_argument(
        "--allow-flip",
        action="store_true",
        help="accept mirrored alignments (sections mounted upside down); refused by default",
    )
    batch.add_argument(
        "--landmark-units",
        choices=("fullres", "hires"),
        default="fullres",
        help="units of the Visium landmarks of every pair: full-resolution pixels (default) or hires-image pixels",
    )
    _common(batch, force=False)
    return ap


def _common(p: argparse.ArgumentParser, force: bool = True) -> None:
    p.add_argument("--dx", type=float, default=20.0, help="pixel size (µm) of the rasterised Xenium cells")
    p.add_argument(
        "--gene",
        default=None,
        help="gene shown side by side in the report; an error if not measured by both (default: EGFR when both "
        "measure it, else the best-correlated shared gene)",
    )
    p.add_argument(
        "--bin-size",
        type=int,
        default=16,
        help="Visium HD: bin size (µm) the Xenium cells are aggregated into and compared at (default 16)",
    )
    p.add_argument("--device", default="cpu", help="torch device for LDDMM (cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no stage messages or progress bars")
    if force:  # batch has its own --force (redo finished pairs)
        p.add_argument(
            "--force",
            action="store_true",
            help="run despite suspect inputs (the verdict is then 'unreliable'), and exit 0 even when the verdict is "
            "'unreliable'",
        )
    p.add_argument(
        "--loo",
        choices=("lddmm", "affine", "none"),
        default="lddmm",
        help="held-out landmark error: refit affine + LDDMM without each landmark (default; a few extra LDDMM "
        "runs), the affine only (instant), or none",
    )


#: library notices that say nothing to a user of the command line (zarr repeats this one for every array written)
_CLI_SILENCED = (r"zarr v3 autosharding will be the default",)


def main(argv=None) -> int:
    """Entry point of the ``spatialdata-align`` console script."""
    args = _parser().parse_args(argv)
    import warnings

    with warnings.catch_warnings():
        for message in _CLI_SILENCED:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return _run(args)


def _run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from ._pipeline import run_demo, run_pipeline

    verbose = not args.quiet
    if args.command == "batch":
        return _batch(args, verbose)
    common = {
        "dx": args.dx,
        "gene": args.gene,
        "verbose": verbose,
        "progress": verbose,
        "lddmm_params": {"device": args.device},
        "force": args.force,
        "loo": args.loo,
        "bin_size": args.bin_size,
    }
    try:
        if args.command == "run":
            if args.landmarks is None and not args.auto_init:
                raise ValueError("give a landmark file (--landmarks FILE) or --auto-init.")
            res = run_pipeline(
                args.xenium,
                args.visium,
                landmarks=args.landmarks,
                landmarks_target=args.landmarks_target,
                landmark_units=args.landmark_units,
                auto_init=args.auto_init,
                out=args.out,
                report=args.report,
                flip=args.allow_flip,
                **common,
            )
        else:
            res = run_demo(
                args.out,
                n_cells=args.n_cells,
                n_spots=args.n_spots,
                seed=args.seed,
                auto_init=args.auto_init,
                visium_hd=args.visium_hd,
                **common,
            )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"spatialdata-align: error: {msg}", file=sys.stderr)
        return 2
    s = res.summary
    if verbose:
        print(
            f"done: {s['n_cells']} cells, "
            + (
                f"{s['visium_hd']['n_bins']} bins of {s['visium_hd']['bin_size_um']} µm"
                if "visium_hd" in s
                else f"{s['n_spots']} spots"
            )
            + f", {s['n_shared_genes']} shared genes; "
            f"time per stage (s): {s.get('time_per_stage_s')}"
        )
    _print_verdict(s, verbose)
    if res.verdict == "unreliable" and not args.force:
        print(
            "spatialdata-align: the verdict is 'unreliable' (reasons above); the outputs were written for "
            "inspection. Exit status 3; rerun with --force to accept the result.",
            file=sys.stderr,
        )
        return 3
    return 0


def _print_verdict(summary: dict, verbose: bool) -> None:
    """The CLI's last lines: the verdict, its reasons and the held-out error."""
    from ._report import accuracy_lines

    v = summary.get("verdict", {})
    acc = summary.get("accuracy", {})
    loo = acc.get("loo_lddmm_um") or acc.get("loo_affine_um")
    of = "" if acc.get("loo_lddmm_um") else " of the affine alone (--loo affine / none: the LDDMM not refitted)"
    est = f"; held-out landmark error{of} median {loo['median']:.1f} µm, max {loo['max']:.1f} µm" if loo else ""
    stream = sys.stderr if v.get("level") == "unreliable" else sys.stdout
    if verbose:
        for line in accuracy_lines(summary):
            print(f"  {line}", file=stream)
    for r in v.get("reasons", []):
        print(f"  - {r}", file=stream)
    print(f"verdict: {v.get('level', '?')}{est}", file=stream)


def _batch(args, verbose: bool) -> int:
    from ._batch import batch, exit_code

    try:
        summary = batch(
            args.manifest,
            args.out_dir,
            scheduler=args.scheduler,
            n_workers=args.workers,
            force=args.force,
            verbose=verbose,
            progress=verbose,
            dx=args.dx,
            gene=args.gene,
            lddmm_params={"device": args.device},
            loo=args.loo,
            bin_size=args.bin_size,
            force_inputs=args.force_inputs,
            flip=args.allow_flip,
            landmark_units=args.landmark_units,
        )
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        print(f"spatialdata-align: error: {err}", file=sys.stderr)
        return 2
    return exit_code(summary)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
