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


def fit_affine(src, dst, kind: str = "affine", *, reflection: bool | None = None) -> AffineFit:
    """Fit a transform mapping source landmarks onto target landmarks by least squares.

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

    Returns
    -------
    :class:`AffineFit` with the ``(3, 3)`` matrix and per-landmark residuals.

    Raises
    ------
    ValueError
        Too few pairs, mismatched counts, non-finite coordinates, or (affine) landmarks so close to
        collinear that the fit is ill-conditioned (the condition number is reported).
    """
    s, d = _check_pairs(src, dst, kind)
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
        lin, *_ = np.linalg.lstsq(s0, d0, rcond=None)  # d0 ≈ s0 @ lin
        linear = lin.T
    else:
        if not np.any(s0):
            raise ValueError("source landmarks are all identical; cannot fit a rotation.")
        cov = d0.T @ s0 / s.shape[0]
        u, sig, vt = np.linalg.svd(cov)
        candidates = []
        for refl in (False, True):
            if reflection is not None and refl != reflection:
                continue
            sign = np.diag([1.0, -1.0 if (np.linalg.det(u @ vt) > 0) == refl else 1.0])
            rot = u @ sign @ vt
            if kind == "similarity":
                var_s = (s0**2).sum() / s.shape[0]
                scale = float(np.trace(np.diag(sig) @ sign) / var_s)
            else:
                scale = 1.0
            linear_c = scale * rot
            err = np.sum((s0 @ linear_c.T - d0) ** 2)
            candidates.append((err, refl, linear_c))
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
