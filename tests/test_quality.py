"""Engine-level accuracy estimates without ground truth (``registration._quality``), on arrays with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from spatialdata_align.registration import Registration, fit_affine
from spatialdata_align.registration import _quality as q
from spatialdata_align.registration._utils import apply_affine

A = np.array([[1.8, -0.6, 300.0], [0.7, 1.9, -40.0], [0.0, 0.0, 1.0]])  # µm -> px, no reflection


def _landmarks(n: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 3000, size=(n, 2))
    return src, apply_affine(A, src)


def test_robust_fit_ignores_a_gross_error():
    src, dst = _landmarks(9)
    dst_bad = dst.copy()
    dst_bad[4, 0] += 1e6
    fit = q.robust_landmark_fit(src, dst_bad, min_tol=10.0)
    assert fit.inliers.tolist() == [i != 4 for i in range(9)]
    np.testing.assert_allclose(fit.matrix, A, atol=1e-8)
    assert fit.residuals[4] == pytest.approx(1e6, rel=1e-6)
    # plain least squares is dragged by it
    ls = q.fit_matrix(src, dst_bad)
    assert np.abs(apply_affine(ls, src) - dst).max() > 1e4
    # leave-one-out refits restricted to the inliers: the others are exact, the outlier is measured at 1e6
    loo = q.landmark_loo(src, dst_bad, use=fit.inliers)
    np.testing.assert_allclose(np.delete(loo, 4), 0.0, atol=1e-6)
    assert loo[4] == pytest.approx(1e6, rel=1e-6)


def test_robust_fit_with_few_landmarks_uses_a_similarity():
    src, _ = _landmarks(5, seed=1)
    th = np.radians(30)
    sim = np.array([[2 * np.cos(th), -2 * np.sin(th), 5], [2 * np.sin(th), 2 * np.cos(th), 7], [0, 0, 1]])
    dst = apply_affine(sim, src)
    dst[2] += [800.0, -300.0]
    fit = q.robust_landmark_fit(src, dst, min_tol=20.0)
    assert fit.kind == "similarity"
    assert fit.inliers.tolist() == [True, True, False, True, True]


def test_leave_one_out_is_exact_for_an_exact_affine_and_honest_with_noise():
    src, dst = _landmarks(8)
    np.testing.assert_allclose(q.landmark_loo(src, dst), 0.0, atol=1e-7)
    rng = np.random.default_rng(3)
    noisy = dst + rng.normal(0, 5.0, dst.shape)
    loo = q.landmark_loo(src, noisy)
    fit_res = np.linalg.norm(apply_affine(q.fit_matrix(src, noisy), src) - noisy, axis=1)
    # held out, every landmark is predicted worse than in-sample (the fit does not see it)
    assert np.all(loo > fit_res)
    # and by hand for landmark 0
    m = q.fit_matrix(src[1:], noisy[1:])
    assert loo[0] == pytest.approx(np.linalg.norm(apply_affine(m, src[:1]) - noisy[:1]))


def test_leave_one_out_falls_back_to_a_similarity_with_three_landmarks():
    src, dst = _landmarks(3)
    loo = q.landmark_loo(src, dst)
    assert np.all(np.isfinite(loo))  # two remaining pairs: a similarity refit
    assert q.landmark_loo(src[:2], dst[:2]).tolist() == [pytest.approx(np.nan, nan_ok=True)] * 2


def test_leave_one_out_repeats_the_fits_shape_prior(monkeypatch):
    """Held out, a landmark leaves three near a line: the refit must use the prior the assessed fit used."""
    th = np.radians(60.0)
    truth = np.eye(3)
    truth[:2, :2] = 2.6 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    truth[:2, 2] = [300.0, 900.0]
    src = np.array([[0.0, 0.0], [2000.0, 20.0], [1000.0, 50.0], [900.0, 1500.0]])  # the last one is off the line
    click = np.array([[8.0, -6.0], [-5.0, 9.0], [7.0, -10.0], [-6.0, 4.0]])  # µm
    dst = apply_affine(truth, src + click)
    plain, prior = q.landmark_loo(src, dst), q.landmark_loo(src, dst, shape_prior=500.0)
    # refitted on the three near-collinear landmarks, the plain affine misplaces the fourth by hundreds of px
    assert plain[3] > 500.0 and prior[3] < 0.1 * plain[3]
    by_hand = fit_affine(src[:3], dst[:3], shape_prior=500.0).matrix
    assert prior[3] == pytest.approx(np.linalg.norm(apply_affine(by_hand, src[3:]) - dst[3:]))
    # lddmm_loo hands the same refit to every LDDMM run and to its affine errors
    seen = []

    def fake_lddmm(source, target, *, affine, **kw):
        seen.append(np.asarray(affine))
        return Registration.from_affine(affine)

    monkeypatch.setattr("spatialdata_align.registration._lddmm.lddmm", fake_lddmm)
    res = q.lddmm_loo(None, None, src, dst, shape_prior=500.0, max_refits=None, workers=1)
    np.testing.assert_allclose(res.affine_errors, prior)
    np.testing.assert_allclose(res.errors, prior)
    assert any(np.allclose(m, by_hand) for m in seen)


def test_extrapolation_of_the_fit_with_a_shape_prior():
    """The prior's leverage lies between the plain affine's (prior 0) and the similarity's (prior -> inf)."""
    rng = np.random.default_rng(0)
    cells = rng.uniform(-500, 3500, size=(2000, 2))
    near_line = np.array([[0.0, 0.0], [2000.0, 20.0], [1000.0, 50.0]])
    spread = rng.uniform(0, 3000, size=(5, 2))
    for src in (near_line, spread):
        plain = q.landmark_extrapolation(src, cells)
        sim = q.landmark_extrapolation(src, cells, kind="similarity")
        np.testing.assert_allclose(q.landmark_extrapolation(src, cells, shape_prior=1e-6), plain, rtol=1e-6)
        np.testing.assert_allclose(q.landmark_extrapolation(src, cells, shape_prior=1e8), sim, rtol=1e-6)
        prior = q.landmark_extrapolation(src, cells, shape_prior=500.0)
        assert np.all(prior <= plain * (1 + 1e-9)) and np.all(prior >= sim * (1 - 1e-9))
    # near a line the plain affine extrapolates ~100x the click error at the far cells; the prior fit ~10x
    p95 = [np.percentile(q.landmark_extrapolation(near_line, cells, shape_prior=v), 95) for v in (0.0, 500.0)]
    assert p95[0] > 50 and p95[1] < 0.2 * p95[0]


