"""Stored transforms as OME-NGFF 0.6 coordinate transformations, through every spatialdata operation.

The object under test holds an affine (landmarks) and a non-linear transform in the stored form (affine +
displacement fields). The non-linear part is a known smooth flow rather than a fit, so the file stays fast; the
fitted LDDMM goes through the same storage in ``test_accessor.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import referencing
import shapely
import spatialdata as sd
import zarr
from scipy.ndimage import map_coordinates
from spatialdata.transformations import get_transformation

import spatialdata_align as sda
from spatialdata_align import _store
from spatialdata_align._constants import VISIUM_CS, VISIUM_HIRES, VISIUM_SPOTS, XENIUM_CELLS, XENIUM_CS
from spatialdata_align._elements import element_xy
from spatialdata_align.registration import Registration

SCHEMAS = Path(__file__).parent / "data" / "ngff"
AFFINE, LDDMM = "xenium_to_visium_affine", "xenium_to_visium_lddmm"


# ------------------------------------------------------------------------------------------ fixtures
def _schema_registry() -> referencing.Registry:
    resources = []
    for f in SCHEMAS.glob("*.schema"):
        doc = json.loads(f.read_text())
        resources.append((doc["$id"], referencing.Resource.from_contents(doc)))
    return referencing.Registry().with_resources(resources)


def _validate(instance, schema_file: str) -> None:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator(schema, registry=_schema_registry()).validate(instance)


def _flow(sdata) -> Registration:
    """Landmark affine composed with a smooth flow of up to ~30 µm over the cells."""
    cells = element_xy(sdata, XENIUM_CELLS, XENIUM_CS)
    lo, hi = cells.min(0) - 300, cells.max(0) + 300
    xv, yv = np.linspace(lo[0], hi[0], 32), np.linspace(lo[1], hi[1], 26)
    gx, gy = np.meshgrid(xv, yv)
    v = np.zeros((3, 2, yv.size, xv.size))
    v[:, 0] = 30.0 * np.sin(gy / 400.0)
    v[:, 1] = 20.0 * np.cos(gx / 500.0)
    affine = sdata.align.get(AFFINE).affine
    return Registration(
        affine=affine, velocity_values=v, xv=xv, yv=yv, source_extent=(lo[0], hi[0], lo[1], hi[1]), target_extent=None
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A read pair with an affine and a stored non-linear transform (never modified by the tests)."""
    tw = sda.datasets.twin_sections(tmp_path_factory.mktemp("ngff"), n_cells=3000, n_spots=200, seed=1)
    s = sda.io.read_pair(tw.xenium_path, tw.visium_path)
    s.align.set_landmarks(source=tw.truth.landmarks_source[:4], target=tw.truth.landmarks_target[:4])
    s.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    flow = _flow(s)
    _store.store_registration(
        s,
        flow,
        key=LDDMM,
        kind="lddmm",
        source_cs=XENIUM_CS,
        target_cs=VISIUM_CS,
        source_element=XENIUM_CELLS,
        target_element=VISIUM_HIRES,
        native=False,
    )
    cells = element_xy(s, XENIUM_CELLS, XENIUM_CS)
    spots = element_xy(s, VISIUM_SPOTS, VISIUM_CS)
    ref = {
        k: (s.align.transform_points(cells, key=k), s.align.transform_points(spots, key=k, inverse=True))
        for k in (AFFINE, LDDMM)
    }
    return s, flow, cells, spots, ref


