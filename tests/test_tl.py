"""Tests of ``sda.tl``: shared region, subsetting, pseudo-spots and the gene comparison.

The pair comes from ``_tl_data.make_pair`` (known truth; see its docstring). "Cells that truly lie
under in-tissue spots" are defined on the TRUE cell positions as the cells inside the lattice cell
(hexagonal Voronoi cell, pitch 100 µm) of an in-tissue spot: a strict 55 µm-circle reading would
make the <= 5 % criterion impossible for any contiguous region, as the gaps between spots cover
most of the area.
"""

from __future__ import annotations

import warnings

import anndata as ad
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import shapely
from _tl_data import UM_PER_PX, add_aligned, add_aligned_xy, add_native_affine, make_pair, twin_pair, twin_truth_px
from scipy.spatial import cKDTree
from scipy.stats import pearsonr, spearmanr
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel
from spatialdata.transformations import Affine, Identity, Sequence

import spatialdata_align as sda
from spatialdata_align._constants import (
    ALIGNED_SUFFIX,
    ATTRS_KEY,
    MATCH_WEIGHT_KEY,
    UNS_COMPARE_KEY,
    VISIUM_CS,
    VISIUM_HIRES,
    VISIUM_SPOTS,
    VISIUM_TABLE,
    XENIUM_CELLS,
    XENIUM_CS,
    XENIUM_TABLE,
)
from spatialdata_align.tl import _data

CELLS_AL = f"{XENIUM_CELLS}{ALIGNED_SUFFIX}"
TABLE_AL = f"{XENIUM_TABLE}{ALIGNED_SUFFIX}"


@pytest.fixture(scope="module")
def pair():
    p = make_pair(n_cells=6000, n_side=30, seed=0)
    add_native_affine(p)
    add_aligned(p)
    return p


def fresh(shift_um: float = 0.0, aligned: bool = True, native: bool = True, **kw):
    p = make_pair(n_cells=kw.pop("n_cells", 6000), n_side=kw.pop("n_side", 30), seed=kw.pop("seed", 0))
    if native:
        add_native_affine(p)
    if aligned:
        add_aligned(p, shift_um=shift_um)
    return p


def truly_under_in_tissue(p) -> np.ndarray:
    """Per cell: its TRUE position lies in the lattice cell of an in-tissue spot."""
    circum = p.pitch_px / np.sqrt(3)
    dist, idx = cKDTree(p.spots_px).query(p.cells_px, distance_upper_bound=circum)
    ok = np.isfinite(dist)
    out = np.zeros(len(p.cells_px), dtype=bool)
    out[ok] = p.in_tissue[idx[ok]]
    return out


def kept_cells(shared: SpatialData, table: str = XENIUM_TABLE) -> np.ndarray:
    return shared.tables[table].obs["instance_id"].to_numpy()


# ---------------------------------------------------------------------------------------------- genes
def test_shared_genes_matching_rules(pair):
    gm = sda.tl.shared_genes(pair.sdata)
    genes = gm["gene"].tolist()
    assert genes == sorted(["ACTA2", "CD3E", "EGFR", "EPCAM", "FLAT1", "KRT5", "MYDUP", "NKX2-1", "PTPRC", "VIM"])
    row = gm.set_index("gene")
    assert row.loc["KRT5", "visium_var"] == ["Krt5"]  # case-insensitive
    assert row.loc["MYDUP", "visium_var"] == ["MYDUP", "MYDUP-1"]  # duplicated symbol: both summed
    assert row.loc["NKX2-1", "visium_var"] == ["NKX2-1"]  # a real dash is not a uniqueness suffix
    assert not any(g.startswith(("NegControl", "BLANK")) for g in genes)
    assert "GAPDH" not in genes  # Visium only
    sub = sda.tl.shared_genes(pair.sdata, ["egfr", "krt5"])
    assert sub["gene"].tolist() == ["EGFR", "KRT5"]


def test_shared_genes_unknown_gene_message(pair):
    with pytest.raises(KeyError, match=r"'GAPDH' \(only in Visium\).*'NOPE' \(in neither table\)"):
        sda.tl.shared_genes(pair.sdata, ["GAPDH", "NOPE"])


def test_gene_symbols_folds_make_unique_suffix_only():
    var = pd.DataFrame(index=["A", "A-1", "NKX2-1", "HLA-A", "B-2"])
    t = ad.AnnData(np.zeros((1, 5), dtype=np.float32), var=var)
    assert _data.gene_symbols(t).tolist() == ["A", "A", "NKX2-1", "HLA-A", "B-2"]


# ------------------------------------------------------------------------- acceptance on twin sections
@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    tw, sd = twin_pair(tmp_path_factory.mktemp("twin"), n_cells=3000, n_spots=300, seed=0)
    cells_px, spots_px, in_tis = twin_truth_px(tw, sd)
    pitch = 100.0 / tw.truth.um_per_px  # the 100 µm spot pitch
    dist, idx = cKDTree(spots_px).query(cells_px, distance_upper_bound=pitch / np.sqrt(3))
    under = np.zeros(len(cells_px), dtype=bool)
    under[np.isfinite(dist)] = in_tis[idx[np.isfinite(dist)]]
    return tw, sd, cells_px, under


def _twin_aligned(twin, shift_um: float) -> SpatialData:
    tw, sd, cells_px, _ = twin
    sd = SpatialData(shapes=dict(sd.shapes), tables=dict(sd.tables), images=dict(sd.images), attrs=dict(sd.attrs))
    return add_aligned_xy(sd, cells_px + np.array([shift_um / tw.truth.um_per_px, 0.0]))


def test_twin_shared_region_keep_rates(twin):
    """>= 95 % of cells truly under in-tissue spots kept, <= 5 % of the others; fails with a 500 µm error."""
    _, sd0, _, under = twin
    assert under.sum() > 2000 and (~under).sum() > 50
    rates = {}
    for shift in (0.0, 500.0):
        sd = _twin_aligned(twin, shift)
        sda.tl.shared_region(sd)
        shared = sda.tl.subset_shared(sd)
        kept = np.isin(sd0[XENIUM_CELLS].index, shared[XENIUM_CELLS].index)
        rates[shift] = (kept[under].mean(), kept[~under].mean())
    assert rates[0.0][0] >= 0.95 and rates[0.0][1] <= 0.05, rates
    assert rates[500.0][0] < 0.95 or rates[500.0][1] > 0.05, rates


def test_twin_egfr_correlation_measures_alignment(twin):
    """EGFR agrees at spot level with the true alignment and collapses with a 500 µm shift."""
    r = {}
    for shift in (0.0, 500.0):
        sd = _twin_aligned(twin, shift)
        df = sda.tl.compare_genes(sd, copy=True).set_index("gene")
        r[shift] = df.loc["EGFR", "pearson"]
        assert df.loc["EGFR", "n_spots"] > 100
    assert r[0.0] > 0.5, r
    assert r[500.0] < 0.2, r
    assert r[0.0] - r[500.0] > 0.4, r


# --------------------------------------------------------------------------------------- shared region
def test_shared_region_acceptance(pair):
    sd = pair.sdata
    sda.tl.shared_region(sd, key_added="region_test")
    region = sd.shapes["region_test"].geometry.iloc[0]
    truth = truly_under_in_tissue(pair)
    shared = sda.tl.subset_shared(sd, "region_test")
    kept = np.isin(np.arange(len(truth)), kept_cells(shared))
    frac_in = kept[truth].mean()
    frac_out = kept[~truth].mean()
    assert truth.sum() > 3000 and (~truth).sum() > 300  # both classes are well populated
    assert frac_in >= 0.95, frac_in
    assert frac_out <= 0.05, frac_out
    # the stored element: one (multi)polygon of whole lattice cells of in-tissue spots
    gdf = sd.shapes["region_test"]
    assert len(gdf) == 1 and gdf.geometry.iloc[0].equals(region)
    n = int(gdf["n_spots"].iloc[0])
    hex_area = np.sqrt(3) / 2 * pair.pitch_px**2
    assert region.area == pytest.approx(n * hex_area, rel=1e-3)
    assert gdf["area_um2"].iloc[0] == pytest.approx(n * hex_area * UM_PER_PX**2, rel=1e-3)
    assert n <= pair.in_tissue.sum()
    # every spot centre in the region is in tissue
    inside = shapely.contains_xy(region, pair.spots_px[:, 0], pair.spots_px[:, 1])
    assert inside.sum() == n and pair.in_tissue[inside].all()