def test_extrapolation_with_a_shape_prior_is_the_error_of_the_prior_fit():
    """With a shape prior the factor is the posterior spread: sections whose stretch and shear are drawn from the
    prior, landmarks clicked with noise e, fitted by ``fit_affine(shape_prior=e / t)``; the map's error at a point,
    over many such sections, is e x the factor (a prior weighted 2x or 0.5x moves the far points by 20-40 %)."""
    from spatialdata_align.registration import fit_affine

    rng = np.random.default_rng(0)
    src = np.array([[0.0, 0.0], [1500.0, 120.0], [3000.0, -60.0], [800.0, 260.0], [2300.0, 200.0]])  # a band
    pts = np.array([[1500.0, 60.0], [1500.0, 1500.0], [-1000.0, 0.0], [3000.0, 2500.0]])
    e, spread = 10.0, 500.0
    th = np.deg2rad(30.0)
    sim = 1.1 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    errors = []
    for _ in range(2000):
        c, d = rng.normal(0.0, e / (np.sqrt(2.0) * spread), 2)  # prior: spread^2 |E|_F^2 / (2 e^2), |E|^2 = 2(c²+d²)
        lin = sim + np.array([[c, d], [d, -c]])
        dst = src @ lin.T + [200.0, -50.0] + rng.normal(0.0, e, src.shape)
        errors.append(apply_affine(fit_affine(src, dst, shape_prior=spread).matrix, pts) - pts @ lin.T - [200.0, -50.0])
    rms = np.sqrt((np.asarray(errors) ** 2).mean(axis=(0, 2))) / e  # per point, per coordinate
    ext = q.landmark_extrapolation(src, pts, shape_prior=spread)
    np.testing.assert_allclose(rms, ext, rtol=0.08)
    assert ext[1] < 0.7 * q.landmark_extrapolation(src, pts)[1]  # far across the band: well below the plain fit's