def test_the_stored_fields_cover_every_element_as_get_extent_bounds_it(base):
    """The fields' grids are sized by each section's extent, computed without get_extent (2 orders faster)."""
    from spatialdata.transformations import Affine, Sequence, set_transformation

    s = sd.deepcopy(base[0])
    # skew the cells into a second system (anisotropic, rotated: circles become ellipses) and add a polygon
    m = np.array([[0.9, -0.5, 40.0], [0.3, 1.4, -25.0], [0.0, 0.0, 1.0]])
    skew = Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))
    cells = s.shapes[XENIUM_CELLS]
    set_transformation(cells, Sequence([get_transformation(cells, XENIUM_CS), skew]), to_coordinate_system="skew")
    poly = sd.models.ShapesModel.parse(
        __import__("geopandas").GeoDataFrame(geometry=[shapely.Polygon([(5, 7), (300, 40), (120, 260)])]),
        transformations={"skew": skew},
    )
    s.shapes["tri"] = poly
    rng = np.random.default_rng(0)  # wide circles: a wrong radius term is off by tens of units
    s.shapes["discs"] = sd.models.ShapesModel.parse(
        rng.uniform(0, 2000, (30, 2)), geometry=0, radius=rng.uniform(40, 90, 30), transformations={"skew": skew}
    )
    s.images["pyramid"] = sd.models.Image2DModel.parse(  # a multiscale image: its finest level bounds it
        np.zeros((1, 300, 500), np.uint8), dims=("c", "y", "x"), scale_factors=[2, 2], transformations={"skew": skew}
    )
    checked = 0
    for kind, name, el in s.gen_spatial_elements():
        if kind == "points" or name == "discs":  # (get_extent approximates wide circles under a skew)
            continue
        for cs in get_transformation(el, get_all=True):
            e = sd.get_extent(el, coordinate_system=cs)
            want = np.array([e["x"][0], e["x"][1], e["y"][0], e["y"][1]])
            np.testing.assert_allclose(_store._box_in_cs(kind, el, cs), want, atol=2.0)
            checked += 1
    assert checked >= 7
    t = np.linspace(0, 2 * np.pi, 3601)  # the discs' boundaries, mapped point by point
    discs = s.shapes["discs"]
    rim = (
        np.concatenate(
            [
                np.column_stack([p.x + r * np.cos(t), p.y + r * np.sin(t)])
                for p, r in zip(discs.geometry, discs["radius"], strict=True)
            ]
        )
        @ m[:2, :2].T
        + m[:2, 2]
    )
    exact = [rim[:, 0].min(), rim[:, 0].max(), rim[:, 1].min(), rim[:, 1].max()]
    np.testing.assert_allclose(_store._box_in_cs("shapes", discs, "skew"), exact, atol=0.01)
    boxes = [exact] + [  # the section in "skew": the cells, the triangle, the image, the discs
        [e["x"][0], e["x"][1], e["y"][0], e["y"][1]]
        for e in (sd.get_extent(s[n], coordinate_system="skew") for n in (XENIUM_CELLS, "tri", "pyramid"))
    ]
    b = np.array(boxes)
    want = [b[:, 0].min(), b[:, 1].max(), b[:, 2].min(), b[:, 3].max()]
    np.testing.assert_allclose(_store._section_extent(s, "skew", _store.own_elements(s)), want, atol=2.0)


def _copy(s):
    """An independent copy (sd.concatenate renames the coordinate systems of its inputs' elements in place)."""
    return sd.deepcopy(s)


def _refit(o, m):
    """Store the affine ``m`` (Xenium -> Visium) on ``o`` under the key "refit", as a later fit would."""
    return _store.store_registration(
        o,
        Registration(affine=m),
        key="refit",
        kind="affine",
        source_cs=XENIUM_CS,
        target_cs=VISIUM_CS,
        source_element=XENIUM_CELLS,
        target_element=VISIUM_HIRES,
    )


# ------------------------------------------------------------------------------------------ NGFF form
def test_stored_metadata_validates_against_the_ngff_schema(base):
    s = base[0]
    for key in (AFFINE, LDDMM):
        t = s.align.ngff(key)
        _validate([t], "coordinate_transformations.schema")
    t = s.align.ngff(LDDMM)
    assert t["type"] == "bijection" and t["input"]["name"] == XENIUM_CS and t["output"]["name"] == VISIUM_CS
    assert [x["type"] for x in t["forward"]["transformations"]] == ["displacements", "affine"]
    assert [x["type"] for x in t["inverse"]["transformations"]] == ["affine", "displacements"]
    assert s.align.ngff(AFFINE)["type"] == "affine"
    # the schema is strict enough to catch a broken transformation
    bad = json.loads(json.dumps(t))
    del bad["inverse"]
    with pytest.raises(jsonschema.ValidationError):
        _validate([bad], "coordinate_transformations.schema")


def test_stored_form_is_close_to_the_flow(base):
    s, flow, cells, spots, _ = base
    reg = s.align.get(LDDMM)
    a_inv = np.linalg.inv(reg.affine)[:2, :2]
    fwd = np.linalg.norm((reg.transform_points(cells) - flow.transform_points(cells)) @ a_inv.T, axis=1)
    inv = np.linalg.norm(reg.transform_points(spots, "inverse") - flow.transform_points(spots, "inverse"), axis=1)
    assert fwd.max() < 0.5 and inv.max() < 0.5, (fwd.max(), inv.max())  # µm, against flows of ~30 µm
    aff = s.align.get(AFFINE)
    assert np.linalg.norm((reg.transform_points(cells) - aff.transform_points(cells)) @ a_inv.T, axis=1).max() > 10


