"""The sampled (displacement-field) form of a registration, alone: no SpatialData."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from spatialdata_align.registration import DisplacementField, Registration


def _velocity_registration(seed: int = 0) -> Registration:
    """An affine + smooth non-linear flow (a few µm) over a 2 x 1.5 mm section."""
    rng = np.random.default_rng(seed)
    xv = np.linspace(-100.0, 2100.0, 45)
    yv = np.linspace(-100.0, 1600.0, 35)
    gx, gy = np.meshgrid(xv, yv)
    v = np.zeros((4, 2, yv.size, xv.size))
    for t in range(4):
        p = rng.uniform(0, 2 * np.pi, 2)
        v[t, 0] = 25.0 * np.sin(gy / 300.0 + p[0])
        v[t, 1] = 18.0 * np.cos(gx / 350.0 + p[1])
    affine = np.array([[0.9, -0.35, 400.0], [0.3, 0.95, -50.0], [0.0, 0.0, 1.0]]) * [[2.7], [2.7], [1.0]]
    return Registration(
        affine=affine,
        velocity_values=v,
        xv=xv,
        yv=yv,
        source_extent=(0.0, 2000.0, 0.0, 1500.0),
        target_extent=(-500.0, 6500.0, -2500.0, 5500.0),
        source_units="um",
        target_units="px",
    )


def test_field_interpolation_is_ngff_linear_with_edge_values():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(2, 7, 9))
    f = DisplacementField(values, x0=-3.0, y0=10.0, dx=2.5, dy=4.0)
    # at the nodes: the stored vectors exactly
    gx, gy = np.meshgrid(f.x, f.y)
    nodes = np.column_stack([gx.ravel(), gy.ravel()])
    np.testing.assert_array_equal(f(nodes), values.reshape(2, -1).T)
    # anywhere: linear interpolation in array coordinates (x - x0) / dx, edge values outside (an independent
    # implementation: scipy's order-1 spline with "nearest" boundary)
    pts = rng.uniform([-20, -10], [40, 60], size=(5000, 2))
    ax, ay = (pts[:, 0] - f.x0) / f.dx, (pts[:, 1] - f.y0) / f.dy
    ref = np.column_stack([map_coordinates(values[c], [ay, ax], order=1, mode="nearest") for c in range(2)])
    np.testing.assert_allclose(f(pts), ref, atol=1e-12)
    assert (~f.contains(pts)).sum() > 1000  # the check covers extrapolation too
    np.testing.assert_allclose(f.apply(pts), pts + ref, atol=1e-12)


def test_field_validation_and_immutability():
    with pytest.raises(ValueError, match=r"\(2, ny, nx\)"):
        DisplacementField(np.zeros((3, 4, 4)), 0, 0, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        DisplacementField(np.zeros((2, 4, 4)), 0, 0, 0, 1)
    with pytest.raises(ValueError, match="non-finite"):
        DisplacementField(np.full((2, 4, 4), np.nan), 0, 0, 1, 1)
    src = np.zeros((2, 4, 4))
    f = DisplacementField(src, 0, 0, 1, 1)
    src[:] = 5.0  # the field owns a copy
    assert not f.values.any()
    with pytest.raises(ValueError):
        f.values[0, 0, 0] = 1.0


def test_sampled_registration_matches_the_flow_both_ways():
    reg = _velocity_registration()
    rng = np.random.default_rng(2)
    src = rng.uniform([0, 0], [2000, 1500], size=(4000, 2))
    sampled = reg.to_displacement()
    assert sampled.is_sampled and not sampled.has_velocity and reg.has_velocity
    assert sampled.forward_field.dx == pytest.approx(0.5 * (reg.xv[1] - reg.xv[0]))
    # forward: source units via the inverse affine, so the error reads in µm
    a_inv = np.linalg.inv(reg.affine)

    def um(a, b):
        return np.linalg.norm((a - b) @ a_inv[:2, :2].T, axis=1)

    fwd = um(sampled.transform_points(src), reg.transform_points(src))
    tgt = reg.transform_points(src)
    inv = np.linalg.norm(sampled.transform_points(tgt, "inverse") - reg.transform_points(tgt, "inverse"), axis=1)
    assert fwd.max() < 0.2 and inv.max() < 0.2, (fwd.max(), inv.max())
    # a 4x coarser grid is measurably worse: the tolerance above is not vacuous
    coarse = reg.to_displacement(spacing=4 * sampled.forward_field.dx)
    assert um(coarse.transform_points(src), reg.transform_points(src)).max() > 2 * fwd.max()
    # the two fields invert each other (to the sampling error)
    back = sampled.transform_points(sampled.transform_points(src), "inverse")
    assert np.abs(back - src).max() < 0.2
    # the grids cover the sections: the source, and the target pulled back by the affine
    xmin, xmax, ymin, ymax = sampled.forward_field.extent
    assert xmin <= 0 and xmax >= 2000 and ymin <= 0 and ymax >= 1500
    corners = np.array([[-500.0, -2500.0], [6500.0, -2500.0], [-500.0, 5500.0], [6500.0, 5500.0]])
    assert sampled.inverse_field.contains(corners @ a_inv[:2, :2].T + a_inv[:2, 2]).all()


def test_sampled_fields_reach_as_far_as_the_map_pushes_the_section_edge():
    """A flow pushing the source's edge ~70 µm beyond the target section: the fields grow by the largest
    displacement, so mapping the edge forward and back stays on the grids (0.07 µm; without the growth the inverse
    field is extrapolated there and the round trip misses by 6.8 µm)."""
    xv = yv = np.linspace(-200.0, 1200.0, 36)
    gx, _ = np.meshgrid(xv, yv)
    bump = np.exp(-((gx - 1000.0) ** 2) / (2 * 250.0**2))
    v = np.zeros((4, 2, 36, 36))
    v[:, 0] = 70.0 * bump
    v[:, 1] = 40.0 * np.sin(gx / 150.0) * bump
    reg = Registration(
        affine=np.diag([2.0, 2.0, 1.0]),
        velocity_values=v,
        xv=xv,
        yv=yv,
        source_extent=(0.0, 1000.0, 0.0, 1000.0),
        target_extent=(0.0, 2000.0, 0.0, 2000.0),
    )
    sampled = reg.to_displacement()
    edge = np.column_stack([np.full(200, 1000.0), np.linspace(0.0, 1000.0, 200)])
    mapped = reg.transform_points(edge)
    assert (mapped[:, 0] - 2000.0).max() > 100.0  # beyond the target section, in target pixels
    assert np.abs(sampled.transform_points(sampled.transform_points(edge), "inverse") - edge).max() < 0.2
    np.testing.assert_allclose(
        sampled.transform_points(mapped, "inverse"), reg.transform_points(mapped, "inverse"), atol=0.2
    )


def test_sampled_registration_defines_points_images_and_serialisation():
    sampled = _velocity_registration().to_displacement(spacing=40.0)
    pts = np.random.default_rng(3).uniform([0, 0], [2000, 1500], size=(500, 2))
    # transform_points is exactly affine(x + d_fwd(x)) and x' + d_inv(x'), x' = A^-1 y
    expected = (pts + sampled.forward_field(pts)) @ sampled.affine[:2, :2].T + sampled.affine[:2, 2]
    np.testing.assert_allclose(sampled.transform_points(pts), expected, atol=1e-9)
    y = sampled.transform_points(pts)
    xp = (y - sampled.affine[:2, 2]) @ np.linalg.inv(sampled.affine[:2, :2]).T
    np.testing.assert_allclose(sampled.transform_points(y, "inverse"), xp + sampled.inverse_field(xp), atol=1e-9)
    # lossless dict round trip
    back = Registration.from_dict(sampled.to_dict())
    assert back.is_sampled
    np.testing.assert_array_equal(back.forward_field.values, sampled.forward_field.values)
    np.testing.assert_array_equal(back.transform_points(y, "inverse"), sampled.transform_points(y, "inverse"))
    # displacement() reports the stored fields on their own grids
    d = sampled.displacement()
    np.testing.assert_array_equal(d.values, sampled.forward_field.values)
    # warp_image resamples through the sampled map: a source blob lands where its centre maps
    x = np.arange(0, 2000, 10.0) + 5
    yy = np.arange(0, 1500, 10.0) + 5
    gx, gy = np.meshgrid(x, yy)
    c = np.array([[900.0, 700.0]])
    img = np.exp(-((gx - c[0, 0]) ** 2 + (gy - c[0, 1]) ** 2) / (2 * 60.0**2))
    tc = sampled.transform_points(c)[0]
    ox, oy = np.arange(tc[0] - 600, tc[0] + 600, 8.0), np.arange(tc[1] - 600, tc[1] + 600, 8.0)
    w = sampled.warp_image(img, x=x, y=yy, out_x=ox, out_y=oy).values[0]
    w = np.where(w > 0.5 * w.max(), w, 0.0)  # the blob's core; its centroid lands on the mapped centre
    gox, goy = np.meshgrid(ox, oy)
    assert np.hypot((w * gox).sum() / w.sum() - tc[0], (w * goy).sum() / w.sum() - tc[1]) < 8.0


def test_affine_and_sampled_need_both_fields():
    f = DisplacementField(np.zeros((2, 3, 3)), 0, 0, 1, 1)
    with pytest.raises(ValueError, match="both forward_field and inverse_field"):
        Registration(affine=np.eye(3), forward_field=f)
    reg = Registration.from_affine(np.diag([2.0, 3.0, 1.0]))
    assert reg.is_affine and reg.to_displacement().is_affine