def test_shared_region_keeps_the_spots_with_enough_cells(pair):
    """A spot joins the region when its lattice cell holds at least ``min_cells`` aligned cells (default: a tenth of
    the median over the occupied in-tissue spots), so a few stray cells at the edge do not extend it."""
    from spatialdata_align.tl._region import AUTO_MIN_FRACTION, spot_cell_counts

    sd = pair.sdata
    _, _, counts, _, _ = spot_cell_counts(sd)
    occupied = counts[pair.in_tissue & (counts > 0)]
    k = float(np.percentile(occupied, 25))
    assert (occupied < k).sum() >= 5  # spots the threshold must leave out

    def spots_in(region):
        return shapely.contains_xy(region, pair.spots_px[:, 0], pair.spots_px[:, 1])

    inside = spots_in(sda.tl.shared_region(sd, min_cells=k, copy=True))
    np.testing.assert_array_equal(inside, pair.in_tissue & (counts >= k))
    auto = spots_in(sda.tl.shared_region(sd, copy=True))
    np.testing.assert_array_equal(
        auto, pair.in_tissue & (counts > 0) & (counts >= AUTO_MIN_FRACTION * np.median(occupied))
    )
    assert inside.sum() < auto.sum()


def test_shared_region_fails_acceptance_when_misaligned():
    """A 500 µm error breaks the criterion, so the acceptance test above can fail."""
    p = fresh(shift_um=500.0)
    sda.tl.shared_region(p.sdata)
    shared = sda.tl.subset_shared(p.sdata)
    truth = truly_under_in_tissue(p)
    kept = np.isin(np.arange(len(truth)), kept_cells(shared))
    assert kept[truth].mean() < 0.95 or kept[~truth].mean() > 0.05


def test_shared_region_native_affine_fallback_matches_aligned(pair):
    p = fresh(aligned=False)
    r_native = sda.tl.shared_region(p.sdata, copy=True)
    r_aligned = sda.tl.shared_region(pair.sdata, copy=True)
    assert r_native.symmetric_difference(r_aligned).area < 1e-6 * r_aligned.area
    assert "shared_region" not in p.sdata.shapes  # key_added=None writes nothing


def test_shared_region_match_weight():
    p = fresh()
    t = p.sdata.tables[TABLE_AL]
    with pytest.raises(ValueError, match=MATCH_WEIGHT_KEY):
        sda.tl.shared_region(p.sdata, use_match_weight=True)
    xy = p.cells_px
    right = xy[:, 0] > np.median(xy[:, 0])
    t.obs[MATCH_WEIGHT_KEY] = np.where(right, 0.0, 1.0)
    full = sda.tl.shared_region(p.sdata, copy=True)
    weighted = sda.tl.shared_region(p.sdata, use_match_weight=True, copy=True)
    assert weighted.area < 0.7 * full.area
    # the unmatched half is gone: no weighted-region spot lies right of the split (+ one pitch)
    cx = shapely.get_coordinates(weighted)[:, 0]
    assert cx.max() < np.median(xy[:, 0]) + 1.1 * p.pitch_px


def test_shared_region_errors():
    p = fresh(aligned=False, native=False)
    with pytest.raises(ValueError, match=r"sdata\.align\.affine"):
        sda.tl.shared_region(p.sdata)
    p = fresh(shift_um=50_000.0)
    with pytest.raises(ValueError, match="share no tissue"):
        sda.tl.shared_region(p.sdata)


# -------------------------------------------------------------------------------------------- subset
def _state(sd: SpatialData) -> dict:
    return {
        "elements": sorted(n for _, n, _ in sd.gen_elements()),
        "n": {n: len(sd.shapes[n]) for n in sd.shapes},
        "t": {n: sd.tables[n].shape for n in sd.tables},
        "img": sd.images[VISIUM_HIRES].shape,
        "attrs": repr(sd.attrs),
    }


def test_subset_shared_input_untouched_and_consistent(pair):
    sd = pair.sdata
    sda.tl.shared_region(sd)
    before = _state(sd)
    shared = sda.tl.subset_shared(sd)
    assert _state(sd) == before
    region = shared.shapes["shared_region"].geometry.iloc[0]
    # originals follow their aligned copies row for row; tables match their elements
    assert shared.shapes[XENIUM_CELLS].index.equals(shared.shapes[CELLS_AL].index)
    for tname, el in ((XENIUM_TABLE, XENIUM_CELLS), (TABLE_AL, CELLS_AL), (VISIUM_TABLE, VISIUM_SPOTS)):
        ids = np.sort(shared.tables[tname].obs["instance_id"].to_numpy())
        assert np.array_equal(ids, np.sort(shared.shapes[el].index.to_numpy())), tname
    # kept spots are exactly the spots whose centre is in the region
    inside = shapely.contains_xy(region, pair.spots_px[:, 0], pair.spots_px[:, 1])
    assert np.array_equal(np.sort(shared.shapes[VISIUM_SPOTS].index), np.flatnonzero(inside))
    xy = pair.forward(pair.cells_um)
    assert np.array_equal(
        np.sort(shared.shapes[CELLS_AL].index), np.flatnonzero(shapely.contains_xy(region, xy[:, 0], xy[:, 1]))
    )
    # the hires image is cropped to the region's bounding box (hires px = full-res px * 0.05)
    h, w = shared.images[VISIUM_HIRES].shape[1:]
    minx, miny, maxx, maxy = region.bounds
    assert abs(w - (maxx - minx) * 0.05) <= 2 and abs(h - (maxy - miny) * 0.05) <= 2
    # modifying the output leaves the input alone
    shared.tables[XENIUM_TABLE].obs["x"] = 1
    assert "x" not in sd.tables[XENIUM_TABLE].obs


