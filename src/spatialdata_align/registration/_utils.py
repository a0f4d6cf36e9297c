"""Array plumbing shared by the engine: image/grid coercion, point checks and interpolation.

Conventions (one place, used everywhere in the engine):

* points are ``(N, 2)`` arrays of ``(x, y)`` in physical units;
* images are ``(C, ny, nx)`` arrays sampled on a regular grid given by the physical pixel-centre
  coordinates ``x`` (``nx``,) and ``y`` (``ny``,);
* without explicit coordinates, pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)`` (the
  spatialdata convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch.nn.functional import grid_sample


@dataclass(frozen=True)
class Image:
    """A multi-channel image on a regular physical grid.

    Attributes
    ----------
    data
        ``(C, ny, nx)`` float array.
    x, y
        Pixel-centre coordinates (physical units), increasing, uniformly spaced.
    """

    data: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @property
    def dx(self) -> float:
        """Pixel size along x (physical units)."""
        return float(self.x[1] - self.x[0]) if self.x.size > 1 else 1.0

    @property
    def dy(self) -> float:
        """Pixel size along y (physical units)."""
        return float(self.y[1] - self.y[0]) if self.y.size > 1 else 1.0

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(xmin, xmax, ymin, ymax)`` of the pixel edges."""
        return (
            float(self.x[0] - self.dx / 2),
            float(self.x[-1] + self.dx / 2),
            float(self.y[0] - self.dy / 2),
            float(self.y[-1] + self.dy / 2),
        )

    def to_xarray(self, units: str | None = None, name: str | None = None) -> xr.DataArray:
        """Return the image as a ``(c, y, x)`` :class:`xarray.DataArray` with physical coordinates."""
        attrs = {"units": units} if units else {}
        return xr.DataArray(
            self.data,
            dims=("c", "y", "x"),
            coords={"c": np.arange(self.data.shape[0]), "y": self.y, "x": self.x},
            attrs=attrs,
            name=name,
        )

    def downsample(self, factor: int) -> Image:
        """Block-average by an integer ``factor`` (trailing partial blocks are averaged too)."""
        if factor <= 1:
            return self
        c, ny, nx = self.data.shape
        py, px = (-ny) % factor, (-nx) % factor
        data = np.pad(self.data, ((0, 0), (0, py), (0, px)), mode="edge")
        data = data.reshape(c, (ny + py) // factor, factor, (nx + px) // factor, factor).mean(axis=(2, 4))
        x = self.x[0] - self.dx / 2 + self.dx * factor * (np.arange(data.shape[2]) + 0.5)
        y = self.y[0] - self.dy / 2 + self.dy * factor * (np.arange(data.shape[1]) + 0.5)
        return Image(data, x, y)


def blur_image(image: Image, sigma: float) -> Image:
    """``image`` with every channel blurred by a Gaussian of standard deviation ``sigma`` (physical units).

    The border is extended by its nearest values (``mode="nearest"``), so glass stays glass at the image's edge.
    """
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return image
    s = (sigma / image.dy, sigma / image.dx)
    data = np.stack([gaussian_filter(c, s, mode="nearest") for c in image.data])
    return Image(data, image.x, image.y)


def pixel_centres(n: int, spacing: float = 1.0, origin: float = 0.0) -> np.ndarray:
    """Pixel-centre coordinates ``origin + (i + 0.5) * spacing`` for ``i < n``."""
    return origin + (np.arange(n) + 0.5) * spacing


def as_image(image, x=None, y=None, *, name: str = "image") -> Image:
    """Coerce an image argument into an :class:`Image`.

    Parameters
    ----------
    image
        An :class:`Image`, an :class:`xarray.DataArray` with dims ``(c, y, x)`` or ``(y, x)`` and
        coordinate arrays ``x``/``y``, or a numpy array ``(ny, nx)``, ``(C, ny, nx)`` or
        ``(ny, nx, 3|4)`` (RGB(A) channel-last, as read from a PNG). Integer images are scaled to
        ``[0, 1]`` by their dtype's maximum.
    x, y
        Pixel-centre coordinates (physical units). Default: the DataArray's coordinates, or
        ``j + 0.5`` / ``i + 0.5`` pixel units.
    name
        Used in error messages.
    """
    if isinstance(image, Image):
        return image
    if isinstance(image, xr.DataArray):
        da = image
        if da.ndim == 2:
            da = da.expand_dims("c")
        if set(da.dims) != {"c", "y", "x"}:
            raise ValueError(f"{name}: DataArray dims must be (c, y, x) or (y, x), got {da.dims}.")
        da = da.transpose("c", "y", "x")
        x = np.asarray(da.coords["x"].values if x is None and "x" in da.coords else x, dtype=float)
        y = np.asarray(da.coords["y"].values if y is None and "y" in da.coords else y, dtype=float)
        arr = np.asarray(da.values)
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (1, 3, 4):
            arr = np.moveaxis(arr, -1, 0)
        elif arr.ndim != 3:
            raise ValueError(f"{name}: expected a 2D or 3D array, got shape {arr.shape}.")
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    arr = np.asarray(arr, dtype=np.float64)
    c, ny, nx = arr.shape
    if ny < 2 or nx < 2 or c < 1:
        raise ValueError(f"{name}: image is empty or degenerate (shape {arr.shape}).")
    x = pixel_centres(nx) if x is None else np.asarray(x, dtype=np.float64)
    y = pixel_centres(ny) if y is None else np.asarray(y, dtype=np.float64)
    if x.shape != (nx,) or y.shape != (ny,):
        raise ValueError(f"{name}: coordinates x {x.shape} / y {y.shape} do not match image shape {arr.shape}.")
    for label, v in (("x", x), ("y", y)):
        d = np.diff(v)
        if not np.all(np.isfinite(v)) or np.any(d <= 0) or not np.allclose(d, d[0], rtol=1e-6):
            raise ValueError(f"{name}: {label} coordinates must be finite, increasing and uniformly spaced.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: image contains NaN or infinite values.")
    return Image(arr, x, y)


def check_points(xy, name: str = "points", *, min_points: int = 0) -> np.ndarray:
    """Validate an ``(N, 2)`` array of finite ``(x, y)`` points and return it as float64."""
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected an (N, 2) array of (x, y) points, got shape {arr.shape}.")
    if arr.shape[0] < min_points:
        raise ValueError(f"{name}: need at least {min_points} points, got {arr.shape[0]}.")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name}: {int(bad.sum())} of {arr.shape[0]} points have non-finite coordinates "
            f"(first at row {int(np.flatnonzero(bad)[0])})."
        )
    return arr


