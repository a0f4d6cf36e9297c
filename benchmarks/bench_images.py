"""Peak memory and wall time of warping whole-slide images lazily, block by block, against the in-memory path.

A generated RGB uint8 image (dask, built chunk by chunk from its pixel coordinates: tissue-like blobs,
"nuclei" and texture; never materialised) is warped through an affine + LDDMM registration (a smooth
velocity field integrated in ``nt=5`` steps, the cost of a real result) with
:meth:`~spatialdata_align.registration.Registration.warp_image`:

* forward: the image, in the source frame (µm, 0.25 µm per pixel), onto a target-frame grid of the same
  size at its native resolution;
* inverse: the image, in the target frame (pixels), back onto a source-frame grid of the same size.

Each lazy result becomes a multiscale ``Image2DModel`` and is written to a zarr store chunk by chunk
(``sdata.write``); the store lives under ``--workdir`` (default ``/tmp``) and is deleted afterwards.

On a smaller image (first, in a fresh process) the in-memory path runs too (numpy image in, numpy result
out, then the same write), in the same process: the script prints both wall times and the growth of the
resident memory (sampled every 10 ms during each phase), and checks that the two outputs agree pixel for
pixel (to 1e-6 after the uint8 rounding, i.e. exactly). At the large size it checks a crop of the written
store against the in-memory warp of that crop.

Usage::

    python benchmarks/bench_images.py [--size 40000] [--small 8000] [--chunk 1024] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

GEN_CHUNK = 512
PIXEL_UM = 0.25  # source pixel size (µm)
TARGET_PX_PER_UM = 1 / 0.25  # target pixels per µm: same resolution, so native grids have equal sizes


# ------------------------------------------------------------------------------------------ the image
def _profile(start: int, stop: int, period: float, seed: int) -> np.ndarray:
    """A uint8 1D profile: a slow wave (tissue) plus a pixel-scale hashed texture (nuclei, grain)."""
    i = np.arange(start, stop, dtype=np.int64)
    wave = 60 + 55 * np.sin(i / period) * np.cos(i / (2.7 * period))
    grain = ((i * 2654435761 + seed) >> 7) & 31  # deterministic per-pixel texture
    return (wave + grain).astype(np.uint8)


#: colour lookup tables (index -> R, G, B): pink stroma to purple nuclei, like an H&E
_LUT = np.stack(
    [
        (235 - 0.55 * np.arange(256)).astype(np.uint8),
        (225 - 0.75 * np.arange(256)).astype(np.uint8),
        (235 - 0.35 * np.arange(256)).astype(np.uint8),
    ]
)


def _tile(block_info=None):
    """One RGB uint8 tile of the generated image, from its global pixel coordinates only (a few ns a pixel)."""
    (c0, c1), (r0, r1), (x0, x1) = block_info[None]["array-location"]
    v = _profile(x0, x1, 900.0, 17)[None, :] + _profile(r0, r1, 700.0, 5)[:, None]  # uint8, wraps: fine texture
    return np.stack([_LUT[c][v] for c in range(c0, c1)])


def generated_image(size: int, chunk: int = GEN_CHUNK):
    """A ``(3, size, size)`` uint8 dask array computed tile by tile (never held whole in memory)."""
    import dask.array as da

    return da.map_blocks(_tile, dtype=np.uint8, chunks=((3,), *[_chunks(size, chunk)] * 2))


def _chunks(n: int, c: int) -> tuple[int, ...]:
    return tuple(min(c, n - s) for s in range(0, n, c))


def registration(size: int):
    """Affine (rotation 20°, scale to target pixels) after a smooth velocity field over the source extent."""
    from spatialdata_align.registration import Registration

    ext = size * PIXEL_UM
    xv = np.linspace(-0.05 * ext, 1.05 * ext, 64)
    gx, gy = np.meshgrid(xv, xv)
    amp = 0.004 * ext  # 40 µm on a 10 mm section
    v = np.stack([amp * np.sin(gx / (0.2 * ext)) * np.cos(gy / (0.15 * ext)), amp * np.cos(gx / (0.17 * ext))])
    th = np.deg2rad(20.0)
    s = TARGET_PX_PER_UM
    c = ext / 2
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * s
    # rotate about the centre, so the centre of the section stays at the centre of the target frame
    t = np.array([c, c]) * s - rot @ np.array([c, c])
    aff = np.array([[*rot[0], t[0]], [*rot[1], t[1]], [0, 0, 1]])
    return Registration(affine=aff, velocity_values=v[None].repeat(5, 0), xv=xv, yv=xv)


def frames(size: int):
    """Pixel-centre coordinates of the source (µm) and target (px) grids, both ``size`` pixels a side."""
    src = (np.arange(size) + 0.5) * PIXEL_UM
    tgt = np.arange(size) + 0.5
    return src, tgt


# ------------------------------------------------------------------------------------------ measuring
@contextmanager
def measure(label: str, results: dict):
    """Wall time and peak RSS (sampled every 10 ms) of the block."""
    import psutil

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def poll():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    th = threading.Thread(target=poll, daemon=True)
    start_rss = peak[0]
    th.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        results[label] = {"wall_s": dt, "peak_rss_gb": peak[0] / 1e9, "start_rss_gb": start_rss / 1e9}
        gb = peak[0] / 1e9
        print(f"  {label:<34} wall {dt:8.1f} s   peak RSS {gb:6.2f} GB (start {start_rss / 1e9:.2f})", flush=True)


def write_image(data, path: Path, chunk: int) -> None:
    """Write a ``(c, y, x)`` array as a multiscale image element (pyramid down to one chunk) of a new zarr store."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from spatialdata_align._apply import pyramid_factors

    img = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        scale_factors=pyramid_factors(data.shape[1:], chunk),
        chunks=(data.shape[0], chunk, chunk),
    )
    SpatialData(images={"warped": img}).write(path)


