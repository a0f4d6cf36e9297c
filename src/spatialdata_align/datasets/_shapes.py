"""Raster shape and texture primitives used by the pair families (all in the Xenium frame, µm)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, label


def fourier_outline(X, Y, centre, radius: float, aspect: float, angle: float, amps, phases) -> np.ndarray:
    """Mask of a star-shaped outline ``r(phi) = radius * (1 + sum_k amps[k] cos((k + 2) phi + phases[k]))``.

    The base shape is an ellipse with axes ``radius * sqrt(aspect)`` and ``radius / sqrt(aspect)``, rotated by
    ``angle``.
    """
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = X - centre[0], Y - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    phi = np.arctan2(v / b, u / a)
    rr = np.ones_like(phi)
    for k, (am, ph) in enumerate(zip(amps, phases, strict=True)):
        rr += am * np.cos((k + 2) * phi + ph)
    return np.hypot(u / a, v / b) < rr


def window(X, Y, centre, radius: float) -> tuple[slice, slice]:
    """Row/column slices of the regular grid ``(X, Y)`` covering a disc of ``radius`` µm around ``centre``."""
    x0, y0 = X[0, 0], Y[0, 0]
    s = X[0, 1] - X[0, 0]
    j0, j1 = int(np.floor((centre[0] - radius - x0) / s)), int(np.ceil((centre[0] + radius - x0) / s)) + 1
    i0, i1 = int(np.floor((centre[1] - radius - y0) / s)), int(np.ceil((centre[1] + radius - y0) / s)) + 1
    h, w = X.shape
    return slice(min(max(i0, 0), h), min(max(i1, 0), h)), slice(min(max(j0, 0), w), min(max(j1, 0), w))


def paint_ellipse(mask: np.ndarray, X, Y, centre, axes, angle: float, value=True) -> np.ndarray:
    """Set ``mask`` to ``value`` inside an ellipse (only its bounding window is evaluated); returns the window mask."""
    sl = window(X, Y, centre, float(max(axes)))
    inside = ellipse(X[sl], Y[sl], centre, axes, angle)
    mask[sl][inside] = value
    return inside


def paint_walk(rng, mask, X, Y, start, radius_range, steps_range, step_um: float, turn_sd: float):
    """Paint a tube along a smooth random walk from ``start`` (vessels, septa); returns ``(path, radius)``.

    Draws, in this order: the initial heading, the tube radius (µm, uniform in ``radius_range``), the number of
    steps (``steps_range``), then one heading change (normal, ``turn_sd`` rad) per step of ``step_um`` µm.
    """
    p = np.array(start, dtype=float)
    ang = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(*radius_range)
    path = [p.copy()]
    for _ in range(int(rng.integers(*steps_range))):
        ang += rng.normal(0, turn_sd)
        p = p + step_um * np.array([np.cos(ang), np.sin(ang)])
        path.append(p.copy())
    path = np.asarray(path)
    for q in path:
        paint_ellipse(mask, X, Y, q, (radius, radius), 0.0)
    return path, radius


def ellipse(X, Y, centre, axes, angle: float) -> np.ndarray:
    """Mask of an ellipse (semi-axes ``axes``, rotated by ``angle``)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = X - centre[0], Y - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 < 1.0


