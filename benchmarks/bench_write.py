"""Time writing the tables of a SpatialData store: ``SpatialData.write`` against this package's writer.

``spatialdata_align._write.write_sdata`` writes tables through spatialdata's own table writer into an in-memory
zarr store and then puts its files on disk; ``SpatialData.write`` writes them straight into zarr's local store, one
asynchronous round trip per metadata and array write. Both stores are compared file by file (they must be equal).

Usage (after ``spatialdata-align demo --out demo_out``, whose store holds five tables)::

    python benchmarks/bench_write.py demo_out/aligned.zarr
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="a SpatialData zarr store with tables (e.g. demo_out/aligned.zarr)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each writer (best counts)")
    args = ap.parse_args()

    import spatialdata as sd

    from spatialdata_align._write import write_sdata

    warnings.filterwarnings("ignore", category=UserWarning)
    src = sd.read_zarr(args.store, selection=("tables",))
    tables = {k: v.to_memory() if hasattr(v, "to_memory") else v for k, v in src.tables.items()}
    sdata = sd.SpatialData(tables=tables)
    n_nodes = sum(1 for _ in (args.store / "tables").rglob("zarr.json"))
    work = Path(tempfile.mkdtemp(prefix="bench_write_"))
    writers = {
        "SpatialData.write": lambda out: sdata.write(out, update_sdata_path=False),
        "write_sdata": lambda out: write_sdata(sdata, out),
    }
    times: dict[str, list[float]] = {k: [] for k in writers}
    try:
        for i in range(args.repeat):
            for label, fn in writers.items():
                out = work / f"{label}_{i}.zarr"
                t = time.perf_counter()
                fn(out)
                times[label].append(time.perf_counter() - t)
        a, b = (work / f"{label}_0.zarr" / "tables" for label in writers)
        files = [{p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} for root in (a, b)]
        same = files[0] == files[1]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peer, ours = min(times["SpatialData.write"]), min(times["write_sdata"])
    print(
        f"{len(tables)} tables, {n_nodes} zarr nodes: SpatialData.write {peer:.2f} s, write_sdata {ours:.2f} s, "
        f"ratio {peer / ours:.1f}x (best of {args.repeat}); identical files: {same}"
    )


if __name__ == "__main__":
    main()
