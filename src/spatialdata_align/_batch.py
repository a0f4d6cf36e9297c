"""Many section pairs on a dask.distributed cluster (``sda.batch``, ``spatialdata-align batch``).

Each row of a manifest CSV (``xenium, visium, landmarks, name``) is one task: the whole pipeline
(:func:`spatialdata_align._pipeline.run_pipeline`) of that pair, run on a worker of a
``LocalCluster`` (default) or of an existing cluster (``scheduler=`` address or ``client=``), e.g.
one started by dask-jobqueue on SLURM or by dask-kubernetes. Every pair writes its own folder::

    OUT_DIR/<name>/aligned.zarr     the aligned SpatialData
    OUT_DIR/<name>/report/          overlay, gene plots, correlations, summary
    OUT_DIR/<name>/status.json      outcome, written last (ok or the error and its traceback)
    OUT_DIR/summary.csv             one row per pair

A failing pair (a bad folder, a failed fit, even a dead worker) becomes a ``failed`` row and never
stops the others. A re-run skips pairs whose ``status.json`` says ``ok`` and whose zarr store
exists, unless ``force=True``.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

#: manifest columns (``landmarks`` may be absent or empty: then the affine is found automatically)
MANIFEST_COLUMNS = ("xenium", "visium", "landmarks", "name")
#: columns of the summary table, in order
SUMMARY_COLUMNS = (
    "name",
    "status",
    "error",
    "runtime_s",
    "zarr",
    "report",
    "n_cells",
    "n_spots",
    "n_shared_genes",
    "affine",
    "verdict",
    "heldout_median_um",
    "worker",
)
STATUS_FILE = "status.json"


@dataclass(frozen=True)
class Pair:
    """One row of a manifest: the two 10x folders, an optional landmark file, and the pair's name."""

    name: str
    xenium: str
    visium: str
    landmarks: str | None = None


def read_manifest(manifest) -> list[Pair]:
    """Read a manifest CSV (or DataFrame) of section pairs.

    Parameters
    ----------
    manifest
        Path of a CSV with columns ``xenium``, ``visium``, ``name`` and optionally ``landmarks``
        (one pair per row; an empty ``landmarks`` cell means automatic initialisation). Relative
        paths are relative to the CSV's folder (to the working directory for a DataFrame).

    Raises
    ------
    FileNotFoundError
        The manifest does not exist.
    ValueError
        Missing columns, empty cells, or names that are duplicated or not usable as folder names;
        the message names the file and the rows (CSV line numbers).
    """
    if isinstance(manifest, pd.DataFrame):
        df, base, label = manifest.astype(str).fillna(""), Path.cwd(), "manifest"
    else:
        path = Path(manifest)
        if not path.is_file():
            raise FileNotFoundError(f"manifest {path} does not exist.")
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ValueError(f"manifest {path} is not a readable CSV ({e}).") from None
        base, label = path.resolve().parent, f"manifest {path}"
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("xenium", "visium", "name") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{label} lacks column(s) {missing}; it needs xenium, visium, name (and optionally landmarks), "
            f"found {list(df.columns)}."
        )
    if len(df) == 0:
        raise ValueError(f"{label} lists no pairs.")

    def resolve(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else base / q)

    pairs, problems = [], []
    for i, row in enumerate(df.to_dict("records")):
        line = i + 2  # CSV line (after the header)
        vals = {k: str(row.get(k, "") or "").strip() for k in MANIFEST_COLUMNS}
        empty = [k for k in ("xenium", "visium", "name") if not vals[k]]
        if empty:
            problems.append(f"line {line}: empty {', '.join(empty)}")
            continue
        name = vals["name"]
        if name in (".", "..") or any(ch in name for ch in '/\\:*?"<>|'):
            problems.append(f"line {line}: name {name!r} cannot be a folder name")
            continue
        landmarks = resolve(vals["landmarks"]) if vals["landmarks"] else None
        pairs.append(Pair(name, resolve(vals["xenium"]), resolve(vals["visium"]), landmarks))
    names = [p.name for p in pairs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        problems.append(f"duplicate name(s) {dups} (each pair writes the folder OUT_DIR/<name>)")
    if problems:
        raise ValueError(f"{label}: " + "; ".join(problems) + ".")
    return pairs


def _paths(out_dir: Path, name: str) -> dict[str, Path]:
    d = Path(out_dir) / name
    return {"dir": d, "zarr": d / "aligned.zarr", "report": d / "report", "status": d / STATUS_FILE}


def _finished(out_dir: Path, pair: Pair) -> dict[str, Any] | None:
    """The saved status of a pair that finished successfully earlier (``None`` otherwise)."""
    p = _paths(out_dir, pair.name)
    try:
        saved = json.loads(p["status"].read_text())
    except (OSError, ValueError):
        return None
    zarr_ok = (p["zarr"] / "zarr.json").exists() or (p["zarr"] / ".zgroup").exists()
    same_inputs = all(saved.get(k) == v for k, v in asdict(pair).items())
    return saved if saved.get("status") == "ok" and zarr_ok and same_inputs else None


def _write_status(path: Path, row: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, indent=2, default=str))
    os.replace(tmp, path)