def test_subset_shared_bbox_polygon_and_points():
    p = fresh()
    sd = p.sdata
    # transcripts: points in µm with the true affine into visium
    rng = np.random.default_rng(1)
    tr_um = p.cells_um[rng.integers(0, len(p.cells_um), 20000)] + rng.normal(scale=3, size=(20000, 2))
    df = pd.DataFrame({"x": tr_um[:, 0], "y": tr_um[:, 1], "feature_name": pd.Categorical(["EGFR"] * len(tr_um))})
    aff = Affine(p.matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    sd.points["xenium_transcripts"] = PointsModel.parse(
        dd.from_pandas(df, npartitions=3),
        feature_key="feature_name",
        transformations={XENIUM_CS: Identity(), VISIUM_CS: Sequence([Identity(), aff])},
    )
    tr_px = p.forward(tr_um)
    box = (2000.0, 1500.0, 6000.0, 5000.0)
    out = sda.tl.subset_shared(sd, box)
    inb = (tr_px[:, 0] > box[0]) & (tr_px[:, 0] < box[2]) & (tr_px[:, 1] > box[1]) & (tr_px[:, 1] < box[3])
    assert len(out.points["xenium_transcripts"].compute()) == inb.sum()
    spots_in = (p.spots_px[:, 0] > box[0]) & (p.spots_px[:, 0] < box[2])
    spots_in &= (p.spots_px[:, 1] > box[1]) & (p.spots_px[:, 1] < box[3])
    assert out.tables[VISIUM_TABLE].n_obs == spots_in.sum()
    assert "shared_region" not in out.shapes  # an explicit region is not stored as the shared one
    # a polygon (triangle) in full-res px
    tri = shapely.Polygon([(1000, 1000), (8000, 1000), (1000, 7000)])
    out = sda.tl.subset_shared(sd, tri)
    xy = p.forward(p.cells_um)
    assert out.tables[TABLE_AL].n_obs == shapely.contains_xy(tri, xy[:, 0], xy[:, 1]).sum()
    with pytest.raises(TypeError, match="bounding box"):
        sda.tl.subset_shared(sd, "not a region".split())
    with pytest.raises(ValueError, match="max > min"):
        sda.tl.subset_shared(sd, (10, 10, 5, 20))
    with pytest.raises(KeyError, match="shapes present"):
        sda.tl.subset_shared(sd, "nope")


def test_subset_shared_computes_region_when_absent_and_carries_alignment_elements():
    from spatialdata_align import _store
    from spatialdata_align.registration import DisplacementField, Registration

    p = fresh()
    sd = p.sdata
    # a stored non-linear transform: its field arrays live in a table annotating nothing
    f = DisplacementField(np.ones((2, 4, 4)), 0.0, 0.0, 500.0, 500.0)
    reg = Registration(affine=np.eye(3), forward_field=f, inverse_field=f)
    _store.store_registration(
        sd,
        reg,
        key="k",
        kind="lddmm",
        source_cs=XENIUM_CS,
        target_cs=VISIUM_CS,
        source_element=None,
        target_element=None,
        native=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # carried alignment elements raise no 'unfiltered' warning
        out = sda.tl.subset_shared(sd)
    assert "shared_region" in out.shapes and "shared_region" not in sd.shapes
    assert _store.TABLE in out.tables and list(out.align.transforms.index) == ["k"]
    np.testing.assert_array_equal(out.align.get("k").forward_field.values, f.values)
    assert out.attrs[ATTRS_KEY] == sd.attrs[ATTRS_KEY] and out.attrs is not sd.attrs
    # an unrelated element outside the target system is kept, with a warning
    sd.images["other"] = Image2DModel.parse(np.zeros((1, 4, 4)), dims=("c", "y", "x"))
    with pytest.warns(UserWarning, match="other"):
        out = sda.tl.subset_shared(sd)
    assert "other" in out.images


# ---------------------------------------------------------------------------------------- pseudo-spots
def test_pseudo_spots_brute_force(pair):
    sd = pair.sdata
    ps = sda.tl.pseudo_spots(sd, copy=True)
    vt = sd.tables[VISIUM_TABLE]
    assert ps.obs_names.equals(vt.obs_names)
    assert ps.shape == (vt.n_obs, 10)
    xy = pair.forward(pair.cells_um)
    r_px = 27.5 / UM_PER_PX
    d = np.linalg.norm(pair.spots_px[:, None, :] - xy[None], axis=-1)
    member = d <= r_px
    assert np.array_equal(ps.obs["n_cells"].to_numpy(), member.sum(1))
    assert ps.obs["n_cells"].sum() > 1000
    xt = sd.tables[XENIUM_TABLE]
    for g in ("EGFR", "MYDUP", "KRT5"):
        expect = member.astype(np.float64) @ xt[:, g].X.toarray().ravel()
        np.testing.assert_allclose(ps[:, g].X.toarray().ravel(), expect)
    tot = member.astype(np.float64) @ xt[:, : len(xt.var_names) - 2].X.sum(1).A.ravel()  # controls excluded
    np.testing.assert_allclose(ps.obs["total_counts"].to_numpy(), tot)
    assert ps.uns["sda_pseudo_spots"]["radius_um"] == pytest.approx(27.5)
    assert ps.uns["sda_pseudo_spots"]["cells_element"] == CELLS_AL
    np.testing.assert_allclose(ps.obsm["spatial"], pair.spots_px)


def test_pseudo_spots_radius_units_and_storage(pair):
    sd = pair.sdata
    a = sda.tl.pseudo_spots(sd, radius=50.0, units="um", genes=["egfr"], copy=True)
    b = sda.tl.pseudo_spots(sd, radius=50.0 / UM_PER_PX, units="px", genes=["EGFR"], copy=True)
    assert a.var_names.tolist() == ["EGFR"]
    assert np.array_equal(a.obs["n_cells"], b.obs["n_cells"])
    assert a.obs["n_cells"].sum() > sda.tl.pseudo_spots(sd, copy=True).obs["n_cells"].sum()
    with pytest.raises(ValueError, match="units"):
        sda.tl.pseudo_spots(sd, radius=5, units="mm", copy=True)
    with pytest.raises(ValueError, match="positive"):
        sda.tl.pseudo_spots(sd, radius=-1, copy=True)
    p = fresh()
    sda.tl.pseudo_spots(p.sdata, key_added="xenium_pseudo_spots")
    assert p.sdata.tables["xenium_pseudo_spots"].n_obs == p.sdata.tables[VISIUM_TABLE].n_obs
    assert VISIUM_SPOTS in str(p.sdata.tables["xenium_pseudo_spots"].uns["spatialdata_attrs"])


# ------------------------------------------------------------------------------------------ comparison
def test_compare_genes_values_against_scanpy(pair):
    sd = pair.sdata
    assert sda.tl.compare_genes(sd) is None  # scanpy convention: written, not returned
    df = sd.tables[VISIUM_TABLE].uns[UNS_COMPARE_KEY]
    pd.testing.assert_frame_equal(df, sda.tl.compare_genes(sd, copy=True))
    assert list(df.columns) == [
        "gene",
        "n_spots",
        "pearson",
        "spearman",
        "xenium_detection",
        "visium_detection",
        "xenium_mean",
        "visium_mean",
    ]
    assert df["pearson"].is_monotonic_decreasing
    # independent recomputation with scanpy on the spots compared
    ps = sda.tl.pseudo_spots(sd, copy=True)
    vt = sd.tables[VISIUM_TABLE]
    used = (ps.obs["n_cells"].to_numpy() >= 1) & vt.obs["in_tissue"].astype(bool).to_numpy()
    assert (df["n_spots"] == used.sum()).all()
    xa = ad.AnnData(ps.X.toarray()[used])
    xa.obs["lib"] = ps.obs["total_counts"].to_numpy()[used]
    va = vt[used].copy()
    va.X = va.X.toarray().astype(np.float64)
    sc.pp.normalize_total(va)
    sc.pp.log1p(va)
    xa.X = np.log1p(xa.X / xa.obs["lib"].to_numpy()[:, None] * np.median(xa.obs["lib"]))
    row = df.set_index("gene")
    for g in ("EGFR", "KRT5"):
        xv = xa.X[:, ps.var_names.get_loc(g)]
        vv = va[:, "EGFR" if g == "EGFR" else "Krt5"].X.ravel()
        assert row.loc[g, "pearson"] == pytest.approx(pearsonr(xv, vv)[0], abs=1e-6)
        assert row.loc[g, "spearman"] == pytest.approx(spearmanr(xv, vv)[0], abs=1e-3)  # ulp-level ties
        assert row.loc[g, "xenium_detection"] == pytest.approx((ps[used, g].X.toarray() > 0).mean())
    # MYDUP sums both Visium variables
    vsum = vt[used, "MYDUP"].X.toarray().ravel() + vt[used, "MYDUP-1"].X.toarray().ravel()
    assert row.loc["MYDUP", "visium_detection"] == pytest.approx((vsum > 0).mean())


def test_compare_genes_measures_alignment_quality(pair):
    """EGFR agrees with the true alignment and collapses with a 500 µm error."""
    good = sda.tl.compare_genes(pair.sdata, ["EGFR"], copy=True).set_index("gene")
    bad_pair = fresh(shift_um=500.0)
    bad = sda.tl.compare_genes(bad_pair.sdata, ["EGFR"], copy=True).set_index("gene")
    assert good.loc["EGFR", "pearson"] > 0.7
    assert bad.loc["EGFR", "pearson"] < 0.35
    assert good.loc["EGFR", "pearson"] - bad.loc["EGFR", "pearson"] > 0.4
    assert UNS_COMPARE_KEY not in bad_pair.sdata.tables[VISIUM_TABLE].uns  # copy=True writes nothing


def test_compare_genes_on_subset_equals_full(pair):
    sda.tl.shared_region(pair.sdata)
    shared = sda.tl.subset_shared(pair.sdata)
    full = sda.tl.compare_genes(pair.sdata, copy=True)
    sda.tl.compare_genes(shared)
    sub = shared.tables[VISIUM_TABLE].uns[UNS_COMPARE_KEY]
    assert sub["n_spots"].iloc[0] <= full["n_spots"].iloc[0]
    assert sub["n_spots"].iloc[0] >= 0.95 * full["n_spots"].iloc[0]
    assert UNS_COMPARE_KEY in shared.tables[VISIUM_TABLE].uns


def test_compare_genes_options(pair):
    sd = pair.sdata
    ps = sda.tl.pseudo_spots(sd, copy=True)
    a = sda.tl.compare_genes(sd, pseudo=ps, copy=True)
    b = sda.tl.compare_genes(sd, copy=True)
    pd.testing.assert_frame_equal(a, b)
    c = sda.tl.compare_genes(sd, library="shared", min_cells=3, in_tissue_only=False, copy=True)
    vt = sd.tables[VISIUM_TABLE]
    v_shared = np.asarray(vt[:, [v for v in vt.var_names if v not in ("GAPDH", "MALAT1", "XIST", "ACTB")]].X.sum(1))
    expect = (ps.obs["n_cells"].to_numpy() >= 3) & (np.asarray(ps.X.sum(1)).ravel() > 0) & (v_shared.ravel() > 0)
    assert c["n_spots"].iloc[0] == expect.sum()
    with pytest.raises(ValueError, match="library"):
        sda.tl.compare_genes(sd, library="none", copy=True)
    with pytest.raises(ValueError, match="lacks"):
        sda.tl.compare_genes(sd, pseudo=ps[:10], copy=True)


# ------------------------------------------------------------------ through the sdata.align accessor
def _landmarks(sd, tw):
    lm = pd.read_csv(tw.landmarks_path)
    sd.align.set_landmarks(
        source=lm[["source_x", "source_y"]].to_numpy(), target=lm[["target_x", "target_y"]].to_numpy()
    )


def test_twin_affine_route_via_accessor(twin):
    """Landmark affine (native spatialdata Affine) only: the tools fall back to it."""
    tw, _, _, under = twin
    sd = sda.io.read_pair(tw.xenium_path, tw.visium_path)  # fresh elements: affine() edits transformations
    _landmarks(sd, tw)
    sd.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    assert _data.xenium(sd).element == XENIUM_CELLS
    sda.tl.shared_region(sd)
    shared = sda.tl.subset_shared(sd)
    kept = np.isin(sd[XENIUM_CELLS].index, shared[XENIUM_CELLS].index)
    assert kept[under].mean() >= 0.95 and kept[~under].mean() <= 0.1
    assert "landmarks_xenium" in shared.points and "landmarks_visium" in shared.points  # carried over
    df = sda.tl.compare_genes(shared, copy=True).set_index("gene")
    assert df.loc["EGFR", "pearson"] > 0.5


@pytest.mark.slow
def test_twin_lddmm_pipeline_end_to_end(twin, tmp_path):
    """affine -> LDDMM -> apply -> shared region (match weight) -> subset -> compare -> plots."""
    import matplotlib

    matplotlib.use("Agg")
    tw, _, _, under = twin
    sd = sda.io.read_pair(tw.xenium_path, tw.visium_path)
    _landmarks(sd, tw)
    sd.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    sd.align.lddmm(XENIUM_CELLS, VISIUM_HIRES, progress=False, sigma_r=300.0)
    sd.align.apply(XENIUM_CELLS)
    assert _data.xenium(sd).element == CELLS_AL
    sda.tl.shared_region(sd, use_match_weight=True)
    shared = sda.tl.subset_shared(sd)
    kept = np.isin(sd[XENIUM_CELLS].index, shared[XENIUM_CELLS].index)
    assert kept[under].mean() >= 0.95 and kept[~under].mean() <= 0.05
    reg = shared.align.get()  # the velocity field travelled with the subset
    np.testing.assert_allclose(reg.affine, sd.align.get().affine)
    df = sda.tl.compare_genes(shared, copy=True).set_index("gene")
    assert df.loc["EGFR", "pearson"] > 0.5
    for name, fn in (
        ("overlay", lambda p: sda.pl.overlay(sd, save=p)),
        ("energy", lambda p: sda.pl.energy(sd, save=p)),
        ("gene", lambda p: sda.pl.gene(shared, "EGFR", save=p)),
        ("compare", lambda p: sda.pl.compare(shared, "EGFR", save=p)),
        ("landmarks", lambda p: sda.pl.landmarks(sd, save=p)),
        ("total_counts", lambda p: sda.pl.total_counts(shared, save=p)),
    ):
        path = tmp_path / f"{name}.png"
        fn(path)
        assert path.stat().st_size > 5000, name


def test_tools_follow_scanpy_conventions_and_write_copy_on_write():
    """copy=False writes under key_added and returns None; copy=True returns and writes nothing; a derived
    object's writes never reach the object it came from (they share tables and elements)."""
    p = fresh()
    sd = p.sdata
    o = SpatialData.init_from_elements({n: e for _, n, e in sd.gen_elements()}, attrs=sd.attrs)
    assert o.tables[VISIUM_TABLE] is sd.tables[VISIUM_TABLE]  # shared, as after spatialdata operations
    names = sorted(n for _, n, _ in sd.gen_elements())
    assert sda.tl.shared_region(o) is None and "shared_region" in o.shapes
    assert sda.tl.pseudo_spots(o) is None and "xenium_pseudo_spots" in o.tables
    assert sda.tl.compare_genes(o, pseudo="xenium_pseudo_spots", key_added="cmp") is None
    pd.testing.assert_frame_equal(o.tables[VISIUM_TABLE].uns["cmp"], sda.tl.compare_genes(o, copy=True))
    # the original is untouched: no new element, no new uns key in the shared visium table
    assert sorted(n for _, n, _ in sd.gen_elements()) == names
    assert "cmp" not in sd.tables[VISIUM_TABLE].uns and UNS_COMPARE_KEY not in sd.tables[VISIUM_TABLE].uns
    # copy=True writes nothing
    before = sorted(n for _, n, _ in o.gen_elements())
    assert sda.tl.shared_region(o, copy=True).area > 0
    assert sda.tl.pseudo_spots(o, copy=True).n_obs == o.tables[VISIUM_TABLE].n_obs
    assert sorted(n for _, n, _ in o.gen_elements()) == before
    for f in (sda.tl.shared_region, sda.tl.pseudo_spots, sda.tl.compare_genes):
        with pytest.raises(ValueError, match="key_added"):
            f(o, key_added=None)


def test_cell_type_labels_find_the_populations_and_survive_degenerate_tables():
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    lam = np.full((600, 30), 0.3)
    lam[:300, :10] = 6.0  # population A expresses genes 0-9
    lam[300:, 10:20] = 6.0  # population B genes 10-19
    X = rng.poisson(lam).astype(float)
    X[::50] = 0  # a few empty cells
    labels = sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(X)), 2)
    a, b = labels[1:300][np.any(X[1:300] > 0, 1)], labels[301:][np.any(X[301:] > 0, 1)]
    assert len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0]
    # nothing to cluster: a single type, no error
    for Y in (np.zeros((100, 5)), rng.poisson(1.0, (100, 1)), rng.poisson(1.0, (2, 5))):
        lab = sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(Y.astype(float))), 3)
        assert lab.shape == (Y.shape[0],) and len(set(lab)) == 1


