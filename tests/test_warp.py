"""Images at native resolution, lazily: block-wise warps (``Registration.warp_image``, ``sdata.align.apply``)."""

from __future__ import annotations

import logging
import threading

import dask.array as da
import numpy as np
import pytest
import spatialdata
import xarray as xr
from scipy import ndimage
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, get_transformation

from spatialdata_align import _store
from spatialdata_align._elements import image_in_cs
from spatialdata_align.registration import Registration
from spatialdata_align.registration._warp import Grid, TransformMap, block_coords, image_levels, warp

SRC_CS, TGT_CS = "xenium", "visium"


def _registration(extent: float = 600.0, amp: float = 12.0, scale: float = 1.6) -> Registration:
    """Affine (rotation 25°, scale, translation) after a smooth velocity field (nt=5) over ``[0, extent]²`` µm."""
    xv = np.linspace(-0.1 * extent, 1.1 * extent, 24)
    gx, gy = np.meshgrid(xv, xv)
    v = np.stack([amp * np.sin(gx / (0.3 * extent)) * np.cos(gy / (0.2 * extent)), amp * np.cos(gx / (0.25 * extent))])
    th = np.deg2rad(25.0)
    lin = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    aff = np.eye(3)
    aff[:2, :2] = lin
    aff[:2, 2] = [0.5 * extent * scale, 0.1 * extent * scale]
    return Registration(affine=aff, velocity_values=v[None].repeat(5, 0), xv=xv, yv=xv)


