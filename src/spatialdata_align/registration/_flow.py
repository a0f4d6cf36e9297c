"""The deformation model shared by the optimiser and the result object.

A registration maps source points ``x`` to target points ``A @ phi(x)`` where ``phi`` is the flow of
a time-dependent velocity field ``v_t`` (``t = 0..nt-1``) sampled on a regular grid in source units,
integrated with ``nt`` explicit Euler steps ``S_t(x) = x + v_t(x) / nt``. The inverse of each step
is solved by fixed-point iteration ``u <- z - v_t(u) / nt`` (a contraction while the step is a
diffeomorphism), so forward and inverse are consistent to numerical precision. Velocity fields
are extended beyond their grid by their edge values ("border" extrapolation), never by zeros.

The Sobolev operator ``L = (Id - a^2 Laplacian)^p`` is diagonal in the Fourier domain of the
(periodic) velocity grid, with the discrete Laplacian's symbol.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn.functional import grid_sample

from ._utils import interp


def good_fft_size(n: int) -> int:
    """Smallest ``m >= n`` whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = max(int(n), 1)
    while True:
        k = m
        for f in (2, 3, 5):
            while k % f == 0:
                k //= f
        if k == 1:
            return m
        m += 1


def _laplacian_symbol(ny: int, nx: int, dv: float, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    ky = torch.fft.fftfreq(ny, dtype=dtype, device=device)
    kx = torch.fft.rfftfreq(nx, dtype=dtype, device=device)
    return (
        (2.0 - 2.0 * torch.cos(2.0 * math.pi * ky))[:, None] + (2.0 - 2.0 * torch.cos(2.0 * math.pi * kx))[None, :]
    ) / (dv**2)


def sobolev_symbol(
    ny: int, nx: int, dv: float, a: float, p: float, *, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """Fourier symbol of ``L = (Id - a^2 Δ)^p`` on an ``(ny, nx)`` grid of spacing ``dv`` (rfft layout)."""
    return (1.0 + a**2 * _laplacian_symbol(ny, nx, dv, dtype=dtype, device=device)) ** p


def apply_symbol(field: torch.Tensor, symbol: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Multiply a real field's last two axes by ``symbol**power`` in the Fourier domain."""
    ny, nx = field.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(field) * symbol**power, s=(ny, nx))


def flow_forward(pts: torch.Tensor, v: torch.Tensor, xv: np.ndarray, yv: np.ndarray) -> torch.Tensor:
    """Push ``(N, 2)`` points through the flow: ``x <- x + v_t(x) / nt`` for ``t = 0..nt-1``."""
    nt = v.shape[0]
    for t in range(nt):
        pts = pts + interp(v[t], xv, yv, pts, padding="border").T / nt
    return pts


def flow_inverse(
    pts: torch.Tensor,
    v: torch.Tensor,
    xv: np.ndarray,
    yv: np.ndarray,
    *,
    tol: float = 1e-10,
    max_fixed_point: int = 100,
) -> torch.Tensor:
    """Pull ``(N, 2)`` points back through the flow (the inverse of :func:`flow_forward`).

    Each Euler step ``z = u + v_t(u) / nt`` is inverted by fixed-point iteration started at
    ``u = z - v_t(z) / nt``, continued (up to ``max_fixed_point`` times) until the largest update is
    below ``tol`` (source units).
    """
    nt = v.shape[0]
    for t in range(nt - 1, -1, -1):
        z = pts
        u = z - interp(v[t], xv, yv, z, padding="border").T / nt
        for _ in range(max_fixed_point):
            u_new = z - interp(v[t], xv, yv, u, padding="border").T / nt
            step = (u_new - u).abs().max() if u.numel() else torch.zeros(())
            u = u_new
            if step <= tol:
                break
        pts = u
    return pts


def sample_grid(field: torch.Tensor, grid: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Bilinearly sample ``field`` (``(C, ny, nx)``) at normalised positions ``grid`` (``(H, W, 2)``).

    Positions are grid_sample's ``[-1, 1]`` coordinates with ``align_corners=True``; returns ``(C, H, W)``.
    """
    return grid_sample(field[None], grid[None], mode="bilinear", padding_mode=padding, align_corners=True)[0]


def inverse_displacement_normalised(vn: torch.Tensor, nodes: torch.Tensor, *, n_fixed_point: int = 1) -> torch.Tensor:
    """:func:`inverse_displacement` in the grid's normalised coordinates (the optimiser's hot path).

    ``vn`` is the velocity ``(nt, 2, ny, nx)`` in normalised units per unit time and ``nodes`` the ``(ny, nx, 2)``
    normalised node positions; returns the ``(2, ny, nx)`` displacement in normalised units.
    """
    nt = vn.shape[0]
    disp = None
    for t in range(nt):
        step = vn[t] / nt  # (2, ny, nx): the velocity at the nodes needs no interpolation
        u = nodes - step.permute(1, 2, 0)
        for _ in range(n_fixed_point):
            u = nodes - sample_grid(step, u).permute(1, 2, 0)
        d_u = (u - nodes).permute(2, 0, 1)
        disp = d_u if disp is None else d_u + sample_grid(disp, u)
    return disp


def grid_normaliser(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``s`` and offset ``o`` (both ``(2,)``) with ``s * p + o`` = grid_sample's coordinates of point ``p``."""
    s = np.array([2.0 / (x[-1] - x[0]) if x[-1] != x[0] else 0.0, 2.0 / (y[-1] - y[0]) if y[-1] != y[0] else 0.0])
    o = -1.0 - s * np.array([x[0], y[0]])
    return s, o


def inverse_displacement(v: torch.Tensor, xv: np.ndarray, yv: np.ndarray, *, n_fixed_point: int = 1) -> torch.Tensor:
    """Displacement ``phi^{-1}(z) - z`` of the inverse flow, sampled on the velocity grid itself.

    The inverse map is built by composition on the grid (semi-Lagrangian):
    ``N_t(z) = N_{t-1}(S_t^{-1}(z))`` with ``N_{-1} = Id``, where the inverse Euler step
    ``S_t^{-1}(z)`` is the fixed point of ``u = z - v_t(u) / nt`` (``n_fixed_point`` refinements of the
    first-order guess). Every interpolation is on the velocity grid (``ny * nx`` nodes), so evaluating
    ``phi^{-1}`` at many image pixels costs a single interpolation of the returned ``(2, ny, nx)``
    field (border-extrapolated) instead of ``nt`` interpolations per pixel.
    """
    s, o = grid_normaliser(xv, yv)
    st = torch.as_tensor(s, dtype=v.dtype, device=v.device)
    gx, gy = torch.meshgrid(
        torch.as_tensor(xv, dtype=v.dtype, device=v.device),
        torch.as_tensor(yv, dtype=v.dtype, device=v.device),
        indexing="xy",
    )
    nodes = torch.stack((gx * float(s[0]) + float(o[0]), gy * float(s[1]) + float(o[1])), -1)
    d = inverse_displacement_normalised(v * st[:, None, None], nodes, n_fixed_point=n_fixed_point)
    return d / st[:, None, None]


def affine_torch(matrix: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply a ``(3, 3)`` homogeneous affine to ``(N, 2)`` points."""
    return pts @ matrix[:2, :2].T + matrix[:2, 2]