def grf(rng, shape, sigma_px: float, *, band: float | None = None) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field; with ``band``, a band-pass (difference of Gaussians) field."""
    z = rng.standard_normal(shape)
    f = gaussian_filter(z, sigma_px, mode="wrap")
    if band is not None:
        f = f - gaussian_filter(z, sigma_px * band, mode="wrap")
    f -= f.mean()
    return f / max(float(f.std()), 1e-12)


def field_peaks(field, X, Y, where, smooth_px: float, apart_px: float, n: int = 30) -> np.ndarray:
    """Landmark candidates: the centres of recognisable blobs of ``field``.

    ``(k <= n, 2)`` positions (``X``, ``Y`` at the pixels) of the highest local maxima of ``field`` smoothed by
    ``smooth_px`` pixels, at least ``apart_px`` pixels apart, where ``where`` holds.
    """
    from scipy.ndimage import maximum_filter

    sm = gaussian_filter(field, smooth_px)
    peak = (sm == maximum_filter(sm, size=int(apart_px))) & where
    order = np.argsort(-sm[peak])[:n]
    return np.column_stack([X[peak][order], Y[peak][order]])


def smooth_field(rng, shape, sigma_px: float) -> np.ndarray:
    """Unit-variance smooth random field with correlation length ``sigma_px`` pixels, built on a coarse grid."""
    from scipy.ndimage import zoom

    f = max(1, int(sigma_px // 4))
    small = (max(4, shape[0] // f + 2), max(4, shape[1] // f + 2))
    g = grf(rng, small, sigma_px / f)
    up = zoom(g, (shape[0] / small[0] * 1.0001, shape[1] / small[1] * 1.0001), order=1)
    return up[: shape[0], : shape[1]].astype(np.float32)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask."""
    lab, n = label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fibres(rng, shape, spacing_um: float, angle_field: np.ndarray, length_um: float = 40.0) -> np.ndarray:
    """Fibre-like texture in ``[0, 1]``: noise smeared along a smoothly varying direction (collagen, muscle).

    White noise on a grid of twice ``spacing_um`` is filtered (in Fourier space) by anisotropic Gaussians
    along 6 directions; each pixel takes the one closest to ``angle_field`` (rad); then upsampled to ``shape``.
    """
    from scipy.ndimage import zoom

    small = (max(2, shape[0] // 2), max(2, shape[1] // 2))
    z = rng.standard_normal(small)
    F = np.fft.rfft2(z)
    ky = np.fft.fftfreq(small[0])[:, None] * 2 * np.pi
    kx = np.fft.rfftfreq(small[1])[None, :] * 2 * np.pi
    s_len = length_um / (2 * spacing_um) / 2.0
    s_wid = 0.7
    ang_small = angle_field[::2, ::2][: small[0], : small[1]]
    ang = (ang_small + np.pi / 2) % np.pi - np.pi / 2
    out = np.zeros(small, np.float64)
    n_dir = 6
    for i in range(n_dir):
        a = -np.pi / 2 + (i + 0.5) * np.pi / n_dir
        along = kx * np.cos(a) + ky * np.sin(a)
        across = -kx * np.sin(a) + ky * np.cos(a)
        f = np.fft.irfft2(F * np.exp(-0.5 * (along**2 * s_len**2 + across**2 * s_wid**2)), s=small)
        f /= max(float(f.std()), 1e-12)
        sel = np.abs(((ang - a) + np.pi / 2) % np.pi - np.pi / 2) <= np.pi / (2 * n_dir) + 1e-9
        out[sel] = f[sel]
    up = zoom(out, (shape[0] / small[0], shape[1] / small[1]), order=1)[: shape[0], : shape[1]]
    if up.shape != tuple(shape):
        up = np.pad(up, ((0, shape[0] - up.shape[0]), (0, shape[1] - up.shape[1])), mode="edge")
    return (1.0 / (1.0 + np.exp(-1.5 * up))).astype(np.float32)


def jittered_lattice(rng, bbox, spacing: float, jitter: float, hexagonal: bool = True) -> np.ndarray:
    """Points of a (hexagonal) lattice of ``spacing`` µm over ``bbox``, each moved by up to ``jitter * spacing``."""
    xmin, xmax, ymin, ymax = bbox
    dy = spacing * (np.sqrt(3) / 2 if hexagonal else 1.0)
    ys = np.arange(ymin, ymax + dy, dy)
    xs = np.arange(xmin, xmax + spacing, spacing)
    X, Y = np.meshgrid(xs, ys)
    if hexagonal:
        X = X + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    p = np.column_stack([X.ravel(), Y.ravel()])
    return p + rng.uniform(-jitter, jitter, p.shape) * spacing


def poisson_disc(rng, bbox, r: float, k: int = 20) -> np.ndarray:
    """Bridson-style blue-noise points at least ``r`` µm apart over ``bbox`` (dart throwing on a lattice start)."""
    from scipy.spatial import cKDTree

    pts = jittered_lattice(rng, bbox, r * 1.2, 0.35)
    # relax overlaps: drop points closer than r to an earlier point
    tree = cKDTree(pts)
    pairs = tree.query_pairs(r, output_type="ndarray")
    drop = np.zeros(len(pts), bool)
    for i, j in pairs:
        if not drop[i] and not drop[j]:
            drop[j] = True
    del k
    return pts[~drop]


def sample_raster_mask(mask: np.ndarray, origin, spacing: float, xy: np.ndarray) -> np.ndarray:
    """Nearest-pixel lookup of a boolean raster at ``(N, 2)`` µm points (False outside)."""
    ij = np.rint((xy - origin) / spacing).astype(np.int64)
    h, w = mask.shape
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    out = np.zeros(len(xy), bool)
    out[ok] = mask[ij[ok, 1], ij[ok, 0]]
    return out