def test_jacobian_on_an_anisotropic_grid_and_a_fold_at_exactly_zero():
    """det(I + grad u) of u = (0.1 x, 0.2 y) is 1.1 * 1.2 on any grid, here 10 x 25 µm nodes; a determinant of
    exactly 0 (a map collapsing an area) counts as a fold."""

    class Stretch:
        def displacement(self, x, y, direction="forward"):
            gx, gy = np.meshgrid(x, y)
            return xr.DataArray(np.stack([0.1 * gx, 0.2 * gy]), dims=("c", "y", "x"))

    det = q.jacobian_determinant(Stretch(), np.arange(0.0, 200.0, 10.0), np.arange(0.0, 500.0, 25.0))
    np.testing.assert_allclose(det.values, 1.1 * 1.2, rtol=1e-12)
    summary = q.jacobian_summary(np.array([0.0, 1.0, 1.0, 1.0]))
    assert summary["fold_fraction"] == 0.25 and summary["compressed_fraction"] == 0.0


def test_folds_are_singletons_up_to_the_cap_then_interleaved_groups():
    src, _ = _landmarks(5)
    assert [f.tolist() for f in q.landmark_folds(src, 6)] == [[0], [1], [2], [3], [4]]
    src, _ = _landmarks(14)
    folds = q.landmark_folds(src, 4)
    assert len(folds) == 4
    assert sorted(np.concatenate(folds).tolist()) == list(range(14))
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    # interleaved by angle around the centroid: eight landmarks on a circle, four folds of opposite pairs
    ang = np.deg2rad(np.arange(8) * 45.0 + 10.0)
    circle = np.column_stack([500 + 300 * np.cos(ang), 400 + 300 * np.sin(ang)])
    order = np.random.default_rng(0).permutation(8)  # the file's order says nothing
    folds = q.landmark_folds(circle[order], 4)
    pairs = sorted(sorted(int(order[i]) for i in f) for f in folds)
    assert pairs == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_cross_validate_measures_each_held_out_landmark_once():
    src, dst = _landmarks(7)
    calls = []

    def fit(train):
        calls.append(train.copy())
        shift = 0.0 if train.all() else 3.0  # a refit without landmarks is off by 3 px in x
        return lambda p: apply_affine(A, p) + np.array([shift, 0.0])

    err = q.cross_validate(fit, src, dst, q.landmark_folds(src, 3))
    np.testing.assert_allclose(err, 3.0)
    assert len(calls) == 3 and all((~c).sum() >= 2 for c in calls)


class _Field:
    """A stand-in registration with an analytic displacement u(x, y) = (a x + c y, d x + b y)."""

    def __init__(self, a, b, c=0.0, d=0.0):
        self.a, self.b, self.c, self.d = a, b, c, d

    def displacement(self, x, y, direction="forward"):
        gx, gy = np.meshgrid(x, y)
        d = np.stack([self.a * gx + self.c * gy, self.d * gx + self.b * gy])
        return xr.DataArray(d, dims=("c", "y", "x"), coords={"c": ["dx", "dy"], "y": y, "x": x})


def test_jacobian_determinant_of_known_fields():
    x, y = np.linspace(0, 100, 21), np.linspace(0, 50, 11)
    det = q.jacobian_determinant(_Field(0.5, -0.2, 0.3, 0.4), x, y)
    np.testing.assert_allclose(det.values, 1.5 * 0.8 - 0.3 * 0.4, atol=1e-12)
    assert det.dims == ("y", "x")
    s = q.jacobian_summary(q.jacobian_determinant(_Field(-2.0, 0.0), x, y).values)
    assert s["fold_fraction"] == 1.0 and s["min"] == pytest.approx(-1.0)
    s = q.jacobian_summary(q.jacobian_determinant(_Field(-0.6, 0.0), x, y).values)
    assert s["fold_fraction"] == 0.0 and s["compressed_fraction"] == 1.0


def test_inverse_consistency_of_a_real_flow_and_of_a_broken_inverse():
    rng = np.random.default_rng(0)
    xv = yv = np.linspace(-50, 150, 21)
    v = np.zeros((5, 2, 21, 21))
    gx, gy = np.meshgrid(xv, yv)
    v[:, 0] = 8 * np.exp(-((gx - 50) ** 2 + (gy - 50) ** 2) / 2000)
    reg = Registration(affine=A, velocity_values=v, xv=xv, yv=yv)
    pts = rng.uniform(0, 100, (200, 2))
    ic = q.inverse_consistency(reg, pts)
    assert ic.max() < 1e-6

    class Broken:
        def transform_points(self, p, direction="forward"):
            return p + 2.0 if direction == "forward" else p - 1.0

    np.testing.assert_allclose(q.inverse_consistency(Broken(), pts), np.sqrt(2.0))