def test_cell_type_labels_are_reused_for_the_same_counts_only(monkeypatch):
    """The accuracy estimate's refits reuse the fit's labels: a second call on equal counts does not cluster again,
    a changed count or argument does, and the caller's copy can be modified without changing the kept one."""
    import anndata as ad
    import scipy.sparse as sp

    from spatialdata_align.tl import _data

    calls = {"n": 0}
    cluster = _data._cluster

    def counted(*a, **k):
        calls["n"] += 1
        return cluster(*a, **k)

    monkeypatch.setattr(_data, "_cluster", counted)
    monkeypatch.setattr(_data, "_LABELS_CACHE", type(_data._LABELS_CACHE)())
    rng = np.random.default_rng(1)
    lam = np.full((400, 20), 0.3)
    lam[:200, :10] = 6.0
    X = rng.poisson(lam).astype(float)
    first = sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(X)), 2)
    again = sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(X.copy())), 2)  # another table, equal counts
    assert calls["n"] == 1
    np.testing.assert_array_equal(again, first)
    again[:] = 7  # the caller's copy
    np.testing.assert_array_equal(sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(X)), 2), first)
    Y = X.copy()
    Y[5, 3] += 1  # one count more
    sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(Y)), 2)
    assert calls["n"] == 2
    sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(X)), 3)  # another number of types
    assert calls["n"] == 3
    sda.tl.cell_type_labels(ad.AnnData(X), 2)  # dense counts: a dense digest, clustered once more
    assert calls["n"] == 4
    sda.tl.cell_type_labels(ad.AnnData(sp.csr_matrix(X)), 2, seed=1)  # another seed
    assert calls["n"] == 5