def read_crop(path: Path, rows: slice, cols: slice) -> np.ndarray:
    import zarr

    return zarr.open_array(str(path / "images" / "warped" / "s0"), mode="r")[:, rows, cols]


def warp(reg, img, direction: str, size: int, chunk: int, map_step):
    src, tgt = frames(size)
    x_in, x_out = (src, tgt) if direction == "forward" else (tgt, src)
    return reg.warp_image(
        img, x_in, x_in, direction=direction, out_x=x_out, out_y=x_out, chunk=chunk, map_step=map_step
    ).data


def run_lazy(size: int, chunk: int, work: Path, results: dict, map_step=None, tag="lazy") -> dict:
    reg = registration(size)
    img = generated_image(size)
    steps = {}
    for direction in ("forward", "inverse"):
        out = work / f"{tag}_{direction}_{size}.zarr"
        with measure(f"{tag} {direction} {size}^2 -> zarr", results):
            data = warp(reg, img, direction, size, chunk, map_step)
            write_image(data, out, chunk)
        steps[direction] = out
    return steps


def run_in_memory(size: int, chunk: int, work: Path, results: dict, map_step=None) -> dict:
    reg = registration(size)
    outs = {}
    for direction in ("forward", "inverse"):
        out = work / f"mem_{direction}_{size}.zarr"
        with measure(f"in-memory {direction} {size}^2 -> zarr", results):
            img = np.asarray(generated_image(size))  # the whole image in memory, as the in-memory path needs
            data = warp(reg, img, direction, size, chunk, map_step)
            write_image(data, out, chunk)
            del img
        outs[direction] = (out, data)
    return outs