def test_leave_one_out_of_three_landmarks_on_a_mirrored_section():
    """Two landmarks left: the similarity refit keeps the mirror of the fit on all three (else it is mm off)."""
    mirror = np.array([[-1.2, 0.5, 4000.0], [0.5, 1.2, 300.0], [0.0, 0.0, 1.0]])  # a reflection x 1.3
    src = np.array([[0.0, 0.0], [2000.0, 300.0], [600.0, 1800.0]])
    dst = apply_affine(mirror, src)
    np.testing.assert_allclose(q.landmark_loo(src, dst), 0.0, atol=1e-6)
    # the LDDMM refits start from the same affines
    assert np.linalg.det(q.fit_matrix(src[:2], dst[:2], reflection=True)[:2, :2]) < 0
    assert np.linalg.det(q.fit_matrix(src[:2], dst[:2])[:2, :2]) > 0  # two pairs alone: the proper one


@pytest.mark.parametrize("kind", ["affine", "similarity"])
def test_landmark_extrapolation_is_the_spread_of_noisy_fits(kind):
    """sqrt(leverage) x the click noise is the standard deviation of the fitted map's position, inside and far out."""
    rng = np.random.default_rng(1)
    src = np.array([[0.0, 0.0], [300.0, 40.0], [60.0, 250.0], [180.0, 150.0]])  # clustered in one corner
    if kind == "similarity":
        src = src[:2]  # two landmarks: the affine falls back to a similarity
    dst = apply_affine(A, src)
    pts = np.array([[150.0, 100.0], [3000.0, 3000.0], [-1500.0, 2500.0]])
    sigma = 3.0
    fitted = np.stack(
        [apply_affine(q.fit_matrix(src, dst + rng.normal(0, sigma, dst.shape)), pts) for _ in range(3000)]
    )
    spread = fitted.std(axis=0) / sigma  # (points, xy)
    ext = q.landmark_extrapolation(src, pts)
    np.testing.assert_allclose(spread, np.repeat(ext[:, None], 2, axis=1), rtol=0.08)
    assert ext[0] < 1.0 < 10.0 < ext[1]  # inside the landmarks vs far out
    # only the landmarks in use count; fewer than two determine nothing
    np.testing.assert_allclose(
        q.landmark_extrapolation(np.r_[src, [[5000.0, 5000.0]]], pts, use=[True] * len(src) + [False]), ext
    )
    assert np.isinf(q.landmark_extrapolation(src[:1], pts)).all()


def test_region_confidence_per_tile():
    xy = np.array([[1.0, 1.0]] * 30 + [[15.0, 1.0]] * 30 + [[25.0, 25.0]] * 5)
    w = np.r_[np.full(30, 0.9), np.full(30, 0.1), np.full(5, 0.5)]
    t = q.region_confidence(xy, w, tile=10.0, min_points=20)
    assert len(t) == 2
    assert t.sort_values("x0")["mean_weight"].tolist() == pytest.approx([0.9, 0.1])