def test_cell_type_labels_seed_reaches_the_clustering(monkeypatch):
    """Counts with no populations have many equally good partitions: k-means' seed picks one, the same seed the
    same one (the kept labels cleared in between, so the clustering runs each time)."""
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.metrics import adjusted_rand_score

    from spatialdata_align.tl import _data

    X = sp.csr_matrix(np.random.default_rng(3).poisson(2.0, (500, 25)).astype(float))

    def labels(seed):
        monkeypatch.setattr(_data, "_LABELS_CACHE", type(_data._LABELS_CACHE)())
        return sda.tl.cell_type_labels(ad.AnnData(X), 6, seed=seed)

    first = labels(0)
    np.testing.assert_array_equal(labels(0), first)
    assert adjusted_rand_score(first, labels(1)) < 0.9


# ------------------------------------------------------------------------ the hand-countable tiny pair
#: tiny pair (``_tl_data.tiny_pair``), in Visium table order (spots 13, 11, 12, 10): the cells within 50 px
#: (27.5 µm at 0.55 µm/px) of each spot, their summed A and B, and their non-control library (A + B: CTRL is a
#: control by its feature type, NegControlProbe_1 by its name)
TINY_MEMBERS = [[7, 8], [4, 5], [6], [0, 1, 2]]
TINY_PSEUDO = np.array([[4, 5], [5, 1], [0, 2], [3, 4]], dtype=float)
TINY_LIB = np.array([9, 6, 2, 7], dtype=float)


def _numpy_table(P, lib, V, vlib, genes=("A", "B")) -> pd.DataFrame:
    """compare_genes' table recomputed with numpy/scipy: counts ``P`` / ``V`` (spots x genes) and libraries."""
    P, V, lib, vlib = (np.asarray(a, dtype=float) for a in (P, V, lib, vlib))
    x = np.log1p(P / lib[:, None] * np.median(lib))
    v = np.log1p(V / vlib[:, None] * np.median(vlib))
    out = pd.DataFrame(
        {
            "gene": list(genes),
            "n_spots": len(P),
            "pearson": [pearsonr(x[:, j], v[:, j])[0] for j in range(len(genes))],
            "spearman": [spearmanr(x[:, j], v[:, j])[0] for j in range(len(genes))],
            "xenium_detection": (P > 0).mean(0),
            "visium_detection": (V > 0).mean(0),
            "xenium_mean": x.mean(0),
            "visium_mean": v.mean(0),
        }
    )
    return out.sort_values("pearson", ascending=False).reset_index(drop=True)


def _tiny_expected(members, rows=None, visium_x=None) -> pd.DataFrame:
    """compare_genes' table of the tiny pair for the spots ``rows`` (Visium table positions), with numpy/scipy."""
    from _tl_data import TINY_ROWS, TINY_X

    rows = np.arange(4) if rows is None else np.asarray(rows)
    P = np.array([TINY_X[m][:, :2].sum(0) for m in members], dtype=float)[rows]
    lib = np.array([TINY_X[m][:, :2].sum() for m in members], dtype=float)[rows]
    ids = np.array(TINY_ROWS, dtype=float)[rows]
    V = np.column_stack([ids, 2 * ids - 19]) if visium_x is None else visium_x[rows]
    return _numpy_table(P, lib, V, V.sum(1) + 100)  # GAPDH: Visium only, in the library


def _assert_table(df, expect):
    pd.testing.assert_frame_equal(df, expect, check_dtype=False, atol=1e-9, rtol=1e-6)


def test_tiny_pseudo_spots_hand_counted():
    """Pseudo-spots of the tiny pair: counted by hand, in the Visium table's row order (not the shapes' order), with
    the spot ids and in-tissue flags of those rows; a feature-type control stays out of the library."""
    from _tl_data import TINY_ROWS, tiny_pair

    sd = tiny_pair()
    ps = sda.tl.pseudo_spots(sd, copy=True)
    assert ps.obs_names.tolist() == [f"BC{i}-1" for i in TINY_ROWS]
    assert ps.var_names.tolist() == ["A", "B"] and ps.var["visium_var"].tolist() == ["A", "b"]
    np.testing.assert_array_equal(ps.X.toarray(), TINY_PSEUDO)
    np.testing.assert_array_equal(ps.obs["n_cells"], [2, 2, 1, 3])
    np.testing.assert_array_equal(ps.obs["total_counts"], TINY_LIB)
    np.testing.assert_array_equal(ps.obs["instance_id"], TINY_ROWS)  # the spot each row annotates
    np.testing.assert_array_equal(ps.obs["in_tissue"], [1, 1, 0, 1])
    np.testing.assert_array_equal(ps.obsm["spatial"], [[300, 300], [300, 100], [100, 300], [100, 100]])
    assert ps.uns["sda_pseudo_spots"]["radius_px"] == pytest.approx(50.0)
    assert ps.uns["sda_pseudo_spots"]["radius_um"] == pytest.approx(27.5)


@pytest.mark.parametrize(
    "kw",
    [
        {"spot_radius": False},  # spots drawn as squares: the 27.5 µm default through um_per_px
        {"spot_radius": False, "um_per_px": False},  # um_per_px from scalefactors' spot_diameter_fullres
        {"um_per_px": False, "scalefactors": False},  # um_per_px from the spot radius
    ],
)
def test_tiny_pseudo_spots_default_radius_and_um_per_px_sources(kw):
    """Without a spot radius the default is 27.5 µm (50 px here, not the 55 µm diameter); µm-per-pixel comes from
    uns['visium']['um_per_px'], else spot_diameter_fullres (55 µm), else the spot radius (27.5 µm)."""
    from _tl_data import tiny_pair

    sd = tiny_pair(**kw)
    assert _data.um_per_px(sd) == pytest.approx(0.55)
    for ps in (sda.tl.pseudo_spots(sd, copy=True), sda.tl.pseudo_spots(sd, radius=27.5, units="um", copy=True)):
        np.testing.assert_array_equal(ps.obs["n_cells"], [2, 2, 1, 3])
        np.testing.assert_array_equal(ps.X.toarray(), TINY_PSEUDO)
    # 34 µm = 61.8 px: the cell 60 px below spot 10 joins it
    np.testing.assert_array_equal(sda.tl.pseudo_spots(sd, radius=34.0, copy=True).obs["n_cells"], [2, 2, 1, 4])


