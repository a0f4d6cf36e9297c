"""Automatic affine initialisation without landmarks.

The tissue in each image is segmented (source: density above a fraction of its high quantile;
target: distance from the background colour, estimated on the image border, above an Otsu
threshold). Centroids and second moments give the translation and a scale; a brute-force search
over rotations (and a reflection) scores every candidate by normalised cross-correlation of the
blurred tissue masks in one batched resampling; the best candidates are refined to a full affine by
maximising the correlation of masks and intensities with L-BFGS.

Given shared-gene expression on both sides (the target's spots and a source feature image), the refined
candidates are chosen on the image score plus the expression agreement at the spots (:class:`_SpotAgreement`):
the outline and density of a section often fit two orientations about equally, the expression of the genes
both platforms measured rarely does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter
from torch.nn.functional import grid_sample

from ._landmarks import decompose_affine
from ._utils import Image, as_image, check_spot_inputs, interp, normalised_grid

#: weight of the shared-gene agreement (mean Pearson r of the expression components at the target spots) against
#: the image score when :func:`auto_init` chooses among its refined candidates. Chosen on the 31 cached corpus pairs
#: and checked on 24 pairs of seeds 3-4 (``docs/accuracy.md``, "Without landmarks")
EXPRESSION_WEIGHT = 2.0
#: fewest target spots whose pulled-back position lands on source tissue for the agreement to count
_MIN_SPOTS = 10


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
    margin
        How much better the chosen affine scores than the best refined alternative of another orientation (the
        other mirror state, or a rotation more than 20° away); ``nan`` when none was refined. A margin near 0 means
        the tissue outlines and densities cannot tell the orientations apart (e.g. a symmetric section): place a few
        landmarks.
    coarse_margin
        The same in the coarse search (``candidates``): the best score of the chosen orientation (within 20°, same
        mirror state) minus the best of any other; ``nan`` when the search has no other. It catches a confident
        ``margin`` whose competitors were all of one wrong orientation, so the right one was never refined; it is
        negative when the chosen affine came from the whole-tissue search rather than this one.
    expression_r
        With shared-gene expression given: the chosen affine's agreement with it (mean Pearson r over the
        expression components, at the target spots that land on source tissue); ``nan`` without. The choice and
        ``margin`` then use ``score + EXPRESSION_WEIGHT * expression_r``.
    """

    matrix: np.ndarray
    score: float
    rotation_deg: float
    reflection: bool
    scale: float
    candidates: pd.DataFrame = field(repr=False)
    margin: float = float("nan")
    coarse_margin: float = float("nan")
    expression_r: float = float("nan")


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
    resolution: int | None = None,
    n_refine: int = 4,
    refine_iter: int = 60,
    scale: float | None = None,
    target_spots=None,
    spot_values=None,
    source_features=None,
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
        Longest side (pixels) of the images used for the search (default 96, or 160 with a known ``scale``).
    n_refine
        Number of best coarse candidates refined to a full affine.
    refine_iter
        L-BFGS iterations per refinement.
    scale
        Known scale (target units per source unit, e.g. Visium full-resolution pixels per µm from the scale
        factors). When given, the search allows partial overlap: the source may cover only part of the target
        tissue (a Xenium region inside a larger section). Each rotation's translation is the best of all shifts
        (one FFT cross-correlation), scored by how much of the source lands on target tissue and how the
        intensities correlate there; the refinement keeps that score, in the source frame, with the scale held
        near ``scale``. Without it, scale and translation come from the tissue masks' moments and the masks are
        matched whole (the two sections show the same tissue).
    target_spots, spot_values, source_features
        Optional shared-gene expression, as for the spot term of
        :func:`~spatialdata_align.registration.lddmm` (e.g. from
        :func:`~spatialdata_align.registration.expression_features`): ``(S, 2)`` spot positions ``(x, y)``
        (target units), ``(S, k)`` values there and a ``(k, y, x)`` source feature image. The refined candidates
        are then chosen on ``score + EXPRESSION_WEIGHT * r``, ``r`` the mean Pearson correlation of the
        features pulled back from the spots with the spot values; with a known ``scale`` every refined candidate
        of the whole-tissue search competes, not only its best.

    Returns
    -------
    :class:`InitResult`.
    """
    I_full = as_image(source, name="source")
    J_full = as_image(target, name="target")
    agree = _SpotAgreement.from_inputs(target_spots, spot_values, source_features)
    # work at a coarse, blurred resolution
    if resolution is None:
        resolution = 96 if scale is None else 160
    I = _coarsen(I_full, resolution)
    J = _coarsen(J_full, resolution)
    i_int, i_mask = foreground(I, "source")
    j_int, j_mask = foreground(J, "target")
    c_i, cov_i = _moments(i_mask, I.x, I.y)
    c_j, cov_j = _moments(j_mask, J.x, J.y)
    i_feat = np.stack([gaussian_filter(i_mask, 1.5), gaussian_filter(i_int, 1.0)])
    j_feat = torch.as_tensor(
        np.stack([gaussian_filter(j_mask, 1.5), gaussian_filter(j_int, 1.0)]).reshape(2, -1), dtype=torch.float64
    )
    warper = _Warper(I, i_feat, J)

    flips = [False, True] if reflection is None else [bool(reflection)]
    angles = np.arange(0.0, 360.0, angle_step)
    if scale is not None:
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number (target units per source unit), got {scale!r}.")
        # the whole-tissue search's answer competes too (it wins where the target's tissue mask is poor, e.g. fat);
        # with expression to judge by, every one of its refined candidates
        refined, _ = _whole_tissue(I, J, warper, j_feat, (c_i, cov_i), (c_j, cov_j), flips, angles, angle_step,
                                   n_refine, refine_iter)  # fmt: skip
        extra = [m for m, _ in refined] if agree is not None else [max(refined, key=lambda r: r[1])[0]]
        return _partial_overlap_init(I, J, (i_int, i_mask), j_mask, float(scale), flips, angles, n_refine,
                                     refine_iter, angle_step, extra=extra, agree=agree)  # fmt: skip
    refined, table = _whole_tissue(I, J, warper, j_feat, (c_i, cov_i), (c_j, cov_j), flips, angles, angle_step,
                                   n_refine, refine_iter)  # fmt: skip
    return _result(refined, table, agree)


def _whole_tissue(I, J, warper, j_feat, mom_i, mom_j, flips, angles, angle_step, n_refine, refine_iter):
    """The whole-tissue search: the refined ``(matrix, score)`` of the best distinct orientations and the table."""
    (c_i, cov_i), (c_j, cov_j) = mom_i, mom_j
    scale = (np.linalg.det(cov_j) / np.linalg.det(cov_i)) ** 0.25
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
    picked = _distinct_best(cands, score, angle_step, n_refine)
    return [_refine(warper, j_feat, cands[idx][2], I, refine_iter) for idx in picked], table


def _angdist(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def _distinct_best(cands, score, angle_step: float, n: int) -> list[int]:
    """Indices of the ``n`` best-scoring candidates, skipping any within 3 angle steps of a better one (same mirror)."""
    picked: list[int] = []
    for idx in np.argsort(-np.asarray(score)):
        if all(cands[idx][0] != cands[j][0] or _angdist(cands[idx][1], cands[j][1]) > 3 * angle_step for j in picked):
            picked.append(int(idx))
        if len(picked) >= n:
            break
    return picked


def _result(refined: list[tuple[np.ndarray, float]], table: pd.DataFrame, agree=None) -> InitResult:
    """The best refined ``(matrix, score)``, with its margin over the best one of another orientation.

    With ``agree`` (a :class:`_SpotAgreement`) "best" and the margin are on ``score + EXPRESSION_WEIGHT * r``.
    """
    expr = [agree(m) for m, _ in refined] if agree is not None else [0.0] * len(refined)
    total = [s_ + EXPRESSION_WEIGHT * r for (_, s_), r in zip(refined, expr, strict=True)]
    best = int(np.argmax(total))
    matrix, sc = refined[best]
    dec = decompose_affine(matrix)
    others = []
    for (m, _), t in zip(refined, total, strict=True):
        o = decompose_affine(m)
        if o["reflection"] != dec["reflection"] or _angdist(o["rotation_deg"], dec["rotation_deg"]) > 20:
            others.append(t)
    return InitResult(
        matrix=matrix,
        score=float(sc),
        rotation_deg=dec["rotation_deg"],
        reflection=dec["reflection"],
        scale=dec["scale"],
        candidates=table,
        margin=float(total[best] - max(others)) if others else float("nan"),
        coarse_margin=_coarse_margin(table, dec["reflection"], dec["rotation_deg"]),
        expression_r=float(expr[best]) if agree is not None else float("nan"),
    )


class _SpotAgreement:
    """How well an affine carries the source's expression features onto the target spots' values.

    For a candidate ``m`` (source -> target), each spot is pulled back to the source (``m^-1``) and the feature
    image sampled there (bilinear, 0 off the grid); over the spots that land on source tissue (a non-zero feature)
    the agreement is the mean, over features, of the Pearson correlation between those samples and the spot
    values. Fewer than :data:`_MIN_SPOTS` such spots, or a constant feature, count as no agreement (0).
    """

    def __init__(self, spots: np.ndarray, values: np.ndarray, features: Image):
        self.q, self.v, self.f = spots, values, features
        self._data = torch.as_tensor(features.data, dtype=torch.float64)  # sampled once per refined candidate

    @classmethod
    def from_inputs(cls, target_spots, spot_values, source_features) -> _SpotAgreement | None:
        given = check_spot_inputs(target_spots, spot_values, source_features, "the expression agreement")
        return None if given is None else cls(*given)

    def __call__(self, m: np.ndarray) -> float:
        mi = np.linalg.inv(np.asarray(m, dtype=np.float64))
        z = self.q @ mi[:2, :2].T + mi[:2, 2]
        f = self.f
        vals = interp(self._data, f.x, f.y, torch.as_tensor(z, dtype=torch.float64), padding="zeros").numpy().T
        on = np.abs(vals).sum(1) > 0
        if on.sum() < _MIN_SPOTS:
            return 0.0
        a, b = vals[on] - vals[on].mean(0), self.v[on] - self.v[on].mean(0)
        den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
        r = np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), 0.0)
        return float(r.mean())


def _coarse_margin(table: pd.DataFrame, reflection: bool, rotation_deg: float) -> float:
    """Best coarse score of the orientation ``(reflection, rotation_deg)`` minus the best of any other."""
    if not len(table):
        return float("nan")
    near = np.array([_angdist(float(a), rotation_deg) <= 20 for a in table["angle_deg"]])
    same = (table["reflection"].to_numpy() == reflection) & near
    if not same.any() or same.all():
        return float("nan")
    score = table["score"].to_numpy(dtype=float)
    return float(score[same].max() - score[~same].max())


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


# ---------------------------------------------------------------------------------------------- partial overlap
#: weight of the intensity correlation against the tissue-containment score
_INTENSITY_WEIGHT = 1.0
#: standard deviation of log(scale / known scale) allowed by the refinement
_LOG_SCALE_SD = 0.1


def _partial_overlap_init(I, J, i_feats, j_mask, scale, flips, angles, n_refine, refine_iter, angle_step, extra=(),
                          agree=None):  # fmt: skip
    """:func:`auto_init` with a known scale: rotations x all shifts by FFT, then a rigid + scale refinement."""
    i_int, i_mask = i_feats
    w_src = gaussian_filter(i_mask, 1.0)
    dJ = (J.x[1] - J.x[0]) if J.x.size > 1 else 1.0
    dJy = (J.y[1] - J.y[0]) if J.y.size > 1 else dJ
    ny, nx = j_mask.shape
    # a padded target frame, so that every shift keeps the source on the grid
    ext = int(np.ceil(max(np.ptp(I.x) + I.dx, np.ptp(I.y) + I.dx) * scale / min(dJ, dJy))) + 2
    py, px = ext, ext
    gy = J.y[0] + (np.arange(ny + 2 * py) - py) * dJy
    gx = J.x[0] + (np.arange(nx + 2 * px) - px) * dJ
    cy, cx = float(gy.mean()), float(gx.mean())
    tmask = -np.ones((gy.size, gx.size))  # glass, or off the image: -1 (a source there is penalised)
    tmask[py : py + ny, px : px + nx] = 2 * gaussian_filter(j_mask, 1.0) - 1
    tint = np.zeros_like(tmask)
    # target intensity: darkness (haematoxylin-dense nuclei are darker than eosin stroma), not the distance from
    # the glass colour (both stains are far from it)
    dark = J.data.max() - J.data.mean(axis=0)
    jz = gaussian_filter(dark / max(float(dark.max()), 1e-12), 1.0)
    on = j_mask > 0.5
    jz = (jz - (jz[on].mean() if on.any() else 0.0)) * (j_mask > 0.5)
    tint[py : py + ny, px : px + nx] = jz
    t_rms = float(np.sqrt((jz[on] ** 2).mean())) if on.any() else 1.0
    f_tmask, f_tint = np.fft.rfft2(tmask), np.fft.rfft2(tint)
    feats = np.stack([w_src, gaussian_filter(i_int, 1.0) * (i_mask > 0)])
    warper = _Warper(I, feats, Image(np.zeros((1, gy.size, gx.size)), gx, gy))
    c_i, _ = _moments(i_mask, I.x, I.y)
    rows, cands = [], []
    with torch.no_grad():
        for f in flips:
            for ang in angles:
                m = _similarity(c_i, np.array([cx, cy]), scale, np.radians(ang), f)
                w = warper.sample(torch.as_tensor(np.linalg.inv(m)[None], dtype=torch.float64))[0].numpy()
                sm, si = w[0].reshape(gy.size, gx.size), w[1].reshape(gy.size, gx.size)
                mass = sm.sum()
                if mass <= 0:
                    continue
                sc = (si - (si * sm).sum() / mass) * sm
                norm = np.sqrt((sc**2).sum()) * t_rms * np.sqrt(mass) + 1e-12
                # correlation for every shift t (in padded-frame pixels): sum_x s(x) t(x + t)
                contain = np.fft.irfft2(np.conj(np.fft.rfft2(sm)) * f_tmask, s=sm.shape) / mass
                inten = np.fft.irfft2(np.conj(np.fft.rfft2(sc)) * f_tint, s=sm.shape) / norm
                total = contain + _INTENSITY_WEIGHT * inten
                k = int(np.argmax(total))
                ky, kx = np.unravel_index(k, total.shape)
                ky = ky - gy.size if ky > gy.size // 2 else ky
                kx = kx - gx.size if kx > gx.size // 2 else kx
                shift = np.eye(3)
                shift[:2, 2] = [kx * dJ, ky * dJy]
                cands.append((f, ang, shift @ m))
                rows.append({"reflection": f, "angle_deg": ang, "score": float(total.flat[k])})
    if not cands:
        raise ValueError("the source has no tissue on the search grid; cannot initialise.")
    table = pd.DataFrame(rows)
    score = table["score"].to_numpy()
    picked = _distinct_best(cands, score, angle_step, n_refine)
    j_feat = np.stack([2 * gaussian_filter(j_mask, 1.0) - 1, jz / max(t_rms, 1e-12)])
    starts = [cands[idx][2] for idx in picked] + [np.asarray(m, dtype=float) for m in extra]
    return _result([_refine_rigid(I, feats, J, j_feat, m0, scale, refine_iter) for m0 in starts], table, agree)


def _refine_rigid(I, feats, J, j_feat, m0, scale, n_iter):
    """Refine rotation, translation and scale (held near ``scale``) by the containment + intensity score.

    The score is computed in the source frame: the target's features sampled at every source pixel mapped by the
    affine, weighted by the source tissue, so target tissue the source lacks costs nothing.
    """
    gx, gy = np.meshgrid(I.x, I.y)
    pts = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float64)
    w = torch.as_tensor(feats[0].ravel(), dtype=torch.float64)
    si = torch.as_tensor(feats[1].ravel(), dtype=torch.float64)
    mass = w.sum()
    si_c = (si - (si * w).sum() / mass) * w
    si_n = si_c / (si_c.pow(2).sum().sqrt() + 1e-12)
    jf = torch.as_tensor(j_feat, dtype=torch.float64)[None]
    c = torch.as_tensor(((gx * feats[0]).sum() / feats[0].sum(), (gy * feats[0]).sum() / feats[0].sum()))
    m0_t = torch.as_tensor(m0, dtype=torch.float64)
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)  # angle, log-scale, tx, ty (target units / 100)
    opt = torch.optim.LBFGS([p], lr=1, max_iter=n_iter, line_search_fn="strong_wolfe")
    s0 = float(np.sqrt(abs(np.linalg.det(m0[:2, :2]))))
    span = float(max(np.ptp(J.x), np.ptp(J.y)))

    def matrix(pp):
        ca, sa, es = torch.cos(pp[0]), torch.sin(pp[0]), torch.exp(pp[1])
        rot = torch.stack([torch.stack([ca, -sa]), torch.stack([sa, ca])]) * es
        # rotate and scale about the source tissue centre's image, then shift
        lin = rot @ m0_t[:2, :2]
        ctr = m0_t[:2, :2] @ c + m0_t[:2, 2]
        t = ctr - lin @ c + pp[2:] * span / 100
        top = torch.cat([lin, t[:, None]], 1)
        return torch.cat([top, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])

    def score(a):
        q = pts @ a[:2, :2].T + a[:2, 2]
        g = normalised_grid(q, float(J.x[0]), float(J.x[-1]), float(J.y[0]), float(J.y[-1]))
        v = grid_sample(jf, g[None, None], mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0]
        contain = (w * v[0]).sum() / mass
        inten = (si_n * v[1]).sum() / mass.sqrt()
        log_ratio = torch.log(torch.exp(p[1]) * s0 / scale)
        return contain + _INTENSITY_WEIGHT * inten - 0.5 * (log_ratio / _LOG_SCALE_SD) ** 2

    def loss_fn():
        opt.zero_grad()
        loss = -score(matrix(p))
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        a = matrix(p)
        final = float(score(a))
    return a.detach().numpy(), final
