"""Smooth non-linear deformation models of the pair families (none of them the twin's Gaussian RBF sum).

Each generator draws a displacement field of one kind on a regular grid around the tissue; :func:`finalise`
then tapers it to zero away from the tissue, removes its affine part over the tissue (an affine is the
affine's business) and scales it so that its largest displacement over the tissue is exactly the requested
magnitude. The result is a :class:`~spatialdata_align.datasets._pairtruth.SmoothWarp` (a cubic B-spline), so
the truth evaluates every model the same way, both ways.

Models
------
* ``svf``: exponential of a stationary velocity field (a smoothed Gaussian random field integrated by
  scaling and squaring): large smooth swirls, diffeomorphic by construction.
* ``ffd``: a free-form deformation, cubic B-spline over a coarse random control grid.
* ``tps``: a thin-plate spline through random displacements of a few control points.
* ``vortex``: a composition of a few local twists (rotation angle decaying with the distance to a centre).
* ``microtome``: what the knife does: a bow of the section, a compression gradient along the cutting
  direction and periodic chatter bands.
* ``wendland``: compactly supported Wendland C2 radial functions (local stretches).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from ._pairtruth import SmoothWarp

#: spacing (µm) of the B-spline grid every model is expressed on
GRID_SPACING_UM = 40.0
#: margin (µm) of the grid around the tissue bounding box (the field tapers to zero in it)
GRID_MARGIN_UM = 800.0
MODELS = ("svf", "ffd", "tps", "vortex", "microtome", "wendland")


def node_grid(bbox) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(origin, X, Y)`` of the B-spline grid around ``bbox`` = ``(xmin, xmax, ymin, ymax)`` (µm)."""
    xmin, xmax, ymin, ymax = bbox
    h = GRID_SPACING_UM
    x0, y0 = xmin - GRID_MARGIN_UM, ymin - GRID_MARGIN_UM
    nx = int(np.ceil((xmax - xmin + 2 * GRID_MARGIN_UM) / h)) + 1
    ny = int(np.ceil((ymax - ymin + 2 * GRID_MARGIN_UM) / h)) + 1
    X, Y = np.meshgrid(x0 + h * np.arange(nx), y0 + h * np.arange(ny))
    return np.array([x0, y0]), X, Y


def _window(X, Y, bbox) -> np.ndarray:
    """1 over ``bbox`` + 150 µm, a cosine ramp to 0 three nodes before the grid's edge."""
    xmin, xmax, ymin, ymax = bbox
    inner = 150.0
    ramp = GRID_MARGIN_UM - inner - 3 * GRID_SPACING_UM
    dx = np.maximum(np.maximum(xmin - inner - X, X - xmax - inner), 0.0)
    dy = np.maximum(np.maximum(ymin - inner - Y, Y - ymax - inner), 0.0)
    r = np.clip(np.hypot(dx, dy) / ramp, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * r))


def finalise(field: np.ndarray, bbox, tissue_xy: np.ndarray, magnitude: float) -> SmoothWarp:
    """Taper, remove the affine part over ``tissue_xy`` and scale a ``(2, ny, nx)`` field sampled on :func:`node_grid`.

    Raises
    ------
    ValueError
        The scaled field folds (Jacobian determinant < 0.25 somewhere): too strong for its length scale.
    """
    origin, X, Y = node_grid(bbox)
    if magnitude <= 0:
        return SmoothWarp.zero()
    win = _window(X, Y, bbox)
    warp = SmoothWarp(origin, GRID_SPACING_UM, field * win)
    d = warp.displacement(tissue_xy)
    H = np.column_stack([tissue_xy, np.ones(len(tissue_xy))])
    coef, *_ = np.linalg.lstsq(H, d, rcond=None)  # (3, 2): d ≈ [x y 1] @ coef
    aff = np.stack([X * coef[0, c] + Y * coef[1, c] + coef[2, c] for c in range(2)])
    warp.coefs = (field - aff) * win
    m = warp.max_displacement(tissue_xy)
    if m <= 0:
        return SmoothWarp.zero()
    warp.coefs = warp.coefs * (magnitude / m)
    det = warp.jacobian_det_min(np.column_stack([X.ravel(), Y.ravel()]))
    if det < 0.25:
        raise ValueError(
            f"a {magnitude:.0f} µm warp of this length scale folds the tissue (Jacobian determinant {det:.2f}); "
            "use a smaller warp."
        )
    return warp


