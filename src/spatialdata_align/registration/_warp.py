"""Block-wise image resampling through a coordinate map, lazily (dask) or in memory.

An output grid of pixel centres ``(x0 + j * dx, y0 + i * dy)`` is filled by bilinear sampling of an
input image at ``q = map(p)``, the input position of output point ``p``. The same code serves
both paths:

* **lazy** (dask input): one task per output chunk. Before the graph is built, the ring of each
  block (its boundary, on the coordinate lattice below) is mapped into the input; the bounding box
  of that ring plus a margin is the only input window the task reads (for a diffeomorphism the
  block's interior maps inside the image of its boundary). Blocks that map entirely outside the
  input need no input at all. Inside the task every pixel's position is checked against its
  window, so a folding map raises instead of sampling the wrong pixels.
* **in memory** (numpy input): the same blocks, computed one after another.

Coordinates are evaluated exactly (``map``, i.e. :meth:`Registration.transform_points`) on a
lattice of nodes every ``map_step`` output pixels, anchored in physical space (node ``m`` sits at
``m * map_step * dx``), and interpolated bilinearly in between: every block and every crop of a
grid sees the same node values, so the lazy and in-memory paths agree to rounding. With
``map_step=None`` the coarsest lattice (of 32, 16, 8, 4, 2, 1 pixels) whose interpolation error,
measured against the exact map on sampled output pixels, stays below ``map_tol`` input pixels is
used and logged. ``map_step=1`` evaluates every pixel exactly.

Sampling is bilinear between pixel centres; within half a pixel of the input's edge the edge
value is used, beyond it ``fill``. Integer images are sampled in float64 and rounded back into
their dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: output pixels per side of a block (lazy chunk; also the in-memory processing unit)
DEFAULT_CHUNK = 1024
#: candidate lattice steps (output pixels) of the coordinate map, coarsest first
MAP_STEPS = (32, 16, 8, 4, 2, 1)
#: default largest interpolation error of the coordinate map (input pixels)
DEFAULT_MAP_TOL = 0.01
#: input pixels added around each block's mapped ring
WINDOW_MARGIN = 2
#: output pixels sampled to choose the lattice step and the pyramid level
N_SAMPLES = 512

#: ``(N, 2)`` output physical ``(x, y)`` -> ``(N, 2)`` input ``(column, row)`` pixel indices (fractional)
CoordMap = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Grid:
    """A regular output grid: pixel ``(i, j)`` has its centre at ``(x0 + j * dx, y0 + i * dy)``."""

    x0: float
    dx: float
    nx: int
    y0: float
    dy: float
    ny: int

    @classmethod
    def from_coords(cls, x, y) -> Grid:
        """Grid from increasing, uniformly spaced pixel-centre coordinates."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        for label, v in (("out_x", x), ("out_y", y)):
            if v.ndim != 1 or v.size < 2:
                raise ValueError(f"{label} must be a 1D array of at least 2 pixel centres, got shape {v.shape}.")
            d = np.diff(v)
            if not np.all(np.isfinite(v)) or np.any(d <= 0) or not np.allclose(d, d[0], rtol=1e-6):
                raise ValueError(f"{label} must be finite, increasing and uniformly spaced.")
        return cls(float(x[0]), float(x[1] - x[0]), int(x.size), float(y[0]), float(y[1] - y[0]), int(y.size))

    @property
    def x(self) -> np.ndarray:
        """Pixel-centre x coordinates."""
        return self.x0 + np.arange(self.nx) * self.dx

    @property
    def y(self) -> np.ndarray:
        """Pixel-centre y coordinates."""
        return self.y0 + np.arange(self.ny) * self.dy


# ------------------------------------------------------------------------------------------ lattice
def _node_range(p0: float, p1: float, spacing: float) -> np.ndarray:
    """Lattice node indices ``m`` whose cells cover physical ``[p0, p1]`` (nodes at ``m * spacing``)."""
    return np.arange(math.floor(p0 / spacing), math.floor(p1 / spacing) + 2)