def _ngff_apply(root: zarr.Group, t: dict, pts_xy: np.ndarray, direction: str, grids: dict | None = None):
    """An independent OME-NGFF evaluation of ``t`` (affine / bijection of sequences) on ``(N, 2)`` points.

    Fields are read through their path; their grid from the field group's multiscale metadata, or from
    ``grids[path]`` (scale, translation) for arrays without one. Linear interpolation: scipy order-1 spline.
    """
    p = pts_xy[:, ::-1].copy()  # OME-NGFF axis order (y, x)
    steps = [t] if t["type"] == "affine" else t[direction]["transformations"]
    if t["type"] == "affine" and direction == "inverse":
        m = np.vstack([np.asarray(t["affine"]), [0, 0, 1]])
        steps = [{"type": "affine", "affine": np.linalg.inv(m)[:2].tolist()}]
    for s in steps:
        if s["type"] == "affine":
            m = np.asarray(s["affine"])
            p = p @ m[:, :2].T + m[:, 2]
        else:
            node = root[s["path"]]
            if isinstance(node, zarr.Group):
                ds = node.attrs["ome"]["multiscales"][0]["datasets"][0]
                seq = ds["coordinateTransformations"][0]["transformations"]
                scale, trans = seq[0]["scale"], seq[1]["translation"]
                arr = node[ds["path"]][...]
            else:
                scale, trans = grids[s["path"]]
                arr = node[...]
            a = [(p[:, i] - trans[i + 1]) / scale[i + 1] for i in range(2)]
            d = np.column_stack([map_coordinates(arr[c], a, order=1, mode="nearest") for c in range(2)])
            p = p + d
    return p[:, ::-1]


