"""Tests of ``sda.pl``: files are written and the plotted data are the right numbers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _tl_data import SCALEF, UM_PER_PX, add_aligned, add_native_affine, make_pair
from matplotlib.backend_bases import MouseButton, MouseEvent
from matplotlib.collections import EllipseCollection, PathCollection
from scipy.spatial import cKDTree

import spatialdata_align as sda
from spatialdata_align import _store
from spatialdata_align._constants import VISIUM_TABLE, XENIUM_TABLE
from spatialdata_align.registration import Registration

LM_UM = np.array([[500, 500], [2000, 600], [900, 2000], [2200, 2100], [1500, 1300]], float)


@pytest.fixture(scope="module")
def pair():
    p = make_pair(n_cells=3000, n_side=24, seed=1)
    add_native_affine(p)
    add_aligned(p)
    sda.tl.shared_region(p.sdata)
    return p


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _written(path) -> None:
    assert path.exists() and path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _scatters(ax) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]


def _lognorm(counts: np.ndarray, lib: np.ndarray) -> np.ndarray:
    counts, lib = np.asarray(counts, np.float64), np.asarray(lib, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty out-of-tissue spots: NaN, never compared
        return np.log1p(counts / lib * np.median(lib[lib > 0]))


def test_overlay(pair, tmp_path):
    out = tmp_path / "overlay.png"
    ax = sda.pl.overlay(pair.sdata, save=out)
    _written(out)
    (cells,) = _scatters(ax)
    np.testing.assert_allclose(cells.get_offsets(), pair.forward(pair.cells_um))
    (spots,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    np.testing.assert_allclose(spots.get_offsets(), pair.spots_px[pair.in_tissue])
    np.testing.assert_allclose(spots.get_widths(), 55.0 / UM_PER_PX)  # 55 µm spots, in px
    (im,) = ax.get_images()
    h, w = im.get_array().shape[:2]
    np.testing.assert_allclose(im.get_extent(), (0, w / SCALEF, h / SCALEF, 0))
    assert "full-resolution px" in ax.get_xlabel()
    assert any(line.get_label() == "shared region" for line in ax.get_lines())
    ax = sda.pl.overlay(pair.sdata, image=False, spots=False, max_cells=1000)
    assert len(_scatters(ax)[0].get_offsets()) == 1000 and not ax.get_images()


def test_gene_side_by_side(pair, tmp_path):
    out = tmp_path / "gene.png"
    axes = sda.pl.gene(pair.sdata, "egfr", save=out)
    _written(out)
    assert len(axes) == 2 and axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    assert axes[0].get_xlim() == axes[1].get_xlim() and axes[0].get_ylim() == axes[1].get_ylim()
    xt = pair.sdata.tables[XENIUM_TABLE]
    lib = np.asarray(xt.X[:, :-2].sum(1)).ravel()  # the last two variables are control probes
    expect = _lognorm(xt[:, "EGFR"].X.toarray().ravel(), lib)
    (cells,) = _scatters(axes[0])
    dist, idx = cKDTree(pair.forward(pair.cells_um)).query(np.asarray(cells.get_offsets()))
    assert dist.max() < 1e-6 and len(np.unique(idx)) == len(expect)  # every cell drawn once, at its place
    np.testing.assert_allclose(cells.get_array(), expect[idx], rtol=1e-12)
    assert np.all(np.diff(cells.get_array()) >= 0)  # high values drawn on top
    vt = pair.sdata.tables[VISIUM_TABLE]
    vexp = _lognorm(vt[:, "EGFR"].X.toarray().ravel(), np.asarray(vt.X.sum(1)).ravel())
    (spots,) = [c for c in axes[1].collections if isinstance(c, EllipseCollection)]
    np.testing.assert_allclose(spots.get_array(), vexp[pair.in_tissue])
    assert "EGFR" in axes[0].get_title() and "Visium" in axes[1].get_title()
    with pytest.raises(KeyError, match="only in Visium"):
        sda.pl.gene(pair.sdata, "GAPDH")


def test_compare_scatter_matches_compare_genes(pair, tmp_path):
    out = tmp_path / "compare.png"
    ax = sda.pl.compare(pair.sdata, "EGFR", save=out)
    _written(out)
    pe = sda.tl.paired_expression(pair.sdata, ["EGFR"])
    (pts,) = _scatters(ax)
    np.testing.assert_allclose(pts.get_offsets(), np.column_stack([pe.xenium[:, 0], pe.visium[:, 0]]))
    df = sda.tl.compare_genes(pair.sdata, copy=True).set_index("gene")
    assert f"Pearson r = {df.loc['EGFR', 'pearson']:.2f}" in ax.get_title()
    assert f"n = {df.loc['EGFR', 'n_spots']} spots" in ax.get_title()


def test_total_counts(pair, tmp_path):
    out = tmp_path / "tc.png"
    axes = sda.pl.total_counts(pair.sdata, save=out)
    _written(out)
    xt = pair.sdata.tables[XENIUM_TABLE]
    (cells,) = _scatters(axes[0])
    xtot = np.asarray(xt.X[:, :-2].sum(1), dtype=np.float64).ravel()
    np.testing.assert_allclose(cells.get_array(), np.log10(1 + xtot))
    vt = pair.sdata.tables[VISIUM_TABLE]
    (spots,) = [c for c in axes[1].collections if isinstance(c, EllipseCollection)]
    vtot = np.asarray(vt.X.sum(1), dtype=np.float64).ravel()
    np.testing.assert_allclose(spots.get_array(), np.log10(1 + vtot)[pair.in_tissue])


def test_landmarks_plot_with_affine(pair, tmp_path):
    p = make_pair(n_cells=2000, n_side=20, seed=2)
    sd = p.sdata
    rng = np.random.default_rng(0)
    dst = p.forward(LM_UM) + rng.normal(scale=10.0, size=LM_UM.shape)  # 10 px ~ 2.7 µm of noise
    sd.align.set_landmarks(source=LM_UM, target=dst)
    sd.align.affine("xenium_cells", "visium_hires_image")
    out = tmp_path / "lm.png"
    a0, a1 = sda.pl.landmarks(sd, save=out)
    _written(out)
    src_pts = [c for c in _scatters(a0) if len(c.get_offsets()) == len(LM_UM)]
    np.testing.assert_allclose(src_pts[0].get_offsets(), LM_UM)
    tgt, mapped = (c for c in _scatters(a1))
    np.testing.assert_allclose(tgt.get_offsets(), dst)
    expect = sd.align.transform_points(LM_UM)
    np.testing.assert_allclose(mapped.get_offsets(), expect)
    res = np.linalg.norm(expect - dst, axis=1) * UM_PER_PX
    assert f"median {np.median(res):.1f} µm" in a1.get_title()
    assert "µm" in a0.get_xlabel() and "px" in a1.get_xlabel()
    a0, a1 = sda.pl.landmarks(sd, transform=False, source=None)
    assert len(_scatters(a1)) == 1


def test_energy(tmp_path):
    e = pd.DataFrame(
        {
            "level": [0] * 5 + [1] * 4,
            "stage": ["lddmm"] * 9,
            "iteration": list(range(5)) + list(range(4)),
            "total": np.linspace(10, 2, 9),
            "match": np.linspace(9, 1.5, 9),
            "reg": np.linspace(0.1, 0.5, 9),
            "landmark": np.zeros(9),
        }
    )
    reg = Registration(affine=np.eye(3), energy=e)
    out = tmp_path / "energy.png"
    ax = sda.pl.energy(reg, save=out)
    _written(out)
    lines = {ln.get_label(): ln for a in ax.figure.axes for ln in a.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"total", "match", "reg (right axis)"}  # the all-zero landmark term is left out
    np.testing.assert_allclose(lines["total"].get_ydata(), e["total"])
    np.testing.assert_allclose(lines["reg (right axis)"].get_ydata(), e["reg"])
    assert lines["reg (right axis)"].axes is not ax  # its own scale
    levels = [ln for ln in ax.get_lines() if ln.get_label().startswith("_")]
    assert len(levels) == 1 and levels[0].get_xdata()[0] == pytest.approx(4.5)
    assert ax.get_yscale() == "log"
    # from a SpatialData: the stored trace
    p = make_pair(n_cells=500, n_side=10)
    _store.store_registration(
        p.sdata,
        reg,
        key="k",
        kind="lddmm",
        source_cs="xenium",
        target_cs="visium",
        source_element=None,
        target_element=None,
        native=False,
    )
    ax = sda.pl.energy(p.sdata)
    assert "k" in ax.get_title()
    _store.store_registration(
        p.sdata,
        Registration(affine=np.eye(3)),
        key="a",
        kind="affine",
        source_cs="xenium",
        target_cs="visium",
        source_element=None,
        target_element=None,
        native=False,
    )
    with pytest.raises(ValueError, match="no energy trace"):
        sda.pl.energy(p.sdata, "a")


# --------------------------------------------------------------------------------------- annotation
def _click(ann, ax, xy, button=MouseButton.LEFT):
    x, y = ax.transData.transform(xy)
    ev = MouseEvent("button_press_event", ann.fig.canvas, x, y, button=button)
    ann.fig.canvas.callbacks.process("button_press_event", ev)


def test_annotate_landmarks_by_simulated_clicks(tmp_path):
    p = make_pair(n_cells=2000, n_side=20, seed=3)
    sd = p.sdata
    ann = sda.pl.annotate_landmarks(sd, key="clicked")
    ann.fig.canvas.draw()
    ann.fig.canvas.draw_idle = lambda: None  # Agg redraws synchronously: skip the 0.4 s renders per click
    lm_um = p.cells_um[[0, 400, 800, 1200, 1600]]  # cells: inside both panels
    truth_dst = p.forward(lm_um)
    for i, (s, d) in enumerate(zip(lm_um, truth_dst, strict=True)):
        _click(ann, ann.ax_source, s)
        assert ann.n_pairs == i
        _click(ann, ann.ax_target, d)
        assert ann.n_pairs == i + 1
    src, dst = ann.landmarks
    np.testing.assert_allclose(src, lm_um, atol=1e-6)
    np.testing.assert_allclose(dst, truth_dst, atol=1e-6)
    # stored on the fly, usable by the affine fit
    s2, d2 = sd.align.landmarks("clicked")
    np.testing.assert_allclose(d2, truth_dst, atol=1e-6)
    np.testing.assert_allclose(s2, lm_um, atol=1e-6)
    fit = sd.align.affine("xenium_cells", "visium_hires_image", landmarks="clicked")
    np.testing.assert_allclose(fit.matrix, p.matrix, atol=1e-6)
    # right-click removes the last target point; an extra source click does not make a pair
    _click(ann, ann.ax_target, truth_dst[-1], button=MouseButton.RIGHT)
    assert ann.n_pairs == len(lm_um) - 1
    assert len(sd.align.landmarks("clicked")[0]) == len(lm_um) - 1
    _click(ann, ann.ax_source, (100.0, 100.0))
    assert ann.n_pairs == len(lm_um) - 1
    np.testing.assert_allclose(ann.ax_target.collections[-1].get_offsets(), truth_dst[:-1], atol=1e-6)
    out = tmp_path / "ann.png"
    ann.fig.savefig(out)
    _written(out)
    # a new session resumes from the stored set; clicks outside the panels are ignored
    ann2 = sda.pl.annotate_landmarks(sd, key="clicked", store=False)
    assert ann2.n_pairs == len(lm_um) - 1
    ev = MouseEvent("button_press_event", ann2.fig.canvas, 1, 1, button=MouseButton.LEFT)
    ann2.fig.canvas.callbacks.process("button_press_event", ev)
    assert ann2.n_pairs == len(lm_um) - 1
    ann2.disconnect()
    _click(ann2, ann2.ax_source, (200.0, 200.0))
    assert len(ann2._src) == len(lm_um) - 1
    with pytest.raises(KeyError, match="no element"):
        sda.pl.annotate_landmarks(sd, source="nope")