def _weights(p: np.ndarray, m0: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell (relative to node ``m0``) and fractional position of physical positions ``p``."""
    m = np.floor(p / spacing)
    return (m - m0).astype(np.int64), p / spacing - m


def block_coords(
    cmap: CoordMap, grid: Grid, rows: tuple[int, int], cols: tuple[int, int], step: int
) -> tuple[np.ndarray, np.ndarray]:
    """Input ``(column, row)`` positions of the output pixels ``rows x cols`` (half-open index ranges).

    Returns two ``(n_rows, n_cols)`` float64 arrays.
    """
    px = grid.x0 + np.arange(*cols) * grid.dx
    py = grid.y0 + np.arange(*rows) * grid.dy
    if step == 1:
        gx, gy = np.meshgrid(px, py)
        q = cmap(np.column_stack([gx.ravel(), gy.ravel()]))
        return q[:, 0].reshape(gx.shape), q[:, 1].reshape(gx.shape)
    sx, sy = step * grid.dx, step * grid.dy
    mx = _node_range(px[0], px[-1], sx)
    my = _node_range(py[0], py[-1], sy)
    nx_, ny_ = np.meshgrid(mx * sx, my * sy)
    nodes = cmap(np.column_stack([nx_.ravel(), ny_.ravel()])).reshape(my.size, mx.size, 2)
    ky, ty = _weights(py, int(my[0]), sy)
    kx, tx = _weights(px, int(mx[0]), sx)
    out = []
    for c in range(2):  # separable bilinear interpolation: along y (node rows -> pixel rows), then along x
        a, b = nodes[ky, :, c], nodes[ky + 1, :, c]
        rows_ = a + (b - a) * ty[:, None]
        a, b = rows_[:, kx], rows_[:, kx + 1]
        out.append(a + (b - a) * tx[None, :])
    return out[0], out[1]


def _ring_points(grid: Grid, rows: tuple[int, int], cols: tuple[int, int], step: int) -> np.ndarray:
    """Physical points on the boundary of a block's lattice cells (every pixel when ``step == 1``)."""
    if step == 1:
        xs = grid.x0 + np.arange(*cols) * grid.dx
        ys = grid.y0 + np.arange(*rows) * grid.dy
    else:
        xs = _node_range(grid.x0 + cols[0] * grid.dx, grid.x0 + (cols[1] - 1) * grid.dx, step * grid.dx)
        ys = _node_range(grid.y0 + rows[0] * grid.dy, grid.y0 + (rows[1] - 1) * grid.dy, step * grid.dy)
        xs, ys = xs * step * grid.dx, ys * step * grid.dy
    top = np.column_stack([xs, np.full(xs.size, ys[0])])
    bottom = np.column_stack([xs, np.full(xs.size, ys[-1])])
    left = np.column_stack([np.full(ys.size, xs[0]), ys])
    right = np.column_stack([np.full(ys.size, xs[-1]), ys])
    return np.concatenate([top, bottom, left, right])


def _samples(cmap: CoordMap, grid: Grid, in_shape: tuple[int, int], *, jacobian: bool = False, seed: int = 0):
    """Sampled output pixels that map inside the input: ``(p, q)`` or, with ``jacobian``, ``(p, q, scale)``.

    ``p`` are output physical points, ``q`` their exact input positions and ``scale`` the local
    ``sqrt(|det J|)`` of the map (input pixels per output pixel).
    """
    rng = np.random.default_rng(seed)
    n = min(N_SAMPLES, grid.nx * grid.ny)
    i, j = rng.integers(0, grid.ny, n), rng.integers(0, grid.nx, n)
    p = np.column_stack([grid.x0 + j * grid.dx, grid.y0 + i * grid.dy])
    pts = np.concatenate([p, p + np.array([grid.dx, 0.0]), p + np.array([0.0, grid.dy])]) if jacobian else p
    mapped = cmap(pts)
    q = mapped[:n]
    ny, nx = in_shape
    inside = (q[:, 0] >= -0.5) & (q[:, 0] <= nx - 0.5) & (q[:, 1] >= -0.5) & (q[:, 1] <= ny - 0.5)
    if not jacobian:
        return p[inside], q[inside]
    jac = np.stack([mapped[n : 2 * n] - q, mapped[2 * n :] - q], axis=-1)[inside]  # columns d/dj, d/di
    return p[inside], q[inside], np.sqrt(np.abs(np.linalg.det(jac))) if len(jac) else np.ones(0)


def local_scale(cmap: CoordMap, grid: Grid, in_shape: tuple[int, int]) -> np.ndarray:
    """Output pixel size in input pixels (``sqrt(|det J|)``) at sampled output pixels that map inside the input."""
    return _samples(cmap, grid, in_shape, jacobian=True)[2]


def choose_step(cmap: CoordMap, grid: Grid, in_shape: tuple[int, int], tol: float) -> tuple[int, float]:
    """The coarsest lattice step (of :data:`MAP_STEPS`) whose interpolation error is at most ``tol``.

    The error is measured against the exact map on sampled output pixels that map inside the input.
    Returns ``(step, measured max error in input pixels)``.
    """
    p, q = _samples(cmap, grid, in_shape)
    if len(p) == 0:
        return MAP_STEPS[0], 0.0
    for step in MAP_STEPS[:-1]:
        sx, sy = step * grid.dx, step * grid.dy
        mx, my = np.floor(p[:, 0] / sx), np.floor(p[:, 1] / sy)
        tx, ty = (p[:, 0] / sx - mx)[:, None], (p[:, 1] / sy - my)[:, None]
        corners = [np.column_stack([(mx + a) * sx, (my + b) * sy]) for b in (0, 1) for a in (0, 1)]
        v = cmap(np.concatenate(corners)).reshape(4, len(p), 2)
        est = (v[0] * (1 - tx) + v[1] * tx) * (1 - ty) + (v[2] * (1 - tx) + v[3] * tx) * ty
        err = float(np.abs(est - q).max())
        if err <= tol:
            return step, err
    return 1, 0.0


# ------------------------------------------------------------------------------------------ sampling
def _compute_dtype(in_dtype: np.dtype, out_dtype: np.dtype) -> torch.dtype:
    """float32 arithmetic for 8/16-bit and float32 images, float64 when the input or the output needs it."""
    wide = (in_dtype.kind in "iuf" and in_dtype.itemsize > 4) or (in_dtype.kind in "iu" and in_dtype.itemsize > 2)
    return torch.float64 if wide or out_dtype == np.float64 else torch.float32


def sample_block(
    window: np.ndarray,
    origin: tuple[int, int],
    qx: np.ndarray,
    qy: np.ndarray,
    in_shape: tuple[int, int],
    fill: float,
    dtype: np.dtype,
) -> np.ndarray:
    """Bilinearly sample ``window`` at input positions ``qx``, ``qy`` (``(bh, bw)``, whole-image pixel indices).

    ``window`` is ``(C, h, w)``; its pixel ``(0, 0)`` is input pixel ``origin`` = ``(row, column)``.
    Cells and weights are computed from the whole-image positions (float64), so any window holding
    the needed pixels gives the same result, bit for bit.
    """
    ny, nx = in_shape
    r0, c0 = origin
    n_c, h, w = window.shape
    out_dtype = np.dtype(dtype)
    ftype = _compute_dtype(window.dtype, out_dtype)
    qx_t = torch.from_numpy(np.ascontiguousarray(qx, dtype=np.float64)).ravel()
    qy_t = torch.from_numpy(np.ascontiguousarray(qy, dtype=np.float64)).ravel()
    lo_x, hi_x, lo_y, hi_y = (float(v) for v in (qx_t.min(), qx_t.max(), qy_t.min(), qy_t.max()))
    interior = lo_x >= 0 and hi_x <= nx - 1 and lo_y >= 0 and hi_y <= ny - 1  # False with NaN
    outside = None
    if not interior:
        outside = ~((qx_t >= -0.5) & (qx_t <= nx - 0.5) & (qy_t >= -0.5) & (qy_t <= ny - 0.5))  # NaN: outside
        qx_t = torch.nan_to_num(qx_t).clamp(0, nx - 1)
        qy_t = torch.nan_to_num(qy_t).clamp(0, ny - 1)
        inside = ~outside
        if not bool(inside.any()):
            return np.full((n_c, *qx.shape), fill, dtype=out_dtype)
        lo_x, hi_x = float(qx_t[inside].min()), float(qx_t[inside].max())
        lo_y, hi_y = float(qy_t[inside].min()), float(qy_t[inside].max())
    # the cell's top-left pixel, clamped so that its right/bottom neighbour exists (weight 1 at the far edge)
    if not (
        c0 <= min(math.floor(lo_x), nx - 2)
        and min(math.floor(hi_x), nx - 2) + 1 < c0 + w
        and r0 <= min(math.floor(lo_y), ny - 2)
        and min(math.floor(hi_y), ny - 2) + 1 < r0 + h
    ):
        raise RuntimeError(
            "the transform maps part of an output block outside the input window read for it: it is not "
            "one-to-one there (a fold). Check the registration (Jacobian determinant) or warp in memory."
        )
    x0 = qx_t.floor().clamp(0, max(nx - 2, 0))
    y0 = qy_t.floor().clamp(0, max(ny - 2, 0))
    wx = (qx_t - x0).to(ftype)
    wy = (qy_t - y0).to(ftype)
    i00 = ((y0 - r0) * w + (x0 - c0)).to(torch.int32)  # int32 indices gather ~2x faster than int64
    if outside is not None:
        i00[outside] = 0
    i01, i10, i11 = i00 + 1, i00 + w, i00 + (w + 1)
    window = np.ascontiguousarray(window)
    if window.dtype.kind == "u" and window.dtype.itemsize > 1:  # torch gathers no uint16/32/64
        window = window.astype({2: np.int32, 4: np.int64}.get(window.dtype.itemsize, np.float64))
    flat = torch.from_numpy(window.reshape(n_c, -1))
    res = torch.empty((n_c, i00.numel()), dtype=ftype)
    for c in range(n_c):
        ch = flat[c]
        a, b = ch.index_select(0, i00).to(ftype), ch.index_select(0, i01).to(ftype)
        top = torch.lerp(a, b, wx)
        a, b = ch.index_select(0, i10).to(ftype), ch.index_select(0, i11).to(ftype)
        torch.lerp(top, torch.lerp(a, b, wx), wy, out=res[c])
    if out_dtype.kind in "iu":
        info = np.iinfo(out_dtype)
        res = res.round_().clamp_(info.min, info.max)
    if outside is not None:
        res[:, outside] = fill
    return res.numpy().astype(out_dtype, copy=False).reshape(n_c, *qx.shape)


def _check_fill(fill: float, dtype: np.dtype) -> None:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not np.isfinite(fill) or not info.min <= fill <= info.max:
            raise ValueError(
                f"fill={fill} is not a value of the output dtype {dtype}; pass a float dtype or another fill."
            )


def _bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _windows(
    cmap: CoordMap, grid: Grid, blocks: Sequence[tuple[tuple[int, int], tuple[int, int]]], step: int, in_shape
) -> list[tuple[slice, slice] | None]:
    """Input ``(rows, cols)`` slices each block reads (``None``: the block maps outside the input)."""
    rings = [_ring_points(grid, rows, cols, step) for rows, cols in blocks]
    mapped = cmap(np.concatenate(rings))
    ny, nx = in_shape
    out, s = [], 0
    for ring in rings:
        q = mapped[s : s + len(ring)]
        s += len(ring)
        q = q[np.isfinite(q).all(axis=1)]
        if len(q) == 0:
            out.append(None)
            continue
        lo = np.floor(q.min(axis=0)).astype(np.int64) - WINDOW_MARGIN
        hi = np.ceil(q.max(axis=0)).astype(np.int64) + WINDOW_MARGIN + 1
        c0, c1 = max(int(lo[0]), 0), min(int(hi[0]), nx)
        r0, r1 = max(int(lo[1]), 0), min(int(hi[1]), ny)
        out.append(None if c0 >= c1 or r0 >= r1 else (slice(r0, r1), slice(c0, c1)))
    return out


def _warp_task(window, cmap, origin, grid, rows, cols, step, in_shape, fill, dtype):
    qx, qy = block_coords(cmap, grid, rows, cols, step)
    return sample_block(window, origin, qx, qy, in_shape, fill, dtype)


def warp(
    data,
    cmap: CoordMap,
    grid: Grid,
    *,
    fill: float = 0.0,
    dtype=None,
    chunk: int = DEFAULT_CHUNK,
    map_step: int | None = None,
    map_tol: float = DEFAULT_MAP_TOL,
):
    """Resample ``data`` (``(C, ny, nx)`` numpy or dask array) onto ``grid`` through ``cmap``.

    Parameters
    ----------
    data
        Input image, ``(C, ny, nx)``. A dask array gives a lazy dask result (one task per
        ``chunk x chunk`` output block, each reading only its input window); a numpy array is
        warped in memory, block after block.
    cmap
        Output physical ``(x, y)`` → input ``(column, row)`` pixel indices, vectorised over ``(N, 2)``.
    grid
        The output grid.
    fill
        Value outside the input.
    dtype
        Output dtype (default: the input's; integer outputs are rounded and clipped).
    chunk
        Output block size (pixels per side).
    map_step, map_tol
        Lattice step of the coordinate map (output pixels), or ``None`` to choose the coarsest whose
        measured interpolation error is at most ``map_tol`` input pixels.

    Returns
    -------
    ``(C, grid.ny, grid.nx)`` dask array (lazy) or numpy array.
    """
    import dask.array as da

    in_shape = (int(data.shape[1]), int(data.shape[2]))
    dtype = np.dtype(data.dtype if dtype is None else dtype)
    _check_fill(fill, dtype)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of pixels, got {chunk}.")
    step, _ = resolve_step(cmap, grid, in_shape, map_step, map_tol)
    blocks = [(r, c) for r in _bounds(grid.ny, chunk) for c in _bounds(grid.nx, chunk)]
    windows = _windows(cmap, grid, blocks, step, in_shape)
    n_c = int(data.shape[0])

    def spec(rows, cols, win):  # everything a block's task needs besides its window and the map
        return (win[0].start, win[1].start), grid, rows, cols, step, in_shape, fill, dtype

    if not isinstance(data, da.Array):
        out = np.full((n_c, grid.ny, grid.nx), fill, dtype=dtype)
        for (rows, cols), win in zip(blocks, windows, strict=True):
            if win is not None:
                window = np.asarray(data[:, win[0], win[1]])
                out[:, slice(*rows), slice(*cols)] = _warp_task(window, cmap, *spec(rows, cols, win))
        return out
    import dask

    cmap_d = dask.delayed(cmap, pure=True, traverse=False)  # one copy of the map in the graph, not one a block
    n_cols = len(_bounds(grid.nx, chunk))
    tiles: list[list] = []
    for k, ((rows, cols), win) in enumerate(zip(blocks, windows, strict=True)):
        if k % n_cols == 0:
            tiles.append([])
        shape = (n_c, rows[1] - rows[0], cols[1] - cols[0])
        if win is None:
            tiles[-1].append(da.full(shape, fill, dtype=dtype, chunks=shape))
            continue
        task = dask.delayed(_warp_task, pure=True)(data[:, win[0], win[1]], cmap_d, *spec(rows, cols, win))
        tiles[-1].append(da.from_delayed(task, shape=shape, dtype=dtype))
    return da.block(tiles)


def resolve_step(
    cmap: CoordMap, grid: Grid, in_shape: tuple[int, int], map_step: int | None, map_tol: float
) -> tuple[int, float]:
    """``(lattice step, measured error)``: ``map_step`` as given, or chosen (and logged) by :func:`choose_step`."""
    if map_step is not None:
        if int(map_step) != map_step or map_step < 1:
            raise ValueError(f"map_step must be a positive integer (output pixels), got {map_step!r}.")
        return int(map_step), float("nan")
    step, err = choose_step(cmap, grid, in_shape, map_tol)
    logger.info(
        "coordinate map evaluated every %d output pixel(s), bilinear in between (max error %.2g input px on %d "
        "sampled pixels; tolerance %.2g)",
        step,
        err,
        N_SAMPLES,
        map_tol,
    )
    return step, err


def pick_level(scales: np.ndarray, factors: Sequence[float], level: int | None) -> int:
    """Pyramid level to read: ``level`` as given, or the coarsest whose pixels are no larger than the output's.

    ``scales`` are output pixel sizes in level-0 input pixels at sampled points; ``factors`` the
    level downsampling factors (``factors[0] == 1``).
    """
    if level is not None:
        if not 0 <= level < len(factors):
            raise ValueError(f"level {level} does not exist; this image has levels 0..{len(factors) - 1}.")
        return int(level)
    if len(scales) == 0:
        return 0
    s = float(np.median(scales))
    best = 0
    for i, f in enumerate(factors):
        if f <= s * (1 + 1e-6):
            best = i
    return best


# ------------------------------------------------------------------------------------------ inputs
class TransformMap:
    """Coordinate map ``p -> post @ transform_points(p, direction)``: output physical → input pixel indices.

    ``transform`` is anything with ``transform_points(xy, direction)`` (a
    :class:`~spatialdata_align.registration.Registration`); ``post`` is a ``(3, 3)`` affine from the
    registration's space to the input's ``(column, row)`` pixel indices. Picklable, so it travels to
    dask.distributed workers.
    """

    def __init__(self, transform, direction: str, post: np.ndarray):
        import uuid

        self.transform = transform
        self.direction = direction
        self.post = np.asarray(post, dtype=np.float64)
        self._token = uuid.uuid4().hex

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        q = self.transform.transform_points(np.asarray(xy, dtype=np.float64), self.direction)
        return q @ self.post[:2, :2].T + self.post[:2, 2]

    def then(self, matrix: np.ndarray) -> TransformMap:
        """The same map followed by the affine ``matrix`` (on input pixel indices)."""
        return TransformMap(self.transform, self.direction, np.asarray(matrix, dtype=np.float64) @ self.post)

    def __dask_tokenize__(self):
        return ("TransformMap", self._token, self.post.tobytes())


def level_matrix(factor_x: float, factor_y: float) -> np.ndarray:
    """Level-0 pixel indices → indices of a level downsampled by ``factor_x``/``factor_y`` (pixel centres)."""
    return np.array(
        [[1.0 / factor_x, 0.0, 0.5 / factor_x - 0.5], [0.0, 1.0 / factor_y, 0.5 / factor_y - 0.5], [0.0, 0.0, 1.0]]
    )


@dataclass
class Levels:
    """An input image as pyramid levels: arrays ``(C, ny, nx)`` (numpy or dask), finest first.

    ``x``/``y`` are the level-0 pixel-centre coordinates (physical units); ``factors`` the ``(fx, fy)``
    downsampling of each level relative to level 0.
    """

    arrays: list
    x: np.ndarray
    y: np.ndarray
    channels: list
    factors: list[tuple[float, float]]

    @property
    def to_index(self) -> np.ndarray:
        """Affine: physical ``(x, y)`` → level-0 ``(column, row)`` pixel indices."""
        dx = float(self.x[1] - self.x[0]) if self.x.size > 1 else 1.0
        dy = float(self.y[1] - self.y[0]) if self.y.size > 1 else 1.0
        return np.array([[1.0 / dx, 0.0, -self.x[0] / dx], [0.0, 1.0 / dy, -self.y[0] / dy], [0.0, 0.0, 1.0]])


def _as_cyx(arr, name: str):
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (1, 3, 4):
        return arr.transpose(2, 0, 1)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 2D or 3D image, got shape {arr.shape}.")
    return arr


def image_levels(image, x=None, y=None, *, name: str = "image") -> Levels:
    """Coerce an image argument (numpy/dask array, DataArray, multiscale DataTree) into :class:`Levels`.

    Arrays may be ``(ny, nx)``, ``(C, ny, nx)`` or channel-last RGB(A) ``(ny, nx, 3|4)``. ``x``/``y``
    are level-0 pixel-centre coordinates (default: the DataArray's coordinates, else ``j + 0.5``).
    Nothing is computed: dask-backed inputs stay lazy.
    """
    import xarray as xr

    from ._utils import Image

    if isinstance(image, Image):
        image = image.to_xarray()
    if isinstance(image, xr.DataTree):
        keys = sorted(image.children, key=lambda k: int(str(k).replace("scale", "") or 0))
        das = []
        for key in keys:
            ds = image[key].ds
            das.append(ds[next(iter(ds.data_vars))])
    elif isinstance(image, xr.DataArray):
        das = [image]
    else:
        das = None
    if das is not None:
        for i, d in enumerate(das):
            if d.ndim == 2:
                d = d.expand_dims("c")
            if set(d.dims) != {"c", "y", "x"}:
                raise ValueError(f"{name}: DataArray dims must be (c, y, x) or (y, x), got {d.dims}.")
            das[i] = d.transpose("c", "y", "x")
        base = das[0]
        if x is None and "x" in base.coords:
            x = base.coords["x"].values
        if y is None and "y" in base.coords:
            y = base.coords["y"].values
        arrays = [d.data for d in das]
        channels = list(base.coords["c"].values) if "c" in base.coords else list(range(base.shape[0]))
    else:
        arr = image if hasattr(image, "dask") or isinstance(image, np.ndarray) else np.asarray(image)
        arrays = [_as_cyx(arr, name)]
        channels = list(range(arrays[0].shape[0]))
    c, ny, nx = arrays[0].shape
    if ny < 2 or nx < 2 or c < 1:
        raise ValueError(f"{name}: image is empty or degenerate (shape {arrays[0].shape}).")
    x = np.arange(nx) + 0.5 if x is None else np.asarray(x, dtype=np.float64)
    y = np.arange(ny) + 0.5 if y is None else np.asarray(y, dtype=np.float64)
    if x.shape != (nx,) or y.shape != (ny,):
        raise ValueError(f"{name}: coordinates x {x.shape} / y {y.shape} do not match image shape {arrays[0].shape}.")
    for label, v in (("x", x), ("y", y)):
        d = np.diff(v)
        if not np.all(np.isfinite(v)) or np.any(d <= 0) or not np.allclose(d, d[0], rtol=1e-6):
            raise ValueError(f"{name}: {label} coordinates must be finite, increasing and uniformly spaced.")
    factors = [(nx / a.shape[2], ny / a.shape[1]) for a in arrays]
    return Levels(arrays, x, y, channels, factors)


def warp_levels(
    levels: Levels,
    cmap0: CoordMap,
    grid: Grid,
    *,
    level: int | None = None,
    fill: float = 0.0,
    dtype=None,
    chunk: int = DEFAULT_CHUNK,
    map_step: int | None = None,
    map_tol: float = DEFAULT_MAP_TOL,
):
    """Pick the pyramid level (:func:`pick_level`, logged) and :func:`warp` it.

    ``cmap0`` maps output physical points to level-0 pixel indices and must offer ``then(matrix)``
    (a :class:`TransformMap`) when the image has several levels.
    """
    in_shape0 = (int(levels.arrays[0].shape[1]), int(levels.arrays[0].shape[2]))
    lvl = 0
    if len(levels.arrays) > 1 or level not in (None, 0):
        scales = local_scale(cmap0, grid, in_shape0)
        lvl = pick_level(scales, [math.sqrt(fx * fy) for fx, fy in levels.factors], level)
        logger.info(
            "reading pyramid level %d of %d (downsampled %.3g x): output pixels are ~%.3g level-0 input pixels",
            lvl,
            len(levels.arrays),
            math.sqrt(levels.factors[lvl][0] * levels.factors[lvl][1]),
            float(np.median(scales)) if len(scales) else float("nan"),
        )
    cmap = cmap0 if lvl == 0 else cmap0.then(level_matrix(*levels.factors[lvl]))
    return warp(levels.arrays[lvl], cmap, grid, fill=fill, dtype=dtype, chunk=chunk, map_step=map_step, map_tol=map_tol)
