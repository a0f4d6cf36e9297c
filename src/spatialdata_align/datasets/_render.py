"""Rendering of the Visium section's H&E image from the ground-truth tissue.

Colours follow a Beer-Lambert stain model: each pixel's optical density is a hematoxylin amount
(nuclei of the section's own cells, plus a little diffuse basophilia in nests and aggregates)
times a purple stain vector plus an eosin amount (tissue, strongest in stroma) times a pink one;
glass is near white. So dense nests and aggregates come out darker purple, stroma pink and sparse,
background white, which is what the cell density of the other section reflects too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage
from scipy.ndimage import gaussian_filter, map_coordinates

from ._tissue import CELL_TYPES, EDGE_SOFTNESS_UM, TissueModel
from ._truth import Truth

#: optical-density vectors (R, G, B) of the stains, unit length
HEMATOXYLIN_OD = np.array([0.55, 0.77, 0.32]) / np.linalg.norm([0.55, 0.77, 0.32])
EOSIN_OD = np.array([0.13, 0.86, 0.50]) / np.linalg.norm([0.13, 0.86, 0.50])
GLASS_RGB = np.array([0.965, 0.962, 0.958])
#: nucleus radius (µm) per cell type
NUCLEUS_RADIUS_UM = {
    "tumour": 5.0,
    "luminal": 4.5,
    "myoepithelial": 4.0,
    "fibroblast": 3.5,
    "endothelial": 3.5,
    "t_cell": 3.2,
    "b_cell": 3.2,
    "macrophage": 4.2,
}
#: (eosin, diffuse hematoxylin) amounts per region
_REGION_STAIN = {"nest": (0.17, 0.22), "duct": (0.16, 0.18), "immune": (0.12, 0.30), "stroma": (0.24, 0.03)}


def pulled_back_grid(truth: Truth, shape: tuple[int, int], scalef: float, step: int = 16) -> tuple[np.ndarray, ...]:
    """Xenium-frame coordinates (µm) of every pixel centre of an image at ``scalef`` (image px per full-res px).

    The exact inverse is computed on a coarse grid of pixels (every ``step``) and interpolated
    bilinearly (the map is affine plus a displacement smooth over hundreds of µm, so the error is
    far below a pixel).
    """
    h, w = shape
    ic = np.arange(0, h + step, step, dtype=float)
    jc = np.arange(0, w + step, step, dtype=float)
    J, I = np.meshgrid(jc, ic)
    px = np.column_stack([(J.ravel() + 0.5) / scalef, (I.ravel() + 0.5) / scalef])
    xy = truth.inverse(px)
    U = xy[:, 0].reshape(I.shape)
    V = xy[:, 1].reshape(I.shape)
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float32) / step, np.arange(w, dtype=np.float32) / step, indexing="ij")
    coords = np.stack([ii, jj])
    return map_coordinates(U, coords, order=1), map_coordinates(V, coords, order=1)


def render_he(
    tissue: TissueModel,
    truth: Truth,
    shape: tuple[int, int],
    scalef: float,
    cells_xy_um: np.ndarray,
    cell_types: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render the H&E image of the Visium section.

    Parameters
    ----------
    tissue, truth
        Ground truth (the image shows the ``"visium"`` section).
    shape
        ``(height, width)`` of the image in its own pixels.
    scalef
        Image pixels per full-resolution pixel (e.g. ``tissue_hires_scalef``).
    cells_xy_um, cell_types
        The Visium section's cells (Xenium frame, µm) and their type codes; drawn as nuclei.
    rng
        Random generator (noise, texture).

    Returns
    -------
    ``uint8`` array ``(height, width, 3)``.
    """
    h, w = shape
    U, V = pulled_back_grid(truth, shape, scalef)
    flat = np.column_stack([U.ravel(), V.ravel()])
    # the section outline's signed distance is smooth: evaluate it on every other pixel, interpolate
    sd2 = tissue.section_signed_distance(np.stack([U[::2, ::2], V[::2, ::2]], axis=-1), "visium")
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float32) / 2, np.arange(w, dtype=np.float32) / 2, indexing="ij")
    sd = map_coordinates(sd2, np.stack([ii, jj]), order=1, mode="nearest")
    tis = (0.5 * (1.0 + np.tanh(0.5 * sd / EDGE_SOFTNESS_UM))).astype(np.float32).ravel()
    on = np.flatnonzero(tis > 1e-3)
    eosin = np.zeros(h * w, np.float32)
    hema = np.zeros(h * w, np.float32)
    if on.size:
        reg = tissue.regions(flat[on])
        for r, (e, hd) in _REGION_STAIN.items():
            eosin[on] += e * reg[r]
            hema[on] += hd * reg[r]
    eosin *= tis
    hema *= tis
    eosin = eosin.reshape(h, w)
    hema = hema.reshape(h, w)

    # nuclei: mass-conserving splat of each nucleus' area (in image px²), blurred to a small blob
    um_per_img_px = truth.um_per_px / scalef
    nuclei = np.zeros((h, w), np.float64)
    if len(cells_xy_um):
        p = truth.forward(cells_xy_um) * scalef - 0.5  # continuous pixel index (centre convention)
        radius = np.array([NUCLEUS_RADIUS_UM[t] for t in CELL_TYPES])[cell_types]
        mass = np.pi * radius**2 / um_per_img_px**2
        fx, fy = p[:, 0], p[:, 1]
        ok = (fx >= 0) & (fx < w - 1) & (fy >= 0) & (fy < h - 1)
        fx, fy, mass = fx[ok], fy[ok], mass[ok]
        j0, i0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        tx, ty = fx - j0, fy - i0
        for di, wy in ((0, 1 - ty), (1, ty)):
            for dj, wx in ((0, 1 - tx), (1, tx)):
                np.add.at(nuclei, (i0 + di, j0 + dj), mass * wy * wx)
        sigma = max(3.0 / um_per_img_px, 0.6)
        nuclei = gaussian_filter(nuclei, sigma)
    hema += 0.85 * np.clip(nuclei, 0.0, 1.3).astype(np.float32)

    # texture: smooth multiplicative variation of the stains, then pixel noise
    tex = gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 2.0)
    tex /= max(float(tex.std()), 1e-6)
    eosin *= 1.0 + 0.18 * tex
    hema *= 1.0 + 0.08 * tex
    od = hema[..., None] * HEMATOXYLIN_OD.astype(np.float32) + eosin[..., None] * EOSIN_OD.astype(np.float32)
    rgb = GLASS_RGB.astype(np.float32) * np.power(np.float32(10.0), -od)
    rgb = rgb * 255.0 + rng.normal(0.0, 2.0, size=rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def downscale(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 image to ``shape`` (area averaging), as Space Ranger's lowres image."""
    h, w = shape
    return np.asarray(PILImage.fromarray(image).resize((w, h), resample=PILImage.BOX), dtype=np.uint8)