def test_rebuild_from_the_written_store_reproduces_transform_points(base, tmp_path):
    s, _, cells, spots, ref = base
    path = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.write(path)
    root = zarr.open_group(path, mode="r")
    meta = root.attrs[sda._constants.ATTRS_KEY]["transforms"]
    for key in (AFFINE, LDDMM):
        t = meta[key]["ngff"]
        grids = {}
        if meta[key]["fields"]:
            f = meta[key]["fields"]
            grids = {
                t["forward"]["transformations"][0]["path"]: (f["forward"]["scale"], f["forward"]["translation"]),
                t["inverse"]["transformations"][1]["path"]: (f["inverse"]["scale"], f["inverse"]["translation"]),
            }
        np.testing.assert_allclose(_ngff_apply(root, t, cells, "forward", grids), ref[key][0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(_ngff_apply(root, t, spots, "inverse", grids), ref[key][1], atol=1e-6, rtol=0)


def test_export_is_a_valid_ngff_container_and_imports_exactly(base, tmp_path):
    s, _, cells, spots, ref = base
    path = s.align.export_ngff(tmp_path / "t.zarr", LDDMM)
    root = zarr.open_group(path, mode="r")
    _validate(dict(root.attrs), "scene.schema")
    t = root.attrs["ome"]["scene"]["coordinateTransformations"][0]
    for direction, i in (("forward", 0), ("inverse", 1)):
        group = root[t[direction]["transformations"][i]["path"]]
        _validate({"ome": dict(group.attrs)["ome"]}, "image.schema")
    # an independent reader of the container computes what sdata.align computes
    np.testing.assert_allclose(_ngff_apply(root, t, cells, "forward"), ref[LDDMM][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(_ngff_apply(root, t, spots, "inverse"), ref[LDDMM][1], atol=1e-6, rtol=0)
    # into another object of the same sections, under another key
    other = sd.SpatialData.init_from_elements({XENIUM_CELLS: s[XENIUM_CELLS], VISIUM_SPOTS: s[VISIUM_SPOTS]})
    other.align.import_ngff(path, key="imported")
    np.testing.assert_array_equal(other.align.transform_points(cells, key="imported"), ref[LDDMM][0])
    np.testing.assert_array_equal(other.align.transform_points(spots, key="imported", inverse=True), ref[LDDMM][1])
    # an affine exports as a plain affine
    p2 = s.align.export_ngff(tmp_path / "a.zarr", AFFINE)
    assert zarr.open_group(p2, mode="r").attrs["ome"]["scene"]["coordinateTransformations"][0]["type"] == "affine"
    with pytest.raises(FileExistsError):
        s.align.export_ngff(p2, AFFINE)


# ------------------------------------------------------------------------------------------ operations
def _bbox(cs, center, half=300.0, **kw):
    return lambda s: sd.bounding_box_query(
        s,
        axes=("x", "y"),
        min_coordinate=center - half,
        max_coordinate=center + half,
        target_coordinate_system=cs,
        **kw,
    )


def _poly(cs, center, half=300.0):
    return lambda s: sd.polygon_query(s, shapely.box(*(center - half), *(center + half)), target_coordinate_system=cs)


def _ops(cells, spots):
    xc, vc = cells.mean(0), spots.mean(0)
    return {
        "filter_visium": (lambda s: s.filter_by_coordinate_system(VISIUM_CS), {AFFINE}),
        "filter_xenium": (lambda s: s.filter_by_coordinate_system(XENIUM_CS), {AFFINE}),
        "filter_keep_tables": (
            lambda s: s.filter_by_coordinate_system(VISIUM_CS, filter_tables=False),
            {AFFINE, LDDMM},
        ),
        "subset": (lambda s: s.subset([XENIUM_CELLS, VISIUM_SPOTS]), {AFFINE}),
        "subset_with_table": (lambda s: s.subset([XENIUM_CELLS, _store.TABLE]), {AFFINE, LDDMM}),
        "bbox_visium": (_bbox(VISIUM_CS, vc), {AFFINE}),
        "bbox_xenium": (_bbox(XENIUM_CS, xc), {AFFINE}),
        "bbox_xenium_keep_tables": (_bbox(XENIUM_CS, xc, filter_table=False), {AFFINE, LDDMM}),
        "polygon_visium": (_poly(VISIUM_CS, vc), {AFFINE}),
        "polygon_xenium": (_poly(XENIUM_CS, xc), {AFFINE}),
        "subset_shared": (lambda s: sda.tl.subset_shared(s, (*(vc - 300), *(vc + 300))), {AFFINE, LDDMM}),
        "deepcopy": (sd.deepcopy, {AFFINE, LDDMM}),
    }


OPS = [
    "filter_visium",
    "filter_xenium",
    "filter_keep_tables",
    "subset",
    "subset_with_table",
    "bbox_visium",
    "bbox_xenium",
    "bbox_xenium_keep_tables",
    "polygon_visium",
    "polygon_xenium",
    "subset_shared",
    "deepcopy",
]


@pytest.mark.parametrize("op", OPS)
def test_operation_keeps_whole_transforms_or_unlists_them(base, op):
    s, _, cells, spots, ref = base
    fn, expected = _ops(cells, spots)[op]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(s)
        listed = set(out.align.transforms.index)
    dropped = [w for w in caught if issubclass(w.category, _store.TransformDroppedWarning)]
    assert listed == expected
    # a transform no longer listed says why, once per look
    assert bool(dropped) == (LDDMM not in listed)
    if dropped:
        assert "filter_table" in str(dropped[0].message)
        with pytest.raises(KeyError, match="no stored transform"):
            out.align.get(LDDMM)
    for key in listed:  # listed transforms rebuild the very same numbers
        np.testing.assert_array_equal(out.align.transform_points(cells, key=key), ref[key][0])
        np.testing.assert_array_equal(out.align.transform_points(spots, key=key, inverse=True), ref[key][1])


def test_write_read_rebuilds_identical_numbers(base, tmp_path):
    s, _, cells, spots, ref = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.write(tmp_path / "s.zarr")
        back = sd.read_zarr(tmp_path / "s.zarr")
    assert set(back.align.transforms.index) == {AFFINE, LDDMM}
    for key in (AFFINE, LDDMM):
        np.testing.assert_array_equal(back.align.transform_points(cells, key=key), ref[key][0])
        np.testing.assert_array_equal(back.align.transform_points(spots, key=key, inverse=True), ref[key][1])


def test_concatenate_keeps_the_alignments_renamed_like_the_elements(base):
    s, _, cells, spots, ref = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = sd.concatenate({"a": _copy(s), "b": _copy(s)})
        listed = set(c.align.transforms.index)
    assert listed == {f"{k}-{x}" for k in (AFFINE, LDDMM) for x in "ab"}
    for key in (AFFINE, LDDMM):
        for x in "ab":
            e = c.align.transforms.loc[f"{key}-{x}"]
            assert (e["source_cs"], e["target_cs"], e["source_element"]) == (
                f"xenium-{x}",
                f"visium-{x}",
                f"xenium_cells-{x}",
            )
            np.testing.assert_array_equal(c.align.transform_points(cells, key=f"{key}-{x}"), ref[key][0])
            np.testing.assert_array_equal(c.align.transform_points(spots, key=f"{key}-{x}", inverse=True), ref[key][1])
    # the renamed transform applies to the renamed elements, in the renamed coordinate systems
    name = c.align.apply("xenium_cells-a", key=f"{LDDMM}-a")
    assert list(get_transformation(c[name], get_all=True)) == ["visium-a"]
    np.testing.assert_allclose(element_xy(c, name, "visium-a"), ref[LDDMM][0], atol=1e-9)
    # concatenating tables into one drops the field arrays (anndata merges no uns): unlisted, not broken
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = sd.concatenate({"a": _copy(s), "b": _copy(s)}, concatenate_tables=True)
        assert not any(k.startswith(LDDMM) for k in merged.align.transforms.index)


# ------------------------------------------------------------------------------------------ copy-on-write
def _snapshot(s):
    return (
        json.dumps(s.attrs, sort_keys=True, default=str),
        {n: sorted(get_transformation(el, get_all=True)) for _, n, el in s.gen_spatial_elements()},
        sorted(n for _, n, _ in s.gen_elements()),
        {t: (list(s.tables[t].obs.columns), sorted(s.tables[t].uns)) for t in s.tables},
    )


def test_writes_on_a_derived_object_leave_the_original_unchanged(base):
    s, _, cells, _, ref = base
    before = _snapshot(s)
    o = s.subset([XENIUM_CELLS, VISIUM_SPOTS, _store.TABLE, VISIUM_HIRES, "landmarks_xenium", "landmarks_visium"])
    o.align.remove(AFFINE)
    assert VISIUM_CS not in get_transformation(o[XENIUM_CELLS], get_all=True)
    o.align.remove(LDDMM)
    o.align.set_landmarks(source=np.zeros((3, 2)), target=np.ones((3, 2)), key="other")
    o.align.affine(XENIUM_CELLS, VISIUM_HIRES, key="again")
    o.align.apply(XENIUM_CELLS, key="again")
    assert set(o.align.transforms.index) == {"again"}
    # filters and queries share attrs and elements with their input: writes on them must not leak either
    q = s.filter_by_coordinate_system([XENIUM_CS, VISIUM_CS], filter_tables=False)
    q.align.remove(LDDMM)
    q.align.apply(XENIUM_CELLS, key=AFFINE)
    assert _snapshot(s) == before
    assert set(s.align.transforms.index) == {AFFINE, LDDMM}
    assert VISIUM_CS in get_transformation(s[XENIUM_CELLS], get_all=True)
    np.testing.assert_array_equal(s.align.transform_points(cells, key=LDDMM), ref[LDDMM][0])


# ------------------------------------------------------------------------------- standalone container
def _small_registration(units=("um", "um")) -> Registration:
    """A velocity-based registration on a small grid (no SpatialData), with extents."""
    xv, yv = np.linspace(0.0, 900.0, 19), np.linspace(0.0, 600.0, 13)
    gx, gy = np.meshgrid(xv, yv)
    v = np.zeros((3, 2, yv.size, xv.size))
    v[:, 0] = 25.0 * np.sin(gy / 150.0)
    v[:, 1] = -15.0 * np.cos(gx / 200.0)
    a = np.array([[0.8, -0.3, 40.0], [0.35, 0.9, -12.0], [0.0, 0.0, 1.0]])
    return Registration(
        affine=a,
        velocity_values=v,
        xv=xv,
        yv=yv,
        source_units=units[0],
        target_units=units[1],
        source_extent=(10.0, 890.0, 5.0, 590.0),
        target_extent=(-30.0, 950.0, 0.0, 700.0),
    )


def _edit_root(path, edit) -> None:
    root = zarr.open_group(path, mode="r+")
    attrs = json.loads(json.dumps(dict(root.attrs)))
    edit(attrs)
    root.attrs.put(attrs)


def test_standalone_container_round_trips_units_extents_and_coordinate_systems(tmp_path):
    from spatialdata_align import ngff

    reg = _small_registration(units=("um", "mm"))
    path = ngff.write_transform(reg, tmp_path / "t.zarr", source_cs="xenium", target_cs="visium", name="fit")
    root = zarr.open_group(path, mode="r")
    scene = root.attrs["ome"]["scene"]
    systems = {cs["name"]: cs for cs in scene["coordinateSystems"]}
    assert set(systems) == {"xenium", "visium", "xenium_deformed"}
    # every space axis carries its OME-NGFF unit: micrometer for the source (and its deformed copy), mm target
    for name, unit in (("xenium", "micrometer"), ("xenium_deformed", "micrometer"), ("visium", "millimeter")):
        assert [a["name"] for a in systems[name]["axes"]] == ["y", "x"]
        assert {a.get("unit") for a in systems[name]["axes"]} == {unit}
    t = scene["coordinateTransformations"][0]
    # the forward field lives in the source system, the inverse field in the deformed one
    fwd = root[t["forward"]["transformations"][0]["path"]].attrs["ome"]["multiscales"][0]
    inv = root[t["inverse"]["transformations"][1]["path"]].attrs["ome"]["multiscales"][0]
    assert fwd["coordinateSystems"][0]["name"] == "xenium"
    assert inv["coordinateSystems"][0]["name"] == "xenium_deformed"
    assert fwd["datasets"][0]["coordinateTransformations"][0]["output"]["name"] == "xenium"
    assert inv["datasets"][0]["coordinateTransformations"][0]["output"]["name"] == "xenium_deformed"

    back, info = ngff.read_transform(path)
    assert (info["name"], info["source_cs"], info["target_cs"]) == ("fit", "xenium", "visium")
    assert (back.source_units, back.target_units) == ("um", "mm")
    np.testing.assert_allclose(back.source_extent, reg.source_extent)
    np.testing.assert_allclose(back.target_extent, reg.target_extent)
    pts = np.array([[100.0, 80.0], [450.0, 300.0], [820.0, 560.0]])
    sampled = reg.to_displacement()
    np.testing.assert_allclose(back.transform_points(pts), sampled.transform_points(pts), atol=1e-9)
    inv = sampled.transform_points(pts, "inverse")
    np.testing.assert_allclose(back.transform_points(pts, "inverse"), inv, atol=1e-9)

    # another tool's container has no spatialdata_align attributes: units come from the axes, extents are unknown
    _edit_root(path, lambda a: a.pop("spatialdata_align"))
    plain, _ = ngff.read_transform(path)
    assert (plain.source_units, plain.target_units) == ("um", "mm")
    assert plain.source_extent is None and plain.target_extent is None
    np.testing.assert_allclose(plain.transform_points(pts), sampled.transform_points(pts), atol=1e-9)


def test_standalone_container_overwrite_only_replaces_a_zarr_store(tmp_path):
    from spatialdata_align import ngff

    reg = _small_registration()
    path = tmp_path / "t.zarr"
    ngff.write_transform(Registration.from_affine(np.diag([2.0, 2.0, 1.0])), path, source_cs="a", target_cs="b")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ngff.write_transform(reg, path, source_cs="a", target_cs="b")
    assert ngff.read_transform(path)[0].is_affine  # untouched
    ngff.write_transform(reg, path, source_cs="a", target_cs="b", overwrite=True)
    assert not ngff.read_transform(path)[0].is_affine  # replaced
    # a folder that is not a zarr store (the user's data, say) is never deleted, even with overwrite=True
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.csv").write_text("x,y\n1,2\n")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        ngff.write_transform(reg, folder, source_cs="a", target_cs="b", overwrite=True)
    assert (folder / "keep.csv").read_text() == "x,y\n1,2\n"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t["forward"]["transformations"][0].update(interpolation="nearest"),
            "only linear interpolation",
        ),
        (
            lambda t: t["inverse"]["transformations"][1].update(interpolation="cubic"),
            "only linear interpolation",
        ),
        (
            lambda t: t["inverse"]["transformations"][0].update(affine=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
            "not the inverse of the forward affine",
        ),
        (lambda t: t["forward"]["transformations"].reverse(), "unsupported bijection layout"),
        (lambda t: t.update(type="mapAxis"), "unsupported transformation type"),
    ],
)
def test_read_transform_refuses_what_it_cannot_apply_exactly(tmp_path, edit, message):
    from spatialdata_align import ngff

    path = ngff.write_transform(_small_registration(), tmp_path / "t.zarr", source_cs="a", target_cs="b")
    ngff.read_transform(path)  # reads before the edit
    _edit_root(path, lambda a: edit(a["ome"]["scene"]["coordinateTransformations"][0]))
    with pytest.raises(ValueError, match=message):
        ngff.read_transform(path)


def test_read_transform_picks_a_transformation_by_name(tmp_path):
    from spatialdata_align import ngff

    path = ngff.write_transform(_small_registration(), tmp_path / "t.zarr", source_cs="a", target_cs="b", name="one")

    def add_second(a):
        ts = a["ome"]["scene"]["coordinateTransformations"]
        ts.append({**ngff.transformation(np.diag([3.0, 3.0, 1.0]), source_cs="a", target_cs="b"), "name": "two"})

    _edit_root(path, add_second)
    with pytest.raises(ValueError, match="holds 2 transformations"):
        ngff.read_transform(path)
    with pytest.raises(KeyError, match="no transformation named 'three'"):
        ngff.read_transform(path, name="three")
    two, info = ngff.read_transform(path, name="two")
    assert info["name"] == "two"
    np.testing.assert_allclose(two.affine, np.diag([3.0, 3.0, 1.0]))
    assert not ngff.read_transform(path, name="one")[0].is_affine
    with pytest.raises(FileNotFoundError, match=r"no zarr\.json"):
        ngff.read_transform(tmp_path)


# ------------------------------------------------------------------------------- stored entries: validation, layout
def _with_record(s, **change):
    """A copy of ``s`` whose carrier record of the LDDMM has ``change`` applied (``None`` deletes an item)."""
    o = _copy(s)
    records = {k: dict(v) for k, v in _store._records(o.tables[_store.TABLE]).items()}
    for k, v in change.items():
        if v is None:
            del records[LDDMM][k]
        else:
            records[LDDMM][k] = v
    o.tables[_store.TABLE] = _store._carrier(records)
    return o


def _listed_and_why(o):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = set(o.align.transforms.index)
    return listed, [str(w.message) for w in caught if issubclass(w.category, _store.TransformDroppedWarning)]


def test_field_arrays_of_another_id_or_shape_are_refused_with_the_reason(base):
    """A record whose id or array shapes do not match the metadata is never used: unlisted, a warning says why."""
    s = base[0]
    rec = _store._records(s.tables[_store.TABLE])[LDDMM]
    fwd, inv = np.asarray(rec["forward"]), np.asarray(rec["inverse"])
    cases = {
        "replaced by others": {"id": "0" * 32},
        "its forward field array is missing or has the wrong shape": {"forward": fwd[:, :-1]},
        "its inverse field array is missing or has the wrong shape": {"inverse": inv[:, :, :-2]},
        "its inverse field array is missing": {"inverse": None},
    }
    for why, change in cases.items():
        o = _with_record(s, **change)
        listed, messages = _listed_and_why(o)
        assert listed == {AFFINE}, why
        assert len(messages) == 1 and why in messages[0] and repr(LDDMM) in messages[0], messages
        with pytest.raises(KeyError, match="no stored transform 'xenium_to_visium_lddmm'"):
            _quiet_get(o, LDDMM)
        # nor when the transforms are recovered from the table alone (attrs dropped, as spatialdata.concatenate does)
        o.attrs = {}
        assert _listed_and_why(o)[0] == {AFFINE}, why
    # a table with the carrier's name but not its format holds no fields
    o = _copy(s)
    o.tables[_store.TABLE].uns[_store.UNS_KEY] = {**o.tables[_store.TABLE].uns[_store.UNS_KEY], "format": "other/2"}
    listed, messages = _listed_and_why(o)
    assert listed == {AFFINE} and "its field arrays were dropped" in messages[0]
    assert _store.TABLE not in _store.own_elements(o)


def _quiet_get(o, key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return o.align.get(key)


def test_the_transforms_table_describes_each_entry(base):
    s = base[0]
    t = s.align.transforms
    assert list(t.index) == [AFFINE, LDDMM]
    assert t.loc[LDDMM, ["kind", "source_cs", "target_cs", "source_element", "target_element"]].tolist() == [
        "lddmm",
        XENIUM_CS,
        VISIUM_CS,
        XENIUM_CELLS,
        VISIUM_HIRES,
    ]
    assert t.loc[AFFINE, "kind"] == "affine" and t.loc[AFFINE, "source_cs"] == XENIUM_CS
    # the LDDMM's fields: the spacing of their grid (read back from the arrays' grid, not from the table)
    grid = s.align.get(LDDMM).forward_field
    assert t.loc[LDDMM, "field_spacing"] == pytest.approx(grid.dx) and grid.dx > 0
    assert pd.isna(t.loc[AFFINE, "field_spacing"])
    # iterations: the length of the energy trace of a fit
    o = _copy(s)
    energy = pd.DataFrame({"total": np.linspace(5.0, 1.0, 7), "match": np.ones(7)})
    reg = Registration(affine=np.eye(3), energy=energy)
    _store.store_registration(
        o,
        reg,
        key="seven",
        kind="affine",
        source_cs=XENIUM_CS,
        target_cs=VISIUM_CS,
        source_element=None,
        target_element=None,
        native=False,
        extra={"note": "kept"},
    )
    assert o.align.transforms.loc["seven", "iterations"] == 7
    assert _store.get_entry(o, "seven")["note"] == "kept"  # extra metadata stored with the entry
    with pytest.raises(ValueError, match="without '/'"):
        _store.store_registration(
            o,
            reg,
            key="a/b",
            kind="affine",
            source_cs=XENIUM_CS,
            target_cs=VISIUM_CS,
            source_element=None,
            target_element=None,
        )


def test_native_affine_spares_landmarks_and_elements_already_in_the_target_system(base):
    """The affine is registered on the source system's elements, not on the landmark points, not on an element the
    user placed in the target system; a refit into the same target replaces the earlier native affine."""
    from spatialdata.transformations import Identity, Scale

    s = base[0]
    o = _copy(s)
    xy = ("x", "y")
    both = sd.models.ShapesModel.parse(
        np.array([[1.0, 2.0], [3.0, 4.0]]),
        geometry=0,
        radius=np.ones(2),
        transformations={XENIUM_CS: Identity(), VISIUM_CS: Scale([2.0, 2.0], axes=xy)},
    )
    o.shapes["both"] = both
    m = np.array([[0.5, 0.1, 7.0], [-0.1, 0.5, 3.0], [0.0, 0.0, 1.0]])
    entry, _ = _refit(o, m)
    got = get_transformation(o[XENIUM_CELLS], VISIUM_CS).to_affine_matrix(xy, xy)
    np.testing.assert_allclose(got, m @ get_transformation(o[XENIUM_CELLS], XENIUM_CS).to_affine_matrix(xy, xy))
    assert XENIUM_CELLS in entry["native_elements"] and "both" not in entry["native_elements"]
    np.testing.assert_allclose(get_transformation(o["both"], VISIUM_CS).to_affine_matrix(xy, xy), np.diag([2.0, 2, 1]))
    lm = [n for n in o.points if n.startswith("landmarks")]
    assert lm and not set(lm) & set(entry["native_elements"])
    for n in lm:
        assert len(get_transformation(o[n], get_all=True)) == 1, n
    # the original object keeps its own affine
    np.testing.assert_allclose(
        get_transformation(s[XENIUM_CELLS], VISIUM_CS).to_affine_matrix(xy, xy)[:2],
        (s.align.get(AFFINE).affine @ get_transformation(s[XENIUM_CELLS], XENIUM_CS).to_affine_matrix(xy, xy))[:2],
    )


def test_a_refit_keeps_global_in_step_with_the_exposed_system(base):
    """With the Visium system exposed as "global", a later fit's native affine is what "global" shows too."""
    s = base[0]
    o = _copy(s)
    xy = ("x", "y")
    o.align.set_global(VISIUM_CS)
    m = np.array([[0.5, 0.1, 7.0], [-0.1, 0.5, 3.0], [0.0, 0.0, 1.0]])
    _refit(o, m)
    t = get_transformation(o[XENIUM_CELLS], get_all=True)
    want = m @ t[XENIUM_CS].to_affine_matrix(xy, xy)
    np.testing.assert_allclose(t[VISIUM_CS].to_affine_matrix(xy, xy), want)
    np.testing.assert_allclose(t["global"].to_affine_matrix(xy, xy), want)
    assert "global" not in get_transformation(s[XENIUM_CELLS], get_all=True)


def test_removing_a_transform_removes_its_global_copies(base):
    """Removing the affine takes its "global" mirror with it: the cells no longer show in "global" either."""
    s = base[0]
    o = _copy(s)
    o.align.set_global(VISIUM_CS)
    assert {VISIUM_CS, "global"} <= set(get_transformation(o[XENIUM_CELLS], get_all=True))
    o.align.remove(AFFINE)
    assert set(get_transformation(o[XENIUM_CELLS], get_all=True)) == {XENIUM_CS}
    assert {VISIUM_CS, "global"} <= set(get_transformation(o[VISIUM_SPOTS], get_all=True))  # Visium's own stay