# ---------------------------------------------------------------------------------------------- models
def _grf(rng, shape, sigma_nodes: float) -> np.ndarray:
    """A ``(2, ny, nx)`` smooth Gaussian random field with unit peak standard deviation."""
    f = np.stack([gaussian_filter(rng.standard_normal(shape), sigma_nodes, mode="wrap") for _ in range(2)])
    return f / max(float(f.std()), 1e-12)


def svf(rng, bbox, length: float) -> np.ndarray:
    """Exponential of a stationary Gaussian-random velocity field (correlation length ``length`` µm)."""
    _, X, _ = node_grid(bbox)
    v = _grf(rng, X.shape, length / GRID_SPACING_UM) * (0.15 * length)  # ~15 % of the length: a real swirl
    n_sq = 6
    u = v / 2**n_sq
    ii, jj = np.meshgrid(np.arange(X.shape[0], dtype=float), np.arange(X.shape[1], dtype=float), indexing="ij")
    for _ in range(n_sq):  # phi <- phi o phi, with phi = id + u (displacements in µm, grid in nodes)
        coords = np.stack([ii + u[1] / GRID_SPACING_UM, jj + u[0] / GRID_SPACING_UM])
        u = u + np.stack([map_coordinates(u[c], coords, order=1, mode="nearest") for c in range(2)])
    return u


def ffd(rng, bbox, length: float) -> np.ndarray:
    """Free-form deformation: cubic B-spline over a random control grid of spacing ``length`` µm."""
    xmin, xmax, ymin, ymax = bbox
    pad = 2 * length
    nx = int(np.ceil((xmax - xmin + 2 * pad) / length)) + 1
    ny = int(np.ceil((ymax - ymin + 2 * pad) / length)) + 1
    coarse = SmoothWarp(np.array([xmin - pad, ymin - pad]), length, rng.standard_normal((2, ny, nx)))
    _, X, Y = node_grid(bbox)
    d = coarse.displacement(np.column_stack([X.ravel(), Y.ravel()]))
    return d.T.reshape(2, *X.shape)


def tps(rng, bbox, n_ctrl: int = 8) -> np.ndarray:
    """Thin-plate spline through random displacements of ``n_ctrl`` control points spread over ``bbox``."""
    xmin, xmax, ymin, ymax = bbox
    c = np.column_stack([rng.uniform(xmin, xmax, n_ctrl), rng.uniform(ymin, ymax, n_ctrl)])
    disp = rng.standard_normal((n_ctrl, 2))

    def kernel(r2):
        return np.where(r2 > 0, 0.5 * r2 * np.log(np.maximum(r2, 1e-300)), 0.0)

    scale = max(xmax - xmin, ymax - ymin)
    cs = c / scale
    K = kernel(((cs[:, None] - cs[None]) ** 2).sum(-1))
    P = np.column_stack([np.ones(n_ctrl), cs])
    L = np.zeros((n_ctrl + 3, n_ctrl + 3))
    L[:n_ctrl, :n_ctrl], L[:n_ctrl, n_ctrl:], L[n_ctrl:, :n_ctrl] = K, P, P.T
    rhs = np.vstack([disp, np.zeros((3, 2))])
    sol = np.linalg.solve(L + 1e-9 * np.eye(n_ctrl + 3), rhs)
    _, X, Y = node_grid(bbox)
    q = np.column_stack([X.ravel(), Y.ravel()]) / scale
    Kq = kernel(((q[:, None] - cs[None]) ** 2).sum(-1))
    d = Kq @ sol[:n_ctrl] + np.column_stack([np.ones(len(q)), q]) @ sol[n_ctrl:]
    return d.T.reshape(2, *X.shape)