def _image(ny: int = 300, nx: int = 340, seed: int = 0) -> np.ndarray:
    """A smooth-ish RGB uint8 image with fine detail (so a wrong pixel shows)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((3, ny, nx)), (0, 1.5, 1.5))
    y, x = np.mgrid[:ny, :nx]
    base = 0.5 + 0.3 * np.sin(x / 17.0)[None] * np.cos(y / 23.0)[None]
    return np.clip(255 * (0.6 * base + 0.8 * (noise - 0.5) + 0.2), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- warp_image
def test_lazy_warp_matches_in_memory_and_an_independent_sampler():
    reg = _registration()
    img = _image()
    px = 2.0  # µm per source pixel
    x, y = (np.arange(img.shape[2]) + 0.5) * px, (np.arange(img.shape[1]) + 0.5) * px
    out_x, out_y = np.arange(-100, 1200, 3.0) + 0.25, np.arange(-50, 1150, 3.0) + 0.25
    lazy_in = da.from_array(img, chunks=(3, 64, 64))
    # the per-block budget: 96 x 96 output pixels, far smaller than the 400 x 433 output
    lazy = reg.warp_image(lazy_in, x, y, out_x=out_x, out_y=out_y, chunk=96)
    assert isinstance(lazy.data, da.Array) and lazy.dtype == np.uint8
    assert lazy.data.numblocks == (1, 5, 5)
    mem = reg.warp_image(img, x, y, out_x=out_x, out_y=out_y)
    assert isinstance(mem.data, np.ndarray)
    np.testing.assert_array_equal(lazy.values, mem.values)
    # float output: same numbers as the lazy float output to 1e-6
    lazy_f = reg.warp_image(lazy_in.astype(np.float64), x, y, out_x=out_x, out_y=out_y, chunk=96).values
    mem_f = reg.warp_image(img.astype(np.float64), x, y, out_x=out_x, out_y=out_y).values
    np.testing.assert_allclose(lazy_f, mem_f, atol=1e-6, rtol=0)
    # independent check of the whole chain: exact coordinates of every pixel, scipy's bilinear sampler
    gx, gy = np.meshgrid(out_x, out_y)
    q = reg.transform_points(np.column_stack([gx.ravel(), gy.ravel()]), "inverse")
    col, row = q[:, 0] / px - 0.5, q[:, 1] / px - 0.5
    inside = (col >= 0) & (col <= img.shape[2] - 1) & (row >= 0) & (row <= img.shape[1] - 1)
    ref = np.stack([ndimage.map_coordinates(img[c].astype(float), [row, col], order=1) for c in range(3)])
    got = lazy_f.reshape(3, -1)
    assert inside.mean() > 0.3
    # the coordinate map is interpolated between exact nodes (error < 0.01 input px): tiny intensity differences
    assert np.abs(got[:, inside] - ref[:, inside]).max() < 0.02 * 255 * 0.25
    assert np.abs(got[:, inside] - ref[:, inside]).mean() < 0.05
    outside = (col < -0.55) | (col > img.shape[2] - 0.45) | (row < -0.55) | (row > img.shape[1] - 0.45)
    assert outside.any() and (got[:, outside] == 0).all()
    # the uint8 result is the float one rounded to the nearest integer (not truncated)
    err8 = lazy.values.reshape(3, -1)[:, inside].astype(float) - ref[:, inside]
    assert np.abs(err8).max() < 1.0 and abs(err8.mean()) < 0.05
    # map_step=1 evaluates every pixel exactly: equal to the independent sampler to rounding
    exact = reg.warp_image(lazy_in.astype(np.float64), x, y, out_x=out_x, out_y=out_y, chunk=96, map_step=1).values
    np.testing.assert_allclose(exact.reshape(3, -1)[:, inside], ref[:, inside], atol=1e-6)


def test_crop_of_a_lazy_warp_matches_the_in_memory_warp_of_that_crop():
    reg = _registration()
    img = _image(400, 380, seed=1)
    x, y = np.arange(img.shape[2]) * 2.0 + 1.0, np.arange(img.shape[1]) * 2.0 + 1.0
    out_x, out_y = np.arange(0, 1300, 2.5) + 1.25, np.arange(0, 1200, 2.5) + 1.25
    lazy = reg.warp_image(
        da.from_array(img.astype(np.float32), chunks=(1, 50, 50)), x, y, out_x=out_x, out_y=out_y, chunk=64, map_step=4
    )
    r, c = slice(97, 311), slice(201, 433)  # off the block and lattice grids
    crop = reg.warp_image(img.astype(np.float32), x, y, out_x=out_x[c], out_y=out_y[r], map_step=4)
    np.testing.assert_allclose(lazy.data[:, r, c].compute(), crop.values, atol=1e-6 * 255, rtol=0)
    assert np.ptp(crop.values) > 100  # real content in the crop


def test_each_block_reads_only_its_input_window():
    reg = _registration()
    n_chunk = 40
    img = _image(400, 400, seed=2)
    read: list[tuple[int, int]] = []
    lock = threading.Lock()

    def load(block_info=None):
        _, (r0, r1), (c0, c1) = block_info[None]["array-location"]
        with lock:
            read.append((r0 // n_chunk, c0 // n_chunk))
        return img[:, r0:r1, c0:c1]

    lazy_in = da.map_blocks(load, dtype=np.uint8, chunks=((3,), (n_chunk,) * 10, (n_chunk,) * 10))
    x = y = np.arange(400) * 2.0 + 1.0
    out_x = out_y = np.arange(0, 1200, 2.0) + 1.0  # 6 x 6 blocks of 100 x 100
    lazy = reg.warp_image(lazy_in, x, y, out_x=out_x, out_y=out_y, chunk=100)
    assert read == []  # building the graph reads nothing
    blocks = lazy.data.blocks
    mem = reg.warp_image(img, x, y, out_x=out_x, out_y=out_y).values
    n_read, n_full = [], 0
    for i in range(blocks.shape[1]):
        for j in range(blocks.shape[2]):
            read.clear()
            got = blocks[0, i, j].compute(scheduler="sync")
            np.testing.assert_array_equal(got, mem[:, i * 100 : (i + 1) * 100, j * 100 : (j + 1) * 100])
            n_read.append(len(set(read)))
            n_full += got.any()
    # a 100 x 100 block (2 px = 1.25 µm pixels) maps onto ~80 x 80 input pixels: a few 40-pixel chunks of the 100
    assert 0 < max(n_read) <= 16
    assert min(n_read) == 0  # blocks mapping outside the image read nothing
    assert n_full > 10


def test_integer_dtype_fill_and_errors():
    reg = _registration()
    img = (_image(120, 100).astype(np.uint16) * 200)[:1]
    gx, gy = np.arange(380, 660.0), np.arange(80, 330.0)  # covers the mapped image (pixel units) and beyond
    out = reg.warp_image(da.from_array(img, chunks=(1, 30, 30)), out_x=gx, out_y=gy)
    assert out.dtype == np.uint16 and out.values.max() > 255  # kept, not rescaled to [0, 1]
    assert (out.values == 0).mean() > 0.2  # and filled outside
    with pytest.raises(ValueError, match="fill=nan is not a value of the output dtype uint16"):
        reg.warp_image(img, out_x=gx, out_y=gy, fill=np.nan)
    f = reg.warp_image(img, out_x=gx, out_y=gy, fill=np.nan, dtype=np.float32)
    assert f.dtype == np.float32 and np.isnan(f.values).any() and np.nanmax(f.values) > 255
    with pytest.raises(ValueError, match="map_step must be a positive integer"):
        reg.warp_image(img, out_x=np.arange(0, 30.0), out_y=np.arange(0, 30.0), map_step=0)


def test_lattice_coordinates_agree_with_exact_ones():
    reg = _registration()
    img = _image()
    levels = image_levels(img, np.arange(340) * 2.0 + 1, np.arange(300) * 2.0 + 1)
    cmap = TransformMap(reg, "inverse", levels.to_index)
    grid = Grid.from_coords(np.arange(0, 900, 2.0) + 1, np.arange(0, 800, 2.0) + 1)
    ex, ey = block_coords(cmap, grid, (100, 260), (40, 333), 1)
    for step in (2, 8, 32):
        qx, qy = block_coords(cmap, grid, (100, 260), (40, 333), step)
        err = np.hypot(qx - ex, qy - ey).max()
        assert 0 < err < 0.02 * step**2  # bilinear interpolation of a smooth map: error ~ step²
    # the lattice is anchored in physical space: any sub-block gives the same coordinates as the whole
    qx, qy = block_coords(cmap, grid, (100, 260), (40, 333), 8)
    sx, sy = block_coords(cmap, grid, (137, 201), (99, 250), 8)
    np.testing.assert_allclose(sx, qx[37:101, 59:210], atol=1e-9)
    np.testing.assert_allclose(sy, qy[37:101, 59:210], atol=1e-9)


def test_block_windows_hold_a_bulge_in_the_middle_of_any_block_edge():
    """A map that bulges between a block's corners: each block still reads every input pixel it samples.

    The window is the bounding box of the whole mapped block boundary, not of its corners: a bump of 8 input pixels
    in the middle of each of the four edges of block (2, 2) (beyond the window margin) must be inside it.
    """
    img = _image(300, 300, seed=3).astype(np.float64)
    bumps = [(150.0, 125.0, 1, 0), (100.0, 125.0, -1, 0), (125.0, 150.0, 0, 1), (125.0, 100.0, 0, -1)]

    def cmap(p):  # output physical (x, y) = output pixel index -> input (column, row): identity plus four bumps
        q = np.array(p, dtype=np.float64)
        for bx, by, sx, sy in bumps:
            g = 8.0 * np.exp(-((p[:, 0] - bx) ** 2 + (p[:, 1] - by) ** 2) / (2 * 4.0**2))
            q[:, 0] += sx * g
            q[:, 1] += sy * g
        return q

    grid = Grid.from_coords(np.arange(300.0), np.arange(300.0))
    got = warp(img, cmap, grid, chunk=50, map_step=1)  # block (2, 2): output pixels 100..149 in x and y
    gx, gy = np.meshgrid(np.arange(300.0), np.arange(300.0))
    q = cmap(np.column_stack([gx.ravel(), gy.ravel()]))
    ref = np.stack([ndimage.map_coordinates(img[c], [q[:, 1], q[:, 0]], order=1, mode="nearest") for c in range(3)])
    np.testing.assert_allclose(got.reshape(3, -1), ref, atol=1e-9)


def test_multiscale_input_level_choice_is_logged(caplog):
    reg = _registration()
    img = _image(512, 512, seed=3)
    tree = Image2DModel.parse(img, dims=("c", "y", "x"), scale_factors=[2, 2], chunks=(3, 128, 128))
    x = y = np.arange(512) * 2.0 + 1.0
    out = np.arange(0, 1400, 9.0) + 4.5  # output pixels ~ 9/1.6 ≈ 5.6 µm ≈ 2.8 input pixels: level 1 (2x)
    with caplog.at_level(logging.INFO, logger="spatialdata_align"):
        warped = reg.warp_image(tree, x, y, out_x=out, out_y=out)
    assert "reading pyramid level 1 of 3" in caplog.text
    assert isinstance(warped.data, da.Array)
    lvl1 = tree["scale1"]["image"].values
    x1 = np.arange(256) * 4.0 + 2.0
    np.testing.assert_array_equal(warped.values, reg.warp_image(lvl1, x1, x1, out_x=out, out_y=out).values)
    native = reg.warp_image(tree, x, y, out_x=out, out_y=out, level=0)
    np.testing.assert_array_equal(native.values, reg.warp_image(img, x, y, out_x=out, out_y=out).values)


# --------------------------------------------------------------------------------------------- sdata.align.apply
def _sdata_with_images(reg: Registration) -> spatialdata.SpatialData:
    img = _image(600, 640, seed=4)
    morph = Image2DModel.parse(
        da.from_array(img[:1].astype(np.uint16) * 250, chunks=(1, 128, 128)),
        dims=("c", "y", "x"),
        c_coords=["DAPI"],
        scale_factors=[2, 2],
        chunks=(1, 128, 128),
        transformations={SRC_CS: Scale([1.0, 1.0], axes=("x", "y"))},
    )
    he = Image2DModel.parse(
        da.from_array(_image(700, 700, seed=5), chunks=(3, 200, 200)),
        dims=("c", "y", "x"),
        transformations={TGT_CS: Scale([2.0, 2.0], axes=("x", "y"))},
    )
    sd = spatialdata.SpatialData(images={"morphology": morph, "he": he})
    _store.store_registration(
        sd,
        reg,
        key="fit",
        kind="lddmm",
        source_cs=SRC_CS,
        target_cs=TGT_CS,
        source_element=None,
        target_element="he",
        native=False,
    )
    return sd


def test_apply_image_is_lazy_native_multiscale_both_ways(tmp_path):
    reg = _registration()
    sd = _sdata_with_images(reg)
    # forward: the morphology (1 µm pixels) into the Visium frame, at its native resolution
    name = sd.align.apply("morphology", chunk=256)
    el = sd[name]
    # a pyramid down to one 256-pixel chunk: 837 -> 418 -> 209 pixels
    assert isinstance(el, xr.DataTree) and list(el.children) == ["scale0", "scale1", "scale2"]
    s0 = el["scale0"]["image"]
    assert isinstance(s0.data, da.Array) and s0.dtype == np.uint16 and list(s0.coords["c"].values) == ["DAPI"]
    t = get_transformation(el, get_all=True)
    assert list(t) == [TGT_CS]
    dx = t[TGT_CS].to_affine_matrix(("x", "y"), ("x", "y"))[0, 0]
    assert dx == pytest.approx(1.6, rel=1e-6)  # 1 µm pixels x 1.6 px/µm: native, nothing capped
    c, si = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25))
    # the rotated section's bounding box (in input pixels, +/- the 12 µm warp)
    assert abs(s0.sizes["x"] - (640 * c + 600 * si)) < 30 and abs(s0.sizes["y"] - (640 * si + 600 * c)) < 30
    # the warp equals Registration.warp_image on the same grid
    got = image_in_cs(sd, name, TGT_CS)
    src = np.asarray(sd["morphology"]["scale0"]["image"].values)
    stored = sd.align.get("fit")  # the stored (canonical) form of the registration
    ref = stored.warp_image(src, np.arange(640) + 0.5, np.arange(600) + 0.5, out_x=got.x.values, out_y=got.y.values)
    np.testing.assert_array_equal(got.values, ref.values)
    # inverse: the H&E (2 px/pixel in the Visium frame) into the Xenium µm frame
    back = sd.align.apply("he", inverse=True, chunk=256)
    b = image_in_cs(sd, back, SRC_CS)
    assert b.dtype == np.uint8 and b.shape[0] == 3
    assert (b.x[1] - b.x[0]).item() == pytest.approx(2.0 / 1.6, rel=1e-6)
    # written chunk by chunk and read back identical
    sd.write(tmp_path / "a.zarr")
    rd = spatialdata.read_zarr(tmp_path / "a.zarr")
    np.testing.assert_array_equal(image_in_cs(rd, name, TGT_CS).values, got.values)
    np.testing.assert_array_equal(image_in_cs(rd, back, SRC_CS).values, b.values)


def test_apply_resolution_cap_is_explicit_and_logged(caplog):
    reg = _registration()
    sd = _sdata_with_images(reg)
    with caplog.at_level(logging.WARNING, logger="spatialdata_align"):
        name = sd.align.apply("morphology", max_pixels=200_000)
    s0 = image_in_cs(sd, name, TGT_CS, lazy=True)
    assert s0.sizes["x"] * s0.sizes["y"] <= 200_000
    assert "max_pixels=200000" in caplog.text and "instead of" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialdata_align"):
        sd.align.apply("morphology", name="uncapped")
    assert "max_pixels" not in caplog.text
    full = image_in_cs(sd, "uncapped", TGT_CS, lazy=True)
    assert full.sizes["x"] * full.sizes["y"] > 200_000
    # an image element's grid (the old default for forward warps) is still available by name
    on_he = sd.align.apply("morphology", grid="he", name="on_he")
    assert isinstance(sd[on_he], xr.DataArray) and sd[on_he].shape == (1, 700, 700)
    he = image_in_cs(sd, "he", TGT_CS)
    np.testing.assert_allclose(image_in_cs(sd, on_he, TGT_CS).x.values, he.x.values)


def test_default_grid_is_the_fit_extent_at_native_resolution():
    reg = _registration()
    reg.target_extent, reg.source_extent = (300.0, 1300.0, 0.0, 900.0), (0.0, 600.0, 0.0, 600.0)
    reg.params["target_pixel"] = 40.0  # a coarse fitting grid must not set the output resolution
    img = _image(300, 300)
    x = np.arange(300) * 2.0 + 1.0
    fwd = reg.warp_image(da.from_array(img, chunks=(3, 100, 100)), x, x)
    assert (fwd.x[1] - fwd.x[0]).item() == pytest.approx(2.0 * 1.6) and fwd.sizes["x"] == round(1000 / 3.2)
    assert fwd.x[0].item() == pytest.approx(300 + 1.6) and isinstance(fwd.data, da.Array)
    back = reg.warp_image(img, np.arange(300) + 0.5, np.arange(300) + 0.5, direction="inverse")
    assert (back.x[1] - back.x[0]).item() == pytest.approx(1 / 1.6) and back.sizes["y"] == round(600 * 1.6)
