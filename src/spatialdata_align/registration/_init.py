"""Automatic affine initialisation without landmarks.

The tissue in each image is segmented (source: density above a fraction of its high quantile;
target: distance from the background colour, estimated on the image border, above an Otsu
threshold). Centroids and second moments give the translation and a scale; a brute-force search
over rotations (and a reflection) scores every candidate by normalised cross-correlation of the
blurred tissue masks in one batched resampling; the best candidates are refined to a full affine by
maximising the correlation of masks and intensities with L-BFGS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter
from torch.nn.functional import grid_sample

from ._landmarks import decompose_affine
from ._utils import Image, as_image, normalised_grid


@dataclass
class InitResult:
    """Result of :func:`auto_init`.

    Attributes
    ----------
    matrix
        ``(3, 3)`` source→target affine.
    score
        Normalised cross-correlation (in ``[-1, 1]``) of the aligned tissue masks and intensities.
    rotation_deg, reflection, scale
        Decomposition of ``matrix`` (see :func:`~spatialdata_align.registration.decompose_affine`).
    candidates
        The coarse search: one row per (reflection, angle) with its score.
    """

    matrix: np.ndarray
    score: float
    rotation_deg: float
    reflection: bool
    scale: float
    candidates: pd.DataFrame = field(repr=False)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[np.argmax(between)])


def _border_median(data: np.ndarray) -> np.ndarray:
    _, ny, nx = data.shape
    k = max(1, min(ny, nx) // 20)
    mask = np.zeros((ny, nx), bool)
    mask[:k] = mask[-k:] = True
    mask[:, :k] = mask[:, -k:] = True
    return np.median(data[:, mask], axis=1)


def foreground(img: Image, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(intensity, mask)`` images in ``[0, 1]`` describing where tissue is.

    ``kind="source"``: density-like image (tissue = high values). ``kind="target"``: stained image
    on a background (tissue = far from the border colour).
    """
    if kind == "source":
        inten = img.data.sum(axis=0)
    else:
        bg = _border_median(img.data)
        inten = np.sqrt(((img.data - bg[:, None, None]) ** 2).sum(axis=0))
    hi = float(np.quantile(inten, 0.99))
    if not hi > 0:
        raise ValueError(f"{kind} image has no foreground (zero variance); cannot initialise.")
    inten = np.clip(inten / hi, 0, 1)
    thr = 0.1 if kind == "source" else _otsu(inten)
    sm = gaussian_filter(inten, 1.0)
    mask = (sm > thr).astype(float)
    return inten, mask


def _coarsen(img: Image, resolution: int) -> Image:
    f = max(1, int(np.ceil(max(img.data.shape[1:]) / resolution)))
    return img.downsample(f)


def _moments(mask: np.ndarray, x: np.ndarray, y: np.ndarray):
    gx, gy = np.meshgrid(x, y)
    m = mask.sum()
    if m <= 0:
        raise ValueError("empty tissue mask; cannot initialise.")
    c = np.array([(mask * gx).sum() / m, (mask * gy).sum() / m])
    dxx = ((gx - c[0]) ** 2 * mask).sum() / m
    dyy = ((gy - c[1]) ** 2 * mask).sum() / m
    dxy = ((gx - c[0]) * (gy - c[1]) * mask).sum() / m
    return c, np.array([[dxx, dxy], [dxy, dyy]])


def _similarity(c_src, c_dst, scale, angle_rad, flip) -> np.ndarray:
    r = np.array([[np.cos(angle_rad), -np.sin(angle_rad)], [np.sin(angle_rad), np.cos(angle_rad)]])
    f = np.diag([-1.0, 1.0]) if flip else np.eye(2)
    lin = scale * r @ f
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = c_dst - lin @ c_src
    return m


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation along the last axis (batched)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-12)