def test_tiny_compare_genes_hand_computed():
    """compare_genes on the tiny pair against numpy/scipy: pearson, spearman, detection and the mean log-normalised
    expression of each modality; in-tissue spots only by default."""
    from _tl_data import tiny_pair

    sd = tiny_pair()
    _assert_table(sda.tl.compare_genes(sd, in_tissue_only=False, copy=True), _tiny_expected(TINY_MEMBERS))
    _assert_table(sda.tl.compare_genes(sd, copy=True), _tiny_expected(TINY_MEMBERS, rows=[0, 1, 3]))


def test_tiny_compare_genes_passes_radius_layers_and_pseudo_through():
    """radius reaches the pseudo-spots, layer / visium_layer choose the counts of each modality, and a given
    ``pseudo`` is matched to the spots by barcode whatever its row order."""
    from _tl_data import tiny_pair

    sd = tiny_pair()
    wide = [[7, 8], [4, 5], [6], [0, 1, 2, 3]]  # 34 µm (61.8 px): the cell 60 px from spot 10 joins it
    _assert_table(sda.tl.compare_genes(sd, radius=34.0, in_tissue_only=False, copy=True), _tiny_expected(wide))
    _assert_table(
        sda.tl.compare_genes(sd, radius=62.0, units="px", in_tissue_only=False, copy=True), _tiny_expected(wide)
    )
    # counts in layers, X holding something else
    xt, vt = sd.tables[XENIUM_TABLE], sd.tables[VISIUM_TABLE]
    xt.layers["counts"], vt.layers["raw"] = xt.X.copy(), vt.X.copy()
    xt.X = xt.X[::-1].copy()
    vt.X = vt.X[[1, 2, 3, 0]].copy()
    ps = sda.tl.pseudo_spots(sd, layer="counts", copy=True)
    np.testing.assert_array_equal(ps.X.toarray(), TINY_PSEUDO)
    np.testing.assert_array_equal(ps.obs["total_counts"], TINY_LIB)
    df = sda.tl.compare_genes(sd, layer="counts", visium_layer="raw", in_tissue_only=False, copy=True)
    _assert_table(df, _tiny_expected(TINY_MEMBERS))
    df = sda.tl.compare_genes(sd, pseudo=ps[::-1].copy(), visium_layer="raw", in_tissue_only=False, copy=True)
    _assert_table(df, _tiny_expected(TINY_MEMBERS))