def crop_parity(size: int, lazy_store: Path, direction: str, crop: int = 1500):
    """In-memory warp of a crop of the output grid (reading only the input it needs) vs the written lazy store.

    The crop uses the lattice step the lazy run chose on the whole grid (the choice is deterministic).
    """
    from spatialdata_align.registration._warp import (
        DEFAULT_MAP_TOL,
        Grid,
        TransformMap,
        _windows,
        image_levels,
        resolve_step,
    )

    reg = registration(size)
    src, tgt = frames(size)
    x_in, x_out = (src, tgt) if direction == "forward" else (tgt, src)
    full = TransformMap(
        reg,
        "inverse" if direction == "forward" else "forward",
        image_levels(generated_image(size), x_in, x_in).to_index,
    )
    map_step, _ = resolve_step(full, Grid.from_coords(x_out, x_out), (size, size), None, DEFAULT_MAP_TOL)
    r0 = c0 = size // 2 - crop // 2 + 123  # off the chunk grid on purpose
    ox, oy = x_out[c0 : c0 + crop], x_out[r0 : r0 + crop]
    back = "inverse" if direction == "forward" else "forward"
    levels = image_levels(generated_image(size), x_in, x_in)
    grid = Grid.from_coords(ox, oy)
    (win,) = _windows(TransformMap(reg, back, levels.to_index), grid, [((0, crop), (0, crop))], map_step, (size, size))
    window = np.asarray(generated_image(size)[:, win[0], win[1]])  # only the input this crop needs, in memory
    mem = reg.warp_image(
        window, x_in[win[1]], x_in[win[0]], direction=direction, out_x=ox, out_y=oy, chunk=crop, map_step=map_step
    ).values
    lazy = read_crop(lazy_store, slice(r0, r0 + crop), slice(c0, c0 + crop))
    return int(np.abs(mem.astype(int) - lazy.astype(int)).max()), float((mem != lazy).mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=40_000, help="side of the large image (lazy path only)")
    ap.add_argument("--small", type=int, default=8_000, help="side of the image both paths warp")
    ap.add_argument("--chunk", type=int, default=1024, help="output block size")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("spatialdata_align").setLevel(logging.INFO)
    import dask
    import torch

    torch.set_num_threads(1)  # dask runs one block per core
    work = Path(tempfile.mkdtemp(prefix="bench_images_", dir=args.workdir))
    results: dict = {}
    try:
        print(f"dask threads: {dask.system.CPU_COUNT}; stores under {work} (deleted at the end)")
        # the smaller image first, so that both paths start from the same fresh process
        print(f"both paths, {args.small} x {args.small} ({3 * args.small**2 / 1e9:.2f} GB raw per image):")
        lazy = run_lazy(args.small, args.chunk, work, results, tag="lazy")
        mem = run_in_memory(args.small, args.chunk, work, results)
        for direction in ("forward", "inverse"):
            b = mem[direction][1]
            diff = max(  # strip by strip: float64 copies of the whole images would dwarf what is measured
                float(
                    np.abs(
                        read_crop(lazy[direction], slice(r, r + 500), slice(None)) - b[:, r : r + 500].astype(float)
                    ).max()
                )
                for r in range(0, b.shape[1], 500)
            )
            lz = results[f"lazy {direction} {args.small}^2 -> zarr"]
            im = results[f"in-memory {direction} {args.small}^2 -> zarr"]
            ok = "OK" if diff <= 1e-6 else "FAIL"
            grow = [r["peak_rss_gb"] - r["start_rss_gb"] for r in (lz, im)]
            print(
                f"  {direction}: parity max |lazy - in-memory| = {diff:.3g} ({ok} at 1e-6); lazy/in-memory wall "
                f"{lz['wall_s'] / im['wall_s']:.2f}x; RSS growth lazy {grow[0]:.2f} GB vs in-memory {grow[1]:.2f} GB"
            )
        del mem
        for p in lazy.values():
            shutil.rmtree(p, ignore_errors=True)
        if not args.skip_large:
            print(f"lazy path, {args.size} x {args.size} RGB uint8 ({3 * args.size**2 / 1e9:.1f} GB raw per image):")
            large = run_lazy(args.size, args.chunk, work, results)
            for direction in ("forward", "inverse"):
                with measure(f"crop parity {direction}", results):
                    diff, frac = crop_parity(args.size, large[direction], direction)
                print(
                    f"  crop parity {direction} (1500^2 in memory vs the written store): max |diff| {diff}, "
                    f"{frac:.2%} of pixels differ"
                )
            peak = max(results[f"lazy {d} {args.size}^2 -> zarr"]["peak_rss_gb"] for d in ("forward", "inverse"))
            print(f"peak RSS of the {args.size}^2 lazy runs: {peak:.2f} GB ({'<' if peak < 4 else '>='} 4 GB target)")
        print(f"process max RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
