"""Peak memory of aligning a large Xenium transcripts table: lazy, partition by partition.

For each size a child process builds a ``transcripts.parquet`` of that many rows (x, y, z in µm, feature
name, qv; written in row groups, never held in memory at once), reads it with the package's Xenium
transcript reader (lazy dask), stores an affine + LDDMM registration in the SpatialData object, runs
``sdata.align.apply("xenium_transcripts")`` and writes the aligned points to a zarr store. It prints the
child's peak resident memory (ru_maxrss) beside the size of the table, so the ratio shows whether memory
stays bounded as the table grows (a table held in memory would need ~24 bytes per row for x, y, z alone).

``--read FILE`` instead times reading a whole ``transcripts.parquet`` into memory, best of 3 in one process: the
package's lazy reader (feature names coded in arrow, strings kept as arrow strings) against
``dask.dataframe.read_parquet`` followed by the same categorical ``feature_name``, and prints the ratio.

``--transform FILE`` times reading and mapping every transcript of ``FILE`` through such a registration (the aligned
copy's partitions, one at a time and two at a time) with the package's chunk size against chunks of 1M points.

``--write FILE`` times writing a SpatialData object that holds the transcripts of ``FILE`` and their aligned copy
(an affine + LDDMM registration, as ``spatialdata-align run`` leaves them) to zarr: ``SpatialData.write`` against
this package's writer (:func:`spatialdata_align._write.write_sdata`: the points elements' parquet in one dask pass,
dictionaries only for categorical and string columns), alternating, best of ``--repeat``; it prints the ratio and
checks that both stores read back as the same frames.

Usage::

    python benchmarks/bench_transcripts.py [--rows 1e6 1e7 1e8] [--workdir /tmp/bench_tx]
    python benchmarks/bench_transcripts.py --read demo_out/data/xenium/transcripts.parquet
    python benchmarks/bench_transcripts.py --write demo_out/data/xenium/transcripts.parquet
    python benchmarks/bench_transcripts.py --transform demo_out/data/xenium/transcripts.parquet
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROW_GROUP = 2_000_000


def write_parquet(path: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    genes = np.array([f"GENE{i:03d}" for i in range(300)])
    writer = None
    for start in range(0, n, ROW_GROUP):
        m = min(ROW_GROUP, n - start)
        codes = rng.integers(0, len(genes), m).astype(np.int16)
        table = pa.table(
            {
                "x_location": rng.uniform(0, 4000, m).astype(np.float32),
                "y_location": rng.uniform(0, 3000, m).astype(np.float32),
                "z_location": rng.uniform(0, 20, m).astype(np.float32),
                "feature_name": pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(genes)),
                "qv": rng.uniform(20, 40, m).astype(np.float32),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def aligned_sdata(path: Path):
    """A SpatialData object with the transcripts of ``path`` and their aligned copy (lazy, not computed)."""
    import spatialdata

    from spatialdata_align import _store
    from spatialdata_align._constants import VISIUM_CS, XENIUM_CS, XENIUM_TRANSCRIPTS
    from spatialdata_align.io._xenium import _read_transcripts
    from spatialdata_align.registration import Registration

    points = _read_transcripts(Path(path))
    sdata = spatialdata.SpatialData(points={XENIUM_TRANSCRIPTS: points})
    # an affine + a smooth velocity field (nt=5) over the tissue: the cost of a real LDDMM result
    xv, yv = np.linspace(-200, 4200, 60), np.linspace(-200, 3200, 48)
    gx, gy = np.meshgrid(xv, yv)
    v = np.stack([30 * np.sin(gx / 700) * np.cos(gy / 500), 25 * np.cos(gx / 600)])[None].repeat(5, 0)
    aff = np.array([[0.9, -0.3, 500.0], [0.3, 0.9, 200.0], [0, 0, 1]]) * [[2.3], [2.3], [1]]
    # the sections' extents (the store samples the fields over them; a points-only object cannot give them)
    box = np.array([[0.0, 0.0], [4000.0, 0.0], [0.0, 3000.0], [4000.0, 3000.0]])
    mapped = box @ aff[:2, :2].T + aff[:2, 2]
    reg = Registration(
        affine=aff,
        velocity_values=v,
        xv=xv,
        yv=yv,
        source_extent=(0.0, 4000.0, 0.0, 3000.0),
        target_extent=(*np.sort(mapped[:, 0])[[0, -1]], *np.sort(mapped[:, 1])[[0, -1]]),
    )
    _store.store_registration(
        sdata,
        reg,
        key="bench",
        kind="lddmm",
        source_cs=XENIUM_CS,
        target_cs=VISIUM_CS,
        source_element=XENIUM_TRANSCRIPTS,
        target_element=None,
        native=False,
    )
    name = sdata.align.apply(XENIUM_TRANSCRIPTS)
    return sdata, name


def child(path: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sdata, name = aligned_sdata(Path(path))
    t1 = time.perf_counter()
    sdata.write(out, overwrite=True)  # streams the aligned partitions to disk
    t2 = time.perf_counter()
    head = sdata[name].head(3)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "partitions": int(sdata[name].npartitions),
                "peak_mb": peak_mb,
                "build_s": t1 - t0,
                "write_s": t2 - t1,
                "finite": bool(np.isfinite(head[["x", "y"]].to_numpy()).all()),
            }
        )
    )


def bench_read(path: Path, repeat: int = 3) -> None:
    """Time reading ``path`` whole: this package's reader against dask's ``read_parquet`` + a categorical."""
    import dask.dataframe as dd
    import pandas as pd

    from spatialdata_align.io._transcripts import COORDINATES, read_transcripts_parquet

    ours = read_transcripts_parquet(path)
    cats = ours.dtypes["feature_name"]

    def peer():
        df = dd.read_parquet(path).compute().rename(columns=COORDINATES)
        df["feature_name"] = df["feature_name"].astype(cats)
        return df

    def best(fn):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            df = fn()
            times.append(time.perf_counter() - t)
        return min(times), df

    t_ours, a = best(lambda: read_transcripts_parquet(path).compute())
    t_peer, b = best(peer)
    same = all((a[c].astype(str).to_numpy() == b[c].astype(str).to_numpy()).all() for c in b.columns) and isinstance(
        a["feature_name"].dtype, pd.CategoricalDtype
    )
    print(
        f"{len(a):,d} rows: this reader {t_ours:.2f} s, dask read_parquet + categorical {t_peer:.2f} s, "
        f"ratio {t_peer / t_ours:.1f}x; same values: {same}"
    )


def bench_write(path: Path, workdir: Path, repeat: int = 2) -> None:
    """Time writing the transcripts and their aligned copy: ``SpatialData.write`` against ``write_sdata``."""
    import warnings

    import spatialdata

    from spatialdata_align._write import write_sdata

    sdata, name = aligned_sdata(path)
    workdir.mkdir(parents=True, exist_ok=True)
    stores = {"spatialdata": workdir / "peer.zarr", "this package": workdir / "ours.zarr"}

    def peer(out):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*")
            sdata.write(out, update_sdata_path=False)

    writers = {"spatialdata": peer, "this package": lambda out: write_sdata(sdata, out)}
    times: dict[str, list[float]] = {k: [] for k in writers}
    for _ in range(repeat):
        for label, fn in writers.items():
            shutil.rmtree(stores[label], ignore_errors=True)
            t = time.perf_counter()
            fn(stores[label])
            times[label].append(time.perf_counter() - t)
    a, b = (spatialdata.read_zarr(stores[k]) for k in writers)
    same = True
    for el in sorted(a.points):
        pa_, pb = a.points[el], b.points[el]
        same &= pa_.npartitions == pb.npartitions
        for i in sorted({0, pa_.npartitions - 1}):
            x, y = pa_.partitions[i].compute(), pb.partitions[i].compute()
            same &= x.sort_index(axis=1).equals(y.sort_index(axis=1))
    size = {k: sum(f.stat().st_size for f in v.rglob("*") if f.is_file()) / 1e6 for k, v in stores.items()}
    t_peer, t_ours = min(times["spatialdata"]), min(times["this package"])
    print(
        f"{len(sdata[name]):,d} transcripts + aligned copy: "
        f"SpatialData.write {t_peer:.1f} s ({size['spatialdata']:.0f} MB), "
        f"write_sdata {t_ours:.1f} s ({size['this package']:.0f} MB), ratio {t_peer / t_ours:.2f}x; "
        f"same frames read back: {same}"
    )
    for v in stores.values():
        shutil.rmtree(v, ignore_errors=True)


def bench_transform(path: Path, repeat: int = 3) -> None:
    """Time mapping every transcript of ``path`` (the aligned copy's partitions, read + mapped, one after the other
    and two at a time) with the package's chunk size against chunks of 1M points, alternating, best of ``repeat``."""
    import dask

    from spatialdata_align import _apply
    from spatialdata_align.registration import _displacement

    sdata, name = aligned_sdata(path)
    el = sdata[name]
    originals = (_apply.POINT_CHUNK, _displacement.CHUNK)
    variants = {f"chunks of {originals[0]:,d}": originals, "chunks of 1,000,000": (1_000_000, 1_000_000)}
    times: dict[str, dict[str, list[float]]] = {k: {"1 thread": [], "2 threads": []} for k in variants}
    try:
        for _ in range(repeat):
            for label, (point_chunk, chunk) in variants.items():
                _apply.POINT_CHUNK, _displacement.CHUNK = point_chunk, chunk
                for mode, kw in (("1 thread", {"scheduler": "sync"}), ("2 threads", {"num_workers": 2})):
                    t = time.perf_counter()
                    dask.compute(el.map_partitions(len), **kw)
                    times[label][mode].append(time.perf_counter() - t)
    finally:
        _apply.POINT_CHUNK, _displacement.CHUNK = originals
    print(f"{len(el):,d} transcripts read and mapped (best of {repeat}):")
    for label, t in times.items():
        print(f"  {label:>22s}: {min(t['1 thread']):.2f} s one partition at a time, {min(t['2 threads']):.2f} s two")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--workdir", default="/tmp/bench_transcripts")
    ap.add_argument("--read", type=Path, default=None, help="time reading this transcripts.parquet instead")
    ap.add_argument("--write", type=Path, default=None, help="time writing this transcripts.parquet + aligned copy")
    ap.add_argument("--transform", type=Path, default=None, help="time mapping this transcripts.parquet's points")
    ap.add_argument("--repeat", type=int, default=2, help="--write: alternating runs of each writer (best counts)")
    args = ap.parse_args(argv)
    if args.transform is not None:
        bench_transform(args.transform, max(args.repeat, 1))
        return
    if args.write is not None:
        bench_write(args.write, Path(args.workdir), args.repeat)
        return
    if args.read is not None:
        bench_read(args.read)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{'rows':>12} {'parquet MB':>11} {'x,y,z in RAM MB':>16} {'peak RSS MB':>12} {'partitions':>10} "
        f"{'apply s':>8} {'write s':>8}"
    )
    for n in (int(r) for r in args.rows):
        pq_path = work / f"transcripts_{n}.parquet"
        if not pq_path.exists():
            write_parquet(pq_path, n)
        out = work / f"aligned_{n}.zarr"
        res = subprocess.run(
            [sys.executable, __file__, "--child", str(pq_path), str(out)], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            print(res.stderr[-3000:])
            raise SystemExit(f"child failed for {n} rows")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        assert r["finite"]
        print(
            f"{n:12,d} {pq_path.stat().st_size / 1e6:11.0f} {n * 24 / 1e6:16.0f} {r['peak_mb']:12.0f} "
            f"{r['partitions']:10d} {r['build_s']:8.1f} {r['write_s']:8.1f}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
