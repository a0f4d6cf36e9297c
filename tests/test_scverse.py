"""Other scverse tools on the aligned data: scanpy, squidpy, spatialdata-io's legacy AnnData, transcripts."""

from __future__ import annotations

import io
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from matplotlib.colors import ListedColormap

import spatialdata_align as sda
from spatialdata_align._constants import (
    VISIUM_CS,
    VISIUM_HIRES,
    VISIUM_SPOTS,
    VISIUM_TABLE,
    XENIUM_CELLS,
    XENIUM_CS,
    XENIUM_TRANSCRIPTS,
)
from spatialdata_align._elements import element_xy

ALIGNED_TABLE = "xenium_table_aligned"


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    tw = sda.datasets.twin_sections(tmp_path_factory.mktemp("scverse"), n_cells=3000, n_spots=200, seed=1)
    s = sda.io.read_pair(tw.xenium_path, tw.visium_path)
    if "spatial" not in s.tables[VISIUM_TABLE].uns:  # stand-in until the reader writes it (scanpy layout)
        imgs = {k: np.asarray(s[f"visium_{k}_image"].values).transpose(1, 2, 0) for k in ("hires", "lowres")}
        vt = s.tables[VISIUM_TABLE].copy()
        vt.uns["spatial"] = {"twin": {"images": imgs, "scalefactors": dict(sda.io.visium_scalefactors(s))}}
        s.tables[VISIUM_TABLE] = vt
    s.align.set_landmarks(source=tw.truth.landmarks_source[:4], target=tw.truth.landmarks_target[:4])
    s.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    s.align.apply(XENIUM_CELLS)
    return s, tw