def check_spot_inputs(target_spots, spot_values, source_features, what: str):
    """Validate the shared-gene spot inputs of :func:`lddmm`'s spot term and :func:`auto_init`'s agreement.

    Returns ``None`` when none is given, else ``(spots, values, features)``: ``(S, 2)`` float64 points, ``(S, k)``
    float64 values (a 1-D array is one feature) and the feature :class:`Image` (``k`` channels). ``what`` names the
    consumer in the error raised when only some are given.
    """
    given = [target_spots is not None, spot_values is not None, source_features is not None]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(f"{what} needs target_spots, spot_values and source_features together.")
    q = check_points(target_spots, "target_spots", min_points=3)
    vals = np.asarray(spot_values, dtype=np.float64)
    if vals.ndim == 1:
        vals = vals[:, None]
    features = as_image(source_features, name="source_features")
    if vals.ndim != 2 or vals.shape[0] != q.shape[0] or vals.shape[1] != features.data.shape[0]:
        raise ValueError(
            f"spot_values must be (n_spots, n_features) = ({q.shape[0]}, {features.data.shape[0]}), got {vals.shape}."
        )
    if not np.all(np.isfinite(vals)):
        raise ValueError("spot_values contain NaN or infinite values.")
    return q, vals, features


def homogeneous(matrix) -> np.ndarray:
    """Return a ``(3, 3)`` float64 homogeneous affine from a ``(2, 3)`` or ``(3, 3)`` matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if m.shape != (3, 3):
        raise ValueError(f"affine must be a (3, 3) or (2, 3) matrix, got shape {m.shape}.")
    if not np.all(np.isfinite(m)):
        raise ValueError("affine contains non-finite values.")
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError("affine is singular (determinant of its linear part is ~0).")
    return m


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a homogeneous ``(3, 3)`` affine to ``(..., 2)`` points.

    Written out per coordinate rather than as ``xy @ matrix[:2, :2].T``: numpy hands that product to BLAS, whose
    threads then compete with dask's when the points of several partitions are mapped at once (the 26M transcripts
    of the 168k-cell bundle, two partitions at a time, chunks of 1M points: 6.4-8.8 s with BLAS's threads, 4.6-6.0 s
    with ``OPENBLAS_NUM_THREADS=1``, 2026-12-03).
    """
    xy = np.asarray(xy, dtype=np.float64)
    out = np.empty(xy.shape, dtype=np.float64)
    x, y = xy[..., 0], xy[..., 1]
    for r in range(2):
        col = out[..., r]
        np.multiply(x, matrix[r, 0], out=col)
        col += y * matrix[r, 1]
        col += matrix[r, 2]
    return out


# --------------------------------------------------------------------------------------------- torch
def normalised_grid(pts: torch.Tensor, x0: float, x1: float, y0: float, y1: float) -> torch.Tensor:
    """Map physical ``(..., 2)`` points to grid_sample's ``[-1, 1]`` (align_corners=True) coordinates."""
    sx = 2.0 / (x1 - x0) if x1 != x0 else 0.0
    sy = 2.0 / (y1 - y0) if y1 != y0 else 0.0
    return torch.stack(((pts[..., 0] - x0) * sx - 1.0, (pts[..., 1] - y0) * sy - 1.0), dim=-1)


def interp(
    field: torch.Tensor, x: np.ndarray, y: np.ndarray, pts: torch.Tensor, padding: str = "border"
) -> torch.Tensor:
    """Bilinearly sample ``field`` (``(C, ny, nx)``) at physical points ``pts`` (``(..., 2)``).

    ``padding="border"`` extends the field by its edge values (used for velocity fields, so points
    outside the grid keep moving smoothly instead of being pinned by zero padding); ``"zeros"`` is
    used for images. Returns ``(C, ...)``.
    """
    shape = pts.shape[:-1]
    g = normalised_grid(pts.reshape(1, 1, -1, 2), float(x[0]), float(x[-1]), float(y[0]), float(y[-1]))
    out = grid_sample(field[None], g, mode="bilinear", padding_mode=padding, align_corners=True)
    return out[0, :, 0, :].reshape(field.shape[0], *shape)