def vortex(rng, bbox, radius: float, n: int = 4) -> np.ndarray:
    """Composition of ``n`` twists: rotation by ``theta * exp(-r^2 / 2 radius^2)`` about random centres."""
    xmin, xmax, ymin, ymax = bbox
    _, X, Y = node_grid(bbox)
    p = np.column_stack([X.ravel(), Y.ravel()])
    q = p.copy()
    for _ in range(n):
        c = np.array([rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)])
        r_k = radius * rng.uniform(0.7, 1.3)
        theta = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.3)
        rel = q - c
        ang = theta * np.exp(-(rel**2).sum(1) / (2 * r_k**2))
        co, si = np.cos(ang), np.sin(ang)
        q = c + np.column_stack([co * rel[:, 0] - si * rel[:, 1], si * rel[:, 0] + co * rel[:, 1]])
    return (q - p).T.reshape(2, *X.shape)


def microtome(rng, bbox, chatter_um: float) -> np.ndarray:
    """Knife effects: a bow, a compression gradient along the cut and chatter (wavelength ``chatter_um``)."""
    xmin, xmax, ymin, ymax = bbox
    _, X, Y = node_grid(bbox)
    a = rng.uniform(0, np.pi)
    e, f = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])  # cutting direction, across
    c = np.array([(xmin + xmax) / 2, (ymin + ymax) / 2])
    size = max(xmax - xmin, ymax - ymin) / 2
    u = ((X - c[0]) * e[0] + (Y - c[1]) * e[1]) / size
    v = ((X - c[0]) * f[0] + (Y - c[1]) * f[1]) / size
    bow = rng.choice([-1, 1]) * 0.5 * v**2  # along e: lines across the cut bend
    gradient = 0.35 * u * v  # compression along the cut varies across it
    phase = rng.uniform(0, 2 * np.pi)
    chatter = 0.25 * np.sin(2 * np.pi * u * size / chatter_um + phase) * chatter_um / size
    along = bow + gradient + chatter
    across = rng.choice([-1, 1]) * 0.25 * u**2
    return np.stack([along * e[0] + across * f[0], along * e[1] + across * f[1]])


def wendland(rng, bbox, radius: float, n: int = 6) -> np.ndarray:
    """Sum of Wendland C2 functions ``(1 - r/R)^4 (4 r / R + 1)`` (compact support ``R``) with random vectors."""
    xmin, xmax, ymin, ymax = bbox
    _, X, Y = node_grid(bbox)
    out = np.zeros((2, *X.shape))
    for _ in range(n):
        c = np.array([rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)])
        R = radius * rng.uniform(0.7, 1.4)
        r = np.hypot(X - c[0], Y - c[1]) / R
        phi = np.where(r < 1, (1 - r) ** 4 * (4 * r + 1), 0.0)
        vec = rng.standard_normal(2)
        out += phi[None] * vec[:, None, None]
    return out


def draw(model: str, rng, bbox, tissue_xy: np.ndarray, magnitude: float, length: float) -> SmoothWarp:
    """Draw a warp of one of :data:`MODELS` with largest non-affine displacement ``magnitude`` µm over the tissue.

    A draw that would fold the tissue at that magnitude is replaced by the next draw (up to 8), then
    :class:`ValueError` is raised.

    ``length`` is the model's length scale (µm): correlation length (svf), control spacing (ffd), twist
    radius (vortex), chatter wavelength (microtome), support radius (wendland); tps ignores it.
    """
    if magnitude < 0 or not np.isfinite(magnitude):
        raise ValueError(f"warp must be a finite displacement >= 0 (µm), got {magnitude!r}.")
    if model not in MODELS:
        raise ValueError(f"deformation model must be one of {MODELS}, got {model!r}.")
    if magnitude == 0:
        return SmoothWarp.zero()
    gen = {
        "svf": lambda: svf(rng, bbox, length),
        "ffd": lambda: ffd(rng, bbox, length),
        "tps": lambda: tps(rng, bbox),
        "vortex": lambda: vortex(rng, bbox, length),
        "microtome": lambda: microtome(rng, bbox, length),
        "wendland": lambda: wendland(rng, bbox, length),
    }[model]
    for attempt in range(8):  # a draw whose scaled field folds is replaced by the next one (same rng stream)
        try:
            return finalise(gen(), bbox, tissue_xy, magnitude)
        except ValueError:
            if attempt == 7:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
