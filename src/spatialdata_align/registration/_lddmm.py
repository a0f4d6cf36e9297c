"""Affine + diffeomorphic (LDDMM) image registration with Gaussian-mixture matching.

The model (written from the mathematics of LDDMM with image varifold / mixture matching):

* A source image ``I`` (any number of channels, e.g. rasterised cell densities, in source units) is
  deformed onto the target grid: ``I'(y) = I(phi^{-1}(A^{-1} y))`` where ``A`` is an affine and ``phi``
  the flow of a time-dependent velocity field ``v_t`` (:mod:`._flow`).
* Data terms (:mod:`._data`): each target pixel ``J(y)`` (e.g. RGB H&E) is explained by a three-class
  Gaussian mixture (matched tissue with mean ``f_theta(I'(y))``, background, artifact); optionally, sparse
  target observations (Visium spot expression of shared genes) are compared with smoothed source feature
  fields sampled at the spots' pulled-back positions.
* Energy (dimensionless; the image term is integrated over the target in units of the finest source pixel
  area, so weights do not change across resolution levels)::

      E = sum_y -log sum_k pi_k N(J(y); mu_k(y), sigma_k^2) * area(y)
        + sum_s sum_g w_s (E_sg - b_g F_g(phi^{-1}(A^{-1} q_s)) - c_g)^2 / (2 sigma_g^2)
        + 1 / (2 sigma_R^2) * 1/nt sum_t ||w_t||^2 * dv^2 / dx_I^2,        v_t = K^{1/2} w_t
        + sum_i |A phi(p_i) - q_i|^2 / (2 sigma_P^2)

  where ``K`` is a multi-scale Sobolev kernel (``sum_i c_i (Id - a_i^2 Δ)^{-2p}``): its long scales carry
  deformations across tissue with little texture, its short ones allow local corrections.
* The velocity is parametrised by ``w`` (so the Euclidean gradient in ``w`` is the kernel-preconditioned
  gradient) and the affine in normalised coordinates; both are optimised jointly by L-BFGS with an Armijo
  backtracking line search, coarse-to-fine over image resolutions. The mixture's colours and contrast weights
  are updated every few iterations (EM); a line search that fails three times on a stale mixture updates it
  at once instead of shrinking the step further (on ``bench_lddmm.scaling_problem(1000)``, one level capped at 40
  iterations: 82 evaluations before, 61 after). A trial step costs the energy only: the gradient (the backward
  pass and the data term's closed-form part) is taken for accepted steps, and after an M-step the data terms are
  scored again on the deformed source of that step, not recomputed from the flow. A level stops when the transform has
  stopped moving (largest change of the pulled-back positions over a window of iterations below a tolerance
  in source pixels, after a minimum number of iterations), when no descent is possible, or at its cap; the
  reason is recorded.

The data-term gradients are written out in closed form and only the interpolation and the flow go through
autograd; the heavy arrays are float32 by default, energies and optimiser dot products float64.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.profiler import record_function
from tqdm.auto import tqdm

from ._data import MixtureTerm, SpotTerm
from ._flow import (
    affine_torch,
    flow_forward,
    good_fft_size,
    grid_normaliser,
    inverse_displacement_normalised,
    sample_grid,
    sobolev_symbol,
)
from ._result import Registration
from ._utils import Image, as_image, blur_image, check_points, check_spot_inputs, homogeneous, interp

#: line-search trials per iteration; a search that fails updates the mixture (if stale) or ends the level
_MAX_TRIALS = 20

#: on the CPU, a level whose working target grid has fewer pixels than this runs on one torch thread. Below it
#: an iteration is bound by per-operation overhead: single-level problems of 200^2 / 400^2 / 700^2 / 1000^2 pixels
#: took 17-23 / 47-52 / 146-157 / 225-268 ms per iteration on one thread and 19-21 / 33-48 / 104-117 / 175-224
#: ms on two (quiet 2-core machine). With another process busy on one of the two cores, two threads wait on each
#: other: the demo's LDDMM took 6.4-6.6 s on two threads and 1.9-2.1 s on one (2.2-3.0 s vs 2.2-2.3 s quiet).
#: The pipeline's grids at 20 µm pixels are 100 x 85 to 200 x 170 at the finest level (demo, twin, corpus pairs)
SINGLE_THREAD_PIXELS = 100_000

#: default ``sigma_r``: the larger of ``SIGMA_R_PIXELS`` source pixels and ``SIGMA_R_TISSUE`` x the side of the source
#: tissue (:func:`tissue_side`). The regulariser's unit is a velocity in source units, while serial sections deform by
#: a strain, a fraction of their size; the floor keeps sections smaller than ~2 mm (at 20 µm pixels) at the
#: pixel-scale value chosen on the validation corpus (``docs/accuracy.md``, "The regularisation scales from the size of
#: the tissue")
SIGMA_R_PIXELS = 10.0
SIGMA_R_TISSUE = 0.1
#: a side of the source tissue's bounding box is a cut (see :func:`field_of_view_box`) when the tissue runs along more
#: than this share of it
CUT_TOUCH = 0.1
#: where the target is probed beyond a side of the source tissue's bounding box (source pixels)
CUT_PROBE = (5, 7, 9, 11)
#: source level (of its normalised range) above which a pixel has tissue, for the field of view's bounding box
FOV_LEVEL = 0.02
#: source pixels between a cut (where the tissue's profile across it is at half its plateau) and the field of view's
#: side: the raster's blur makes the tissue fade over about a pixel inside the cut, which the target does not
FOV_INSET = 1.0
#: default shortest kernel scale ``a``: the larger of ``A_PIXELS`` source pixels and ``A_TISSUE`` x the side of the
#: source tissue (a deformation's length scales grow with the section as its size does; sections under ~4.5 mm at 20
#: µm pixels keep ``8 * dx``)
A_PIXELS = 8.0
A_TISSUE = 0.035


class RegistrationDivergedWarning(UserWarning):
    """Emitted when the optimiser diverges; the last good state is returned."""


@dataclass
class _Level:
    factor: int
    source: Image
    target: Image
    I: torch.Tensor  # (C_I, ny, nx)
    area: float
    mixture: MixtureTerm
    border: torch.Tensor  # (C_J, n_border) target values on the image border
    track: torch.Tensor  # indices of target pixels whose pulled-back position is tracked for convergence
    Nt_inv: torch.Tensor  # (3, 3): grid_sample coordinates of the target grid -> target units
    R: torch.Tensor  # (2,) velocity-grid -> source-image normalised coordinates: z_I = R * z_v + c
    c: torch.Tensor  # (2,)
    s_I: np.ndarray  # source-image normaliser: z_I = s_I * z + o_I
    o_I: np.ndarray
    gx: torch.Tensor  # (W,) grid_sample x coordinates of the target columns
    gy: torch.Tensor  # (H,)
    fov: tuple | None = None  # the source's field of view (x0, x1, y0, y1), source units, +-inf: open


def _linear_resampler(src: np.ndarray, dst: np.ndarray, dtype, device) -> torch.Tensor:
    """``(len(dst), len(src))`` matrix of 1-D linear interpolation from nodes ``src`` to ``dst`` (clamped ends)."""
    f = np.clip((dst - src[0]) / (src[1] - src[0]), 0, len(src) - 1)
    i0 = np.minimum(np.floor(f).astype(int), len(src) - 2)
    t = f - i0
    m = np.zeros((len(dst), len(src)))
    m[np.arange(len(dst)), i0] = 1 - t
    m[np.arange(len(dst)), i0 + 1] += t
    return torch.as_tensor(m, dtype=dtype, device=device)


def _normalise_matrix(extent) -> np.ndarray:
    """Affine taking physical coordinates to roughly [-1, 1] over ``extent``."""
    xmin, xmax, ymin, ymax = extent
    c = np.array([(xmin + xmax) / 2, (ymin + ymax) / 2])
    s = max(xmax - xmin, ymax - ymin) / 2
    m = np.eye(3)
    m[:2, :2] /= s
    m[:2, 2] = -c / s
    return m


def _corners(extent) -> np.ndarray:
    xmin, xmax, ymin, ymax = extent
    return np.array([[xmin, ymin], [xmax, ymin], [xmin, ymax], [xmax, ymax]], dtype=float)


def _as_tuple(v, n: int, name: str) -> tuple:
    if np.isscalar(v):
        return (v,) * n
    v = tuple(v)
    if len(v) != n:
        raise ValueError(f"{name} must be a scalar or have one entry per level ({n}), got {len(v)}.")
    return v


def tissue_mask(source: Image) -> np.ndarray:
    """Source tissue: where the first channel (the cell density) exceeds a tenth of its maximum."""
    d0 = source.data[0]
    return d0 > 0.1 * d0.max()


def tissue_side(source: Image, mask: np.ndarray | None = None) -> float:
    """Side of the source tissue (source units): the square root of the area of ``mask`` (:func:`tissue_mask`)."""
    n = int((tissue_mask(source) if mask is None else mask).sum())
    return math.sqrt(n * source.dx * source.dy)


def fov_sides(box) -> list[tuple[int, float, float]]:
    """The closed sides of a field of view ``(x0, x1, y0, y1)``.

    Returns ``(axis, bound, sign)`` per finite side: inside where ``sign * (coordinate - bound) > 0``.
    """
    x0, x1, y0, y1 = box
    return [
        (ax, float(b), sg) for ax, b, sg in ((0, x0, 1.0), (0, x1, -1.0), (1, y0, 1.0), (1, y1, -1.0)) if np.isfinite(b)
    ]


def border_mask(ny: int, nx: int) -> np.ndarray:
    """The image border: the outer twentieth (at least one pixel) on each side, where the background colour is read."""
    border = np.zeros((ny, nx), dtype=bool)
    k = max(1, min(ny, nx) // 20)
    border[:k] = border[-k:] = True
    border[:, :k] = border[:, -k:] = True
    return border


def _half_level_inset(profile: np.ndarray) -> float:
    """Where a tissue profile across a side (outermost pixel first) reaches half its plateau, in pixels from the side.

    The plateau is the median of the profile's inner half: where the cut is, under the raster's blur.
    """
    m = profile
    if m.size < 4:
        return 0.0
    half = 0.5 * np.median(m[m.size // 2 :])
    above = np.flatnonzero(m >= half)
    if not above.size or above[0] == 0:
        return 0.0
    j = above[0]  # the profile crosses half between pixel j - 1 and j (pixel centres at 0.5, 1.5, ...)
    return float(j - 0.5 + (half - m[j - 1]) / max(m[j] - m[j - 1], 1e-12))


def field_of_view_box(source: Image, target: Image, affine: np.ndarray, sigma_m: float, field_of_view="auto"):
    """The source's field of view as a box ``(x0, x1, y0, y1)`` (source units; an open side is infinite), or ``None``.

    ``"auto"``: the sides of the bounding box of the source's tissue (first channel above ``FOV_LEVEL`` of its
    normalised range) that are cuts: the tissue reaches the side along more than ``CUT_TOUCH`` of its length, and
    beyond it (``CUT_PROBE`` source pixels out, through ``affine``) the target has tissue at most of those places.
    A Xenium region is a rectangle of fields of view in the instrument's frame; where it cuts through the tissue the
    section goes on unobserved. A side where the tissue ends in both sections is its own edge and stays open (the
    source saw glass beyond it). A 4-tuple: that box; ``None``: none (the source saw glass wherever it is empty).
    Target tissue: pixels further than ``3 sigma_m`` from the colour of the image's border.
    """
    if field_of_view is None:
        return None
    if not isinstance(field_of_view, str):
        # None for an open side, as ``params["field_of_view"]`` stores it (so a fit's box can be passed to a refit)
        sides = np.ravel(np.asarray(field_of_view, dtype=object))
        open_ = (-np.inf, np.inf, -np.inf, np.inf)
        try:
            box = tuple(open_[i] if b is None else float(b) for i, b in enumerate(sides)) if sides.size == 4 else ()
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or any(np.isnan(box)) or box[0] >= box[1] or box[2] >= box[3]:
            raise ValueError(
                "field_of_view must be 'auto', None or (x0, x1, y0, y1) with x0 < x1 and y0 < y1; "
                f"got {field_of_view!r}."
            )
        return box
    if field_of_view != "auto":
        raise ValueError(f"field_of_view must be 'auto', None or (x0, x1, y0, y1), got {field_of_view!r}.")
    seen = source.data[0] > FOV_LEVEL
    if not seen.any():
        return None
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    xs, ys = source.x, source.y
    dx, dy = source.dx, source.dy
    # target tissue, looked up by nearest pixel
    J = target.data
    ny, nx = J.shape[1:]
    mu_b = np.median(J[:, border_mask(ny, nx)], axis=1)  # as the mixture reads the background colour
    tissue = ((J - mu_b[:, None, None]) ** 2).sum(0) > (3 * sigma_m) ** 2

    def target_tissue(pts):
        q = pts @ affine[:2, :2].T + affine[:2, 2]
        ix = np.rint((q[:, 0] - target.x[0]) / target.dx).astype(int)
        iy = np.rint((q[:, 1] - target.y[0]) / target.dy).astype(int)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        out = np.zeros(len(q), bool)
        out[ok] = tissue[iy[ok], ix[ok]]
        return out

    box = [-np.inf, np.inf, -np.inf, np.inf]
    band, depth = 2, 12  # source pixels: the tissue reaches a side within band of it; its profile is read to depth
    probe = np.asarray(CUT_PROBE, float)
    d0 = source.data[0]
    # each side as a view of the image with the side as its first column, outermost first, one row per position along
    # it: (box index, view, the positions along the side, coordinate of the side, outward sign, pixel across)
    sides = (
        (0, d0[r0 : r1 + 1, c0:], ys[r0 : r1 + 1], xs[c0] - dx / 2, -1.0, dx),
        (1, d0[r0 : r1 + 1, : c1 + 1][:, ::-1], ys[r0 : r1 + 1], xs[c1] + dx / 2, 1.0, dx),
        (2, d0[r0:, c0 : c1 + 1].T, xs[c0 : c1 + 1], ys[r0] - dy / 2, -1.0, dy),
        (3, d0[: r1 + 1, c0 : c1 + 1][::-1].T, xs[c0 : c1 + 1], ys[r1] + dy / 2, 1.0, dy),
    )
    for i, view, along, at, sign, px in sides:
        touch = (view[:, :band] > FOV_LEVEL).any(1)
        if touch.mean() <= CUT_TOUCH:
            continue
        across = at + sign * probe[:, None] * px  # (n_probe, 1)
        a = np.broadcast_to(along[touch][None], (len(probe), int(touch.sum()))).ravel()
        b = np.broadcast_to(across, (len(probe), int(touch.sum()))).ravel()
        pts = np.column_stack([b, a] if i < 2 else [a, b])
        if target_tissue(pts).mean() > 0.5:
            box[i] = float(at) - sign * (_half_level_inset(view[touch, :depth].mean(0)) + FOV_INSET) * px
    return None if all(np.isinf(box)) else tuple(box)


def default_kernel_scales(source: Image, a: float | None = None, *, side: float | None = None) -> tuple[float, ...]:
    """Length scales of the smoothing kernel, from the source image (source units).

    The shortest is ``a`` (default the larger of ``A_PIXELS`` (8) source pixels and ``A_TISSUE`` (3.5 %) of the side
    of the source tissue, :func:`tissue_side`); longer ones follow at factors of 3 up to a quarter of the
    source's extent, so a deformation found where the tissue has texture extends smoothly over featureless
    tissue instead of decaying to the affine within ``a`` of it. ``side``: the tissue's side, if already measured.
    """
    xmin, xmax, ymin, ymax = source.extent
    if a is None:
        a = max(A_PIXELS * source.dx, A_TISSUE * (tissue_side(source) if side is None else side))
    a0 = float(a)
    top = max(xmax - xmin, ymax - ymin) / 4
    scales = [a0]
    while scales[-1] * 3 <= top * 1.5:
        scales.append(scales[-1] * 3)
    return tuple(scales)


class _Problem:
    """Holds tensors and nuisance parameters, evaluates the energy and its gradient."""

    def __init__(
        self,
        I_img,
        A0,
        *,
        scales_a,
        kernel_weights,
        p,
        nt,
        dv,
        sigma_r,
        sigma_p,
        lm_src,
        lm_dst,
        dtype,
        device,
    ):
        self.dtype, self.device = dtype, device
        self.A0 = A0
        self.NI = _normalise_matrix(I_img.extent)
        self.b_scale = float(self.NI[0, 0])  # 1 / half-extent of the source (source units)
        # the target normaliser is expressed through A0 so the affine parameters start near identity
        self.NJ = self.NI @ np.linalg.inv(A0)
        self.NJi = torch.as_tensor(np.linalg.inv(self.NJ), dtype=dtype, device=device)
        self.NIt = torch.as_tensor(self.NI, dtype=dtype, device=device)
        self.nt, self.p = nt, p
        self.dxI = I_img.dx * I_img.dy
        # one velocity grid per kernel scale a_i (spacing a_i / 3 for the shortest, coarser for the longer
        # scales; each padded by 2 a_i so the periodic Fourier-domain smoothing does not couple opposite
        # edges; sizes rounded up to fast FFT lengths). The total velocity is their sum, resampled onto the
        # finest grid: a sum of independent fields with kernels c_i (Id - a_i^2 Δ)^{-2p}, at the cost of the
        # finest grid alone. Target pixels pulled back outside it sample an empty source anyway; there the
        # field is extended by its edge values.
        src = _corners(I_img.extent)
        c = np.asarray(kernel_weights, dtype=float)
        c = c / c.sum()
        a_min = min(scales_a)
        self.grids = []
        for a_i, c_i in sorted(zip(scales_a, c, strict=True)):
            d_i = dv if a_i == a_min else max(dv, a_i / 3)
            lo = src.min(axis=0) - 2 * a_i
            hi = src.max(axis=0) + 2 * a_i
            nx_i = good_fft_size(int(np.ceil((hi[0] - lo[0]) / d_i)) + 1)
            ny_i = good_fft_size(int(np.ceil((hi[1] - lo[1]) / d_i)) + 1)
            cx, cy = (lo + hi) / 2
            xg = cx + d_i * (np.arange(nx_i) - (nx_i - 1) / 2)
            yg = cy + d_i * (np.arange(ny_i) - (ny_i - 1) / 2)
            sym = sobolev_symbol(ny_i, nx_i, d_i, a_i, p, dtype=dtype, device=device) ** -1 * math.sqrt(c_i)
            grid = {"a": a_i, "c": c_i, "dv": d_i, "x": xg, "y": yg, "symbol": sym, "shape": (nt, 2, ny_i, nx_i)}
            if self.grids:  # separable linear interpolation onto the finest grid (border-extended)
                fine = self.grids[0]
                grid["Ry"] = _linear_resampler(yg, fine["y"], dtype, device)
                grid["Rx"] = _linear_resampler(xg, fine["x"], dtype, device)
            self.grids.append(grid)
        self.xv, self.yv, self.dv = self.grids[0]["x"], self.grids[0]["y"], self.grids[0]["dv"]
        fx, fy = np.meshgrid(self.xv, self.yv)
        self.fine_nodes = torch.as_tensor(np.stack([fx.ravel(), fy.ravel()], 1), dtype=dtype, device=device)
        # the hot path works in the fine grid's grid_sample coordinates: z_v = s_v * z + o_v
        self.s_v, self.o_v = grid_normaliser(self.xv, self.yv)
        self.sv_t = torch.as_tensor(self.s_v, dtype=dtype, device=device)
        self.ov_t = torch.as_tensor(self.o_v, dtype=dtype, device=device)
        nv = np.diag([*self.s_v, 1.0])
        nv[:2, 2] = self.o_v
        self.Nv = torch.as_tensor(nv, dtype=dtype, device=device)
        self.nodes_n = self.fine_nodes.reshape(len(self.yv), len(self.xv), 2) * self.sv_t + self.ov_t
        self.sigma_r, self.sigma_p = sigma_r, sigma_p
        self.affine_weight = 0.0  # set by lddmm(): n_tissue_px / (2 sigma_affine^2)
        self.lm_src = None if lm_src is None else torch.as_tensor(lm_src, dtype=dtype, device=device)
        self.lm_dst = None if lm_dst is None else torch.as_tensor(lm_dst, dtype=dtype, device=device)
        self.n_b = 6
        self.w_shape = self.grids[0]["shape"]
        self.sizes = [int(np.prod(g["shape"])) for g in self.grids]
        self.n_x = self.n_b + sum(self.sizes)
        self.spots: _SpotInput | None = None

    # ------------------------------------------------------------------ parameter handling
    def unpack(self, x: torch.Tensor):
        """Affine parameters and the list of per-scale velocity parameters."""
        ws, i = [], self.n_b
        for g, n in zip(self.grids, self.sizes, strict=True):
            ws.append(x[i : i + n].reshape(g["shape"]))
            i += n
        return x[: self.n_b], ws

    def affine(self, b: torch.Tensor) -> torch.Tensor:
        # b is scaled so that a unit change moves points by about one source unit (like w)
        b = b * self.b_scale
        B = torch.eye(3, dtype=self.dtype, device=self.device) + torch.cat(
            [b.reshape(2, 3), torch.zeros(1, 3, dtype=self.dtype, device=self.device)]
        )
        return self.NJi @ B @ self.NIt

    def velocity(self, ws) -> torch.Tensor:
        """Total velocity ``(nt, 2, ny, nx)`` on the finest grid: the sum of the per-scale fields."""
        v = None
        for g, w in zip(self.grids, ws, strict=True):
            ny, nx = w.shape[-2:]
            vi = torch.fft.irfft2(torch.fft.rfft2(w) * g["symbol"], s=(ny, nx))
            v = vi if v is None else v + g["Ry"] @ vi @ g["Rx"].T
        return v

    def reg_energy(self, ws) -> torch.Tensor:
        """``1/(2 sigma_R^2 nt) sum_i ||w_i||^2 dv_i^2 / dx_I^2`` (float64)."""
        e = 0.0
        for g, w in zip(self.grids, ws, strict=True):
            e = e + (w.double() ** 2).sum() * (g["dv"] ** 2 / self.dxI)
        return e / (2 * self.sigma_r**2 * self.nt)

    def pull_back(self, y: torch.Tensor, A: torch.Tensor, disp_n: torch.Tensor) -> torch.Tensor:
        """Source positions ``phi^{-1}(A^{-1} y)`` (source units) of target points ``y`` (``(N, 2)``)."""
        z0 = affine_torch(torch.linalg.inv(A), y) * self.sv_t + self.ov_t
        d = sample_grid(disp_n, z0[None]).reshape(2, -1).T
        return (z0 + d - self.ov_t) / self.sv_t

    # ------------------------------------------------------------------ energy
    def evaluate(self, lvl: _Level, x: torch.Tensor, mask: torch.Tensor | None, *, want_post: bool = False):
        """The energy at ``x`` (an :class:`_Evaluation`: the total now, the gradient when asked for).

        With ``mask`` the forward pass records the graph for the gradient (masked to the free parameters); without
        it there is no gradient.
        """
        x = x.detach().requires_grad_(mask is not None)
        with record_function("lddmm.flow"):
            b, ws = self.unpack(x)
            A = self.affine(b)
            v = self.velocity(ws)
            disp_n = inverse_displacement_normalised(v * self.sv_t[:, None, None], self.nodes_n)
        with record_function("lddmm.deform"):
            theta = (self.Nv @ torch.linalg.inv(A) @ lvl.Nt_inv)[:2]
            # velocity-grid coordinates of A^{-1} y at every target pixel, (H, W, 2), as an outer sum
            z0 = (lvl.gx[:, None] * theta[:, 0]) + (lvl.gy[:, None] * theta[:, 1] + theta[:, 2])[:, None, :]
            zI = torch.addcmul(lvl.c, z0 + sample_grid(disp_n, z0).permute(1, 2, 0), lvl.R)  # source-image coords
            Iw = sample_grid(lvl.I, zI, padding="zeros").reshape(lvl.I.shape[0], -1)  # (C_I, N)
            if lvl.fov is not None:  # the field of view as a last row: a ramp one level pixel wide at each side
                w = float(lvl.source.dx)
                fv = None
                for axis, bound, sign in fov_sides(lvl.fov):
                    u = (zI[..., axis] - float(lvl.o_I[axis])) / float(lvl.s_I[axis])  # source units
                    r = ((u - bound) * (sign / w) + 0.5).clamp(0.0, 1.0)
                    fv = r if fv is None else fv * r
                if fv is None:
                    fv = torch.ones_like(zI[..., 0])
                Iw = torch.cat([Iw, fv.reshape(1, -1)])
        Fs = zs = None
        if self.spots is not None:
            with record_function("lddmm.spot_term"):
                zs = self.pull_back(self.spots.q, A, disp_n)
                Fs = interp(self.spots.F, self.spots.image.x, self.spots.image.y, zs, padding="zeros")  # (G, S)
        e_reg = self.reg_energy(ws)
        if self.affine_weight > 0:
            # prior on the change of the affine: the mean squared displacement it causes over the source (source
            # units^2: translation^2 + |linear change|_F^2 / 3 in the normalised parametrisation), counted per
            # source tissue pixel like the velocity's regulariser, with standard deviation sigma_affine
            bd = b.double()
            msd = bd[[2, 5]].pow(2).sum() + bd[[0, 1, 3, 4]].pow(2).sum() / 3
            e_reg = e_reg + self.affine_weight * msd
        e_lm = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.lm_src is not None:
            q_lm = affine_torch(A, flow_forward(self.lm_src, v, self.xv, self.yv))
            e_lm = ((q_lm - self.lm_dst).double() ** 2).sum() / (2 * self.sigma_p**2)
        with torch.no_grad():
            zt = zI.reshape(-1, 2)[lvl.track]
            z_track = (zt - torch.as_tensor(lvl.o_I, dtype=zt.dtype)) / torch.as_tensor(lvl.s_I, dtype=zt.dtype)
        extra = {"disp_max": float(disp_n.detach().abs().max()), "z_track": z_track}
        if zs is not None:
            extra["z_spot"] = zs.detach()
        return _Evaluation(self, lvl, x, mask, Iw, Fs, e_reg, e_lm, extra, want_post)


class _Evaluation:
    """The energy at one point: its total, parts and extras now, its gradient on demand.

    The deformation's forward pass (flow, pull-back, sampling) is done once, in :meth:`_Problem.evaluate`; the data
    terms are evaluated on its output here. Two savings follow, and neither changes a number:

    - a line-search trial that is rejected never pays for its gradient (the backward pass through the flow and the
      mixture term's gradient): :meth:`gradient` runs for accepted trials only;
    - after an M-step the data terms change but the deformation does not: :meth:`refresh` re-evaluates them on the
      kept deformed source, without integrating the flow again.

    ``python benchmarks/bench_lddmm.py --datasets --scaling 1000 --scaling-iters 30`` (one level, two cores,
    three runs each, interleaved with the eager version in the same session): 189 -> 160 ms per iteration in
    float32 and 295 -> 278 ms in float64, with the same energy at every step.
    """

    def __init__(self, prob: _Problem, lvl: _Level, x, mask, Iw, Fs, e_reg, e_lm, extra: dict, want_post: bool):
        self.prob, self.lvl, self.x, self.mask = prob, lvl, x, mask
        self.Iw, self.Fs, self.e_rest = Iw, Fs, e_reg + e_lm
        self.e_reg, self.e_lm = e_reg.detach(), e_lm.detach()
        self.extra = extra
        self._Iw_d = Iw.detach()
        self._g = None
        self._score(want_post)

    def _score(self, want_post: bool):
        """Evaluate the data terms on the deformed source (with the mixture's and spot term's current state)."""
        prob, lvl = self.prob, self.lvl
        with torch.no_grad(), record_function("lddmm.data_term"):
            e_match, post = lvl.mixture.energy(self._Iw_d, want_post=want_post)
            occ = lvl.mixture.occupancy(self._Iw_d) if want_post else None
        self.parts = {"match": e_match}
        e_spot = None
        self.g_F = None
        if self.Fs is not None:
            with torch.no_grad():
                e_spot, self.g_F, r_spot = prob.spots.term.evaluate(self.Fs.detach(), want_grad=self.mask is not None)
            self.parts["spots"] = e_spot
            self.extra["r_spot"] = r_spot
        self.parts.update(reg=self.e_reg, landmark=self.e_lm)
        self.total = (e_match + self.e_reg + self.e_lm + (0.0 if e_spot is None else e_spot)).detach()
        self.extra.update(post=post, occupancy=occ)
        self.finite = bool(torch.isfinite(self.total))

    def gradient(self, *, retain: bool = False) -> torch.Tensor | None:
        """The masked gradient at ``x`` (``None`` without a mask or when the energy is not finite).

        ``retain`` keeps the graph for a :meth:`refresh`. Call it before the mixture is evaluated anywhere else.
        """
        if self.mask is None or not self.finite:
            return None
        if self._g is None:
            with record_function("lddmm.data_term"), torch.no_grad():
                g_I = self.lvl.mixture.gradient(self._Iw_d)  # (raises if the term was evaluated elsewhere since)
            outs, grads = [self.Iw], [g_I]
            if self.Fs is not None:
                outs.append(self.Fs)
                grads.append(self.g_F)
            outs.append(self.e_rest)
            grads.append(torch.ones((), dtype=torch.float64, device=self.prob.device))
            with record_function("lddmm.backward"):
                (g,) = torch.autograd.grad(outs, [self.x], grads, retain_graph=retain)
            self._g = torch.where(self.mask, g, torch.zeros_like(g))
        return self._g

    def refresh(self):
        """The same point after an M-step: the data terms again, the gradient to be taken anew."""
        self._g = None
        self._score(False)
        return self


@dataclass
class _SpotInput:
    """Sparse target observations and the matching source feature image (see :func:`lddmm`)."""

    term: SpotTerm
    q: torch.Tensor  # (S, 2) spot positions, target units
    image: Image  # source feature image (grid in source units)
    F: torch.Tensor  # its values, (G, ny, nx)


def _lbfgs_direction(g, S, Y):
    """L-BFGS two-loop recursion."""
    q = g.clone()
    alphas = []
    for s, y in zip(reversed(S), reversed(Y), strict=True):
        rho = 1.0 / torch.dot(y, s)
        alpha = rho * torch.dot(s, q)
        q -= alpha * y
        alphas.append((rho, alpha))
    r = q * (torch.dot(S[-1], Y[-1]) / torch.dot(Y[-1], Y[-1]))
    for (s, y), (rho, alpha) in zip(zip(S, Y, strict=True), reversed(alphas), strict=True):
        r += s * (alpha - rho * torch.dot(y, r))
    return -r


def lddmm(
    source,
    target,
    *,
    affine=None,
    source_landmarks=None,
    target_landmarks=None,
    target_spots=None,
    spot_values=None,
    source_features=None,
    a: float | None = None,
    kernel_scales=None,
    kernel_weights=None,
    p: float = 2.0,
    nt: int = 5,
    dv: float | None = None,
    sigma_m: float | None = None,
    sigma_b: float | None = None,
    sigma_a: float | None = None,
    sigma_r: float | None = None,
    sigma_p: float | None = None,
    sigma_affine: float | None = None,
    contrast_degree: int = 3,
    background: bool = True,
    artifact: bool = True,
    update_priors: bool = False,
    prior_in=(0.9, 0.05, 0.05),
    prior_out=(0.05, 0.5, 0.45),
    scales=(4, 2, 1),
    max_iter=(200, 100, 50),
    affine_iter: int = 100,
    optimize_affine: bool = True,
    tol: float = 0.02,
    window: int = 10,
    min_iter: int = 15,
    em_every: int = 5,
    target_pixel: float | None = None,
    target_blur: float = 0.0,
    field_of_view="auto",
    device: str = "cpu",
    dtype=None,
    seed: int = 0,
    progress: bool = True,
    source_units: str = "um",
    target_units: str = "px",
) -> Registration:
    """Register a source image onto a target image: affine + diffeomorphism (LDDMM).

    Parameters
    ----------
    source
        Source image (e.g. :func:`~spatialdata_align.registration.rasterize` output): a ``(c, y, x)``
        DataArray with physical coordinates (source units, e.g. µm), or an array (pixel units). Several
        channels (e.g. densities of cell types) all enter the contrast map.
    target
        Target image (e.g. an RGB H&E): DataArray with physical coordinates (target units, e.g.
        Visium full-resolution pixels) or an array; integer images are scaled to ``[0, 1]``.
    affine
        ``(3, 3)`` initial source→target affine (from landmarks or
        :func:`~spatialdata_align.registration.auto_init`). Default: identity.
    source_landmarks, target_landmarks
        Optional ``(N, 2)`` matched ``(x, y)`` points in source / target units: adds the landmark
        term ``sum |A phi(p) - q|^2 / (2 sigma_p^2)``.
    target_spots, spot_values, source_features
        Optional sparse target observations: ``(S, 2)`` positions ``(x, y)`` in target units (e.g. Visium
        spot centres), their ``(S, G)`` feature values (e.g. normalised log expression of shared genes),
        and a ``(G, y, x)`` source image of the same features (e.g. smoothed Xenium expression, on any grid
        in source units). Adds a spot term with a per-feature affine calibration and noise levels estimated
        by maximum likelihood.
    a
        Shortest smoothness length scale of the velocity field (source units). Default: the larger of ``8 * dx`` of
        the source image and 3.5 % of the side of the source tissue (:func:`default_kernel_scales`).
    kernel_scales, kernel_weights
        Length scales ``a_i`` (source units) and relative prior variances ``c_i`` of the multi-scale
        kernel. Default: :func:`default_kernel_scales` (``a`` and factors of 3 up to a quarter of the
        source's extent), equal weights. ``kernel_scales=(a,)`` gives the classic single-scale operator.
    p
        Power of the Sobolev operator ``(Id - a^2 Δ)^p``.
    nt
        Number of time steps of the flow.
    dv
        Velocity grid spacing (source units). Default ``a / 2``.
    sigma_m, sigma_b, sigma_a
        Noise standard deviations of the matched, background and artifact classes (target
        intensity units). Defaults: ``0.5 * std(target)``, ``2 * sigma_m``, and the spread of the target's
        tissue colours (at least ``sigma_m``): the artifact class explains target tissue that the source lacks.
    sigma_r
        Regularisation scale: larger allows larger deformations (source units). Default: the larger of ``10 * dx``
        of the source image and a tenth of the side of the source tissue (the square root of its area; the tissue
        is where the first channel exceeds a tenth of its maximum): ``SIGMA_R_PIXELS`` and ``SIGMA_R_TISSUE``. So a
        section of 2 mm or less at 20 µm pixels gets 200 µm, a 7 mm brain section ~700 µm (``docs/accuracy.md``).
    sigma_p
        Landmark tolerance (target units). Default: two source pixels mapped to target units.
    sigma_affine
        Prior on how far the affine may move from ``affine`` during the fit: a mean displacement of
        ``sigma_affine`` (source units) over the source tissue costs as much as the regulariser's unit.
        Default 5 % of the source's half-extent; ``0`` removes the prior. Without it, low-texture sections
        can shrink or slide onto the part of the target that the contrast model explains best.
    contrast_degree
        Degree of the per-channel polynomial mapping source intensities to target colours.
    background, artifact
        Whether to model background / artifact classes.
    update_priors
        Re-estimate the class priors by EM. Off by default: re-estimated, the artifact prior collapses when
        little of the target lacks a source counterpart, and the source's cut edges are then stretched over
        that tissue.
    prior_in, prior_out
        Class priors (match, background, artifact) where the deformed source has tissue and where it has
        none; in between they are mixed by the source's occupancy ``tanh(I / tau)`` (``tau`` a quarter of the
        source's typical tissue level). Target pixels under source tissue are then expected to match, and the
        rest to be glass or tissue the source lacks; the prior moves with the deformation (its gradient is
        part of the fit).
    scales
        Coarse-to-fine image downsampling factors (relative to the working resolution).
    max_iter
        Iteration cap per level (scalar or one per level).
    affine_iter
        Iteration cap of the initial affine-only stage at the coarsest level (0 disables it).
    optimize_affine
        Refine the affine jointly with the velocity (otherwise the initial affine is kept).
    tol, window, min_iter
        Convergence test: a level stops once the pulled-back positions of the target pixels over the source
        have moved less than ``tol`` level pixels (source units ``tol * factor * dx``) over the last
        ``window`` iterations, after at least ``min_iter`` iterations.
    em_every
        Iterations between updates of the mixture's colours and weights (each followed by a re-evaluation).
    target_pixel
        Working pixel size of the target (target units). Default: the source pixel size mapped
        through the initial affine (the target is block-averaged down to it).
    target_blur
        Standard deviation of a Gaussian blur of the target image, in source units (e.g. µm; converted through the
        initial affine's scale), applied at the working resolution (``target_pixel``). ``0`` (default): none.
        :meth:`sdata.align.lddmm <spatialdata_align.AlignAccessor.lddmm>` passes the source raster's own blur, so
        that both images are equally smooth (``docs/accuracy.md``).
    field_of_view
        Where the source was observed. ``"auto"`` (default): the sides of the bounding box of the source's tissue
        (in its own frame) along which the target's tissue goes on, through ``affine``: there a rectangular region of
        interest (a Xenium region is a rectangle of fields of view) cut through the section
        (:func:`field_of_view_box`). ``(x0, x1, y0, y1)`` in source units (``±inf`` or ``None`` for an open side):
        that box.
        ``None``: everywhere (an empty source means glass). Target pixels outside the field of view cost what an
        observed pixel of their colour costs on average, whatever the deformation (:class:`~._data.MixtureTerm`,
        ``fov``), so the source's cut is not stretched over the tissue beyond it. The box found is in
        ``params["field_of_view"]`` (``None`` for an open side).
    device, dtype
        Torch device and dtype of the image arrays. Default ``float32`` (energies and optimiser dot products
        are accumulated in float64); results are bit-reproducible on a given machine and thread count. On the
        CPU, levels whose working target grid has fewer than ``SINGLE_THREAD_PIXELS`` (100 000) pixels run on one
        torch thread (as fast at those sizes, and several times faster when another process shares the cores);
        larger ones on torch's thread count.
    seed
        Torch random seed (the algorithm itself is deterministic).
    progress
        Show a tqdm progress bar.
    source_units, target_units
        Unit labels stored in the result.

    Returns
    -------
    :class:`~spatialdata_align.registration.Registration` mapping source → target. Its ``params["levels"]``
    lists, per stage, the iterations taken and why it stopped.
    """
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    if dtype is None:
        dtype = torch.float32
    I_img = as_image(source, name="source")
    J_img = as_image(target, name="target")
    # intensity normalisation: every source channel to ~[0, 1] (target as given, integer images scaled)
    scale_i = np.quantile(I_img.data.reshape(I_img.data.shape[0], -1), 0.999, axis=1)
    if not np.all(np.isfinite(scale_i)) or float(I_img.data.std()) == 0:
        raise ValueError("source image has zero variance (empty raster?); nothing to register.")
    scale_i = np.where(scale_i > 0, scale_i, np.maximum(I_img.data.reshape(len(scale_i), -1).max(1), 1e-12))
    I_img = Image(I_img.data / scale_i[:, None, None], I_img.x, I_img.y)
    A0 = np.eye(3) if affine is None else homogeneous(affine)
    lm_src = lm_dst = None
    if (source_landmarks is None) != (target_landmarks is None):
        raise ValueError("pass both source_landmarks and target_landmarks, or neither.")
    if source_landmarks is not None:
        lm_src = check_points(source_landmarks, "source_landmarks", min_points=1)
        lm_dst = check_points(target_landmarks, "target_landmarks", min_points=1)
        if lm_src.shape != lm_dst.shape:
            raise ValueError(
                f"landmarks must be matched pairs: {lm_src.shape[0]} source vs {lm_dst.shape[0]} target points."
            )
    spot_inputs = check_spot_inputs(target_spots, spot_values, source_features, "the spot term")
    scale_a = abs(np.linalg.det(A0[:2, :2])) ** 0.5
    dxI = I_img.dx
    if target_pixel is None:
        target_pixel = dxI * scale_a
    base_j = max(1, round(target_pixel / J_img.dx))
    target_extent = J_img.extent
    if not np.isfinite(target_blur) or target_blur < 0:
        raise ValueError(f"target_blur must be >= 0 (source units), got {target_blur!r}.")
    if target_blur > 0:
        # at the working resolution (blocks of base_j pixels), where it costs little; blurring the full-resolution
        # image first differs from it by less than the block averaging does
        J_img = blur_image(J_img.downsample(base_j), target_blur * scale_a)
        base_j = 1
    std_j = float(J_img.data.std(axis=(1, 2)).mean())  # (after the blur: the match noise of the blurred target)
    if std_j == 0:
        raise ValueError("target image has zero variance; nothing to register.")
    # source tissue: one mask for the scale defaults, the affine prior's weight and the occupancy's tissue level
    on_tissue = tissue_mask(I_img)
    n_tissue = float(on_tissue.sum())
    side = tissue_side(I_img, on_tissue)
    if kernel_scales is None:
        kernel_scales = default_kernel_scales(I_img, a, side=side)
    kernel_scales = tuple(float(s) for s in np.atleast_1d(kernel_scales))
    if kernel_weights is None:
        kernel_weights = (1.0,) * len(kernel_scales)
    kernel_weights = tuple(float(c) for c in np.atleast_1d(kernel_weights))
    if len(kernel_weights) != len(kernel_scales) or min(kernel_weights) < 0 or sum(kernel_weights) <= 0:
        raise ValueError("kernel_weights must be non-negative, one per kernel scale, and not all zero.")
    a = min(kernel_scales)
    dv = float(a / 2 if dv is None else dv)
    sigma_r = float(max(SIGMA_R_PIXELS * dxI, SIGMA_R_TISSUE * side) if sigma_r is None else sigma_r)
    sigma_m = float(0.5 * std_j if sigma_m is None else sigma_m)
    sigma_b = float(2 * sigma_m if sigma_b is None else sigma_b)
    sigma_a = None if sigma_a is None else float(sigma_a)
    sigma_p = float(2 * dxI * scale_a if sigma_p is None else sigma_p)
    for name, val in (
        ("a", a),
        ("dv", dv),
        ("sigma_m", sigma_m),
        ("sigma_b", sigma_b),
        ("sigma_a", 1.0 if sigma_a is None else sigma_a),
        ("sigma_r", sigma_r),
        ("sigma_p", sigma_p),
        ("tol", tol if tol > 0 else 1.0),
    ):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be positive and finite, got {val!r}.")
    if nt < 1:
        raise ValueError(f"nt must be >= 1, got {nt}.")
    scales = tuple(int(s) for s in scales)
    max_iter = _as_tuple(max_iter, len(scales), "max_iter")

    prob = _Problem(
        I_img,
        A0,
        scales_a=kernel_scales,
        kernel_weights=kernel_weights,
        p=p,
        nt=nt,
        dv=dv,
        sigma_r=sigma_r,
        sigma_p=sigma_p,
        lm_src=lm_src,
        lm_dst=lm_dst,
        dtype=dtype,
        device=device,
    )
    if spot_inputs is not None:
        q, vals, F_img = spot_inputs
        term = SpotTerm(torch.as_tensor(vals.T.copy(), dtype=dtype, device=device), area=1.0)
        prob.spots = _SpotInput(
            term, torch.as_tensor(q, dtype=dtype, device=device), F_img, torch.as_tensor(F_img.data, dtype=dtype)
        )
    # prior on how far the affine may move from the initial one: a mean displacement of sigma_affine (default 5 %
    # of the source's half-extent) costs as much as a velocity of sigma_r per source tissue pixel
    half = 0.5 * max(I_img.extent[1] - I_img.extent[0], I_img.extent[3] - I_img.extent[2])
    sigma_affine = float(0.05 * half if sigma_affine is None else sigma_affine)
    if not np.isfinite(sigma_affine) or sigma_affine < 0:
        raise ValueError(f"sigma_affine must be >= 0 (0: no prior), got {sigma_affine!r}.")
    prob.affine_weight = n_tissue / (2 * sigma_affine**2) if sigma_affine > 0 else 0.0
    sigmas = (sigma_m, sigma_b, sigma_a)
    # tissue level of the source's first channel (the cell density): a quarter of its typical value over tissue
    on = I_img.data[0][on_tissue]
    tissue_level = float(0.25 * np.median(on)) if on.size else 0.1
    active = (True, background, artifact)
    fov_box = field_of_view_box(I_img, J_img.downsample(base_j), A0, sigma_m, field_of_view)

    def make_level(f: int) -> _Level:
        Il = I_img.downsample(f)
        Jl = J_img.downsample(f * base_j)
        Jt = torch.as_tensor(Jl.data.reshape(Jl.data.shape[0], -1), dtype=dtype, device=device)
        area = (Jl.dx * Jl.dy) / (scale_a**2) / (I_img.dx * I_img.dy)
        ny, nx = Jl.data.shape[1:]
        border = border_mask(ny, nx)
        # tracked pixels: those whose initial pull-back lands on the source image (<= ~20k of them)
        gx, gy = np.meshgrid(Jl.x, Jl.y)
        zi = (np.stack([gx.ravel(), gy.ravel()], 1) - A0[:2, 2]) @ np.linalg.inv(A0[:2, :2]).T
        xmin, xmax, ymin, ymax = I_img.extent
        on = np.flatnonzero((zi[:, 0] > xmin) & (zi[:, 0] < xmax) & (zi[:, 1] > ymin) & (zi[:, 1] < ymax))
        if on.size == 0:
            on = np.arange(zi.shape[0])
        on = on[:: max(1, on.size // 20000)]
        s_t, o_t = grid_normaliser(Jl.x, Jl.y)
        nt_inv = np.eye(3)
        nt_inv[:2, :2] = np.diag(1.0 / s_t)
        nt_inv[:2, 2] = -o_t / s_t
        s_I, o_I = grid_normaliser(Il.x, Il.y)
        R = s_I / prob.s_v
        return _Level(
            f,
            Il,
            Jl,
            torch.as_tensor(Il.data, dtype=dtype, device=device),
            area,
            MixtureTerm(
                Jt,
                sigmas,
                contrast_degree,
                active,
                prior_in,
                prior_out,
                tissue_level,
                area=area,
                fov=fov_box is not None,
            ),
            Jt[:, torch.as_tensor(border.ravel(), device=device)],
            torch.as_tensor(on, device=device),
            torch.as_tensor(nt_inv, dtype=dtype, device=device),
            torch.as_tensor(R, dtype=dtype, device=device),
            torch.as_tensor(o_I - R * prob.o_v, dtype=dtype, device=device),
            s_I,
            o_I,
            torch.linspace(-1.0, 1.0, nx, dtype=dtype, device=device),
            torch.linspace(-1.0, 1.0, ny, dtype=dtype, device=device),
            fov_box,
        )

    n_x = prob.n_x
    x = torch.zeros(n_x, dtype=dtype, device=device)
    stages = []
    if optimize_affine and affine_iter > 0:
        stages.append((0, "affine", affine_iter))
    for li, mi in enumerate(max_iter):
        stages.append((li, "joint" if optimize_affine else "velocity", int(mi)))
    records = []
    post_final = None
    diverged = False
    bar = tqdm(total=sum(s[2] for s in stages), desc="LDDMM", disable=not progress, leave=False)
    levels: dict[int, _Level] = {}
    stage_log = []
    colours = None  # mixture colours carried across levels
    good = None
    lvl = None
    n_eval = n_grad = 0  # energy evaluations (forward passes of the deformation), gradients (backward passes)

    def em_update(lvl, extra):
        lvl.mixture.m_step(extra["post"], extra["occupancy"], update_priors)
        if prob.spots is not None:
            term = prob.spots.term
            occ = interp(lvl.I[:1], lvl.source.x, lvl.source.y, extra["z_spot"], padding="zeros")[0]
            ref = torch.quantile(lvl.I[0][lvl.I[0] > 0.05].float(), 0.5).to(dtype) if (lvl.I[0] > 0.05).any() else 1
            term.m_step(extra["r_spot"], occ / ref)

    def fresh_mixture(ev: _Evaluation, when: str):
        """M-step from ``ev``'s posteriors (an evaluation with ``want_post``), then the energy and gradient there.

        The deformation is not recomputed.
        """
        nonlocal n_grad
        em_update(ev.lvl, ev.extra)
        ev.refresh()
        g = ev.gradient()
        n_grad += 1
        if g is None:
            raise FloatingPointError(f"energy is not finite {when}")
        return ev.total, g, ev.parts, ev.extra

    n_threads = torch.get_num_threads()
    try:
        for li, kind, n_iter in stages:
            if li not in levels:
                levels.clear()
                levels[li] = make_level(scales[li])
            lvl = levels[li]
            small = lvl.target.data[0].size < SINGLE_THREAD_PIXELS
            torch.set_num_threads(1 if small and torch.device(device).type == "cpu" else n_threads)
            if colours is not None:
                m = lvl.mixture
                m.mu_b, m.mu_a, m.pi_in, m.pi_out, m.sigma = colours
            lvl.mixture.init_colours(lvl.border)
            mask = torch.zeros(n_x, dtype=torch.bool, device=device)
            if kind in ("affine", "joint"):
                mask[: prob.n_b] = True
            if kind in ("joint", "velocity"):
                mask[prob.n_b :] = True

            # prime the EM state at this level
            e, g, parts, extra = fresh_mixture(prob.evaluate(lvl, x, mask, want_post=True), "at the start of a level")
            n_eval += 1
            S, Y = [], []
            track = [extra["z_track"]]
            good = x.clone()
            fresh_em, n_steps = True, 0
            tol_move = tol * lvl.factor * dxI
            it = 0
            for it in range(1, n_iter + 1):
                if S:
                    d = _lbfgs_direction(g, S, Y)
                else:
                    # first step: move the fastest-changing parameter by a quarter of a level pixel
                    d = -g * (0.25 * lvl.factor * dxI / max(float(g.abs().max()), 1e-30))
                gd = float(torch.dot(g, d))
                if not gd < 0:
                    S, Y = [], []
                    d = -g * (0.25 * lvl.factor * dxI / max(float(g.abs().max()), 1e-30))
                    gd = float(torch.dot(g, d))
                t, accepted, non_finite = 1.0, False, 0
                for trial in range(_MAX_TRIALS):
                    xn = x + t * d
                    ev = None  # a rejected trial's graph goes before the next is built
                    ev = prob.evaluate(lvl, xn, mask, want_post=it % em_every == 0)
                    en = ev.total
                    n_eval += 1
                    if not ev.finite:
                        non_finite += 1
                        t *= 0.1
                        continue
                    if float(en) <= float(e) + 1e-4 * t * gd:
                        accepted = True
                        # the gradient of accepted trials only (kept for the mixture update that may follow)
                        gn, partsn, extran = ev.gradient(retain=it % em_every == 0), ev.parts, ev.extra
                        n_grad += 1
                        break
                    if trial == 2 and not fresh_em:
                        break  # three failed trials on a stale mixture: update it (below) and try again
                    if S and trial == 5:  # a poor quasi-Newton direction: restart from the scaled gradient
                        S, Y = [], []
                        d = -g * (0.25 * lvl.factor * dxI / max(float(g.abs().max()), 1e-30))
                        gd = float(torch.dot(g, d))
                        t = 1.0
                        continue
                    # minimiser of the quadratic through e, the slope and en, kept within [0.1 t, 0.5 t]
                    t_q = -gd * t * t / (2.0 * (float(en) - float(e) - gd * t))
                    t = min(max(t_q, 0.1 * t), 0.5 * t)
                if not accepted:
                    if non_finite:
                        raise FloatingPointError(f"energy became non-finite ({non_finite} trial steps)")
                    if not fresh_em:
                        # stalled on a stale mixture (colours, contrast weights): update it and go on, rather
                        # than spend evaluations on vanishing steps until the scheduled update
                        e, g, parts, extra = fresh_mixture(
                            prob.evaluate(lvl, x, mask, want_post=True), "after the mixture update"
                        )
                        n_eval += 1
                        S, Y = [], []
                        fresh_em = True
                        continue
                    reason = "no descent possible (stationary at this resolution)"
                    break
                fresh_em = False
                n_steps += 1
                s_vec, y_vec = xn - x, gn - g
                sy = float(torch.dot(s_vec, y_vec))
                if sy > 1e-10 * float(torch.dot(y_vec, y_vec)) and sy > 0:
                    S.append(s_vec)
                    Y.append(y_vec)
                    if len(S) > 10:
                        S.pop(0)
                        Y.pop(0)
                x, e, g, parts, extra = xn, en, gn, partsn, extran
                if not np.isfinite(extra["disp_max"]) or extra["disp_max"] > 20:  # in grid half-widths
                    raise FloatingPointError("deformation exploded")
                good = x.clone()
                track.append(extra["z_track"])
                records.append(
                    {
                        "level": li,
                        "scale": scales[li],
                        "stage": kind,
                        "iteration": len(records),
                        "total": float(e),
                        **{k: float(v) for k, v in parts.items()},
                        "step": t,
                        "trials": trial + 1,
                    }
                )
                bar.update(1)
                bar.set_postfix(level=f"{li}/{kind}", energy=f"{float(e):.4g}", refresh=False)  # at tqdm's own pace
                if it % em_every == 0:  # the accepted trial computed the posteriors
                    e, g, parts, extra = fresh_mixture(ev, "after the mixture update")
                    fresh_em = True
                if len(track) > window:
                    moved = float((track[-1] - track[-1 - window]).norm(dim=1).max())
                    track = track[-window - 1 :]
                    if it >= min_iter and moved < tol_move:
                        reason = (
                            f"converged: moved {moved:.3g} < {tol_move:.3g} {source_units} over the last "
                            f"{window} iterations"
                        )
                        break
            else:
                # the cap counts loop turns; "iterations" counts the steps taken, and a turn may refresh a stale
                # mixture instead of stepping
                refreshed = n_iter - n_steps
                spent = f": {n_steps} steps, {refreshed} mixture refreshes" if refreshed else ""
                reason = f"iteration cap ({n_iter}{spent})"
            bar.update(max(n_iter - it, 0))
            stage_log.append({"level": li, "scale": scales[li], "stage": kind, "iterations": n_steps, "reason": reason,
                              "converged": reason.startswith(("converged", "no descent"))})  # fmt: skip
            m = lvl.mixture
            colours = (m.mu_b, m.mu_a, m.pi_in, m.pi_out, list(m.sigma))
    except FloatingPointError as err:
        diverged = True
        warnings.warn(
            f"LDDMM diverged ({err}); returning the last good state. Try a smaller sigma_r or a larger a "
            "(sdata.align.lddmm(..., sigma_r=..., a=...)); from the command line, a finer --dx.",
            RegistrationDivergedWarning,
            stacklevel=2,
        )
        if good is not None:
            x = good
    finally:
        bar.close()
        torch.set_num_threads(n_threads)
    if lvl is not None:
        extra = prob.evaluate(lvl, x, None, want_post=True).extra
        if extra["post"] is not None and bool(torch.isfinite(extra["post"]).all()):
            post_final = (lvl, extra["post"])

    with torch.no_grad():
        b, w = prob.unpack(x)
        A = prob.affine(b).double().cpu().numpy()
        v = prob.velocity(w).double().cpu().numpy()
    match_weight = None
    if post_final is not None and post_final[1] is not None:
        lvl, post = post_final
        mw = post[0].reshape(lvl.target.data.shape[1:]).double().cpu().numpy()
        match_weight = xr.DataArray(
            mw, dims=("y", "x"), coords={"y": lvl.target.y, "x": lvl.target.x}, name="match_weight"
        )
    params = {
        "a": a,
        "kernel_scales": list(kernel_scales),
        "kernel_weights": list(kernel_weights),
        "p": p,
        "nt": nt,
        "dv": dv,
        "sigma_m": sigma_m,
        "sigma_b": sigma_b,
        "sigma_a": None if lvl is None else float(lvl.mixture.sigma[2]),
        "sigma_r": sigma_r,
        "sigma_p": sigma_p,
        "sigma_affine": sigma_affine,
        "contrast_degree": contrast_degree,
        "background": background,
        "artifact": artifact,
        "update_priors": update_priors,
        "prior_in": list(prior_in),
        "prior_out": list(prior_out),
        "tissue_level": tissue_level,
        "scales": list(scales),
        "max_iter": list(max_iter),
        "affine_iter": affine_iter,
        "optimize_affine": optimize_affine,
        "tol": tol,
        "window": window,
        "min_iter": min_iter,
        "em_every": em_every,
        "target_pixel": target_pixel,
        "target_blur": float(target_blur),
        "field_of_view": None if fov_box is None else [b if np.isfinite(b) else None for b in fov_box],
        "source_pixel": dxI,
        "source_channels": int(I_img.data.shape[0]),
        "target_channels": int(J_img.data.shape[0]),
        "spot_features": 0 if prob.spots is None else int(prob.spots.term.G),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
        "initial_affine": A0.tolist(),
        "n_landmarks": 0 if lm_src is None else int(lm_src.shape[0]),
        "diverged": diverged,
        "levels": stage_log,
        "evaluations": n_eval,
        "gradients": n_grad,
        "runtime_s": time.perf_counter() - t_start,
        "source_intensity_scale": [float(s) for s in scale_i],
    }
    contrast = {}
    if lvl is not None and lvl.mixture.theta is not None:
        contrast = {
            "theta": lvl.mixture.theta.double().cpu().numpy(),
            "mu_background": lvl.mixture.mu_b.double().cpu().numpy(),
            "mu_artifact": lvl.mixture.mu_a.double().cpu().numpy(),
            "priors_in": lvl.mixture.pi_in.cpu().numpy(),
            "priors_out": lvl.mixture.pi_out.cpu().numpy(),
        }
        if prob.spots is not None:
            term = prob.spots.term
            contrast["spot_sigma"] = term.sigma.double().cpu().numpy()
            if term.calib is not None:
                contrast["spot_gain"] = term.calib[0].double().cpu().numpy()
    return Registration(
        affine=A,
        velocity_values=v,
        xv=prob.xv,
        yv=prob.yv,
        energy=pd.DataFrame.from_records(records),
        match_weight=match_weight,
        params=params,
        source_units=source_units,
        target_units=target_units,
        source_extent=I_img.extent,
        target_extent=target_extent,
        contrast=contrast,
    )