class _Warper:
    def __init__(self, src: Image, feats: np.ndarray, tgt: Image):
        self.feats = torch.as_tensor(feats, dtype=torch.float64)  # (C, ny, nx)
        self.src = src
        gx, gy = np.meshgrid(tgt.x, tgt.y)
        self.pts = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float64)

    def sample(self, inv: torch.Tensor) -> torch.Tensor:
        """Sample source features at target points pulled back by ``inv`` ``(K, 3, 3)``: ``(K, C, N)``."""
        z = torch.einsum("kij,nj->kni", inv[:, :2, :2], self.pts) + inv[:, None, :2, 2]
        x, y = self.src.x, self.src.y
        g = normalised_grid(z, float(x[0]), float(x[-1]), float(y[0]), float(y[-1]))
        k = inv.shape[0]
        feats = self.feats[None].expand(k, -1, -1, -1)
        out = grid_sample(feats, g[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[:, :, 0, :]


def auto_init(
    source,
    target,
    *,
    angle_step: float = 5.0,
    reflection: bool | None = None,
    resolution: int = 96,
    n_refine: int = 4,
    refine_iter: int = 60,
) -> InitResult:
    """Find a source→target affine without landmarks.

    Parameters
    ----------
    source
        Source image (e.g. rasterised cell density), DataArray ``(c, y, x)`` with physical
        coordinates or array.
    target
        Target image (e.g. RGB H&E on a light background), same conventions.
    angle_step
        Rotation search step (degrees).
    reflection
        ``None`` searches both mirror states, ``False`` only proper rotations, ``True`` only
        reflected ones.
    resolution
        Longest side (pixels) of the images used for the search.
    n_refine
        Number of best coarse candidates refined to a full affine.
    refine_iter
        L-BFGS iterations per refinement.

    Returns
    -------
    :class:`InitResult`.
    """
    I_full = as_image(source, name="source")
    J_full = as_image(target, name="target")
    # work at a coarse, blurred resolution
    I = _coarsen(I_full, resolution)
    J = _coarsen(J_full, resolution)
    i_int, i_mask = foreground(I, "source")
    j_int, j_mask = foreground(J, "target")
    c_i, cov_i = _moments(i_mask, I.x, I.y)
    c_j, cov_j = _moments(j_mask, J.x, J.y)
    scale = (np.linalg.det(cov_j) / np.linalg.det(cov_i)) ** 0.25
    i_feat = np.stack([gaussian_filter(i_mask, 1.5), gaussian_filter(i_int, 1.0)])
    j_feat = torch.as_tensor(
        np.stack([gaussian_filter(j_mask, 1.5), gaussian_filter(j_int, 1.0)]).reshape(2, -1), dtype=torch.float64
    )
    warper = _Warper(I, i_feat, J)

    flips = [False, True] if reflection is None else [bool(reflection)]
    angles = np.arange(0.0, 360.0, angle_step)
    cands = [(f, ang, _similarity(c_i, c_j, scale, np.radians(ang), f)) for f in flips for ang in angles]
    inv = torch.as_tensor(np.stack([np.linalg.inv(m) for _, _, m in cands]), dtype=torch.float64)
    with torch.no_grad():
        scores = []
        for s in range(0, inv.shape[0], 64):
            w = warper.sample(inv[s : s + 64])
            scores.append(_ncc(w[:, 0], j_feat[0][None]))
        score = torch.cat(scores).numpy()
    table = pd.DataFrame({"reflection": [c[0] for c in cands], "angle_deg": [c[1] for c in cands], "score": score})

    # refine the best few (distinct) candidates to full affines
    order = np.argsort(-score)
    picked: list[int] = []
    for idx in order:
        if all(cands[idx][0] != cands[j][0] or _angdist(cands[idx][1], cands[j][1]) > 3 * angle_step for j in picked):
            picked.append(int(idx))
        if len(picked) >= n_refine:
            break
    best = None
    for idx in picked:
        m, sc = _refine(warper, j_feat, cands[idx][2], I, refine_iter)
        if best is None or sc > best[1]:
            best = (m, sc)
    matrix, sc = best
    dec = decompose_affine(matrix)
    return InitResult(
        matrix=matrix,
        score=float(sc),
        rotation_deg=dec["rotation_deg"],
        reflection=dec["reflection"],
        scale=dec["scale"],
        candidates=table,
    )


def _angdist(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def _refine(warper: _Warper, j_feat: torch.Tensor, m0: np.ndarray, I: Image, n_iter: int):
    """Maximise the mean NCC of mask and intensity features over a full affine (normalised params)."""
    xmin, xmax, ymin, ymax = I.extent
    c = np.array([(xmin + xmax) / 2, (ymin + ymax) / 2])
    s = max(xmax - xmin, ymax - ymin) / 2
    norm = np.eye(3)
    norm[:2, :2] /= s
    norm[:2, 2] = -c / s
    # A = m0 @ N^-1 @ (I + P) @ N, P small: perturbation in normalised source coordinates
    m0_t = torch.as_tensor(m0 @ np.linalg.inv(norm), dtype=torch.float64)
    n_t = torch.as_tensor(norm, dtype=torch.float64)
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], lr=1, max_iter=n_iter, line_search_fn="strong_wolfe")

    def matrix(pp):
        pert = torch.eye(3, dtype=torch.float64) + torch.cat([pp.reshape(2, 3), torch.zeros(1, 3, dtype=torch.float64)])
        return m0_t @ pert @ n_t

    def loss_fn():
        opt.zero_grad()
        a = matrix(p)
        w = warper.sample(torch.linalg.inv(a)[None])[0]
        loss = -_ncc(w, j_feat).mean()
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        a = matrix(p)
        final = float(_ncc(warper.sample(torch.linalg.inv(a)[None])[0], j_feat).mean())
    return a.detach().numpy(), final
