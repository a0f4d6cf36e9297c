"""Affine, similarity and rigid transforms fitted to matched landmark pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._utils import apply_affine, check_points

_KINDS = ("affine", "similarity", "rigid")
_MIN_PAIRS = {"affine": 3, "similarity": 2, "rigid": 2}
#: ratio of the smallest to largest singular value of the centred source landmarks below which an
#: affine fit is refused as (nearly) collinear.
COLLINEAR_TOL = 1e-3
#: default ``shape_prior`` of :func:`fit_affine` (source units, µm for Xenium): the ratio of the landmarks'
#: click error (~15 µm) to the stretch and shear between two serial sections (~3 %). See :func:`fit_affine`.
AFFINE_SHAPE_PRIOR = 500.0


@dataclass
class AffineFit:
    """An affine transform fitted to landmarks.

    Attributes
    ----------
    matrix
        ``(3, 3)`` homogeneous matrix mapping source ``(x, y)`` to target ``(x, y)``.
    kind
        ``"affine"``, ``"similarity"`` or ``"rigid"``.
    residuals
        ``(N,)`` distances ``|matrix @ src_i - dst_i|`` in target units.
    reflection
        Whether the fitted linear part has a negative determinant (a flipped section).
    condition
        Ratio of the largest to the smallest singular value of the centred source landmarks
        (large = nearly collinear).
    """

    matrix: np.ndarray
    kind: str
    residuals: np.ndarray
    reflection: bool
    condition: float
    src: np.ndarray = field(repr=False)
    dst: np.ndarray = field(repr=False)

    @property
    def rms(self) -> float:
        """Root-mean-square landmark residual (target units)."""
        return float(np.sqrt(np.mean(self.residuals**2)))

    def transform_points(self, xy, direction: str = "forward") -> np.ndarray:
        """Map ``(N, 2)`` points source→target (``"forward"``) or target→source (``"inverse"``)."""
        m = self.matrix if direction == "forward" else np.linalg.inv(self.matrix)
        if direction not in ("forward", "inverse"):
            raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}.")
        return apply_affine(m, check_points(xy))


def _check_pairs(src, dst, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
    s = check_points(src, "source landmarks")
    d = check_points(dst, "target landmarks")
    if s.shape[0] != d.shape[0]:
        raise ValueError(
            f"source and target landmarks must be matched pairs: got {s.shape[0]} source and "
            f"{d.shape[0]} target points."
        )
    need = _MIN_PAIRS[kind]
    if s.shape[0] < need:
        raise ValueError(f"a {kind} fit needs at least {need} landmark pairs, got {s.shape[0]}.")
    return s, d


def _condition(centred: np.ndarray) -> float:
    sv = np.linalg.svd(centred, compute_uv=False)
    return float(np.inf if sv[-1] <= sv[0] * 1e-15 else sv[0] / sv[-1])


def _similarities(s0: np.ndarray, d0: np.ndarray, kind: str, reflection: bool | None) -> list[tuple]:
    """Least-squares rotation (+ uniform scale for ``"similarity"``) of centred landmarks, proper and/or mirrored.

    Returns ``(residual sum of squares, mirrored, (2, 2) linear part)`` per allowed candidate.
    """
    cov = d0.T @ s0 / s0.shape[0]
    u, sig, vt = np.linalg.svd(cov)
    candidates = []
    for refl in (False, True):
        if reflection is not None and refl != reflection:
            continue
        sign = np.diag([1.0, -1.0 if (np.linalg.det(u @ vt) > 0) == refl else 1.0])
        rot = u @ sign @ vt
        scale = float(np.trace(np.diag(sig) @ sign) / ((s0**2).sum() / s0.shape[0])) if kind == "similarity" else 1.0
        linear = scale * rot
        candidates.append((float(np.sum((s0 @ linear.T - d0) ** 2)), refl, linear))
    return candidates


def _shrunk_affine(s0: np.ndarray, d0: np.ndarray, spread: float) -> np.ndarray:
    """Linear part of the affine with a Gaussian prior centring its stretch and shear on the best similarity.

    Minimises ``sum_i |L s_i - d_i|^2 + spread^2 |L - L_sim|_F^2`` over ``L`` (closed form, a ridge
    regression), for the proper and the mirrored similarity ``L_sim``; the lower objective wins. The
    objective is the negative log-posterior of landmarks with isotropic click error ``e`` (source units)
    and a linear part ``L_sim (I + E)`` with ``E``'s entries of standard deviation ``t``: ``spread = e / t``.
    """
    gram = s0.T @ s0 + spread**2 * np.eye(2)
    best = None
    for _, _, base in _similarities(s0, d0, "similarity", None):
        delta = np.linalg.solve(gram, s0.T @ (d0 - s0 @ base.T)).T
        linear = base + delta
        cost = float(np.sum((s0 @ linear.T - d0) ** 2) + spread**2 * np.sum(delta**2))
        if best is None or cost < best[0]:
            best = (cost, linear)
    return best[1]


def fit_affine(
    src, dst, kind: str = "affine", *, reflection: bool | None = None, shape_prior: float = AFFINE_SHAPE_PRIOR
) -> AffineFit:
    """Fit a transform mapping source landmarks onto target landmarks by (regularised) least squares.

    Parameters
    ----------
    src, dst
        ``(N, 2)`` matched ``(x, y)`` landmark positions in source and target units
        (e.g. Xenium µm and Visium full-resolution pixels).
    kind
        ``"affine"`` (6 parameters, N >= 3 non-collinear), ``"similarity"`` (rotation, uniform
        scale, translation; N >= 2) or ``"rigid"`` (rotation and translation; N >= 2).
    reflection
        For similarity/rigid fits: ``None`` (default) takes the reflected solution only when it
        fits clearly better (residual sum of squares below a quarter of the proper rotation's; with
        two pairs both fit exactly and the proper rotation is kept); ``False`` forbids reflections;
        ``True`` forces one. Affine fits reflect freely.
    shape_prior
        Affine fits only (source units; default 500, for landmarks in µm): the stretch and shear of the affine are
        drawn towards those of the best rotation + uniform scale, by a Gaussian prior whose scale is the ratio of
        the landmarks' click error to the stretch and shear expected between serial sections (~15 µm over ~3 %).
        Along directions in which the landmarks spread over much more than ``shape_prior`` the fit approaches the
        plain least-squares affine; along narrower ones (three landmarks close to a line, or all of them in one
        corner of a large section) it falls back to the similarity, where plain least squares lets a few µm of
        click error decide the stretch across the line. ``0`` gives the plain least-squares affine.

    Returns
    -------
    :class:`AffineFit` with the ``(3, 3)`` matrix and per-landmark residuals.

    Raises
    ------
    ValueError
        Too few pairs, mismatched counts, non-finite coordinates, a negative ``shape_prior``, or (affine)
        landmarks so close to collinear that the fit is ill-conditioned (the condition number is reported).

    Notes
    -----
    Measured on the landmark affine alone (``docs/accuracy.md``): on the 31 pairs of the validation corpus the
    default prior took the mean error from 50.8 / 128.8 to 41.2 / 76.2 µm (median / p95); the two pairs whose three
    landmarks lie close to a line went from 170 / 835 to 38 / 66 µm, and the largest loss on one pair was 34 µm (a
    torn section, median 98 -> 132 µm). On 24 held-out pairs: 44.7 / 102.6 -> 44.5 / 95.3 µm. On real tissue
    (MERFISH R3 -> R2, 13 landmarks) the held-out median error of the affine fitted to each of the 715 four-landmark
    subsets averages 278 µm against 329 µm without the prior, and 478 against 1059 µm for the 286 three-landmark
    subsets.
    """
    s, d = _check_pairs(src, dst, kind)
    if not np.isfinite(shape_prior) or shape_prior < 0:
        raise ValueError(f"shape_prior must be a finite number >= 0 (source units), got {shape_prior!r}.")
    cs, cd = s.mean(axis=0), d.mean(axis=0)
    s0, d0 = s - cs, d - cd
    cond = _condition(s0)
    if kind == "affine":
        if cond > 1.0 / COLLINEAR_TOL:
            raise ValueError(
                f"source landmarks are (nearly) collinear: condition number {cond:.3g} "
                f"(limit {1.0 / COLLINEAR_TOL:.0f}); an affine fit needs >= 3 well-spread points. "
                "Add landmarks off the line or use kind='similarity'."
            )
        if shape_prior > 0:
            linear = _shrunk_affine(s0, d0, float(shape_prior))
        else:
            lin, *_ = np.linalg.lstsq(s0, d0, rcond=None)  # d0 ≈ s0 @ lin
            linear = lin.T
    else:
        if not np.any(s0):
            raise ValueError("source landmarks are all identical; cannot fit a rotation.")
        candidates = _similarities(s0, d0, kind, reflection)
        if len(candidates) == 2 and candidates[1][0] > 0.25 * candidates[0][0] - 1e-12 * (d0**2).sum():
            # a reflection must explain the landmarks clearly better than a proper rotation to be chosen:
            # with two pairs (or symmetric configurations) both fit equally well and mounting is usually
            # not mirrored.
            linear = candidates[0][2]
        else:
            linear = min(candidates, key=lambda t: t[0])[2]
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = cd - linear @ cs
    residuals = np.linalg.norm(apply_affine(matrix, s) - d, axis=1)
    return AffineFit(
        matrix=matrix,
        kind=kind,
        residuals=residuals,
        reflection=bool(np.linalg.det(linear) < 0),
        condition=cond,
        src=s,
        dst=d,
    )


def decompose_affine(matrix) -> dict:
    """Describe a ``(3, 3)`` affine as rotation (degrees), scales, shear, reflection and translation.

    Uses the polar decomposition ``L = R @ S`` (``R`` orthogonal, ``S`` symmetric positive), with a
    reflection, if any, applied to x before the rotation: ``L = Rot(theta) @ diag(±1, 1) @ S``.
    ``scale`` is the geometric mean of the singular values.
    """
    m = np.asarray(matrix, dtype=float)
    lin = m[:2, :2]
    u, sig, vt = np.linalg.svd(lin)
    r = u @ vt
    s = vt.T @ np.diag(sig) @ vt
    refl = np.linalg.det(r) < 0
    rot = r @ np.diag([-1.0, 1.0]) if refl else r
    theta = float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0])))
    return {
        "rotation_deg": theta,
        "reflection": bool(refl),
        "scale": float(np.sqrt(sig[0] * sig[1])),
        "singular_values": sig,
        "stretch": s,
        "translation": m[:2, 2].copy(),
    }