@pytest.mark.parametrize(
    ("metrics", "level", "needle"),
    [
        ({"loo_um": [5, 8, 6, 7], "match_median": 0.9}, "good", None),
        ({"loo_um": [30, 40, 35, 33]}, "check", "half a spot"),
        ({"loo_um": [80, 90, 70, 60]}, "unreliable", "spot diameter"),
        ({"loo_um": [5, 8, 6, 300], "landmark_names": ["a", "b", "c", "d"]}, "check", "d (300 µm)"),
        ({"loo_um": [40, 45, 50, 42], "loo_affine_um": [10, 12, 11, 9]}, "unreliable", "away from"),
        ({"loo_um": [5, 6], "no_landmarks": False}, "check", "only 2 landmarks"),
        ({"no_landmarks": True}, "check", "no independent"),
        ({"loo_um": [5, 6, 7, 5], "ic_um": np.full(100, 30.0)}, "unreliable", "does not invert"),
        (
            {
                "loo_um": [5, 6, 7, 5],
                "jacobian": {"n": 100, "fold_fraction": 0.05, "compressed_fraction": 0, "expanded_fraction": 0},
            },
            "unreliable",
            "folds",
        ),
        ({"loo_um": [5, 6, 7, 5], "ic_um": np.full(100, 5.0)}, "check", "inverse-consistency error 5 µm"),
        ({"loo_um": [5, 6, 7, 5], "ic_um": np.r_[np.full(99, 0.5), 30.0]}, "good", None),
        (
            {
                "loo_um": [5, 6, 7, 5],
                "jacobian": {"n": 100, "fold_fraction": 5e-4, "compressed_fraction": 0, "expanded_fraction": 0},
            },
            "check",
            "folds over 0.05% of the tissue",
        ),
        (
            {
                "loo_um": [5, 6, 7, 5],
                "jacobian": {"n": 100, "fold_fraction": 0, "compressed_fraction": 0.02, "expanded_fraction": 0.01},
            },
            "check",
            "extreme compression/expansion (area ratio < 0.5 or > 2) over 3.0%",
        ),
        (
            {
                "loo_um": [5, 6, 7, 5],
                "jacobian": {"n": 100, "fold_fraction": 0, "compressed_fraction": 0.01, "expanded_fraction": 0.005},
            },
            "good",
            None,
        ),
        ({"loo_um": [5, 6, 7, 5], "match_median": 0.1}, "unreliable", "hardly match"),
        ({"loo_um": [5, 6, 7, 5], "match_median": 0.35}, "check", "median match confidence of the cells is 0.35"),
        ({"loo_um": [5, 6, 7, 5], "match_median": 0.6}, "good", None),
        ({"loo_um": [5, 6, 7, 5], "lddmm": {"moved": False}}, "unreliable", "without improving"),
        ({"loo_um": [5, 6, 7, 5], "findings": ["x.csv: typo"]}, "unreliable", "x.csv: typo"),
        ({"loo_um": [5, 6, 7, 5], "extrapolation": np.linspace(0.3, 1.45, 100)}, "good", None),
        ({"loo_um": [5, 6, 7, 5], "extrapolation": np.r_[np.full(90, 1.0), np.full(10, 1.8)]}, "check", "1.8x"),
        ({"loo_um": [5, 6, 7, 5], "extrapolation": np.r_[np.full(90, 1.0), np.full(10, 9.0)]}, "unreliable", "9.0x"),
        (
            {
                "loo_um": [5, 6, 7, 5],
                "regions": pd.DataFrame({"n": [50, 50], "mean_weight": [0.1, 0.9]}),
            },
            "check",
            "low match confidence",
        ),
    ],
)
def test_verdict_rules(metrics, level, needle):
    v = q.verdict(metrics)
    assert v.level == level, v.reasons
    if needle:
        assert any(needle in r for r in v.reasons), v.reasons
    else:
        assert v.reasons == []


def test_lddmm_leave_one_out_on_a_toy_pair():
    """Refits run from the leave-one-out affine; a pure translation is recovered at the held-out points."""
    n = 48
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    blob = lambda cx, cy: np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 18.0)
    src_img = blob(18, 20) + 0.7 * blob(32, 30) + 0.5 * blob(14, 34)
    tgt_img = blob(21, 22) + 0.7 * blob(35, 32) + 0.5 * blob(17, 36)  # source shifted by (3, 2)
    src = np.array([[18, 20], [32, 30], [14, 34], [25, 12], [30, 40.0]])
    noise = np.array([[1.5, 0], [0, -1.5], [-1, 1], [1, 1], [0, 1.5]])
    dst_noisy = src + np.array([3.0, 2.0]) + noise
    # sigma_affine=0: the click noise here is 7 % of the toy's 24 px half-extent, beyond the engine's default prior
    # on affine changes (5 % of the half-extent, sized for sections many times larger than their click noise)
    res = q.lddmm_loo(
        src_img, tgt_img, src, dst_noisy, max_refits=3, progress=False, scales=(2, 1), max_iter=(20, 10), sigma_affine=0
    )
    assert len(res.folds) == 3 and res.errors.shape == (5,) and np.all(np.isfinite(res.errors))
    np.testing.assert_allclose(res.affine_errors, q.landmark_loo(src, dst_noisy))
    # each refit (without the held-out landmarks) finds the shift from the images: the held-out error is the
    # landmark's own placement noise, not the affine's extrapolation error
    np.testing.assert_allclose(res.errors, np.linalg.norm(noise, axis=1), atol=0.6)