def run_pair(pair: dict[str, Any], out_dir: str, pipeline_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one pair's pipeline (on a worker); never raises: failures are returned as a ``failed`` row."""
    import matplotlib

    matplotlib.use("Agg")
    t0 = time.perf_counter()
    p = _paths(Path(out_dir), pair["name"])
    p["dir"].mkdir(parents=True, exist_ok=True)
    p["status"].unlink(missing_ok=True)
    row: dict[str, Any] = {**pair, "zarr": str(p["zarr"]), "report": str(p["report"])}
    try:
        from distributed import get_worker

        row["worker"] = get_worker().address
    except (ImportError, ValueError):
        row["worker"] = "local"
    try:
        from ._pipeline import run_pipeline

        res = run_pipeline(
            pair["xenium"],
            pair["visium"],
            landmarks=pair["landmarks"],
            auto_init=pair["landmarks"] is None,
            out=p["zarr"],
            report=p["report"],
            verbose=False,
            progress=False,
            **pipeline_kwargs,
        )
        s = res.summary
        acc = s.get("accuracy") or {}
        loo = acc.get("loo_lddmm_um") or acc.get("loo_affine_um") or {}
        row.update(
            status="ok",
            error="",
            n_cells=s.get("n_cells"),
            n_spots=s.get("n_spots"),
            n_shared_genes=s.get("n_shared_genes"),
            affine=(s.get("affine") or {}).get("method"),
            verdict=res.verdict,
            heldout_median_um=loo.get("median"),
        )
    except Exception as e:  # one pair's failure, whatever it is, must not stop the batch
        # the pipeline's hint names run's --force; a batch offers it as --force-inputs
        from ._checks import FORCE_HINT

        msg = str(e).replace(FORCE_HINT, "--force-inputs (Python: sda.batch(..., force_inputs=True))")
        row.update(status="failed", error=f"{type(e).__name__}: {msg}", traceback=traceback.format_exc())
    row["runtime_s"] = round(time.perf_counter() - t0, 2)
    _write_status(p["status"], row)
    return row


def exit_code(summary: pd.DataFrame) -> int:
    """The batch's exit status: ``1`` only if every pair failed, else ``0`` (skipped pairs count as done)."""
    return int(len(summary) > 0 and bool((summary["status"] == "failed").all()))


def _line(k: int, n: int, row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return (
            f"[{k}/{n}] {row['name']}: ok in {row.get('runtime_s', float('nan')):.1f} s, verdict "
            f"{row.get('verdict')} -> {row['zarr']}"
        )
    if row["status"] == "skipped":
        return f"[{k}/{n}] {row['name']}: skipped (finished earlier; force=True / --force redoes it)"
    return f"[{k}/{n}] {row['name']}: FAILED {row['error']}"


def batch(
    manifest,
    out_dir=None,
    *,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    force: bool = False,
    force_inputs: bool = False,
    verbose: bool = True,
    progress: bool = True,
    **pipeline_kwargs,
) -> pd.DataFrame:
    """Align many section pairs, one dask.distributed task per pair.

    Parameters
    ----------
    manifest
        CSV (or DataFrame) with columns ``xenium, visium, landmarks, name``: see
        :func:`read_manifest`. Pairs without landmarks are initialised automatically.
    out_dir
        Output folder; each pair writes ``<out_dir>/<name>/aligned.zarr``, ``report/`` and
        ``status.json``, and the batch ``<out_dir>/summary.csv``. Default: ``<manifest stem>_aligned``
        beside the manifest (``batch_aligned`` in the working directory for a DataFrame).
    client
        A ``distributed.Client`` to submit to (kept open).
    scheduler
        Address of a running scheduler (``tcp://host:8786``) to connect to when no client is given.
        Without either, a ``LocalCluster`` of ``n_workers`` single-threaded worker processes is
        started and closed afterwards.
    n_workers
        Workers of the local cluster (default: one per pair, at most the number of CPUs).
    force
        Redo pairs that finished earlier (default: skip them).
    force_inputs
        Run pairs despite suspect inputs (:func:`~spatialdata_align._pipeline.run_pipeline`'s ``force``: each is
        then a warning and the pair's verdict "unreliable"; CLI ``--force-inputs``).
    verbose, progress
        One line per pair as it finishes; a tqdm bar over the pairs.
    **pipeline_kwargs
        Passed to :func:`~spatialdata_align._pipeline.run_pipeline` for every pair (e.g. ``dx``,
        ``gene``, ``lddmm_params``, ``loo``). Inputs that fail the pipeline's checks make that pair
        fail (its ``error`` says why); ``force=True`` here only redoes finished pairs.

    Returns
    -------
    The summary table (also written to ``<out_dir>/summary.csv``), one row per pair in manifest
    order: ``name``, ``status`` (``ok``, ``failed``, ``skipped``), ``error``, ``runtime_s``,
    ``zarr``, ``report``, counts, the pipeline's ``verdict`` (good / check / unreliable) and held-out
    landmark error, and the worker it ran on. :func:`exit_code` turns it into the
    CLI's exit status (non-zero only if every pair failed).
    """
    from tqdm.auto import tqdm

    if force_inputs:
        pipeline_kwargs = {**pipeline_kwargs, "force": True}
    pairs = read_manifest(manifest)
    if out_dir is None:
        out_dir = (
            Path("batch_aligned")
            if isinstance(manifest, pd.DataFrame)
            else Path(manifest).with_name(f"{Path(manifest).stem}_aligned")
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another out_dir.")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    n, k = len(pairs), 0
    for pair in pairs:
        saved = None if force else _finished(out_dir, pair)
        if saved is None:
            todo.append(pair)
            continue
        k += 1
        rows[pair.name] = {**saved, "status": "skipped", "error": ""}
        if verbose:
            print(_line(k, n, rows[pair.name]), flush=True)
    if todo:
        own = []
        try:
            if client is None:
                from distributed import Client, LocalCluster

                if scheduler is not None:
                    client = Client(scheduler)
                else:
                    workers = n_workers or max(1, min(len(todo), os.cpu_count() or 1))
                    cluster = LocalCluster(
                        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
                    )
                    own.append(cluster)
                    client = Client(cluster)
                own.insert(0, client)
            k = _gather(client, todo, out_dir, pipeline_kwargs, rows, k, n, verbose, progress, tqdm)
        finally:
            for obj in own:
                obj.close()
    summary = pd.DataFrame([rows[p.name] for p in pairs])
    for col in SUMMARY_COLUMNS:
        if col not in summary.columns:
            summary[col] = None
    summary = summary[list(SUMMARY_COLUMNS)]
    summary.to_csv(out_dir / "summary.csv", index=False)
    if verbose:
        n_ok = int((summary["status"] != "failed").sum())
        print(
            f"{n_ok} of {n} pairs aligned ({int((summary['status'] == 'skipped').sum())} skipped); "
            f"summary: {out_dir / 'summary.csv'}",
            flush=True,
        )
    return summary


def _gather(client, todo, out_dir, pipeline_kwargs, rows, k, n, verbose, progress, tqdm) -> int:
    from distributed import as_completed

    tag = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            run_pair, asdict(pair), str(out_dir), pipeline_kwargs, key=f"align-{pair.name}-{tag}", pure=False
        ): pair
        for pair in todo
    }
    bar = tqdm(total=len(todo), desc="pairs", unit="pair", disable=not progress)
    try:
        for fut in as_completed(futures, loop=client.loop):  # (not the default client's loop: there may be none)
            pair = futures[fut]
            try:
                row = fut.result()
            except Exception as e:  # a dead worker or a cancelled task: that pair failed
                p = _paths(Path(out_dir), pair.name)
                row = {
                    **asdict(pair),
                    "status": "failed",
                    "error": f"{type(e).__name__}: {e}",
                    "zarr": str(p["zarr"]),
                    "report": str(p["report"]),
                }
                if p["dir"].is_dir():
                    _write_status(p["status"], row)
            rows[pair.name] = row
            k += 1
            if verbose:
                bar.write(_line(k, n, row))
            bar.update(1)
    finally:
        bar.close()
    return k