def test_tiny_compare_genes_subset_and_undefined_correlations():
    """``genes`` restricts the table to those genes; with fewer than 3 spots the correlations are NaN, and genes
    whose correlation is undefined sort last."""
    from _tl_data import TINY_ROWS, tiny_pair

    sd = tiny_pair()
    df = sda.tl.compare_genes(sd, ["b"], in_tissue_only=False, copy=True)
    expect = _tiny_expected(TINY_MEMBERS)
    _assert_table(df, expect[expect["gene"] == "B"].reset_index(drop=True))
    pe = sda.tl.paired_expression(sd, ["b"], in_tissue_only=False)
    assert pe.genes == ["B"] and pe.xenium.shape == (4, 1)
    np.testing.assert_array_equal(pe.xy, [[300, 300], [300, 100], [100, 300], [100, 100]])
    pe = sda.tl.paired_expression(sd)  # in tissue: spots 13, 11, 10
    np.testing.assert_array_equal(pe.xy, [[300, 300], [300, 100], [100, 100]])
    # two spots (10 and 11, in the box): correlations undefined, not +-1
    two = sda.tl.compare_genes(sda.tl.subset_shared(sd, (50, 50, 350, 150)), copy=True)
    assert (two["n_spots"] == 2).all() and two["pearson"].isna().all() and two["spearman"].isna().all()
    # no Visium A anywhere: A's correlation is undefined and sorts after B's
    vt = sd.tables[VISIUM_TABLE]
    vt.X = sp.csr_matrix(vt.X.toarray() * np.array([0, 1, 1], dtype=np.float32))
    df = sda.tl.compare_genes(sd, in_tissue_only=False, copy=True)
    assert df["gene"].tolist() == ["B", "A"] and np.isnan(df["pearson"].iloc[1])
    ids = np.array(TINY_ROWS, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: constant input
        _assert_table(df, _tiny_expected(TINY_MEMBERS, visium_x=np.column_stack([0 * ids, 2 * ids - 19])))


# ------------------------------------------------------------------------------------ tiny Visium HD grid
#: tiny HD grid (``_tl_data.tiny_hd``) in its table's order: summed (A, B) of the cells in each bin, cells per bin
TINY_HD_BINNED = np.array([[11, 6], [1, 0], [0, 0], [7, 0], [4, 0], [5, 6], [0, 0], [0, 0], [0, 0]], dtype=float)
TINY_HD_NCELLS = [2, 1, 0, 1, 1, 2, 0, 0, 0]


def _tiny_hd_expected(rows, library="all") -> pd.DataFrame:
    from _tl_data import TINY_HD_ROWS

    ij = np.array([[int(n.split("_")[1]), int(n.split("_")[2])] for n in np.asarray(TINY_HD_ROWS)[rows]])
    V = np.column_stack([1 + ij[:, 0] + 3 * ij[:, 1], 9 - ij.sum(1)])
    P = TINY_HD_BINNED[rows]
    df = _numpy_table(P, P.sum(1), V, V.sum(1) + (10 if library == "all" else 0))
    df.insert(2, "bin_size_um", 16)
    return df


def test_tiny_bin_cells_hand_counted():
    """A cell joins the bin whose square holds its centre (within half a side on both axes), none off the grid;
    rows follow the HD table (not the shapes), with its barcodes, ids and in-tissue flags."""
    from _tl_data import TINY_HD_ROWS, tiny_hd

    sd = tiny_hd()
    b = sda.tl.bin_cells(sd, 16, copy=True)
    assert b.obs_names.tolist() == TINY_HD_ROWS
    np.testing.assert_array_equal(b.X.toarray(), TINY_HD_BINNED)
    np.testing.assert_array_equal(b.obs["n_cells"], TINY_HD_NCELLS)
    np.testing.assert_array_equal(b.obs["total_counts"], TINY_HD_BINNED.sum(1))  # the control probe left out
    np.testing.assert_array_equal(b.obs["instance_id"], TINY_HD_ROWS)
    np.testing.assert_array_equal(b.obs["in_tissue"], [not n.startswith("s_0") for n in TINY_HD_ROWS])
    centres = [[5 + 10 * int(n.split("_")[1]), 5 + 10 * int(n.split("_")[2])] for n in TINY_HD_ROWS]
    np.testing.assert_allclose(b.obsm["spatial"], centres)
    only_b = sda.tl.bin_cells(sd, 16, genes=["b"], copy=True)
    assert only_b.var_names.tolist() == ["B"]
    np.testing.assert_array_equal(only_b.X.toarray(), TINY_HD_BINNED[:, 1:])
    # counts from a layer
    xt = sd.tables[XENIUM_TABLE]
    xt.layers["counts"] = xt.X.copy()
    xt.X = xt.X[::-1].copy()
    b = sda.tl.bin_cells(sd, 16, layer="counts", copy=True)
    np.testing.assert_array_equal(b.X.toarray(), TINY_HD_BINNED)
    np.testing.assert_array_equal(b.obs["total_counts"], TINY_HD_BINNED.sum(1))
    assert sda.tl.bin_cells(sd, 16, key_added="mine") is None and sd.tables["mine"].n_obs == 9


def test_tiny_compare_bins_hand_computed_and_options():
    """compare_bins against numpy/scipy on the tiny grid, with in_tissue_only, min_cells, library, layer and
    visium_layer reaching the comparison."""
    from _tl_data import tiny_hd

    sd = tiny_hd()
    occupied = [0, 1, 3, 4, 5]  # table rows of the bins holding cells
    tissue = [0, 3, 5]
    _assert_table(sda.tl.compare_bins(sd, 16, in_tissue_only=False, copy=True), _tiny_hd_expected(occupied))
    _assert_table(sda.tl.compare_bins(sd, 16, copy=True), _tiny_hd_expected(tissue))
    _assert_table(
        sda.tl.compare_bins(sd, 16, library="shared", in_tissue_only=False, copy=True),
        _tiny_hd_expected(occupied, library="shared"),
    )
    two = sda.tl.compare_bins(sd, 16, min_cells=2, in_tissue_only=False, copy=True)  # bins s_2_2 and s_1_0
    assert (two["n_spots"] == 2).all() and two["pearson"].isna().all()
    xt, vt = sd.tables[XENIUM_TABLE], sd.tables["visium_hd_table_016um"]
    xt.layers["counts"], vt.layers["raw"] = xt.X.copy(), vt.X.copy()
    xt.X, vt.X = xt.X[::-1].copy(), vt.X[::-1].copy()
    df = sda.tl.compare_bins(sd, 16, layer="counts", visium_layer="raw", in_tissue_only=False, copy=True)
    _assert_table(df, _tiny_hd_expected(occupied))


def test_hd_bin_sizes_need_both_the_bins_and_their_table():
    """A bins element without its table is no usable bin size (listing it would send bin_cells to a missing table)."""
    from _tl_data import tiny_hd

    from spatialdata_align.tl._bins import hd_bin_sizes

    sd = tiny_hd()
    sd.shapes["visium_hd_bins_008um"] = sd.shapes["visium_hd_bins_016um"]
    assert hd_bin_sizes(sd) == [16]
    with pytest.raises(ValueError, match=r"bin sizes present: \[16\]"):
        sda.tl.bin_cells(sd, 8, copy=True)


def test_cell_type_labels_follow_composition_not_depth_or_control_probes():
    """Two populations by their genes, each with cells of 1x and 20x depth, and control probes high in every other
    cell: the labels split the populations (not normalising would split by depth, clustering the controls would
    split odd from even cells)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n = 400
    pop = np.arange(n) < 200
    lam = np.full((n, 20), 1.0)
    lam[pop, :10] = 5.0
    lam[~pop, 10:] = 5.0
    depth = np.where(rng.random(n) < 0.5, 1.0, 20.0)
    genes = rng.poisson(lam * depth[:, None])
    controls = rng.poisson(np.where(np.arange(n) % 2 == 0, 40.0, 0.0)[:, None] * np.ones((1, 6)))
    names = [f"G{i}" for i in range(20)] + [f"NegControlProbe_{i}" for i in range(6)]
    t = ad.AnnData(sp.csr_matrix(np.hstack([genes, controls]).astype(float)), var=pd.DataFrame(index=names))
    labels = sda.tl.cell_type_labels(t, 2)
    assert len(set(labels[pop])) == 1 and len(set(labels[~pop])) == 1 and labels[0] != labels[-1]


def test_shared_genes_spelling_feature_types_and_repeats():
    """The gene column keeps the Xenium spelling; Visium features that are not gene expression (e.g. antibody
    capture) are not shared and stay out of the Visium library; a gene asked twice (any case) is compared once."""
    from _tl_data import TINY_ROWS, tiny_pair

    sd = tiny_pair()
    xt, vt = sd.tables[XENIUM_TABLE], sd.tables[VISIUM_TABLE]
    xt.var_names = ["A", "b", "CTRL", "NegControlProbe_1"]
    vt.var_names = ["A", "B", "GAPDH"]
    assert sda.tl.shared_genes(sd)["gene"].tolist() == ["A", "b"]
    gm = sda.tl.shared_genes(sd, ["a", "A", "B"])
    assert gm["gene"].tolist() == ["A", "b"] and gm["visium_var"].tolist() == [["A"], ["B"]]
    assert sda.tl.compare_genes(sd, ["a", "A"], copy=True)["gene"].tolist() == ["A"]
    vt.var["feature_types"] = ["Gene Expression", "Antibody Capture", "Gene Expression"]
    assert sda.tl.shared_genes(sd)["gene"].tolist() == ["A"]
    ids = np.array(TINY_ROWS, dtype=float)
    pe = sda.tl.paired_expression(sd, in_tissue_only=False)
    vlib = ids + 100  # A + GAPDH: the antibody's counts are no library
    np.testing.assert_allclose(pe.visium[:, 0], np.log1p(ids / vlib * np.median(vlib)))


def test_modality_reads_um_per_px_first_and_scales_radii_into_the_frame():
    """uns['visium']['um_per_px'] wins over the spot diameter (HD and CytAssist spots are not 55 µm); spots stored
    at half scale with a Scale(2) into ``visium`` keep their 50 px radius there."""
    import geopandas as gpd
    from _tl_data import TINY_SPOTS, tiny_pair
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    sd = tiny_pair()
    sd.tables[VISIUM_TABLE].uns["visium"]["um_per_px"] = 0.5
    assert _data.um_per_px(sd) == 0.5
    assert sda.tl.pseudo_spots(sd, radius=27.5, copy=True).uns["sda_pseudo_spots"]["radius_px"] == pytest.approx(55)
    sd = tiny_pair(um_per_px=False, scalefactors=False)
    xy = np.array(list(TINY_SPOTS.values())) / 2
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(4, 25.0)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), index=list(TINY_SPOTS)
    )
    sd.shapes[VISIUM_SPOTS] = ShapesModel.parse(gdf, transformations={VISIUM_CS: Scale([2.0, 2.0], axes=("x", "y"))})
    np.testing.assert_allclose(_data.visium(sd).radius, 50.0)
    assert _data.um_per_px(sd) == pytest.approx(0.55)
    ps = sda.tl.pseudo_spots(sd, copy=True)
    np.testing.assert_array_equal(ps.X.toarray(), TINY_PSEUDO)


def test_a_table_annotating_several_elements_is_refused():
    """Rows of another element would be paired with the wrong geometries."""
    from _tl_data import tiny_pair
    from spatialdata.models import TableModel

    sd = tiny_pair()
    vt = sd.tables[VISIUM_TABLE].copy()
    vt.obs["region"] = pd.Categorical([VISIUM_SPOTS, VISIUM_SPOTS, XENIUM_CELLS, VISIUM_SPOTS])
    vt.obs["instance_id"] = [13, 11, 0, 10]
    del vt.uns[TableModel.ATTRS_KEY]
    sd.tables[VISIUM_TABLE] = TableModel.parse(
        vt, region=[VISIUM_SPOTS, XENIUM_CELLS], region_key="region", instance_key="instance_id"
    )
    with pytest.raises(ValueError, match="annotates several elements"):
        sda.tl.pseudo_spots(sd, copy=True)


def _lattice_counts(p) -> np.ndarray:
    """Aligned cells per spot lattice cell (nearest spot, within the hexagon's circumradius), by brute force."""
    d = np.linalg.norm(p.forward(p.cells_um)[:, None, :] - p.spots_px[None], axis=-1)
    near = d.argmin(1)
    on = d.min(1) <= p.pitch_px / np.sqrt(3)
    return np.bincount(near[on], minlength=len(p.spots_px))


def test_shared_region_outside_the_tissue_counts_only_cells_on_the_lattice(pair):
    """in_tissue_only=False: every spot whose lattice cell holds >= min_cells cells, out-of-tissue and edge spots
    too, each a whole hexagon; cells beyond the lattice count for no spot; n_cells sums the selected spots."""
    sd = pair.sdata
    counts = _lattice_counts(pair)
    d = np.linalg.norm(pair.forward(pair.cells_um)[:, None, :] - pair.spots_px[None], axis=-1).min(1)
    assert (d > pair.pitch_px / np.sqrt(3)).sum() > 20  # cells beyond the lattice's edge
    sda.tl.shared_region(sd, min_cells=3, in_tissue_only=False, key_added="region_all")
    gdf = sd.shapes["region_all"]
    region = gdf.geometry.iloc[0]
    inside = shapely.contains_xy(region, pair.spots_px[:, 0], pair.spots_px[:, 1])
    np.testing.assert_array_equal(inside, counts >= 3)
    assert (inside & ~pair.in_tissue).sum() > 20  # out-of-tissue spots joined
    assert int(gdf["n_spots"].iloc[0]) == inside.sum()
    assert gdf["n_cells"].iloc[0] == counts[inside].sum()
    assert region.area == pytest.approx(inside.sum() * np.sqrt(3) / 2 * pair.pitch_px**2, rel=1e-3)


def test_shared_region_match_weights_count_at_most_one():
    """A match weight above 1 (a rounding overshoot) counts as 1: the weighted region equals the count rule."""
    p = fresh()
    p.sdata.tables[TABLE_AL].obs[MATCH_WEIGHT_KEY] = 3.0
    region = sda.tl.shared_region(p.sdata, min_cells=8, use_match_weight=True, copy=True)
    inside = shapely.contains_xy(region, p.spots_px[:, 0], p.spots_px[:, 1])
    np.testing.assert_array_equal(inside, p.in_tissue & (_lattice_counts(p) >= 8))


def test_subset_shared_by_a_circle_element_through_its_transformation():
    """A region given as a circles element is the union of its disks mapped into ``cs``: a disk of radius 105 at
    (50, 50), scaled by 2 into ``visium``, holds the spots within 210 px of (100, 100): ids 10, 11, 12, not 13."""
    import geopandas as gpd
    from _tl_data import tiny_pair
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    sd = tiny_pair()
    roi = gpd.GeoDataFrame({"radius": [105.0]}, geometry=gpd.points_from_xy([50.0], [50.0]))
    sd.shapes["roi"] = ShapesModel.parse(roi, transformations={VISIUM_CS: Scale([2.0, 2.0], axes=("x", "y"))})
    out = sda.tl.subset_shared(sd, "roi")
    assert sorted(out.shapes[VISIUM_SPOTS].index) == [10, 11, 12]
    assert sorted(out.tables[VISIUM_TABLE].obs["instance_id"]) == [10, 11, 12]
    assert "roi" in out.shapes and len(out.shapes["roi"]) == 1


def test_subset_shared_region_in_another_coordinate_system():
    """``cs`` names the region's frame: a box in Xenium µm keeps the cells whose µm position lies in it."""
    p = fresh()
    box = (600.0, 500.0, 1800.0, 1400.0)
    with pytest.warns(UserWarning, match="not mapped"):
        out = sda.tl.subset_shared(p.sdata, box, cs=XENIUM_CS)
    um = p.cells_um
    inb = (um[:, 0] > box[0]) & (um[:, 0] < box[2]) & (um[:, 1] > box[1]) & (um[:, 1] < box[3])
    assert 100 < inb.sum() < len(um) - 100
    np.testing.assert_array_equal(np.sort(out.shapes[XENIUM_CELLS].index), np.flatnonzero(inb))
    # the same box as a Shapes element, mapped to both frames: read in the frame asked for
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    aff = Affine(p.matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    roi = gpd.GeoDataFrame(geometry=[shapely.box(*box)])
    p.sdata.shapes["roi"] = ShapesModel.parse(roi, transformations={XENIUM_CS: Identity(), VISIUM_CS: aff})
    with pytest.warns(UserWarning, match="not mapped"):
        out = sda.tl.subset_shared(p.sdata, "roi", cs=XENIUM_CS)
    np.testing.assert_array_equal(np.sort(out.shapes[XENIUM_CELLS].index), np.flatnonzero(inb))


def test_subset_shared_keeps_the_rows_of_a_multi_region_table_by_region():
    """A table annotating three elements: rows of the subset element follow its kept instances, rows of an element
    not mapped to the region's coordinate system are all kept (it is carried over unfiltered), rows of an element left
    with no instance go, and the table stops naming it (subset_shared raised spatialdata's ValidationError there); the
    other columns travel with their rows."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel, TableModel

    def circles(xy, cs):
        gdf = gpd.GeoDataFrame({"radius": np.full(len(xy), 5.0)}, geometry=shapely.points(xy))
        gdf.index = pd.Index(np.arange(len(xy)) + 100, name="id")
        return ShapesModel.parse(gdf, transformations={cs: Identity()})

    a = circles(np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 90.0]]), VISIUM_CS)  # ids 100, 101, 102
    b = circles(np.array([[10.0, 10.0], [500.0, 500.0]]), "other")  # ids 100, 101, not in visium
    c = circles(np.array([[900.0, 900.0]]), VISIUM_CS)  # id 100, outside any box below
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["a"] * 3 + ["b"] * 2 + ["c"]),
            "id": [100, 101, 102, 100, 101, 100],
            "tag": list("uvwxyz"),
        },
        index=[f"r{i}" for i in range(6)],
    )
    table = TableModel.parse(
        ad.AnnData(X=np.arange(12.0).reshape(6, 2), obs=obs), region=["a", "b", "c"], region_key="region",
        instance_key="id",
    )  # fmt: skip
    s = SpatialData(shapes={"a": a, "b": b, "c": c}, tables={"t": table})
    with pytest.warns(UserWarning, match="not mapped"):
        out = sda.tl.subset_shared(s, (0.0, 0.0, 60.0, 60.0), cs=VISIUM_CS)
    t = out.tables["t"]
    assert t.obs["tag"].tolist() == ["u", "v", "x", "y"]  # a: 100, 101; b: both; c: none
    # c lost every row, so the table no longer annotates it (spatialdata refuses a table naming a region it lacks)
    assert t.uns["spatialdata_attrs"]["region"] == ["a", "b"] and list(t.obs["region"].cat.categories) == ["a", "b"]
    np.testing.assert_array_equal(t.X, [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0], [8.0, 9.0]])
    assert sorted(out.shapes["a"].index) == [100, 101] and len(out.shapes["b"]) == 2 and "c" not in out.shapes
    assert len(s.tables["t"]) == 6  # the input is not changed


def test_cell_type_labels_cluster_on_n_pcs_components():
    """Two genes vary continuously and oppositely (the largest variance: the first component), two others split
    the cells into two groups (the second): two types found on one component cut the continuum, on two they are
    the groups. Fails when ``n_pcs`` is ignored, or left out of the labels' cache key (asked in either order)."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    t, groups = rng.uniform(-1.0, 1.0, 600), rng.integers(0, 2, 600)
    s = 0.62 * (2 * groups - 1)
    lam = 2000.0 * np.exp(np.stack([1.2 * t, -1.2 * t, s, -s], axis=1))
    table = ad.AnnData(rng.poisson(lam).astype(np.float32), var=pd.DataFrame(index=["g1", "g2", "g3", "g4"]))
    for order in ((2, 1), (1, 2)):
        got = {n: adjusted_rand_score(groups, sda.tl.cell_type_labels(table, 2, n_pcs=n)) for n in order}
        assert got[2] > 0.95 and got[1] < 0.2, (order, got)