def test_lddmm_refits_never_see_their_held_out_landmarks(monkeypatch):
    """Each refit starts from the affine of its training landmarks and pulls the map through those only.

    With a stand-in LDDMM that returns its initial affine, the held-out errors are exactly the affine's leave-one-out
    errors, which on noisy landmarks exceed the in-sample residuals. A landmark outside ``use`` (a gross error) is
    in no refit and still measured. Fails when a refit sees the landmark it is measured at: the trust estimate of the
    report would then be the optimistic in-sample residual.
    """
    from spatialdata_align.registration import _lddmm

    src, dst = _landmarks(7)
    noisy = dst + np.random.default_rng(5).normal(0, 20.0, dst.shape)
    noisy[3, 0] += 5000.0  # a typo, kept out of the refits by ``use``
    use = np.arange(7) != 3
    seen = []

    def fake_lddmm(source, target, *, affine, source_landmarks=None, target_landmarks=None, **kw):
        seen.append((np.array(source_landmarks), np.array(target_landmarks)))
        return Registration.from_affine(affine)

    monkeypatch.setattr(_lddmm, "lddmm", fake_lddmm)
    img = np.zeros((8, 8))
    res = q.lddmm_loo(img, img, src, noisy, max_refits=None, use=use, landmark_term=True, workers=1)
    expected = q.landmark_loo(src, noisy, use=use)
    np.testing.assert_allclose(res.errors, expected, rtol=1e-9)
    assert res.errors[3] > 4000.0
    in_sample = np.linalg.norm(apply_affine(q.fit_matrix(src[use], noisy[use]), src) - noisy, axis=1)
    assert np.all(res.errors[use] > in_sample[use])
    # the landmark term of refit i holds the used landmarks but i
    assert len(seen) == 7
    for i, (s_lm, d_lm) in enumerate(seen):
        train = use & (np.arange(7) != i)
        np.testing.assert_array_equal(s_lm, src[train])
        np.testing.assert_array_equal(d_lm, noisy[train])


def test_refits_in_threads_give_the_sequential_result():
    """Refits run two at once (threads, one torch thread each) give what one-thread refits in a row give."""
    n = 48
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    blob = lambda cx, cy: np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 18.0)
    src_img = blob(18, 20) + 0.7 * blob(32, 30) + 0.5 * blob(14, 34)
    tgt_img = blob(21, 22) + 0.7 * blob(35, 32) + 0.5 * blob(17, 36)
    src = np.array([[18, 20], [32, 30], [14, 34], [25, 12], [30, 40.0]])
    dst = src + np.array([3.0, 2.0]) + np.array([[1.5, 0], [0, -1.5], [-1, 1], [1, 1], [0, 1.5]])
    kw = dict(max_refits=3, progress=False, scales=(2, 1), max_iter=(20, 10), sigma_affine=0, landmark_term=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = q.lddmm_loo(src_img, tgt_img, src, dst, workers=2, **kw)
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        sequential = q.lddmm_loo(src_img, tgt_img, src, dst, workers=1, **kw)
    finally:
        torch.set_num_threads(threads)
    assert np.all(np.isfinite(parallel.errors))
    np.testing.assert_array_equal(parallel.errors, sequential.errors)


def test_cut_edge_flags_the_cells_along_a_cut_not_along_the_tissue_edge():
    """A Xenium region (cells over [0, 1000]² µm) inside tissue that goes on to the left (target tissue over
    [-500, 1000] x [0, 1000]): only the band along the left edge is a cut; the other three edges are the tissue's."""
    from spatialdata_align.registration._quality import cut_edge

    rng = np.random.default_rng(0)
    cells = rng.uniform(0, 1000, (20000, 2))
    gx, gy = np.meshgrid(np.arange(-500, 1001, 100.0), np.arange(0, 1001, 100.0))
    spots = np.column_stack([gx.ravel(), gy.ravel()])
    px = cells / 0.5  # the target in pixels of 0.5 µm
    flag = cut_edge(cells, px, spots / 0.5, band=150, source_spacing=25, target_spacing=100 / 0.5, scale=0.5)
    x, y = cells[:, 0], cells[:, 1]
    core = (x < 100) & (y > 200) & (y < 800)  # along the cut (the band, less a grid cell), away from the edges
    assert flag[core].mean() > 0.95
    assert not flag[x > 200].any()  # inside, or along the tissue's own right edge
    assert not flag[(y < 100) | (y > 900)].any()  # along the tissue's own top and bottom edges
    # where the target tissue ends with the cells, there is no cut
    flush = cut_edge(cells, px, px[::20], band=150, source_spacing=25, target_spacing=100 / 0.5, scale=0.5)
    assert not flush.any()
