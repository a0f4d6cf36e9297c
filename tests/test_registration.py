"""Unit tests of the registration engine (no SpatialData)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import xarray as xr
from _toy import Toy

from spatialdata_align.registration import (
    Registration,
    RegistrationDivergedWarning,
    auto_init,
    celltype_channels,
    decompose_affine,
    fit_affine,
    lddmm,
    rasterize,
)
from spatialdata_align.registration import _lddmm as lddmm_mod
from spatialdata_align.registration._flow import flow_inverse, inverse_displacement
from spatialdata_align.registration._utils import apply_affine

FAST = {"progress": False, "contrast_degree": 3, "sigma_r": 300.0}


@pytest.fixture(scope="module")
def toy():
    return Toy()


@pytest.fixture(scope="module")
def toy_reg(toy):
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    return fit, lddmm(toy.source, toy.target, affine=fit.matrix, **FAST)


# --------------------------------------------------------------------------- rasterize
def test_rasterize_conserves_mass_and_places_points():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(5000, 2))
    img = rasterize(xy, dx=20.0, blur=30.0)
    assert img.dims == ("c", "y", "x")
    assert img.sum().item() == pytest.approx(5000.0, rel=1e-9)
    # without blur a point on a pixel centre lands entirely in that pixel
    one = rasterize(np.array([[10.0, 30.0]]), dx=20.0, blur=0, extent=(0, 100, 0, 100))
    iy, ix = np.unravel_index(np.argmax(one.values[0]), one.shape[1:])
    assert (one.x.values[ix], one.y.values[iy]) == (10.0, 30.0)
    assert one.values[0, iy, ix] == pytest.approx(1.0)
    # mass splits bilinearly between neighbours and the centroid is preserved
    two = rasterize(np.array([[25.0, 37.0]]), dx=20.0, blur=0, extent=(0, 100, 0, 100))
    gx, gy = np.meshgrid(two.x.values, two.y.values)
    w = two.values[0]
    assert (w * gx).sum() == pytest.approx(25.0)
    assert (w * gy).sum() == pytest.approx(37.0)


def test_rasterize_channels_dense_and_sparse_agree():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, size=(2000, 2))
    counts = rng.poisson(0.5, size=(2000, 7)).astype(float)
    dense = rasterize(xy, counts, dx=25.0, channel_names=list("abcdefg"))
    sparse = rasterize(xy, sp.csr_matrix(counts), dx=25.0)
    assert dense.shape[0] == 7 and list(dense.c.values) == list("abcdefg")
    np.testing.assert_allclose(dense.values, sparse.values, atol=1e-9)
    np.testing.assert_allclose(dense.sum(("x", "y")).values, counts.sum(0), rtol=1e-9)


def test_rasterize_extent_drops_outside_and_errors():
    xy = np.array([[10.0, 10.0], [500.0, 500.0]])
    img = rasterize(xy, dx=10.0, blur=0, extent=(0, 100, 0, 100))
    assert img.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-finite"):
        rasterize(np.array([[0.0, np.nan]]), dx=10.0)
    with pytest.raises(ValueError, match="at least 1"):
        rasterize(np.zeros((0, 2)), dx=10.0)
    with pytest.raises(ValueError, match="dx"):
        rasterize(xy, dx=0)
    with pytest.raises(ValueError, match="one row per point"):
        rasterize(xy, np.ones(3), dx=10.0)


def test_rasterize_blur_is_a_gaussian_of_the_given_width():
    """One point on a pixel centre, blurred: a normalised Gaussian of standard deviation ``blur`` (default one pixel).

    Fails when the blur is skipped (the point stays in one pixel: variance 0) or has the wrong width.
    """
    dx, c = 10.0, 505.0  # 505 is a pixel centre of the extent below
    for blur, sigma in ((30.0, 30.0), (None, dx)):
        img = rasterize(np.array([[c, c]]), dx=dx, blur=blur, extent=(0, 1000, 0, 1000))
        assert img.attrs["blur"] == sigma
        w = img.values[0]
        gx, gy = np.meshgrid(img.x.values, img.y.values)
        assert w.sum() == pytest.approx(1.0, rel=1e-9)
        assert (w * gx).sum() == pytest.approx(c) and (w * gy).sum() == pytest.approx(c)
        assert (w * (gx - c) ** 2).sum() == pytest.approx(sigma**2, rel=0.01)
        assert (w * (gy - c) ** 2).sum() == pytest.approx(sigma**2, rel=0.01)
    # the 30 µm blur pixel by pixel: the Gaussian density times the pixel area
    ref = np.exp(-((gx - c) ** 2 + (gy - c) ** 2) / (2 * 30.0**2)) * dx**2 / (2 * np.pi * 30.0**2)
    w30 = rasterize(np.array([[c, c]]), dx=dx, blur=30.0, extent=(0, 1000, 0, 1000)).values[0]
    np.testing.assert_allclose(w30, ref, atol=1e-3 * ref.max())
    # the default extent is padded enough that the blurred mass of a point at the edge of the cloud is kept
    edge = rasterize(np.array([[0.0, 0.0], [200.0, 0.0]]), dx=dx, blur=30.0)
    assert edge.sum().item() == pytest.approx(2.0, rel=1e-6)
    assert edge.values[0].max() < 0.02  # spread over many pixels, not left in one


# --------------------------------------------------------------------------- landmarks
@pytest.mark.parametrize("kind", ["affine", "similarity", "rigid"])
@pytest.mark.parametrize("flip", [False, True])
def test_fit_affine_recovers_known_transform(kind, flip):
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 1000, size=(8, 2))
    th = np.radians(40.0)
    lin = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    if kind == "affine":
        lin = lin @ np.array([[1.3, 0.2], [0.0, 0.8]])
    elif kind == "similarity":
        lin = 1.7 * lin
    if flip:
        lin = lin @ np.diag([-1.0, 1.0])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = [100.0, -50.0]
    dst = src @ lin.T + m[:2, 2]
    fit = fit_affine(src, dst, kind=kind, shape_prior=0.0)  # plain least squares: exact on exact landmarks
    np.testing.assert_allclose(fit.matrix, m, atol=1e-9)
    assert fit.rms < 1e-9
    assert fit.reflection == flip
    np.testing.assert_allclose(fit.transform_points(dst, "inverse"), src, atol=1e-9)


def _tre(matrix, truth, grid):
    return np.linalg.norm(apply_affine(matrix, grid) - apply_affine(truth, grid), axis=1)


@pytest.mark.parametrize("flip", [False, True])
def test_fit_affine_shape_prior_rescues_landmarks_near_a_line(flip):
    """Three landmarks close to a line: plain least squares lets 10 µm of click error set the stretch across it."""
    th = np.radians(117.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    truth = np.eye(3)
    truth[:2, :2] = 2.6 * rot @ np.array([[1.02, 0.01], [0.0, 0.985]]) @ np.diag([-1.0 if flip else 1.0, 1.0])
    truth[:2, 2] = [4000.0, 2500.0]
    src = np.array([[0.0, 0.0], [2000.0, 20.0], [1000.0, 50.0]])  # spread 2000 µm along x, ~25 µm across
    click = np.array([[8.0, -6.0], [-5.0, 9.0], [7.0, -10.0]])  # µm, on the source side
    dst = apply_affine(truth, src + click)
    gx, gy = np.meshgrid(np.linspace(-200, 2200, 25), np.linspace(-800, 900, 18))
    tissue = np.c_[gx.ravel(), gy.ravel()]  # the section around the landmarks
    plain = fit_affine(src, dst, shape_prior=0.0)
    prior = fit_affine(src, dst)
    e_plain, e_prior = _tre(plain.matrix, truth, tissue) / 2.6, _tre(prior.matrix, truth, tissue) / 2.6  # µm
    assert np.median(e_plain) > 100.0  # the failure the prior is there for
    assert np.median(e_prior) < 40.0 and np.percentile(e_prior, 95) < 80.0
    assert prior.reflection == flip == plain.reflection
    # a similarity is what the prior falls back to across the line; the stretch along it still comes from the data
    sv = np.linalg.svd(prior.matrix[:2, :2], compute_uv=False)
    assert sv[0] / sv[1] < 1.3 < np.divide(*np.linalg.svd(plain.matrix[:2, :2], compute_uv=False))


def test_fit_affine_shape_prior_keeps_well_spread_fits():
    """Five landmarks spread over 3 mm: the prior costs nothing at 5 % anisotropy and keeps a 15 % one."""
    th = np.radians(90.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    for aniso, tol in ((0.05, 0.5), (0.15, 3.0)):
        errs, ratios = [], []
        for seed in range(10):
            rng = np.random.default_rng(seed)
            truth = np.eye(3)
            truth[:2, :2] = 2.5 * rot @ np.array([[1 + aniso / 2, aniso / 3], [0.0, 1 - aniso / 2]])
            truth[:2, 2] = [900.0, -300.0]
            src = rng.uniform(0, 3000, size=(5, 2))
            dst = apply_affine(truth, src + rng.normal(0, 10.0, size=src.shape))  # 10 µm clicks
            grid = rng.uniform(0, 3000, size=(500, 2))
            plain, prior = fit_affine(src, dst, shape_prior=0.0), fit_affine(src, dst)
            errs.append([np.median(_tre(f.matrix, truth, grid)) / 2.5 for f in (plain, prior)])  # µm
            ratios.append(np.divide(*np.linalg.svd(prior.matrix[:2, :2], compute_uv=False)))
        errs = np.array(errs)
        assert errs[:, 1].mean() < errs[:, 0].mean() + tol, (aniso, errs.mean(axis=0))
        assert np.all(errs[:, 1] != errs[:, 0])  # the prior is applied
        if aniso == 0.15:  # not a similarity: most of the true stretch is kept (a similarity would give 1.0)
            assert np.median(ratios) > 1.1
    with pytest.raises(ValueError, match="shape_prior"):
        fit_affine(src, dst, shape_prior=-1.0)


def test_fit_affine_residuals_are_per_landmark():
    src = np.array([[0, 0], [100, 0], [0, 100], [100, 100], [50, 50], [30, 70]], float)
    dst = src.copy()
    dst[3] += [4.0, 0.0]
    fit = fit_affine(src, dst)
    assert fit.residuals.shape == (6,)
    assert fit.residuals.argmax() == 3
    manual = np.linalg.norm(src @ fit.matrix[:2, :2].T + fit.matrix[:2, 2] - dst, axis=1)
    np.testing.assert_allclose(fit.residuals, manual)
    assert fit.rms == pytest.approx(np.sqrt(np.mean(manual**2)))
    assert 0 < fit.residuals[3] < 4.0  # least squares absorbs part of the displacement


def test_similarity_reflects_only_when_the_mirror_fits_clearly_better():
    """A mirrored similarity must explain the landmarks four times better than a proper one to be chosen: here it
    fits 2.4x better (three noisy landmarks), which is not enough; a truly mirrored set is."""
    s = np.array([[472.3, 912.6], [765.9, 915.3], [127.4, 73.6]])
    d = np.array([[-1042.8, 932.2], [-926.9, 463.4], [-170.9, 229.1]])
    rss = {r: float((fit_affine(s, d, "similarity", reflection=r).residuals ** 2).sum()) for r in (False, True)}
    assert 0.25 < rss[True] / rss[False] < 0.5
    assert not fit_affine(s, d, "similarity").reflection
    mirrored = s * [-1.0, 1.0] + [[3.0, -2.0], [-1.0, 4.0], [2.0, 1.0]]
    assert fit_affine(s, mirrored, "similarity").reflection


def test_decompose_affine_reads_back_a_known_matrix():
    th = np.deg2rad(30.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m = np.eye(3)
    m[:2, :2] = rot @ np.diag([-1.0, 1.0]) @ np.diag([3.0, 0.75])  # stretch, mirror x, rotate
    m[:2, 2] = [12.0, -5.0]
    d = decompose_affine(m)
    assert d["rotation_deg"] == pytest.approx(30.0) and d["reflection"]
    assert d["scale"] == pytest.approx(1.5)  # the geometric mean of 3 and 0.75
    np.testing.assert_allclose(sorted(d["singular_values"]), [0.75, 3.0])
    np.testing.assert_allclose(d["stretch"], np.diag([3.0, 0.75]), atol=1e-12)
    np.testing.assert_allclose(d["translation"], [12.0, -5.0])


def test_integer_images_are_scaled_to_unit_range():
    rgb = np.full((5, 6, 3), 255, dtype=np.uint8)
    rgb[..., 1] = 51
    img = lddmm_mod.as_image(rgb, name="he")  # channel-last, as read from a PNG
    assert img.data.shape == (3, 5, 6)
    np.testing.assert_allclose(img.data[:, 0, 0], [1.0, 0.2, 1.0])
    img16 = lddmm_mod.as_image(np.full((4, 4), 65535, dtype=np.uint16))
    assert img16.data.max() == 1.0


def test_a_2x3_affine_is_completed_with_the_homogeneous_row():
    from spatialdata_align.registration._utils import homogeneous

    m = homogeneous([[2.0, 0.5, 10.0], [-0.5, 2.0, 20.0]])
    np.testing.assert_array_equal(m, [[2.0, 0.5, 10.0], [-0.5, 2.0, 20.0], [0.0, 0.0, 1.0]])


def test_fit_affine_errors():
    src = np.array([[0, 0], [100, 0], [0, 100]], float)
    with pytest.raises(ValueError, match="at least 3"):
        fit_affine(src[:2], src[:2])
    with pytest.raises(ValueError, match="3 source and 2 target"):
        fit_affine(src, src[:2])
    with pytest.raises(ValueError, match="non-finite"):
        fit_affine(np.vstack([src, [np.nan, 1]]), np.vstack([src, [1, 1]]))
    collinear = np.array([[0, 0], [100, 100], [200, 200.0001], [300, 300]])
    with pytest.raises(ValueError, match="condition number"):
        fit_affine(collinear, collinear)
    with pytest.raises(ValueError, match="kind"):
        fit_affine(src, src, kind="projective")


# --------------------------------------------------------------------------- auto init
@pytest.mark.parametrize("flip", [False, True])
def test_auto_init_recovers_rotation_scale_and_flip(flip):
    toy = Toy(n=30_000, flip=flip)
    res = auto_init(toy.source, toy.target)
    truth = decompose_affine(toy.affine)
    assert res.reflection == flip
    d = (res.rotation_deg - truth["rotation_deg"] + 180) % 360 - 180
    assert abs(d) < 2.0
    assert res.scale == pytest.approx(truth["scale"], rel=0.05)
    # the translation is right too: tissue centre lands within a few pixels
    c = toy.src_pts.mean(0)
    assert np.linalg.norm(res.matrix[:2, :2] @ c + res.matrix[:2, 2] - toy.forward(c[None])[0]) < 80


@pytest.mark.parametrize("flip", [False, True])
def test_auto_init_with_a_known_scale_places_a_partial_section(flip):
    """A source covering only part of the target tissue (a Xenium region in a larger section) is placed right.

    With the scale known (from the Visium scale factors) every rotation's translation is searched over all shifts,
    and only the source has to land on tissue; whole-mask matching would centre the part on the whole.
    """
    toy = Toy(n=30_000, flip=flip, warp=0.0)
    part = toy.src_pts[toy.src_pts[:, 0] < 1400]  # the left ~70 % of the tissue
    src = rasterize(part, dx=25.0)
    truth = decompose_affine(toy.affine)
    res = auto_init(src, toy.target, scale=truth["scale"])
    assert res.reflection == flip
    assert abs((res.rotation_deg - truth["rotation_deg"] + 180) % 360 - 180) < 3.0
    assert res.scale == pytest.approx(truth["scale"], rel=0.05)
    err = np.linalg.norm(part @ res.matrix[:2, :2].T + res.matrix[:2, 2] - toy.forward(part), axis=1)
    # target units (~1.55 per source µm): about one 25 µm raster pixel; matching the whole masks instead (no
    # scale) gives ~240 here
    assert np.median(err) < 60
    assert res.margin > 0.15 and res.coarse_margin > 0.15  # the other orientations score clearly lower
    with pytest.raises(ValueError, match="scale must be a positive"):
        auto_init(src, toy.target, scale=-1.0)


def _symmetric_pair(rotation_deg: float, flip: bool, seed: int = 0):
    """An ellipse of uniform density (its outline fits four orientations equally) and a target section of it.

    The source carries two expression fields, its x and y coordinates; the target's spots hold them at the spots'
    true source positions. Returns the source raster, the target H&E-like image, the spot inputs and the truth.
    """
    rng = np.random.default_rng(seed)
    a, b = 900.0, 500.0

    def cells(n):
        p = rng.uniform(-1, 1, size=(3 * n, 2))
        return (p[(p**2).sum(1) < 1][:n] * [a, b]) + [1000.0, 800.0]

    src_pts = cells(12_000)
    th = np.radians(rotation_deg)
    m = np.eye(3)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m[:2, :2] = 1.5 * rot @ np.diag([-1.0 if flip else 1.0, 1.0])
    m[:2, 2] = [2500.0, 2000.0] - m[:2, :2] @ [1000.0, 800.0]
    source = rasterize(src_pts, dx=25.0)
    tp = cells(12_000) @ m[:2, :2].T + m[:2, 2]
    dens = rasterize(tp, dx=20.0, blur=20.0, extent=(0, 5000, 0, 4000))
    tis = np.clip(dens.values[0] / np.quantile(dens.values[0][dens.values[0] > 0], 0.5), 0, 1)[None]
    rgb = 0.95 * (1 - tis) + tis * np.array([0.85, 0.55, 0.7])[:, None, None]
    rgb = rgb + rng.normal(scale=0.02, size=rgb.shape)
    target = xr.DataArray(rgb, dims=("c", "y", "x"), coords={"c": [0, 1, 2], "y": dens.y.values, "x": dens.x.values})
    gx, gy = np.meshgrid(np.arange(0, 5000, 150.0), np.arange(0, 4000, 150.0))
    spots = np.stack([gx.ravel(), gy.ravel()], 1)
    at_src = (spots - m[:2, 2]) @ np.linalg.inv(m[:2, :2]).T
    inside = (((at_src - [1000.0, 800.0]) / [a, b]) ** 2).sum(1) < 0.8
    spots, at_src = spots[inside], at_src[inside]
    fx, fy = np.meshgrid(source.x.values, source.y.values)
    on = source.values[0] > 0
    features = xr.DataArray(
        np.stack([(fx - 1000.0) * on, (fy - 800.0) * on]),
        dims=("c", "y", "x"),
        coords={"c": [0, 1], "y": source.y.values, "x": source.x.values},
    )
    values = (at_src - [1000.0, 800.0]) + rng.normal(scale=100.0, size=at_src.shape)
    return source, target, {"target_spots": spots, "spot_values": values, "source_features": features}, m


@pytest.mark.parametrize(("rotation_deg", "flip"), [(40.0, False), (220.0, False), (40.0, True), (220.0, True)])
def test_auto_init_expression_tells_symmetric_orientations_apart(rotation_deg, flip):
    """An outline that fits four orientations: the shared-gene agreement at the spots picks the true one.

    The ellipse fits the truth, its 180° turn and their two mirror images equally well, so the image score alone
    picks one of them by noise (right on some of these four cases, wrong on the others); the expression fields
    (x and y gradients) correlate +1 with the spots only for the truth.
    """
    source, target, spots, m = _symmetric_pair(rotation_deg, flip)
    truth = decompose_affine(m)
    res = auto_init(source, target, scale=1.5, **spots)
    assert res.reflection == flip
    assert abs((res.rotation_deg - truth["rotation_deg"] + 180) % 360 - 180) < 5.0
    assert res.expression_r > 0.8
    assert res.margin > 1.0  # the other orientations' expression correlates at 0 (mirrored) or -1 (turned)
    from spatialdata_align.registration._init import _SpotAgreement

    agree = _SpotAgreement.from_inputs(**spots)
    turned = m @ np.array([[-1.0, 0, 2000.0], [0, -1.0, 1600.0], [0, 0, 1]])  # the same outline, turned by 180°
    assert agree(m) > 0.9 and agree(turned) < -0.9
    assert np.isnan(auto_init(source, target, scale=1.5).expression_r)
    with pytest.raises(ValueError, match="together"):
        auto_init(source, target, target_spots=spots["target_spots"])
    with pytest.raises(ValueError, match="spot_values must be"):
        auto_init(source, target, **{**spots, "spot_values": spots["spot_values"][:, :1]})
    # the LDDMM spot term checks the same inputs the same way (before any work)
    with pytest.raises(ValueError, match="the spot term needs"):
        lddmm(source, target, source_features=spots["source_features"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        lddmm(source, target, **{**spots, "spot_values": np.full_like(spots["spot_values"], np.nan)})


def test_coarse_margin_is_the_chosen_orientation_over_any_other():
    import pandas as pd

    from spatialdata_align.registration._init import _coarse_margin

    table = pd.DataFrame(
        {
            "reflection": [True, True, True, False, False, False],
            "angle_deg": [130.0, 145.0, 300.0, 125.0, 312.0, 10.0],
            "score": [0.459, 0.450, 0.30, 0.447, 0.40, 0.20],
        }
    )
    # chosen: mirrored at ~136°: its orientation's best (0.459, within 20°) over the best other (0.447, unmirrored)
    assert _coarse_margin(table, True, 136.0) == pytest.approx(0.012)
    # chosen: unmirrored at -48° (= 312°): 0.40 against the mirrored 0.459
    assert _coarse_margin(table, False, -48.0) == pytest.approx(-0.059)
    # 350° and 10° are 20° apart (the same orientation across 0°), 312° is 38° away
    assert _coarse_margin(table, False, 350.0) == pytest.approx(0.20 - 0.459)
    assert np.isnan(_coarse_margin(table.iloc[:1], True, 130.0))  # nothing else searched


def test_stain_densities_recover_the_stains_of_a_beer_lambert_image():
    """Pixels stained with known amounts of haematoxylin and eosin (Beer-Lambert, Ruifrok's stain colours, 8-bit):
    the densities come back to the quantisation of 8 bits, each stain in its own channel."""
    from skimage.color import rgb_from_hed

    from spatialdata_align.registration import stain_densities

    rng = np.random.default_rng(0)
    h, e = rng.uniform(0, 1.2, (2, 20, 30))
    od = h[None] * rgb_from_hed[0][:, None, None] + e[None] * rgb_from_hed[1][:, None, None]
    rgb = np.clip(np.round(255 * np.exp(-od)), 0, 255).astype(np.uint8)
    x, y = np.arange(30) * 2.0 + 1.0, np.arange(20) * 2.0 + 5.0
    got = stain_densities(xr.DataArray(rgb, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"], "y": y, "x": x}))
    assert got.dims == ("c", "y", "x") and list(got.c.values) == ["haematoxylin", "eosin"]
    np.testing.assert_array_equal(got.x, x)
    np.testing.assert_array_equal(got.y, y)
    np.testing.assert_allclose(got.values[0], h, atol=0.03)
    np.testing.assert_allclose(got.values[1], e, atol=0.03)
    # white is no stain; float input in [0, 1] is the same image
    assert np.abs(stain_densities(np.full((3, 2, 2), 255, np.uint8)).values).max() < 1e-6
    np.testing.assert_allclose(stain_densities(rgb / 255.0).values, got.values, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(3, y, x\) RGB"):
        stain_densities(np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stain_densities(rgb.astype(float))


def test_celltype_channels_partition_the_density():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, size=(4000, 2))
    labels = np.where(xy[:, 0] < 200, "a", np.where(xy[:, 1] < 250, "b", "c"))
    grid = rasterize(xy, dx=10.0)
    img = celltype_channels(xy, labels, grid, blur=0.0)
    assert list(img.c.values) == ["density", "type_a", "type_b", "type_c"]
    np.testing.assert_allclose(img.values[1:].sum(0), img.values[0], rtol=1e-6, atol=1e-9)
    # each type's channel holds its own cells only (no blur): type a lives left of x = 200 µm
    left = img.x.values < 210  # one pixel of bilinear spread past 200 µm
    assert img.sel(c="type_a").values[:, ~left].max() == 0 and img.sel(c="type_a").values[:, left].sum() > 0
    with pytest.raises(ValueError, match="one entry per cell"):
        celltype_channels(xy, labels[:-1], grid)
    # grids whose extent, rebuilt from the pixel centres, is n pixels only up to rounding: still n pixels
    dx, hits = 20.0, 0
    for x0, n in [(2756.9118810182836, 293), (3009.1703660860903, 289), (2551.1810656012703, 296), (100.0, 50)]:
        xs = x0 + (np.arange(n) + 0.5) * dx
        d = xs[1] - xs[0]  # the pixel size as read back from the coordinates
        hits += np.ceil(((xs[-1] + d / 2) - (xs[0] - d / 2)) / d) != n
        pts = np.column_stack([xs, xs])
        g = xr.DataArray(np.zeros((1, n, n)), dims=("c", "y", "x"), coords={"c": [0], "y": xs, "x": xs})
        assert celltype_channels(pts, np.arange(n) % 2, g).shape == (3, n, n)
    assert hits == 3  # the first three are such grids


# --------------------------------------------------------------------------- lddmm
def test_lddmm_improves_on_affine_and_inverts(toy, toy_reg):
    fit, reg = toy_reg
    tre_aff = toy.tre(fit.transform_points(toy.src_pts))
    tre_lddmm = toy.tre(reg.transform_points(toy.src_pts))
    assert np.median(tre_lddmm) < 0.75 * np.median(tre_aff)
    assert np.percentile(tre_lddmm, 95) < np.percentile(tre_aff, 95)
    assert np.median(tre_lddmm) < 7.0
    back = reg.transform_points(reg.transform_points(toy.src_pts), "inverse")
    assert np.abs(back - toy.src_pts).max() < 1e-6
    assert reg.has_velocity
    assert set(reg.energy.columns) >= {"level", "total", "match", "reg", "landmark"}
    # energy decreases within every stage (monotone line search; float32 arrays: 1e-7 relative noise)
    for _, grp in reg.energy.groupby(["level", "stage"]):
        assert np.all(np.diff(grp.total.values) <= 1e-7 * np.abs(grp.total.values[:-1]) + 1e-9)


def test_lddmm_result_objects(toy_reg):
    _, reg = toy_reg
    v = reg.velocity
    assert isinstance(v, xr.DataArray) and v.dims == ("t", "c", "y", "x")
    assert v.shape[0] == reg.params["nt"]
    mw = reg.match_weight
    assert mw.dims == ("y", "x") and float(mw.min()) >= 0 and float(mw.max()) <= 1
    assert float(mw.max()) > 0.9  # tissue is matched somewhere


def test_lddmm_is_bit_reproducible(toy):
    kw = dict(FAST, scales=(2, 1), max_iter=(15, 10), affine_iter=10)
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    r1 = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    r2 = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    assert np.array_equal(r1.velocity_values, r2.velocity_values)
    assert np.array_equal(r1.affine, r2.affine)
    assert np.array_equal(r1.energy.total.values, r2.energy.total.values)


def test_progress_bar_redraws_at_its_own_pace_not_every_iteration(toy, capsys):
    """The bar's energy/level postfix must not force a redraw per iteration: a run of hundreds of iterations then
    wrote hundreds of lines into every log (CI, nohup, a notebook's captured stderr). tqdm redraws at most every
    ``mininterval`` (0.1 s) on its own; counted here against the run's own duration, so a slow machine cannot fail it.
    """
    import time

    kw = dict(FAST, scales=(2, 1), max_iter=(40, 20), affine_iter=20, tol=0.0, min_iter=40)
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    t = time.perf_counter()
    reg = lddmm(toy.source, toy.target, affine=fit.matrix, **{**kw, "progress": True})
    elapsed = time.perf_counter() - t
    n_iter = len(reg.energy.total)
    redraws = capsys.readouterr().err.count("\r")
    assert n_iter >= 60
    assert redraws <= elapsed / 0.1 + 6, (redraws, n_iter, elapsed)


def test_lddmm_small_levels_run_on_one_thread_and_restore_the_setting(toy, monkeypatch):
    """Levels below ``SINGLE_THREAD_PIXELS`` run single-threaded; the caller's thread count comes back, also after
    a failure. Fails when the rule is dropped (two threads at every level), applied to large levels, or leaks."""
    from spatialdata_align.registration import _lddmm

    kw = dict(FAST, scales=(2, 1), max_iter=(3, 2), affine_iter=2)
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    before = torch.get_num_threads()
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    try:
        real(2)
        lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
        assert calls[0] == 1 and calls[-1] == 2 and torch.get_num_threads() == 2, calls  # toy grids are small
        calls.clear()
        monkeypatch.setattr(_lddmm, "SINGLE_THREAD_PIXELS", 1)  # every level "large": the caller's setting
        lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
        assert set(calls) == {2}, calls
        monkeypatch.setattr(_lddmm, "SINGLE_THREAD_PIXELS", 10**9)
        monkeypatch.setattr(_lddmm.MixtureTerm, "energy", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
        assert torch.get_num_threads() == 2
    finally:
        real(before)


def test_registration_dict_round_trip_is_lossless(toy, toy_reg):
    _, reg = toy_reg
    back = Registration.from_dict(reg.to_dict())
    pts = toy.src_pts[:500]
    assert np.array_equal(back.transform_points(pts), reg.transform_points(pts))
    assert np.array_equal(back.velocity_values, reg.velocity_values)
    assert back.params == reg.params
    assert np.array_equal(back.match_weight.values, reg.match_weight.values)
    np.testing.assert_array_equal(back.energy.total.values, reg.energy.total.values)
    assert set(back.contrast) == set(reg.contrast) and "priors_in" in reg.contrast
    for k, v in reg.contrast.items():
        np.testing.assert_array_equal(back.contrast[k], v)
    assert back.source_extent == reg.source_extent and back.target_extent == reg.target_extent
    assert reg.target_extent is not None


def test_match_weight_is_read_where_the_source_points_land():
    """The match weight lives on the target grid; ``match_weight_at`` maps source points there first (forward), or
    reads target points as they are (``direction="inverse"``). A weight ramp along target x tells the two apart."""
    x, y = np.arange(0.0, 1000.0, 10.0), np.arange(0.0, 800.0, 10.0)
    ramp = np.broadcast_to(x / 1000.0, (y.size, x.size)).copy()
    mw = xr.DataArray(ramp, dims=("y", "x"), coords={"y": y, "x": x}, name="match_weight")
    reg = Registration.from_affine(np.array([[2.0, 0.0, 100.0], [0.0, 2.0, 50.0], [0.0, 0.0, 1.0]]))
    reg.match_weight = mw
    src = np.array([[50.0, 100.0], [200.0, 300.0], [400.0, 10.0]])
    np.testing.assert_allclose(reg.match_weight_at(src), (2.0 * src[:, 0] + 100.0) / 1000.0, atol=1e-12)
    np.testing.assert_allclose(reg.match_weight_at(src, direction="inverse"), src[:, 0] / 1000.0, atol=1e-12)
    assert reg.match_weight_at(np.array([[600.0, 10.0]]))[0] == 0.0  # lands beyond the grid: no match


def test_velocity_extrapolates_at_the_border(toy_reg):
    _, reg = toy_reg
    x_out = reg.xv[-1] + 5000.0
    y_mid = reg.yv[len(reg.yv) // 2]
    d_edge = reg.displacement(x=[reg.xv[-1]], y=[y_mid]).values[:, 0, 0]
    d_out = reg.displacement(x=[x_out], y=[y_mid]).values[:, 0, 0]
    # border extension: far outside the grid the displacement equals the edge one (not zero)
    np.testing.assert_allclose(d_out, d_edge, atol=1e-9)


def test_displacement_in_each_direction_of_a_constant_velocity():
    """A constant velocity v (identity affine) moves every point by v: ``displacement`` is +v forward, -v inverse.

    The same holds in the sampled (stored) form. Fails when the inverse direction returns the forward displacement.
    """
    xv = np.linspace(-50.0, 250.0, 31)
    shift = np.array([7.0, -4.0])  # source units over unit time
    v = np.zeros((5, 2, xv.size, xv.size))
    v[:, 0], v[:, 1] = shift
    reg = Registration(affine=np.eye(3), velocity_values=v, xv=xv, yv=xv)
    x, y = np.linspace(20.0, 180.0, 9), np.linspace(30.0, 170.0, 8)
    sampled = reg.to_displacement(source_extent=(0, 200, 0, 200), target_extent=(0, 200, 0, 200))
    for r, atol in ((reg, 1e-8), (sampled, 1e-6)):
        fwd = r.displacement(x, y, "forward")
        inv = r.displacement(x, y, "inverse")
        assert fwd.dims == ("c", "y", "x") and fwd.shape == (2, 8, 9) and inv.attrs["direction"] == "inverse"
        np.testing.assert_allclose(fwd.values, np.broadcast_to(shift[:, None, None], (2, 8, 9)), atol=atol)
        np.testing.assert_allclose(inv.values, np.broadcast_to(-shift[:, None, None], (2, 8, 9)), atol=atol)


def test_optimiser_inverse_displacement_matches_the_exact_inverse_flow():
    """The optimiser pulls the target back through ``inverse_displacement`` (semi-Lagrangian, on the velocity grid);
    the result maps points through ``flow_inverse`` (fixed point to 1e-12). Both must be the same map.

    64 µm of displacement over five time steps on a 30 µm grid: they agree to 0.53 µm inside the grid. Composing the
    steps without resampling the earlier displacement gives 7.4 µm, no fixed-point refinement of each inverse step
    3.9 µm.
    """
    xv, yv = np.linspace(0, 1200, 41), np.linspace(0, 1000, 35)
    gx, gy = np.meshgrid(xv, yv)
    v0 = np.stack([40 * np.sin(gx / 250) * np.cos(gy / 300), 35 * np.cos(gx / 200 + gy / 350)])
    v = torch.as_tensor(np.stack([v0 * (1 + 0.3 * t) for t in range(5)]))
    d = inverse_displacement(v, xv, yv).numpy()
    nodes = np.column_stack([gx.ravel(), gy.ravel()])
    exact = flow_inverse(torch.as_tensor(nodes), v, xv, yv, tol=1e-12).numpy() - nodes
    assert np.abs(exact).max() > 60.0
    err = np.hypot(d[0].ravel() - exact[:, 0], d[1].ravel() - exact[:, 1])
    inner = ((gx > 100) & (gx < 1100) & (gy > 100) & (gy < 900)).ravel()
    assert err[inner].max() < 1.0
    assert np.median(err) < 0.3


def test_warp_image_both_directions(toy, toy_reg):
    _, reg = toy_reg
    fwd = reg.warp_image(toy.source)  # source density onto the target grid
    assert fwd.dims == ("c", "y", "x")
    tgt_dark = 1 - toy.target.mean("c")
    dens = fwd.isel(c=0).interp(x=tgt_dark.x, y=tgt_dark.y).fillna(0)
    r = np.corrcoef(dens.values.ravel(), tgt_dark.values.ravel())[0, 1]
    assert r > 0.6
    back = reg.warp_image(
        toy.target, direction="inverse", out_x=toy.source.x.values, out_y=toy.source.y.values, fill=0.95
    )
    dark_back = 1 - back.mean("c")
    r2 = np.corrcoef(dark_back.values.ravel(), toy.source.values[0].ravel())[0, 1]
    assert r2 > 0.6


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_warp_image_moves_pixels_by_the_velocity(direction):
    """A constant velocity (identity affine) translates by exactly its value: a warp that ignores it fails."""
    xv = np.linspace(-50.0, 250.0, 31)
    shift = np.array([7.0, -4.0])  # source units over unit time
    v = np.zeros((5, 2, xv.size, xv.size))
    v[:, 0], v[:, 1] = shift
    reg = Registration(affine=np.eye(3), velocity_values=v, xv=xv, yv=xv)
    x = np.arange(200) + 0.5
    img = np.zeros((1, 200, 200))
    img[0, 90:110, 80:100] = 1.0  # a square centred at (90, 100)
    out = reg.warp_image(img, x, x, out_x=x, out_y=x, direction=direction).values[0]
    w = out / out.sum()
    centre = np.array([(w.sum(0) * x).sum(), (w.sum(1) * x).sum()])
    sign = 1.0 if direction == "forward" else -1.0
    np.testing.assert_allclose(centre, np.array([90.0, 100.0]) + sign * shift, atol=0.1)
    np.testing.assert_allclose(reg.transform_points([[90.0, 100.0]], direction)[0], centre, atol=0.1)


def test_affine_only_registration():
    m = np.array([[2.0, 0, 10], [0, 2.0, -5], [0, 0, 1]])
    reg = Registration.from_affine(m)
    pts = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(reg.transform_points(pts), [[12, -1], [16, 3]])
    np.testing.assert_allclose(reg.transform_points(reg.transform_points(pts), "inverse"), pts)
    assert not reg.has_velocity
    with pytest.raises(ValueError, match="direction"):
        reg.transform_points(pts, "sideways")


def test_lddmm_landmark_term_pulls_landmarks(toy):
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    kw = dict(FAST, scales=(2,), max_iter=(30,), affine_iter=0)
    free = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    tied = lddmm(
        toy.source,
        toy.target,
        affine=fit.matrix,
        source_landmarks=toy.landmarks_src,
        target_landmarks=toy.landmarks_dst,
        sigma_p=2.0,
        **kw,
    )
    err = lambda r: np.linalg.norm(r.transform_points(toy.landmarks_src) - toy.landmarks_dst, axis=1).mean()
    assert err(tied) < err(free)
    assert tied.energy.landmark.iloc[-1] > 0


def _disk_pair(rng, *, cut: float | None = None, fold: bool = False):
    """Cells of a 300 µm disk (centre (500, 500) µm), rasterised, and an H&E-like image of the disk in the same frame.

    ``cut``: the source keeps the cells left of ``x = cut`` only (a partial field of view, the target shows the whole
    disk). ``fold``: a dark 140 µm square inside the target disk (a fold or debris: tissue without a source
    counterpart). The true map is the identity.
    """
    n = 30_000
    r, t = 300 * np.sqrt(rng.uniform(size=n)), rng.uniform(0, 2 * np.pi, n)
    cells = np.column_stack([500 + r * np.cos(t), 500 + r * np.sin(t)])
    if cut is not None:
        cells = cells[cells[:, 0] < cut]
    x = np.arange(0, 1000, 10.0) + 5
    gx, gy = np.meshgrid(x, x)
    tissue = (np.hypot(gx - 500, gy - 500) < 300)[None]
    dark = ((np.abs(gx - 560) < 70) & (np.abs(gy - 480) < 70))[None] if fold else np.zeros_like(tissue)
    white, purple = np.array([0.95, 0.95, 0.95])[:, None, None], np.array([0.45, 0.2, 0.6])[:, None, None]
    rgb = np.where(dark, 0.1, np.where(tissue, purple, white)) + rng.normal(scale=0.03, size=(3, x.size, x.size))
    target = xr.DataArray(rgb, dims=("c", "y", "x"), coords={"c": [0, 1, 2], "y": x, "x": x})
    return cells, rasterize(cells, dx=20.0), target


DISK_KW = {"progress": False, "scales": (2, 1), "max_iter": (30, 15), "affine_iter": 10}


def test_lddmm_artifact_class_explains_a_fold_the_source_lacks():
    """Target tissue under the source that the contrast map cannot explain (a dark fold) goes to the artifact class.

    The match weight is ~0 on the fold and ~1 on the rest of the tissue; without the artifact class (``artifact=False``)
    the fold has to be called matched. Fails when ``lddmm`` drops the artifact class.
    """
    _, source, target = _disk_pair(np.random.default_rng(0), fold=True)
    fold, tissue = {"x": slice(510, 610), "y": slice(430, 530)}, {"x": slice(300, 420), "y": slice(400, 600)}
    reg = lddmm(source, target, sigma_m=0.05, **DISK_KW)  # the target's noise is 0.03
    mw = reg.match_weight
    assert float(mw.sel(**fold).mean()) < 0.05
    assert float(mw.sel(**tissue).mean()) > 0.95
    assert reg.contrast["priors_in"][2] == pytest.approx(0.05) and reg.params["artifact"] is True
    without = lddmm(source, target, sigma_m=0.05, artifact=False, **DISK_KW).match_weight
    assert float(without.sel(**fold).mean()) > 0.9


def test_lddmm_affine_prior_keeps_a_partial_section_in_place():
    """A source covering the left 60 % of a featureless disk (truth: the identity) stays within ~10 µm of its place.

    Without the prior on the affine's change (``sigma_affine=0``) and without the field of view (which finds the cut
    and alone keeps the section within ~5 µm) it slides over the tissue it lacks: ~22 µm median, ~40 µm at worst
    (both runs converged). Fails when the prior is dropped.
    """
    cells, source, target = _disk_pair(np.random.default_rng(0), cut=450.0)
    kw = {"progress": False, "scales": (2, 1), "max_iter": (200, 100), "affine_iter": 100}
    moved = lambda reg: np.linalg.norm(reg.transform_points(cells) - cells, axis=1)
    d = moved(lddmm(source, target, **kw))
    assert np.median(d) < 12.0 and d.max() < 20.0
    free = moved(lddmm(source, target, sigma_affine=0, field_of_view=None, **kw))
    assert np.median(free) > 16.0 and free.max() > 30.0


def test_lddmm_field_of_view_keeps_a_cut_edge_in_place():
    """The source covers the disk left of a straight cut at x = 450 µm; the target shows the whole disk (truth: the
    identity). Without a field of view the cut edge is stretched ~10 µm over the tissue beyond it (matching it is
    rewarded over calling it tissue the source lacks); with it (``"auto"``, the default: the cut is found as the side
    of the tissue's bounding box along which the target's tissue goes on) the edge stays within ~3 µm. The disk's
    own edges are not cuts. Fails when the field of view is not found, or not used by the data term."""
    cells, source, target = _disk_pair(np.random.default_rng(0), cut=450.0)
    kw = {"progress": False, "scales": (2, 1), "max_iter": (200, 100), "affine_iter": 100}
    near = cells[:, 0] > 420
    reg = lddmm(source, target, **kw)
    x0, x1, y0, y1 = reg.params["field_of_view"]
    assert x0 is None and y0 is None and y1 is None and 430 < x1 < 460  # the cut, at the tissue's half level - 1 px
    d = reg.transform_points(cells[near]) - cells[near]
    assert abs(d[:, 0].mean()) < 3.0
    # the stored box (None for an open side) is a valid field_of_view: the accuracy estimate's refits pass it back
    again = lddmm(source, target, **{**kw, "max_iter": (2, 2), "field_of_view": reg.params["field_of_view"]})
    assert again.params["field_of_view"] == reg.params["field_of_view"]
    with pytest.raises(ValueError, match="field_of_view must be"):
        lddmm(source, target, **{**kw, "field_of_view": [None, None, 5.0, "x"]})
    with pytest.raises(ValueError, match="field_of_view must be"):
        lddmm(source, target, **{**kw, "field_of_view": 5.0})
    old = lddmm(source, target, field_of_view=None, **kw)
    assert old.params["field_of_view"] is None
    assert (old.transform_points(cells[near]) - cells[near])[:, 0].mean() > 8.0
    # a whole disk has no cut
    _, whole, target = _disk_pair(np.random.default_rng(1))
    assert lddmm(whole, target, **{**kw, "max_iter": (2, 2), "affine_iter": 0}).params["field_of_view"] is None


def test_blur_image_is_a_gaussian_in_physical_units_on_any_grid():
    """A unit mass on a 2 x 4 µm grid, blurred by 12 µm: variance 144 µm² along both axes, mass kept."""
    from spatialdata_align.registration._utils import Image, blur_image

    x, y = np.arange(0.0, 400.0, 2.0) + 1.0, np.arange(0.0, 400.0, 4.0) + 2.0
    data = np.zeros((1, y.size, x.size))
    data[0, 50, 100] = 1.0
    out = blur_image(Image(data, x, y), 12.0)
    w = out.data[0]
    gx, gy = np.meshgrid(x, y)
    assert w.sum() == pytest.approx(1.0, rel=1e-6)
    assert (w * (gx - x[100]) ** 2).sum() == pytest.approx(144.0, rel=0.02)
    assert (w * (gy - y[50]) ** 2).sum() == pytest.approx(144.0, rel=0.02)
    assert blur_image(Image(data, x, y), 0.0).data is data


def test_lddmm_target_blur_is_a_gaussian_at_the_working_resolution(toy):
    """``target_blur`` (source units) blurs the target after block-averaging it to the working pixel: the same fit as
    a target blurred so by hand; a different one from no blur; the stored target extent is the image's own."""
    from scipy.ndimage import gaussian_filter

    from spatialdata_align.registration._utils import as_image

    A = fit_affine(toy.landmarks_src, toy.landmarks_dst).matrix
    kw = dict(FAST, scales=(2, 1), max_iter=(15, 8), affine_iter=0)
    blurred = lddmm(toy.source, toy.target, affine=A, target_blur=40.0, **kw)
    scale = abs(np.linalg.det(A[:2, :2])) ** 0.5
    J = as_image(toy.target)
    base = round(float(toy.source.x[1] - toy.source.x[0]) * scale / J.dx)
    assert base == 2  # the toy target is block-averaged by 2 first
    Jb = J.downsample(base)
    sig = (40.0 * scale / Jb.dy, 40.0 * scale / Jb.dx)
    by_hand = xr.DataArray(
        np.stack([gaussian_filter(c, sig, mode="nearest") for c in Jb.data]),
        dims=("c", "y", "x"),
        coords={"y": Jb.y, "x": Jb.x},
    )
    ref = lddmm(toy.source, by_hand, affine=A, **kw)
    pts = toy.src_pts[::500]
    np.testing.assert_allclose(blurred.transform_points(pts), ref.transform_points(pts), atol=1e-3)
    plain = lddmm(toy.source, toy.target, affine=A, **kw)
    assert np.abs(plain.transform_points(pts) - blurred.transform_points(pts)).max() > 1.0
    assert blurred.params["target_blur"] == 40.0 and plain.params["target_blur"] == 0.0
    np.testing.assert_allclose(blurred.target_extent, plain.target_extent)
    with pytest.raises(ValueError, match="target_blur"):
        lddmm(toy.source, toy.target, affine=A, target_blur=-1.0, **kw)


def test_lddmm_input_errors(toy):
    with pytest.raises(ValueError, match="zero variance"):
        lddmm(np.zeros((1, 20, 20)), toy.target, progress=False)
    with pytest.raises(ValueError, match="zero variance"):
        lddmm(toy.source, np.ones((3, 20, 20)), progress=False)
    bad = toy.source.copy()
    bad.values[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lddmm(bad, toy.target, progress=False)
    with pytest.raises(ValueError, match="empty or degenerate"):
        lddmm(np.zeros((1, 0, 5)), toy.target, progress=False)
    with pytest.raises(ValueError, match="matched pairs"):
        lddmm(
            toy.source, toy.target, source_landmarks=np.zeros((3, 2)), target_landmarks=np.zeros((2, 2)), progress=False
        )
    with pytest.raises(ValueError, match="sigma_r"):
        lddmm(toy.source, toy.target, sigma_r=-1, progress=False)


def test_lddmm_divergence_returns_last_good_state(toy, monkeypatch):
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    real = lddmm_mod._Evaluation._score
    calls = {"n": 0}

    def flaky(self, want_post):
        calls["n"] += 1
        real(self, want_post)
        if calls["n"] > 12:
            self.total = self.total * torch.tensor(float("nan"), dtype=self.total.dtype)
            self.finite = False

    monkeypatch.setattr(lddmm_mod._Evaluation, "_score", flaky)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        reg = lddmm(toy.source, toy.target, affine=fit.matrix, **dict(FAST, scales=(2,), max_iter=(40,)))
    assert any(issubclass(w.category, RegistrationDivergedWarning) for w in rec)
    assert reg.params["diverged"] or len(reg.energy) < 40
    assert np.all(np.isfinite(reg.affine)) and np.all(np.isfinite(reg.velocity_values))
    assert np.all(np.isfinite(reg.transform_points(toy.src_pts[:10])))


def test_lddmm_lazy_gradient_and_refresh_follow_the_same_path(toy, monkeypatch):
    """The optimiser takes gradients of accepted trials only and, after an M-step, re-scores the kept deformed
    source instead of integrating the flow again. Both are savings, not changes: the energies of every step equal
    those of the plain path (a full evaluation after each M-step), and there is one backward pass per accepted step
    and per M-step, fewer than the line-search trials."""
    from spatialdata_align.registration._data import MixtureTerm

    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    kw = dict(FAST, scales=(2, 1), max_iter=(25, 10), affine_iter=10, em_every=2, dtype=torch.float64)
    counts = {"backward": 0, "m_step": 0}
    grad, m_step = torch.autograd.grad, MixtureTerm.m_step

    def counted_grad(*a, **k):
        counts["backward"] += 1
        return grad(*a, **k)

    def counted_m_step(self, *a, **k):
        counts["m_step"] += 1
        return m_step(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(torch.autograd, "grad", counted_grad)
        mp.setattr(MixtureTerm, "m_step", counted_m_step)
        lazy = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    trials = int(lazy.energy["trials"].sum())
    assert trials > len(lazy.energy)  # some trials were rejected, so laziness is tested
    assert counts["backward"] == len(lazy.energy) + counts["m_step"]

    def full_refresh(self):  # the plain path: evaluate the point afresh with the updated mixture
        fresh = self.prob.evaluate(self.lvl, self.x, self.mask)
        self.__dict__.update(fresh.__dict__)
        return self

    monkeypatch.setattr(lddmm_mod._Evaluation, "refresh", full_refresh)
    plain = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    assert lazy.energy["total"].tolist() == plain.energy["total"].tolist()
    np.testing.assert_array_equal(lazy.velocity_values, plain.velocity_values)


def test_lddmm_float32_path(toy):
    """The float32 path (the default on CUDA) runs and agrees with float64 to a fraction of a pixel."""
    kw = dict(FAST, scales=(2, 1), max_iter=(15, 10), affine_iter=10)
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    r64 = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    r32 = lddmm(toy.source, toy.target, affine=fit.matrix, dtype=torch.float32, **kw)
    assert r32.params["dtype"] == "float32"
    pts = toy.src_pts[:2000]
    d = np.linalg.norm(r32.transform_points(pts) - r64.transform_points(pts), axis=1)
    assert np.median(d) < 0.25 * toy.source.attrs["dx"] * 1.55


@pytest.mark.parametrize("n", [5000, 70000])
def test_weighted_gram_is_the_float64_product_with_or_without_work_buffer(n):
    """The mixture's Gram matrix: float32 chunks of 2^16 pixels summed in float64, the rest an exact float64 product,
    whose operands go through the work buffer when one of the right shape is given (the same numbers)."""
    from spatialdata_align.registration._data import _weighted_gram

    g = torch.Generator().manual_seed(0)
    m = torch.rand(6, n, generator=g)
    mw = m * torch.rand(n, generator=g)
    ref = mw.double() @ m.double().T
    work = torch.full((2, 6, n % (1 << 16)), float("nan"), dtype=torch.float64)
    with_work = _weighted_gram(m, mw, work)
    assert torch.equal(with_work, _weighted_gram(m, mw))
    assert torch.equal(work[1], m[:, n - n % (1 << 16) :].double())  # the buffer was used
    tol = 0.0 if n < (1 << 16) else 1e-5  # below one chunk the product is exact in float64
    assert float((with_work - ref).abs().max() / ref.abs().max()) <= tol
    assert _weighted_gram(m, mw, work[:, :, :10]).shape == (6, 6)  # a buffer of another shape is not used


@pytest.mark.parametrize(("n_channels", "fov"), [(1, False), (3, False), (2, True)])
def test_mixture_gradient_matches_finite_differences(n_channels, fov):
    """The data term's closed-form gradient (direct, through the refitted contrast, through the occupancy-dependent
    priors, through the field of view's row) matches central differences of its energy in float64, and its work
    buffers carry nothing over."""
    from spatialdata_align.registration._data import MixtureTerm

    gen = torch.Generator().manual_seed(0)
    n = 400
    J = torch.rand(3, n, generator=gen, dtype=torch.float64)
    Iw = 0.5 * torch.rand(n_channels + fov, n, generator=gen, dtype=torch.float64)
    Iw[0, :40] = 0.0  # no source tissue there: the occupancy's clamp
    if fov:  # the last row: the deformed field of view, strictly inside (0, 1)
        Iw[-1] = 0.1 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64)
    term = MixtureTerm(J, (0.1, 0.2, None), 3, (True, True, True), tissue_level=0.1, fov=fov)
    term.init_colours(J[:, :40])
    _, _, post = term.evaluate(Iw, want_post=True)
    term.m_step(post, term.occupancy(Iw), update_priors=fov)
    e, g, _ = term.evaluate(Iw)
    h = 1e-6
    for k in range(4 + fov):
        d = torch.randn(n_channels + fov, n, generator=gen, dtype=torch.float64)
        d[0, :40] = 0.0
        if k == 3:  # only the occupancy channel, where tanh(I / tau) still varies
            d[1:] = 0.0
            d[0] *= Iw[0] < 0.2
        if k == 4:  # only the field of view
            d[:-1] = 0.0
        e_plus, _, _ = term.evaluate(Iw + h * d, want_grad=False)
        e_minus, _, _ = term.evaluate(Iw - h * d, want_grad=False)
        fd = float(e_plus - e_minus) / (2 * h)
        assert float((g * d).sum()) == pytest.approx(fd, rel=1e-3)
    e_again, g_again, _ = term.evaluate(Iw)
    assert float(e_again) == float(e)
    torch.testing.assert_close(g_again, g, rtol=0, atol=0)


def test_long_kernel_scales_reach_the_finest_grid():
    """Each kernel scale has its own velocity grid (coarser for longer scales); their fields are resampled onto the
    finest grid and summed. An impulse in the longest scale's parameters must give a velocity on the finest grid
    that is as wide as that scale (without it, a deformation found in textured tissue would not extend smoothly over
    featureless tissue); an impulse in the shortest scale's stays narrow."""
    img = lddmm_mod.as_image(np.ones((1, 120, 120)), name="source")  # pixel units
    prob = lddmm_mod._Problem(img, np.eye(3), scales_a=(4.0, 36.0), kernel_weights=(1.0, 1.0), p=2.0, nt=3, dv=2.0,
                              sigma_r=10.0, sigma_p=1.0, lm_src=None, lm_dst=None, dtype=torch.float64,
                              device="cpu")  # fmt: skip
    assert [g["dv"] for g in prob.grids] == [2.0, 12.0]
    row_y = int(np.argmin(np.abs(prob.yv - 60)))

    def profile(scale: int):
        _, ws = prob.unpack(torch.zeros(prob.n_x, dtype=torch.float64))
        g = prob.grids[scale]
        ws[scale][0, 0, np.argmin(np.abs(g["y"] - 60)), np.argmin(np.abs(g["x"] - 60))] = 1.0
        v = prob.velocity(ws)
        assert float(v[:, 1].abs().max()) == 0 and float(v[1:].abs().max()) == 0  # x component at t = 0 only
        row = v[0, 0, row_y].numpy()
        half = prob.xv[row >= row.max() / 2]
        return row.max(), prob.xv[row.argmax()], half.max() - half.min()

    peak_f, at_f, width_f = profile(0)
    peak_c, at_c, width_c = profile(1)
    assert peak_f > 0 and abs(at_f - 60) <= 2 and width_f < 16  # ~2 a of the short scale
    assert peak_c > 0 and abs(at_c - 60) <= 12 and width_c > 72  # ~2.5 a of the long one (90 px)


def test_spot_term_estimates_each_features_noise_level():
    """The spot term's weight against the image is estimated, not set: its calibration (E ~ b F + c) and each
    feature's noise level come from the residuals of the spots weighted as matched; unmatched spots drop out; the
    floor keeps a perfectly explained feature from taking over."""
    from spatialdata_align.registration._data import SpotTerm

    rng = np.random.default_rng(0)
    n = 4000
    F = rng.normal(size=(3, n))
    noise = np.array([0.3, 1.0, 0.0])
    E = 2.0 * F + 1.0 + noise[:, None] * rng.normal(size=(3, n))
    E[:, : n // 4] = rng.normal(scale=5.0, size=(3, n // 4))  # spots with no source tissue under them
    term = SpotTerm(torch.as_tensor(E), area=1.0)
    np.testing.assert_allclose(term.sigma.numpy(), E.std(axis=1, ddof=1), rtol=1e-6)  # a weak start
    occupancy = torch.ones(n, dtype=torch.float64)
    occupancy[: n // 4] = 0.0
    term.w = occupancy  # as after a first M-step
    _, _, r = term.evaluate(torch.as_tensor(F), want_grad=False)
    term.m_step(r, occupancy)
    b, c = term.calib
    np.testing.assert_allclose(b.numpy(), 2.0, rtol=0.02)
    np.testing.assert_allclose(c.numpy(), 1.0, atol=0.02)
    np.testing.assert_allclose(term.sigma.numpy()[:2], noise[:2], rtol=0.05)
    np.testing.assert_allclose(term.sigma.numpy()[2], 0.05 * E[2].std(ddof=1), rtol=1e-6)  # the floor
    # the gradient then weighs each feature's residual by 1 / sigma^2: the precise feature pulls harder (|r| / sigma^2
    # ~ 1 / sigma: 3.3x)
    _, g, _ = term.evaluate(torch.as_tensor(F))
    assert float(g[0].abs().mean()) > 2.5 * float(g[1].abs().mean())


def test_a_level_runs_min_iter_before_it_may_stop(toy):
    """The convergence test cannot declare success after a few steps: with a tolerance every step meets, each level
    still takes ``min_iter`` iterations (less the odd iteration spent on a mixture update)."""
    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    kw = dict(FAST, scales=(2,), max_iter=(60,), affine_iter=0, tol=1e6, min_iter=30)
    reg = lddmm(toy.source, toy.target, affine=fit.matrix, **kw)
    (level,) = reg.params["levels"]
    assert level["reason"].startswith("converged")
    assert 26 <= level["iterations"] <= 30


def test_a_level_at_its_cap_says_how_its_turns_were_spent(toy):
    """``iterations`` counts the steps taken; a level stopped by its cap says how many of the cap's turns refreshed
    the mixture instead (so "45 iterations, iteration cap (50)" does not read as a miscount)."""
    import re

    fit = fit_affine(toy.landmarks_src, toy.landmarks_dst)
    kw = dict(FAST, scales=(2,), max_iter=(80,), affine_iter=0, tol=1e-12, min_iter=80)
    (level,) = lddmm(toy.source, toy.target, affine=fit.matrix, **kw).params["levels"]
    assert not level["converged"] and level["reason"] == "iteration cap (80)" and level["iterations"] == 80
    # mixture updates every other turn: a few turns go to refreshing a stale mixture
    (level,) = lddmm(toy.source, toy.target, affine=fit.matrix, em_every=2, **kw).params["levels"]
    m = re.fullmatch(r"iteration cap \(80: (\d+) steps, (\d+) mixture refreshes\)", level["reason"])
    assert m, level["reason"]
    assert int(m[1]) == level["iterations"] < 80 and int(m[1]) + int(m[2]) == 80


def test_default_regularisation_scales_grow_with_the_tissue_and_keep_their_pixel_floors():
    """The default ``sigma_r``: ``SIGMA_R_TISSUE`` (0.1) x the side of the source tissue (where the first channel
    exceeds a tenth of its maximum), at least ``SIGMA_R_PIXELS`` (10) source pixels; the default shortest kernel scale
    ``a``: ``A_TISSUE`` (0.035) x that side, at least ``A_PIXELS`` (8) pixels. Explicit values are kept."""

    def run(n_y, n_x, block, dx, **kw):
        y, x = (np.arange(n) * dx for n in (n_y, n_x))
        img = np.zeros((1, n_y, n_x))
        img[0, 5 : 5 + block[0], 5 : 5 + block[1]] = 1.0
        img[0, 6, 6] = 1.05  # the maximum; the faint rim below a tenth of it is not tissue
        img[0, 5 + block[0], 5 : 5 + block[1]] = 0.09
        src = xr.DataArray(img, dims=("c", "y", "x"), coords={"c": [0], "y": y, "x": x})
        tgt = np.random.default_rng(0).uniform(size=(1, n_y, n_x))
        reg = lddmm(src, tgt, scales=(1,), max_iter=(1,), affine_iter=0, progress=False, **kw)
        return reg.params["sigma_r"], reg.params["a"]

    side = np.sqrt(120 * 150) * 20.0  # 2683 µm: sigma_r from the tissue, a at its floor
    assert run(160, 190, (120, 150), 20.0) == pytest.approx((0.1 * side, 160.0))
    assert run(60, 60, (40, 40), 20.0) == pytest.approx((200.0, 160.0))  # an 0.8 mm section: both at their floors
    side = np.sqrt(240 * 250) * 20.0  # 4899 µm: both from the tissue
    assert run(260, 270, (240, 250), 20.0) == pytest.approx((0.1 * side, 0.035 * side))
    side = np.sqrt(120 * 150) * 10.0  # at 10 µm pixels the floors halve
    assert run(160, 190, (120, 150), 10.0) == pytest.approx((0.1 * side, 80.0))
    assert run(60, 60, (40, 40), 20.0, sigma_r=55.0, a=100.0) == (55.0, 100.0)