def _png(draw) -> np.ndarray:
    fig = plt.figure(figsize=(4, 4), dpi=80)
    ax = fig.add_subplot()
    draw(ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return plt.imread(buf)[..., :3]


def _cells_on_tissue(draw) -> tuple[int, float, float]:
    """Pixels the cells paint (drawn opaque vs transparent), and the fraction of them over H&E tissue."""
    with_cells, without = _png(lambda ax: draw(ax, 1.0)), _png(lambda ax: draw(ax, 0.0))
    cells = np.abs(with_cells - without).sum(-1) > 0.3
    tissue = without.mean(-1) < 0.85  # stained tissue; glass and the empty canvas are near white
    return int(cells.sum()), float(tissue[cells].mean()), float(tissue.mean())


def test_aligned_table_carries_the_target_frames_scanpy_metadata(aligned):
    s, _ = aligned
    t = s.tables[ALIGNED_TABLE]
    assert t.uns["spatial"].keys() == s.tables[VISIUM_TABLE].uns["spatial"].keys()
    lib = next(iter(t.uns["spatial"]))
    assert t.uns["spatial"][lib]["scalefactors"] == s.tables[VISIUM_TABLE].uns["spatial"][lib]["scalefactors"]
    np.testing.assert_allclose(t.obsm["spatial"], element_xy(s, f"{XENIUM_CELLS}_aligned", VISIUM_CS))
    # the original table keeps its own (µm) frame's metadata, untouched
    assert s.tables["xenium_table"].uns.get("spatial") is not t.uns["spatial"]


@pytest.mark.parametrize("tool", ["scanpy", "squidpy"])
def test_scanpy_and_squidpy_draw_the_aligned_cells_on_the_he(aligned, tool):
    import scanpy as sc
    import squidpy as sq

    s, _ = aligned
    t = s.tables[ALIGNED_TABLE].copy()
    t.obs["marker"] = pd.Categorical(["cell"] * t.n_obs)
    blue = ListedColormap(["#0000ff"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tool == "scanpy":
            n, on, overall = _cells_on_tissue(
                lambda ax, a: sc.pl.spatial(
                    t, color="marker", palette=["#0000ff"], alpha=a, size=0.5, ax=ax, show=False, legend_loc=None
                )
            )
        else:
            n, on, overall = _cells_on_tissue(
                lambda ax, a: sq.pl.spatial_scatter(
                    t, color="marker", palette=blue, alpha=a, size=0.3, ax=ax, legend_loc=None
                )
            )
    assert n > 2000  # the cells are drawn ...
    assert on > 0.9 > overall + 0.3, (on, overall)  # ... on the stained tissue, not beside the H&E


def test_legacy_anndata_sees_no_alignment_internals(aligned):
    from spatialdata_io.experimental import to_legacy_anndata

    s, _ = aligned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = to_legacy_anndata(s, coordinate_system=VISIUM_CS, table_name=VISIUM_TABLE, include_images=True)
    # libraries: the reader's (uns['spatial']) and one per image spatialdata-io finds in "visium", nothing of ours
    images = {n for n in s.images if VISIUM_CS in sd.transformations.get_transformation(s[n], get_all=True)}
    assert set(a.uns["spatial"]) <= images | set(s.tables[VISIUM_TABLE].uns["spatial"])
    assert not any("align" in lib or "match" in lib for lib in a.uns["spatial"])
    assert a.n_obs == s.tables[VISIUM_TABLE].n_obs


def test_transcripts_transform_and_render_lazily_after_a_round_trip(aligned, tmp_path):
    import spatialdata_plot  # noqa: F401

    s, _ = aligned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.write(tmp_path / "s.zarr")
        back = sd.read_zarr(tmp_path / "s.zarr")
    tr = back[XENIUM_TRANSCRIPTS]
    moved = sd.transform(tr, to_coordinate_system=VISIUM_CS)
    assert hasattr(moved, "dask")  # still lazy
    raw = tr[["x", "y"]].compute().to_numpy()
    m = back.align.get("xenium_to_visium_affine").affine
    np.testing.assert_allclose(moved[["x", "y"]].compute().to_numpy(), raw @ m[:2, :2].T + m[:2, 2], rtol=0, atol=1e-6)
    ax = plt.figure(figsize=(4, 4)).add_subplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back.pl.render_points(XENIUM_TRANSCRIPTS, color="#ff0000", size=1).pl.show(coordinate_systems=VISIUM_CS, ax=ax)
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png")
    plt.close("all")
    buf.seek(0)
    img = plt.imread(buf)[..., :3]
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    assert red.sum() > 500


def _many_cells(n: int = 12_000):
    """A SpatialData with more shapes than spatialdata-plot 0.4.0 draws without datashader, in "visium"."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(0)
    g = gpd.GeoDataFrame({"radius": np.ones(n)}, geometry=gpd.points_from_xy(*rng.uniform(0, 1000, (2, n))))
    return sd.SpatialData(
        shapes={"cells": ShapesModel.parse(g, transformations={VISIUM_CS: Scale([2.0, 2.0], ("x", "y"))})}
    )


def test_spatialdata_plot_works_by_default_with_global_and_sda_pl_picks_the_method(tmp_path):
    import spatialdata_plot  # noqa: F401

    s = _many_cells()
    # spatialdata-plot 0.4.0 fails on its default (datashader) route outside "global" ...
    with pytest.raises(ValueError, match="global"):
        s.pl.render_shapes("cells").pl.show(coordinate_systems=VISIUM_CS, ax=plt.figure().add_subplot())
    plt.close("all")
    # ... sda.pl picks the method that works
    assert sda.pl.render_method(s, "cells", VISIUM_CS) == "matplotlib"
    ax = sda.pl.render(s, "cells", image=None, cs=VISIUM_CS, color="#0000ff", save=tmp_path / "r.png")
    assert len(ax.collections) + len(ax.images) > 0 and (tmp_path / "r.png").stat().st_size > 3000
    plt.close("all")
    # exposing the frame as "global" makes the default route work (copy-on-write: the original is unchanged)
    o = sd.SpatialData.init_from_elements({"cells": s["cells"]})
    assert o.align.set_global(VISIUM_CS) == ["cells"]
    assert "global" not in sd.transformations.get_transformation(s["cells"], get_all=True)
    assert sda.pl.render_method(o, "cells", VISIUM_CS) is None
    o.pl.render_shapes("cells").pl.show(coordinate_systems="global", ax=plt.figure().add_subplot())  # default method
    plt.close("all")
    o.align.set_global(None)
    assert "global" not in sd.transformations.get_transformation(o["cells"], get_all=True)


def test_global_follows_later_alignment_writes(aligned):
    s, _ = aligned
    o = sd.SpatialData.init_from_elements({n: e for _, n, e in s.gen_elements()}, attrs=s.attrs)
    o.align.set_global(VISIUM_CS)
    o.align.apply(XENIUM_CELLS, name="again")  # a later aligned copy gets "global" as well
    t = sd.transformations.get_transformation(o["again"], get_all=True)
    assert set(t) == {VISIUM_CS, "global"}
    t_cells = sd.transformations.get_transformation(o[XENIUM_CELLS], get_all=True)
    assert "global" in t_cells  # the native affine into visium is mirrored
    assert "global" not in sd.transformations.get_transformation(s[XENIUM_CELLS], get_all=True)


# ------------------------------------------------------------------------------ spatialdata operations on the result
LDDMM_KEY, AFFINE_KEY = "xenium_to_visium_lddmm", "xenium_to_visium_affine"


@pytest.fixture(scope="module")
def fitted(aligned):
    """The main workflow's result: landmark affine, LDDMM, the cells applied with the LDDMM (never modified)."""
    s = sd.deepcopy(aligned[0])
    s.align.lddmm(XENIUM_CELLS, VISIUM_HIRES, channels="density", progress=False, max_iter=60)
    s.align.apply(XENIUM_CELLS)
    return s


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_a_default_transform_an_operation_dropped_is_not_replaced_by_another(fitted):
    """A filter/query/subset drops the LDDMM's arrays (documented): the default must not become the affine."""
    s = fitted
    cells = element_xy(s, XENIUM_CELLS, XENIUM_CS)
    lddmm_xy = s.align.transform_points(cells)
    affine_xy = s.align.transform_points(cells, key=AFFINE_KEY)
    assert np.median(np.linalg.norm(lddmm_xy - affine_xy, axis=1)) > 1.0  # the two differ: a swap would be wrong
    for derived in (
        _quiet(s.filter_by_coordinate_system, [XENIUM_CS, VISIUM_CS]),
        _quiet(s.subset, [XENIUM_CELLS, VISIUM_HIRES]),
    ):
        assert list(_quiet(lambda d=derived: d.align.transforms).index) == [AFFINE_KEY]
        for call in (lambda d=derived: d.align.apply(XENIUM_CELLS), lambda d=derived: d.align.transform_points(cells)):
            with pytest.raises(ValueError, match=f"default transform '{LDDMM_KEY}'.*not available.*key="):
                _quiet(call)
        if f"{XENIUM_CELLS}_aligned" in derived.shapes:  # not overwritten with affine-only positions
            np.testing.assert_allclose(element_xy(derived, f"{XENIUM_CELLS}_aligned", VISIUM_CS), lddmm_xy, atol=1e-9)
        np.testing.assert_array_equal(_quiet(derived.align.transform_points, cells, key=AFFINE_KEY), affine_xy)
    # with the arrays kept, the default is the LDDMM again
    kept = _quiet(s.filter_by_coordinate_system, [XENIUM_CS, VISIUM_CS], filter_tables=False)
    np.testing.assert_array_equal(kept.align.transform_points(cells), lddmm_xy)


def test_concatenated_results_need_a_key_unless_they_came_from_one_object(fitted):
    s = fitted
    cells = element_xy(s, XENIUM_CELLS, XENIUM_CS)
    two = _quiet(sd.concatenate, {"a": sd.deepcopy(s), "b": sd.deepcopy(s)})
    with pytest.raises(ValueError, match=r"several objects.*key="):
        _quiet(two.align.transform_points, cells)
    np.testing.assert_array_equal(
        _quiet(two.align.transform_points, cells, key=f"{LDDMM_KEY}-a"), s.align.transform_points(cells)
    )
    one = _quiet(sd.concatenate, {"a": sd.deepcopy(s)})
    np.testing.assert_array_equal(_quiet(one.align.transform_points, cells), s.align.transform_points(cells))


def test_without_attrs_the_default_is_the_most_recently_fitted_transform(fitted, tmp_path):
    """A rebuilt object (attrs lost) recovers its transforms from the table; the default must stay the LDDMM, in
    whatever order the table holds the records (an apply with the affine rewrites its record: the CLI's output held
    the affine's last, and the rebuilt object's default was the affine)."""
    from spatialdata_align._store import TABLE, UNS_KEY

    s = fitted
    cells = element_xy(s, XENIUM_CELLS, XENIUM_CS)
    c = sd.deepcopy(s)
    c.align.apply(XENIUM_CELLS, key=AFFINE_KEY, name="affine_copy")  # records the copy on the affine's entry
    _quiet(c.write, tmp_path / "c.zarr")
    c = _quiet(sd.read_zarr, tmp_path / "c.zarr")
    node = c.tables[TABLE].uns[UNS_KEY]
    node["records"] = {k: node["records"][k] for k in sorted(node["records"], key=lambda k: k == AFFINE_KEY)}
    assert list(node["records"])[-1] == AFFINE_KEY
    for rebuilt in (
        _quiet(sd.concatenate, {"a": c}),
        sd.SpatialData(images=c.images, shapes=c.shapes, points=c.points, tables=c.tables),
    ):
        np.testing.assert_array_equal(_quiet(rebuilt.align.transform_points, cells), s.align.transform_points(cells))


def test_renamed_coordinate_systems_fail_with_a_message_naming_the_rename(fitted):
    """spatialdata renames in place and does not know sdata.align's metadata: say so, and how to get back."""
    s = fitted
    cells = element_xy(s, XENIUM_CELLS, XENIUM_CS)
    o = sd.deepcopy(s)  # (rename_coordinate_systems changes the element objects, shared with derived objects)
    o.rename_coordinate_systems({VISIUM_CS: "he", XENIUM_CS: "xen_um"})
    np.testing.assert_array_equal(o.align.transform_points(cells), s.align.transform_points(cells))  # no cs used
    with pytest.raises(KeyError, match=r"'xenium_to_visium_lddmm' maps 'xenium'.*\['he', 'xen_um'\].*rename"):
        o.align.apply(XENIUM_CELLS, name="again")
    with pytest.raises(KeyError, match=r"no coordinate system 'visium'"):
        o.align.apply(VISIUM_SPOTS, inverse=True)
    o.rename_coordinate_systems({"xen_um": XENIUM_CS})  # the target's system alone renamed: caught too
    with pytest.raises(KeyError, match=r"'xenium_to_visium_lddmm' maps 'xenium'.*'visium'.*rename"):
        o.align.apply(XENIUM_CELLS, name="again")
    assert VISIUM_CS not in o.coordinate_systems  # nothing written into a new, empty 'visium' system
    o.rename_coordinate_systems({"he": VISIUM_CS})  # renamed back, it works again
    o.align.apply(XENIUM_CELLS, name="again")
    np.testing.assert_allclose(element_xy(o, "again", VISIUM_CS), s.align.transform_points(cells), atol=1e-9)


def test_spatialdata_queries_and_aggregation_agree_with_the_alignment(fitted):
    """Queries, joins, aggregation, extents and circles in "visium" see the cells where sdata.align puts them."""
    s, aligned_cells, aligned_table = fitted, f"{XENIUM_CELLS}_aligned", ALIGNED_TABLE
    mapped = s.align.transform_points(element_xy(s, XENIUM_CELLS, XENIUM_CS))
    spots = element_xy(s, VISIUM_SPOTS, VISIUM_CS)
    lo, hi = spots[len(spots) // 2] - 300, spots[len(spots) // 2] + 300
    inside = s[XENIUM_CELLS].index[((mapped >= lo) & (mapped <= hi)).all(1)]
    assert 20 < len(inside) < 1000
    for q in (
        _quiet(sd.bounding_box_query, s, ("x", "y"), lo, hi, VISIUM_CS),
        _quiet(s.query.bounding_box, ("x", "y"), lo, hi, VISIUM_CS),
    ):
        assert set(q[aligned_cells].index) == set(inside)
        table = sd.match_table_to_element(q, aligned_cells, aligned_table)  # linked, row for row
        assert list(table.obs["instance_id"]) == list(q[aligned_cells].index)
        np.testing.assert_allclose(table.obsm["spatial"], element_xy(q, aligned_cells, VISIUM_CS), atol=1e-9)
    # the cells' centroids counted into the spots: what sda.tl.pseudo_spots counts, up to the circle's polygon
    centroids = sd.get_centroids(s[aligned_cells], coordinate_system=VISIUM_CS)
    agg = sd.aggregate(values=centroids, by=s[VISIUM_SPOTS], target_coordinate_system=VISIUM_CS, agg_func="count")
    t = agg.tables["table"]
    counts = pd.Series(np.asarray(t.X.todense()).ravel(), index=t.obs["instance_id"].astype(str))
    ps = sda.tl.pseudo_spots(s, copy=True)
    n_cells = pd.Series(ps.obs["n_cells"].to_numpy(), index=ps.obs["instance_id"].astype(str))
    assert n_cells.sum() > 100 and (counts.reindex(n_cells.index, fill_value=0) - n_cells).abs().max() <= 1
    assert abs(counts.sum() - n_cells.sum()) <= 0.01 * n_cells.sum()
    # extents: the aligned cells lie on the H&E; circles keep the cells' size in full-resolution pixels
    cells_e, image_e = (sd.get_extent(s[n], coordinate_system=VISIUM_CS) for n in (aligned_cells, VISIUM_HIRES))
    for ax in "xy":
        assert image_e[ax][0] <= cells_e[ax][0] < cells_e[ax][1] <= image_e[ax][1]
    um_per_px = sda.io.visium_scalefactors(s)["um_per_px"]
    ratio = sd.to_circles(s[aligned_cells]).radius.to_numpy() * um_per_px / s[XENIUM_CELLS].radius.to_numpy()
    assert 0.8 < np.median(ratio) < 1.25
