"""Readers ``sda.io`` and the 10x writers they are tested with (``datasets._tenx``)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _io_data import MARKER, MORPH_MARKER, PIXEL_SIZE, make_visium, make_xenium
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

import spatialdata_align as sda
from spatialdata_align._constants import (
    INSTANCE_KEY,
    REGION_KEY,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_CYTASSIST,
    VISIUM_FULLRES,
    VISIUM_HIRES,
    VISIUM_LOWRES,
    VISIUM_SPOTS,
    VISIUM_TABLE,
    XENIUM_CELL_BOUNDARIES,
    XENIUM_CELLS,
    XENIUM_CS,
    XENIUM_NUCLEUS_BOUNDARIES,
    XENIUM_TABLE,
    XENIUM_TRANSCRIPTS,
)
from spatialdata_align.datasets._tenx import FOCUS_CHANNELS, write_feature_matrix_h5, write_feature_matrix_mtx

XY = ("x", "y")


def _matrix(el, cs):
    return get_transformation(el, to_coordinate_system=cs).to_affine_matrix(input_axes=XY, output_axes=XY)


def _tree_digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _scale0(image):
    return image["scale0"]["image"] if hasattr(image, "children") and "scale0" in image else image


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def xin():
    return make_xenium()


@pytest.fixture(scope="module")
def xdirs(xin, tmp_path_factory):
    root = tmp_path_factory.mktemp("xenium")
    return {
        "minimal_csv_h5": xin.write(root / "a", layout="minimal", cells_format="csv.gz", matrix_format="h5"),
        "minimal_parquet_mtx": xin.write(
            root / "b", layout="minimal", cells_format="parquet", matrix_format="mtx", transcripts_format="csv.gz"
        ),
        "full": xin.write(root / "c", layout="full"),
    }


@pytest.fixture(scope="module")
def xread(xdirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: sda.io.read_xenium(v) for k, v in xdirs.items()}


@pytest.fixture(scope="module")
def vin():
    return make_visium()


@pytest.fixture(scope="module")
def vdirs(vin, tmp_path_factory):
    root = tmp_path_factory.mktemp("visium")
    out = {}
    for pf in ("tissue_positions.csv", "tissue_positions_list.csv"):
        for mf in ("h5", "mtx"):
            out[(pf, mf)] = vin.write(root / f"{pf}_{mf}" / "outs", positions_file=pf, matrix_format=mf)
    return out


# ------------------------------------------------------------------------------------------------ matrices
def test_feature_matrix_h5_and_mtx_round_trip(tmp_path, xin):
    ids = xin.cells["cell_id"].to_numpy()
    args = (xin.counts, ids, xin.feature_ids, xin.feature_names, xin.feature_types)
    h5 = write_feature_matrix_h5(tmp_path / "m.h5", *args)
    mtx = write_feature_matrix_mtx(tmp_path / "mtx", *args)
    # a folder a user gunzipped: scanpy.read_10x_mtx cannot read it, our fallback does
    plain = shutil.copytree(mtx, tmp_path / "plain")
    for f in list(plain.iterdir()):
        with gzip.open(f, "rb") as fh:
            f.with_suffix("").write_bytes(fh.read())
        f.unlink()
    for path in (h5, mtx, plain):
        m = sda.io.read_feature_matrix(path)
        assert sparse.isspmatrix_csr(m.X) and m.X.dtype == np.int32  # scanpy's float32 back to the file's int32
        np.testing.assert_array_equal(m.X.toarray(), xin.counts.toarray())
        assert list(m.obs_names) == list(ids)
        assert list(m.var_names) == xin.feature_names
        assert list(m.var["gene_ids"]) == xin.feature_ids
        assert list(m.var["feature_types"]) == xin.feature_types
    with gzip.open(mtx / "matrix.mtx.gz", "rt") as fh:
        header = [next(fh) for _ in range(3)]
    assert header[0].startswith("%%MatrixMarket matrix coordinate integer general")
    assert header[2].split() == [str(len(xin.feature_ids)), str(len(ids)), str(xin.counts.nnz)]


# ------------------------------------------------------------------------------------------------ Xenium
@pytest.mark.parametrize("layout", ["minimal_csv_h5", "minimal_parquet_mtx", "full"])
def test_read_xenium_counts_positions_and_names(xread, xin, layout):
    sdata = xread[layout]
    table = sdata.tables[XENIUM_TABLE]
    genes = xin.gene_mask
    # counts exactly as written, sparse int, controls out of X
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), xin.counts.toarray()[:, genes])
    assert list(table.var_names) == list(np.array(xin.feature_names)[genes])
    assert list(table.var["gene_ids"]) == list(np.array(xin.feature_ids)[genes])
    assert set(table.var["feature_types"]) == {"Gene Expression"}
    np.testing.assert_array_equal(table.obsm["control_counts"].toarray(), xin.counts.toarray()[:, ~genes])
    assert list(table.uns["control_features"].index) == list(np.array(xin.feature_names)[~genes])
    # cells and positions
    ids = xin.cells["cell_id"].to_numpy()
    assert list(table.obs_names) == list(ids)
    np.testing.assert_array_equal(table.obsm["spatial"], xin.cells[["x_centroid", "y_centroid"]].to_numpy())
    np.testing.assert_array_equal(table.obs["total_counts"].to_numpy(), xin.cells["total_counts"].to_numpy())
    assert (table.obs[REGION_KEY] == XENIUM_CELLS).all()
    assert list(table.obs[INSTANCE_KEY]) == list(ids)
    assert table.uns["spatialdata_attrs"]["region"] == XENIUM_CELLS
    assert table.uns["xenium"]["pixel_size"] == pytest.approx(PIXEL_SIZE)
    cells = sdata.shapes[XENIUM_CELLS]
    assert list(cells.index) == list(ids)
    np.testing.assert_allclose(cells.geometry.x, xin.cells["x_centroid"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(cells.geometry.y, xin.cells["y_centroid"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(cells["radius"], np.sqrt(xin.cells["cell_area"] / np.pi), rtol=1e-12)
    np.testing.assert_allclose(_matrix(cells, XENIUM_CS), np.eye(3))
    assert set(sdata.coordinate_systems) == {XENIUM_CS}


@pytest.mark.parametrize("layout", ["minimal_csv_h5", "minimal_parquet_mtx", "full"])
def test_read_xenium_transcripts(xread, xin, layout):
    pts = xread[layout].points[XENIUM_TRANSCRIPTS]
    assert not isinstance(pts, pd.DataFrame)  # lazy (dask)
    df = pts.compute().sort_values("transcript_id").reset_index(drop=True)
    ref = xin.transcripts
    assert len(df) == len(ref)
    np.testing.assert_allclose(df["x"], ref["x_location"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(df["y"], ref["y_location"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(df["z"], ref["z_location"], rtol=0, atol=1e-5)
    assert isinstance(df["feature_name"].dtype, pd.CategoricalDtype)
    assert list(df["feature_name"].astype(str)) == list(ref["feature_name"])
    assert list(df["cell_id"].astype(str)) == list(ref["cell_id"])
    np.testing.assert_allclose(_matrix(pts, XENIUM_CS), np.eye(3))


def test_transcripts_have_a_unique_lazy_index(xcopy, xin, tmp_path, monkeypatch):
    """Several partitions, known divisions: sd.transform, queries and a zarr round trip work lazily."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import spatialdata as sd
    from spatialdata.transformations import Affine, set_transformation

    from spatialdata_align.io import _transcripts

    tx = xin.transcripts.astype({"x_location": np.float32, "y_location": np.float32})  # as Xenium writes them
    pq.write_table(pa.Table.from_pandas(tx, preserve_index=False), xcopy / "transcripts.parquet", row_group_size=50)
    monkeypatch.setattr(_transcripts, "TRANSCRIPT_BLOCKSIZE", 1)  # one partition per row group
    pts = sda.io.read_xenium(xcopy).points[XENIUM_TRANSCRIPTS]
    assert pts.npartitions == 8 and pts.known_divisions
    assert pts.divisions == (0, 50, 100, 150, 200, 250, 300, 350, 399)
    df = pts.compute()
    assert df.index.is_unique and list(df.index) == list(range(len(xin.transcripts)))
    A = np.array([[0.0, -2.0, 300.0], [2.0, 0.0, 10.0], [0.0, 0.0, 1.0]])
    set_transformation(pts, Affine(A, input_axes=XY, output_axes=XY), to_coordinate_system="other")
    moved = sd.transform(pts, to_coordinate_system="other")
    assert not isinstance(moved, pd.DataFrame)  # still lazy
    np.testing.assert_allclose(
        moved.compute()[["x", "y"]].to_numpy(), df[["x", "y"]].to_numpy() @ A[:2, :2].T + A[:2, 2], rtol=1e-6
    )
    box = sd.bounding_box_query(
        pts, axes=XY, min_coordinate=[0, 0], max_coordinate=[50, 35], target_coordinate_system=XENIUM_CS
    )
    inside = (df["x"] >= 0) & (df["x"] <= 50) & (df["y"] >= 0) & (df["y"] <= 35)
    assert len(box.compute()) == int(inside.sum()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.SpatialData(points={"t": pts}).write(tmp_path / "t.zarr")
    back = sd.read_zarr(tmp_path / "t.zarr").points["t"]
    back_df = back.compute()
    assert back_df.index.is_unique
    pd.testing.assert_frame_equal(back_df.sort_index(), df.astype({"feature_name": back_df["feature_name"].dtype}))


def test_transcript_gene_names_coded_from_dictionaries_plain_pages_and_nulls(xcopy, xin, monkeypatch):
    """Gene names: first-appearance order over row groups, dictionary or plain pages alike, null -> missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spatialdata_align.io import _transcripts

    df = xin.transcripts.iloc[:300].reset_index(drop=True)
    names = df["feature_name"].astype(object).to_numpy().copy()
    names[150] = "LATE_GENE"  # first seen in the second row group
    names[10] = None
    df = df.assign(feature_name=names)
    schema = pa.Table.from_pandas(df, preserve_index=False).schema
    path = xcopy / "transcripts.parquet"
    with pq.ParquetWriter(path, schema, use_dictionary=True) as w:  # dictionary-encoded pages
        w.write_table(pa.Table.from_pandas(df.iloc[:100], schema=schema, preserve_index=False))
    first = pq.read_table(path)
    with pq.ParquetWriter(path, schema, use_dictionary=False) as w:  # then plain pages, in one file
        w.write_table(first)
        w.write_table(pa.Table.from_pandas(df.iloc[100:], schema=schema, preserve_index=False))
    monkeypatch.setattr(_transcripts, "TRANSCRIPT_BLOCKSIZE", 1)
    pts = sda.io.read_xenium(xcopy, images=False).points[XENIUM_TRANSCRIPTS]
    got = pts.compute()
    seen = list(dict.fromkeys(n for n in names if n is not None))
    assert list(got["feature_name"].cat.categories) == seen
    assert got["feature_name"].isna().sum() == 1 and pd.isna(got["feature_name"].iloc[10])
    assert list(got["feature_name"].astype(object).iloc[11:]) == list(names[11:])
    # a dictionary-encoded file: the same codes as decoding every string
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=70)
    assert pq.ParquetFile(path).metadata.row_group(0).column(schema.names.index("feature_name")).has_dictionary_page
    again = sda.io.read_xenium(xcopy, images=False).points[XENIUM_TRANSCRIPTS].compute()
    assert list(again["feature_name"].cat.categories) == seen
    pd.testing.assert_series_equal(again["feature_name"], got["feature_name"])


def test_written_store_holds_transcripts_and_aligned_copy_read_once(xcopy, xin, tmp_path, monkeypatch):
    """The pipeline's writer: spatialdata's store, every points partition read once for both copies."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import spatialdata as sd

    from spatialdata_align import _store
    from spatialdata_align._write import _placeholder, write_sdata
    from spatialdata_align.io import _transcripts
    from spatialdata_align.registration import Registration

    tx = xin.transcripts.astype({"x_location": np.float32, "y_location": np.float32})  # as Xenium writes them
    pq.write_table(pa.Table.from_pandas(tx, preserve_index=False), xcopy / "transcripts.parquet", row_group_size=50)
    monkeypatch.setattr(_transcripts, "TRANSCRIPT_BLOCKSIZE", 1)  # one partition per row group
    reads = []
    read = _transcripts._read_row_groups
    monkeypatch.setattr(
        _transcripts, "_read_row_groups", lambda part, *a, **k: reads.append(part) or read(part, *a, **k)
    )
    sdata = sda.io.read_xenium(xcopy, images=False)
    df = sdata.points[XENIUM_TRANSCRIPTS].compute()
    lo, hi = df[["x", "y"]].min().to_numpy() - 20, df[["x", "y"]].max().to_numpy() + 20
    xv, yv = np.linspace(lo[0], hi[0], 12), np.linspace(lo[1], hi[1], 10)
    gx, gy = np.meshgrid(xv, yv)
    v = np.stack([6 * np.sin(gx / 40), 5 * np.cos(gy / 30)])[None].repeat(4, 0)
    reg = Registration(
        affine=np.array([[0.0, -2.0, 300.0], [2.0, 0.0, 10.0], [0.0, 0.0, 1.0]]),
        velocity_values=v,
        xv=xv,
        yv=yv,
        source_extent=(lo[0], hi[0], lo[1], hi[1]),
        target_extent=(-200.0, 600.0, -200.0, 600.0),
    )
    _store.store_registration(
        sdata,
        reg,
        key="t",
        kind="lddmm",
        source_cs=XENIUM_CS,
        target_cs=VISIUM_CS,
        source_element=XENIUM_TRANSCRIPTS,
        target_element=None,
        native=False,
    )
    aligned = sdata.align.apply(XENIUM_TRANSCRIPTS)
    part = sdata.points[aligned].partitions[1].compute()  # mapped positions keep the float32 they were given in
    assert part["x"].dtype == part["y"].dtype == sdata.points[aligned]["x"].dtype == np.float32
    reads.clear()
    n_parts = sdata.points[XENIUM_TRANSCRIPTS].npartitions
    assert n_parts == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reads.clear()
        sdata.write(tmp_path / "peer.zarr", update_sdata_path=False)
        assert len(reads) == 2 * n_parts  # spatialdata: one element after the other, each reads the file
        reads.clear()
        write_sdata(sdata, tmp_path / "ours.zarr")
    assert len(reads) == n_parts  # here: one pass for both
    # the stand-ins spatialdata writes have task keys of their own: two pipelines on one dask.distributed cluster
    # (sda.batch) would otherwise share the keys of equal empty frames, and one write failed
    assert _placeholder(sdata.points[aligned])._name != _placeholder(sdata.points[aligned])._name
    assert sdata.path is None  # the object is not re-pointed at the store
    assert all("transform" in el.attrs for el in sdata.points.values())  # nor its elements changed
    peer, ours = sd.read_zarr(tmp_path / "peer.zarr"), sd.read_zarr(tmp_path / "ours.zarr")
    for kind in ("points", "shapes", "tables", "images"):
        assert sorted(getattr(ours, kind)) == sorted(getattr(peer, kind))
    # the tables (written through an in-memory zarr store here) are spatialdata's files byte for byte, and the
    # consolidated metadata describes the same nodes
    stores = [tmp_path / "peer.zarr", tmp_path / "ours.zarr"]
    files = [{p.relative_to(st): p.read_bytes() for p in (st / "tables").rglob("*") if p.is_file()} for st in stores]
    assert len(files[0]) > 20 and files[1] == files[0]
    from spatialdata._io.io_zarr import _write_consolidated_metadata

    _write_consolidated_metadata(stores[0])  # spatialdata consolidated sdata.path (None: update_sdata_path=False)
    meta = [json.loads((st / "zarr.json").read_text())["consolidated_metadata"]["metadata"] for st in stores]
    assert meta[1] == meta[0] and any(k.startswith("tables/") for k in meta[0])
    for name in (XENIUM_TRANSCRIPTS, aligned):
        a, b = peer.points[name], ours.points[name]
        assert a.npartitions == b.npartitions == n_parts and b.attrs == a.attrs
        pd.testing.assert_frame_equal(b.compute(), a.compute(), check_like=True)
        # the parts are dask's: same names, schema and pandas metadata (index as __null_dask_index__), floats
        # written byte-stream-split and the index delta-encoded
        parts = [sorted((st / "points" / name / "points.parquet").iterdir()) for st in stores]
        assert [f.name for f in parts[1]] == [f.name for f in parts[0]] and len(parts[0]) == n_parts
        files = [pq.ParquetFile(f[0]) for f in parts]
        assert files[1].schema_arrow.remove_metadata() == files[0].schema_arrow.remove_metadata()
        pandas_md = [json.loads(f.schema_arrow.metadata[b"pandas"]) for f in files]
        assert [{k: v for k, v in m.items() if k != "creator"} for m in pandas_md[1:]] == [
            {k: v for k, v in pandas_md[0].items() if k != "creator"}
        ]
        assert pandas_md[1]["index_columns"] == ["__null_dask_index__"]
        rg = files[1].metadata.row_group(0)
        enc = {rg.column(i).path_in_schema: rg.column(i).encodings for i in range(rg.num_columns)}
        assert "BYTE_STREAM_SPLIT" in enc["x"] and "DELTA_BINARY_PACKED" in enc["__null_dask_index__"]
        assert files[1].schema_arrow.field("x").type == pa.float32()  # the aligned copy keeps float32 positions
    back = ours.points[aligned].compute().sort_index()
    assert len(back) == len(df)
    np.testing.assert_allclose(
        back[["x", "y"]].to_numpy(), sdata.align.get("t").transform_points(df[["x", "y"]].to_numpy()), rtol=0, atol=1e-3
    )


def test_write_sdata_falls_back_to_dask_for_object_columns(tmp_path):
    """Points whose column types the meta cannot tell (``object`` strings) are written by dask and read back equal."""
    import dask
    import dask.dataframe as dd
    import spatialdata as sd
    from spatialdata.models import PointsModel

    from spatialdata_align._write import _parquet_schema, write_sdata

    df = pd.DataFrame(
        {
            "x": np.arange(40, dtype=np.float32),
            "y": np.arange(40, dtype=np.float64) * 2,
            "gene": pd.Categorical(["a", "b"] * 20),
            "cell": np.array([f"c{i % 7}" for i in range(40)], dtype=object),
        }
    )
    with dask.config.set({"dataframe.convert-string": False}):  # (dask makes strings arrow strings by default)
        el = PointsModel.parse(dd.from_pandas(df, npartitions=3), feature_key="gene")
    assert el["cell"].dtype == object and _parquet_schema(el._meta) is None
    typed = PointsModel.parse(dd.from_pandas(df.astype({"cell": "string[pyarrow]"}), npartitions=3), feature_key="gene")
    assert _parquet_schema(typed._meta) is not None
    sdata = sd.SpatialData(points={"plain": el, "typed": typed})
    write_sdata(sdata, tmp_path / "ours.zarr")
    sdata.write(tmp_path / "peer.zarr", update_sdata_path=False)
    ours, peer = sd.read_zarr(tmp_path / "ours.zarr"), sd.read_zarr(tmp_path / "peer.zarr")
    for name, src in (("plain", el), ("typed", typed)):
        assert ours.points[name].npartitions == 3
        got = ours.points[name].compute()
        pd.testing.assert_frame_equal(got, peer.points[name].compute())  # what spatialdata's own writer gives
        pd.testing.assert_frame_equal(got, src.compute(), check_dtype=False)  # (object strings read back as str)


def test_public_write_zarr_writes_in_one_pass_and_replaces_only_zarr_stores(xcopy, tmp_path, monkeypatch):
    """``sda.write_zarr``: spatialdata's store through the one-pass writer; an existing path needs ``overwrite``."""
    import spatialdata as sd

    from spatialdata_align import _write

    sdata = sda.io.read_xenium(xcopy, images=False)
    used = []
    real = _write.write_sdata
    monkeypatch.setattr(_write, "write_sdata", lambda s, p: used.append(p) or real(s, p))
    out = tmp_path / "a.zarr"
    assert sda.write_zarr(sdata, out) == out and len(used) == 1
    back = sd.read_zarr(out)
    assert sorted(back.points) == sorted(sdata.points) and sorted(back.tables) == sorted(sdata.tables)
    pd.testing.assert_frame_equal(
        back.points[XENIUM_TRANSCRIPTS].compute().reset_index(drop=True),
        sdata.points[XENIUM_TRANSCRIPTS].compute().reset_index(drop=True),
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sda.write_zarr(sdata, out)
    del sdata.tables[XENIUM_TABLE]
    sda.write_zarr(sdata, out, overwrite=True)  # replaced: the dropped table is gone from the store
    assert XENIUM_TABLE not in sd.read_zarr(out).tables and sdata.path is None
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        sda.write_zarr(sdata, notes, overwrite=True)
    assert notes.read_text() == "keep me"


def test_xenium_morphology_maps_pixels_to_um(xread, xin):
    for layout in ("minimal_csv_h5", "full"):
        img = xread[layout].images["xenium_morphology_focus"]
        np.testing.assert_allclose(_matrix(img, XENIUM_CS), np.diag([PIXEL_SIZE, PIXEL_SIZE, 1.0]))
        arr = np.asarray(_scale0(img).values)
        assert arr.shape == xin.morphology.shape
        np.testing.assert_array_equal(arr, xin.morphology)
        assert list(img["scale0"]["image"].coords["c"].values) == list(FOCUS_CHANNELS)


def test_xenium_full_boundaries_in_um(xread, xin):
    sdata = xread["full"]
    for name, area in ((XENIUM_CELL_BOUNDARIES, "cell_area"), (XENIUM_NUCLEUS_BOUNDARIES, "nucleus_area")):
        polys = sdata.shapes[name]
        np.testing.assert_allclose(_matrix(polys, XENIUM_CS), np.eye(3), atol=1e-12)
        # the writer draws each boundary as a 13-gon around the centroid: centroid and area come back in µm
        np.testing.assert_allclose(polys.geometry.centroid.x.to_numpy(), xin.cells["x_centroid"], atol=1e-3)
        np.testing.assert_allclose(polys.geometry.centroid.y.to_numpy(), xin.cells["y_centroid"], atol=1e-3)
        ratio = polys.geometry.area.to_numpy() / xin.cells[area].to_numpy()
        np.testing.assert_allclose(ratio, 13 / (2 * np.pi) * np.sin(2 * np.pi / 13), rtol=1e-4)


def test_xenium_layouts_give_the_same_table(xread):
    a, b = xread["minimal_csv_h5"].tables[XENIUM_TABLE], xread["full"].tables[XENIUM_TABLE]
    assert (a.X != b.X).nnz == 0
    assert list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.var[["gene_ids", "feature_types", "gene_symbols"]], b.var[a.var.columns[:3]])
    common = [c for c in a.obs.columns if c in b.obs.columns]
    assert len(common) == len(a.obs.columns)
    pd.testing.assert_frame_equal(a.obs[common], b.obs[common], check_dtype=False)


def test_xenium_options(xdirs, xin):
    sd = sda.io.read_xenium(xdirs["minimal_csv_h5"], cells_as="points", transcripts=False, images=False)
    assert XENIUM_TRANSCRIPTS not in sd.points and not sd.images
    pts = sd.points[XENIUM_CELLS].compute()
    np.testing.assert_allclose(pts[["x", "y"]].to_numpy(), xin.cells[["x_centroid", "y_centroid"]].to_numpy())
    assert sd.tables[XENIUM_TABLE].uns["spatialdata_attrs"]["region"] == XENIUM_CELLS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = sda.io.read_xenium(xdirs["full"], boundaries=False, images=False, transcripts=False, labels=True)
    assert set(full.shapes) == {XENIUM_CELLS}
    assert set(full.labels) == {"xenium_cell_labels", "xenium_nucleus_labels"}
    lab = np.asarray(_scale0(full.labels["xenium_cell_labels"]).values)
    for name in ("xenium_cell_labels", "xenium_nucleus_labels"):  # label pixels to µm, like the morphology image
        np.testing.assert_allclose(_matrix(full.labels[name], XENIUM_CS), np.diag([PIXEL_SIZE, PIXEL_SIZE, 1.0]))
    # the label at a cell's centre pixel is the 1-based index of the last cell whose disc covers that pixel centre
    cx = xin.cells["x_centroid"].to_numpy() / PIXEL_SIZE
    cy = xin.cells["y_centroid"].to_numpy() / PIXEL_SIZE
    r2 = xin.cells["cell_area"].to_numpy() / np.pi / PIXEL_SIZE**2
    px, py = cx.astype(int), cy.astype(int)
    covers = (px[:, None] + 0.5 - cx[None]) ** 2 + (py[:, None] + 0.5 - cy[None]) ** 2 <= r2[None]
    expected = np.array([np.flatnonzero(row).max() + 1 for row in covers])
    np.testing.assert_array_equal(lab[py, px], expected)
    assert np.mean(expected == np.arange(1, len(px) + 1)) > 0.5
    with pytest.raises(ValueError, match="cells_as"):
        sda.io.read_xenium(xdirs["full"], cells_as="polygons")


#: Xenium folders as each XOA version writes them: writer arguments (all with experiment.xenium and boundaries)
_XOA_VARIANTS = {
    "xoa1_integer_ids": {"xoa_version": 1, "cells_format": "csv.gz", "transcripts_format": "csv.gz", "int_ids": True},
    "xoa1_string_ids": {"xoa_version": 1, "cells_format": "csv.gz", "transcripts_format": "csv.gz"},
    "xoa2_parquet": {"xoa_version": 2, "cells_format": "parquet"},
    "xoa3_mtx": {"xoa_version": 3, "cells_format": "parquet", "matrix_format": "mtx"},
    "xoa4_parquet": {"xoa_version": 4, "cells_format": "parquet"},
}


@pytest.mark.parametrize("variant", list(_XOA_VARIANTS))
def test_xenium_every_analysis_version_reads_exactly(xin, tmp_path, variant):
    from spatialdata_align.datasets._tenx import XOA_VERSIONS

    kw = dict(_XOA_VARIANTS[variant])
    cells = xin.cells.copy()
    if kw.pop("int_ids", False):  # XOA 1.0-1.2
        cells["cell_id"] = np.arange(1, len(cells) + 1)
    ids = cells["cell_id"].astype(str).to_numpy()
    xin_v = dataclasses.replace(xin, cells=cells)
    xin_v.transcripts = xin.transcripts.assign(
        cell_id=xin.transcripts["cell_id"].map(dict(zip(xin.cells["cell_id"], ids, strict=True))).fillna("UNASSIGNED")
    )
    folder = xin_v.write(tmp_path / variant, layout="minimal", boundaries=True, experiment=True, **kw)
    sdata = sda.io.read_xenium(folder)
    table = sdata.tables[XENIUM_TABLE]
    # counts, ids and positions exactly
    np.testing.assert_array_equal(table.X.toarray(), xin.counts.toarray()[:, xin.gene_mask])
    assert list(table.obs_names) == list(ids) == list(sdata.shapes[XENIUM_CELLS].index)
    np.testing.assert_array_equal(table.obsm["spatial"], xin.cells[["x_centroid", "y_centroid"]].to_numpy())
    assert table.uns["xenium"]["analysis_sw_version"] == XOA_VERSIONS[kw["xoa_version"]]
    assert table.uns["xenium"]["pixel_size"] == pytest.approx(PIXEL_SIZE)
    # transcripts: all of them, unique lazy index, their cells
    tx = sdata.points[XENIUM_TRANSCRIPTS]
    df = tx.compute()
    assert len(df) == len(xin.transcripts) and df.index.is_unique
    assert sorted(df["cell_id"].astype(str)) == sorted(xin_v.transcripts["cell_id"].astype(str))
    # morphology: one OME-TIFF per channel (XOA >= 2; DAPI only in 1.x), the marker cell on its marker pixel
    img = sdata.images["xenium_morphology_focus"]
    arr = np.asarray(_scale0(img).values)
    n_c = 1 if kw["xoa_version"] == 1 else 4
    assert arr.shape == (n_c, *xin.morphology.shape[1:])
    assert list(_scale0(img).coords["c"].values) == list(FOCUS_CHANNELS[:n_c])
    np.testing.assert_allclose(_matrix(img, XENIUM_CS), np.diag([PIXEL_SIZE, PIXEL_SIZE, 1.0]))
    cx, cy = xin.cells.iloc[xin.marker_cell][["x_centroid", "y_centroid"]]
    px = np.linalg.inv(_matrix(img, XENIUM_CS)) @ np.array([cx, cy, 1.0])
    np.testing.assert_array_equal(arr[:, int(px[1]), int(px[0])], MORPH_MARKER + np.arange(n_c))
    assert ("xenium_morphology_mip" in sdata.images) == (kw["xoa_version"] == 1)
    # cell and nucleus boundaries: polygons in µm, one per cell, index = cell id
    for name, area in ((XENIUM_CELL_BOUNDARIES, "cell_area"), (XENIUM_NUCLEUS_BOUNDARIES, "nucleus_area")):
        polys = sdata.shapes[name]
        assert list(polys.index) == list(ids)
        np.testing.assert_allclose(polys.geometry.centroid.x.to_numpy(), xin.cells["x_centroid"], atol=1e-3)
        np.testing.assert_allclose(polys.geometry.centroid.y.to_numpy(), xin.cells["y_centroid"], atol=1e-3)
        ratio = polys.geometry.area.to_numpy() / xin.cells[area].to_numpy()
        np.testing.assert_allclose(ratio, 13 / (2 * np.pi) * np.sin(2 * np.pi / 13), rtol=1e-4)
    # uns['spatial']: cells (µm) on a small DAPI image whose scale factor maps µm to its pixels
    node = table.uns["spatial"]["synthetic"]
    hires = node["images"]["hires"]
    s = node["scalefactors"]["tissue_hires_scalef"]
    assert list(hires.shape[:2]) == np.ceil(np.array(arr.shape[1:]) * PIXEL_SIZE * s - 1e-9).astype(int).tolist()
    assert hires[int(cy * s), int(cx * s)].max() == 255  # the marker is the brightest DAPI pixel


def test_xenium_full_folder_spatialdata_io_cannot_read_falls_back(xdirs, xin, tmp_path):
    """A complete folder of a layout spatialdata-io does not know: a warning, then our own path reads it."""
    folder = shutil.copytree(xdirs["full"], tmp_path / "xen")
    (folder / "cells.zarr.zip").write_bytes(b"not a zip file")  # e.g. a newer cells.zarr.zip format
    with pytest.warns(UserWarning, match=r"spatialdata_io\.xenium could not read .*directly"):
        sdata = sda.io.read_xenium(folder)
    table = sdata.tables[XENIUM_TABLE]
    np.testing.assert_array_equal(table.X.toarray(), xin.counts.toarray()[:, xin.gene_mask])
    assert list(table.obs_names) == list(xin.cells["cell_id"])
    assert {XENIUM_CELL_BOUNDARIES, XENIUM_NUCLEUS_BOUNDARIES} <= set(sdata.shapes)
    assert np.asarray(_scale0(sdata.images["xenium_morphology_focus"]).values).shape == xin.morphology.shape
    assert len(sdata.points[XENIUM_TRANSCRIPTS].compute()) == len(xin.transcripts)


def test_xenium_cell_boundaries_align_with_the_cells(xdirs, vdirs):
    """Boundary polygons get the native affine and ``apply`` maps their vertices with the fitted transform."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sda.io.read_pair(xdirs["minimal_parquet_mtx"], vdirs[("tissue_positions.csv", "h5")])
    assert XENIUM_CELL_BOUNDARIES not in sdata.shapes  # the minimal download has none
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sda.io.read_pair(xdirs["full"], vdirs[("tissue_positions.csv", "h5")], transcripts=False)
    A = np.array([[0.0, -9.5, 1400.0], [10.2, 0.5, 200.0], [0.0, 0.0, 1.0]])  # rotation + anisotropic scale
    src = np.array([[10.0, 10.0], [90.0, 15.0], [50.0, 60.0], [20.0, 55.0]])
    sdata.align.set_landmarks(source=src, target=src @ A[:2, :2].T + A[:2, 2])
    sdata.align.affine(XENIUM_CELLS, shape_prior=0.0)  # exact landmarks over 80 µm: the plain least-squares affine
    name = sdata.align.apply(XENIUM_CELL_BOUNDARIES)
    before = np.asarray(sdata.shapes[XENIUM_CELL_BOUNDARIES].geometry.iloc[3].exterior.coords)
    after = np.asarray(sdata.shapes[name].geometry.iloc[3].exterior.coords)
    np.testing.assert_allclose(after, before @ A[:2, :2].T + A[:2, 2], atol=1e-6)
    np.testing.assert_allclose(_matrix(sdata.shapes[XENIUM_CELL_BOUNDARIES], VISIUM_CS), A, atol=1e-6)


def test_xenium_old_integer_ids_and_no_transcripts(tmp_path):
    small = make_xenium(n_cells=12, n_tx=0)
    # a full folder whose transcripts.parquet is empty: read, with no transcripts element
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = sda.io.read_xenium(small.write(tmp_path / "full", layout="full"))
    assert XENIUM_TRANSCRIPTS not in full.points and full.tables[XENIUM_TABLE].n_obs == 12
    # XOA 1.0-1.2 wrote integer cell ids: read back as strings, matched to the matrix barcodes
    small.cells["cell_id"] = np.arange(1, 13)
    sd = sda.io.read_xenium(small.write(tmp_path / "old", layout="minimal"))
    assert list(sd.tables[XENIUM_TABLE].obs_names) == [str(i) for i in range(1, 13)]
    assert list(sd.shapes[XENIUM_CELLS].index) == [str(i) for i in range(1, 13)]
    np.testing.assert_array_equal(sd.tables[XENIUM_TABLE].X.toarray(), small.counts.toarray()[:, small.gene_mask])


def test_xenium_pixel_size_argument_only_without_experiment_file(xin, tmp_path):
    bare = xin.write(tmp_path / "bare", layout="minimal", experiment=False)
    assert not (bare / "experiment.xenium").exists()
    for arg, expected in ((None, 0.2125), (0.5, 0.5)):
        sd = sda.io.read_xenium(bare, pixel_size=arg, transcripts=False)
        assert sd.tables[XENIUM_TABLE].uns["xenium"]["pixel_size"] == pytest.approx(expected)
        img = sd.images["xenium_morphology_focus"]
        np.testing.assert_allclose(_matrix(img, XENIUM_CS), np.diag([expected, expected, 1.0]))
    # experiment.xenium's pixel size wins over the argument
    spec = sda.io.read_xenium(xin.write(tmp_path / "spec", experiment=True), pixel_size=0.5, transcripts=False)
    assert spec.tables[XENIUM_TABLE].uns["xenium"]["pixel_size"] == pytest.approx(PIXEL_SIZE)


def test_xenium_cells_file_order_differs_from_the_matrix(xin, tmp_path):
    folder = xin.write(tmp_path / "x", layout="minimal")
    perm = np.random.default_rng(5).permutation(len(xin.cells))
    pd.read_csv(folder / "cells.csv.gz").iloc[perm].to_csv(folder / "cells.csv.gz", index=False)
    sd = sda.io.read_xenium(folder, transcripts=False, images=False)
    table = sd.tables[XENIUM_TABLE]
    # the table follows the cells file; each row keeps its own cell's counts, found by barcode in the matrix
    assert list(table.obs_names) == list(xin.cells["cell_id"].to_numpy()[perm])
    np.testing.assert_array_equal(table.X.toarray(), xin.counts.toarray()[perm][:, xin.gene_mask])
    np.testing.assert_allclose(table.obsm["spatial"], xin.cells[["x_centroid", "y_centroid"]].to_numpy()[perm])


def test_xenium_duplicated_cell_ids(xcopy):
    cells = pd.read_csv(xcopy / "cells.csv.gz")
    cells.loc[4, "cell_id"] = cells.loc[3, "cell_id"]
    cells.to_csv(xcopy / "cells.csv.gz", index=False)
    with pytest.raises(
        ValueError,
        match=rf"cells\.csv\.gz: 'cell_id' is not unique \(1 duplicated, e\.g\. \['{cells.loc[3, 'cell_id']}'\]",
    ):
        sda.io.read_xenium(xcopy)


# ------------------------------------------------------------------------------------------------ Visium
@pytest.mark.parametrize("pf", ["tissue_positions.csv", "tissue_positions_list.csv"])
@pytest.mark.parametrize("mf", ["h5", "mtx"])
def test_read_visium_counts_and_positions(vdirs, vin, pf, mf):
    sdata = sda.io.read_visium(vdirs[(pf, mf)])
    table = sdata.tables[VISIUM_TABLE]
    tissue = vin.in_tissue == 1
    assert list(table.obs_names) == list(vin.barcodes[tissue])
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), vin.counts.toarray())
    # duplicated symbols made unique, originals kept
    assert list(table.var_names) == ["EGFR", "KRT5", "MYDUP", "ACTB", "MYDUP-1", "GAPDH"]
    assert list(table.var["gene_symbols"]) == vin.feature_names
    assert list(table.var["gene_ids"]) == vin.feature_ids
    np.testing.assert_array_equal(table.obs["pxl_row_in_fullres"], vin.pxl_row[tissue])
    np.testing.assert_array_equal(table.obs["pxl_col_in_fullres"], vin.pxl_col[tissue])
    np.testing.assert_array_equal(table.obs["array_row"], vin.array_row[tissue])
    np.testing.assert_array_equal(table.obs["array_col"], vin.array_col[tissue])
    np.testing.assert_array_equal(table.obsm["spatial"], np.column_stack([vin.pxl_col, vin.pxl_row])[tissue])
    assert (table.obs[REGION_KEY] == VISIUM_SPOTS).all()
    assert list(table.obs[INSTANCE_KEY]) == list(vin.barcodes[tissue])
    spots = sdata.shapes[VISIUM_SPOTS]
    assert list(spots.index) == list(table.obs_names)
    np.testing.assert_array_equal(spots.geometry.x, vin.pxl_col[tissue])
    np.testing.assert_array_equal(spots.geometry.y, vin.pxl_row[tissue])
    assert (spots["radius"] == 40.0).all()
    np.testing.assert_allclose(_matrix(spots, VISIUM_CS), np.eye(3))
    sf = sda.io.visium_scalefactors(sdata)
    assert sf["tissue_hires_scalef"] == 0.2 and sf["tissue_lowres_scalef"] == 0.05
    assert sf["spot_diameter_fullres"] == 80.0
    assert sf["um_per_px"] == pytest.approx(55.0 / 80.0, rel=1e-3)  # from the 100 µm pitch of whole-pixel positions
    assert table.uns[UNS_VISIUM_KEY]["um_per_px_from"] == "spot grid (100 µm pitch)"
    assert table.uns[UNS_VISIUM_KEY]["positions_file"] == pf
    assert set(sdata.coordinate_systems) == {VISIUM_CS}


def test_pixel_size_comes_from_the_spot_grid_not_the_spot_diameter(vdirs, tmp_path):
    """Real Space Ranger runs write a spot_diameter_fullres spanning ~65 µm, not 55: the 100 µm grid decides."""
    import json
    import shutil

    folder = shutil.copytree(vdirs[("tissue_positions.csv", "h5")], tmp_path / "outs")
    sf_file = next(folder.rglob("scalefactors_json.json"))
    sf = json.loads(sf_file.read_text())
    sf["spot_diameter_fullres"] = 80.0 * 65.0 / 55.0
    sf_file.write_text(json.dumps(sf))
    got = sda.io.visium_scalefactors(sda.io.read_visium(folder))
    assert got["spot_diameter_fullres"] == pytest.approx(80.0 * 65.0 / 55.0)
    assert got["um_per_px"] == pytest.approx(55.0 / 80.0, rel=1e-3)  # not 55 / 94.5 (18 % off)


def test_known_spot_lands_on_its_hires_pixel(vdirs, vin):
    sdata = sda.io.read_visium(vdirs[("tissue_positions.csv", "h5")])
    hires = sdata.images[VISIUM_HIRES]
    m = _matrix(hires, VISIUM_CS)
    np.testing.assert_allclose(m, np.diag([5.0, 5.0, 1.0]))  # Scale(1 / 0.2)
    bc = vin.barcodes[vin.marker_spot]
    spot = sdata.shapes[VISIUM_SPOTS].loc[bc].geometry
    # full-res (x, y) -> hires intrinsic (x, y) through the element's own transformation, then pixel (row, col)
    xy_h = np.linalg.inv(m) @ np.array([spot.x, spot.y, 1.0])
    row, col = int(np.floor(xy_h[1])), int(np.floor(xy_h[0]))
    assert (row, col) == vin.marker_rc and row != col
    arr = np.asarray(hires.values)
    assert arr.dtype == np.uint8 and arr.shape == (3, *vin.hires.shape[:2])
    np.testing.assert_array_equal(arr[:, row, col], MARKER)
    np.testing.assert_array_equal(arr[:, col % arr.shape[1], row % arr.shape[2]], [240, 240, 240])
    lowres = sdata.images[VISIUM_LOWRES]
    np.testing.assert_allclose(_matrix(lowres, VISIUM_CS), np.diag([20.0, 20.0, 1.0]))
    full = sdata.images[VISIUM_FULLRES]
    np.testing.assert_allclose(_matrix(full, VISIUM_CS), np.eye(3))
    np.testing.assert_array_equal(np.asarray(full.values), vin.fullres.transpose(2, 0, 1))


_IMAGE_ELEMENTS = {
    "hires": VISIUM_HIRES,
    "lowres": VISIUM_LOWRES,
    "fullres": VISIUM_FULLRES,
    "cytassist": VISIUM_CYTASSIST,
}
#: Space Ranger folders as users share them: (images present, positions file, expected registration target)
_VISIUM_VARIANTS = {
    "hires_only": (("hires",), "tissue_positions.csv", VISIUM_HIRES),
    "lowres_only_spaceranger1": (("lowres",), "tissue_positions_list.csv", VISIUM_LOWRES),
    "fullres_only_parquet": (("fullres",), "tissue_positions.parquet", VISIUM_FULLRES),
    "cytassist_only": (("cytassist",), "tissue_positions.csv", VISIUM_CYTASSIST),
    "all_images_parquet": (("hires", "lowres", "fullres", "cytassist"), "tissue_positions.parquet", VISIUM_HIRES),
}


@pytest.mark.parametrize("variant", list(_VISIUM_VARIANTS))
def test_visium_any_image_subset_reads_exactly(vin, tmp_path, variant):
    images, pf, target = _VISIUM_VARIANTS[variant]
    out = vin.write(tmp_path / "outs", images=images, positions_file=pf)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sdata = sda.io.read_visium(out)
    # a missing hires / lowres image is one warning naming it and what was found
    lacking = [f"tissue_{n}_image.png" for n in ("hires", "lowres") if n not in images]
    msgs = [str(w.message) for w in rec if "not found in spatial/" in str(w.message)]
    assert len(msgs) == (1 if lacking else 0)
    assert all(name in msgs[0] for name in lacking) if lacking else True
    # counts and positions exactly
    table = sdata.tables[VISIUM_TABLE]
    tissue = vin.in_tissue == 1
    np.testing.assert_array_equal(table.X.toarray(), vin.counts.toarray())
    assert list(table.obs_names) == list(vin.barcodes[tissue])
    np.testing.assert_array_equal(table.obsm["spatial"], np.column_stack([vin.pxl_col, vin.pxl_row])[tissue])
    assert table.uns[UNS_VISIUM_KEY]["positions_file"] == pf
    # exactly the images present, and the best one is the registration target
    assert set(sdata.images) == {_IMAGE_ELEMENTS[i] for i in images}
    assert sda.io.registration_target(sdata) == target
    # the marker spot lands on its marker pixel in each image present (and that pixel is the only marker)
    spot = sdata.shapes[VISIUM_SPOTS].loc[vin.barcodes[vin.marker_spot]].geometry
    for name in sdata.images:
        img = sdata.images[name]
        xy = np.linalg.inv(_matrix(img, VISIUM_CS)) @ np.array([spot.x, spot.y, 1.0])
        row, col = int(np.floor(xy[1])), int(np.floor(xy[0]))
        arr = np.asarray(_scale0(img).values)
        np.testing.assert_array_equal(arr[:, row, col], MARKER, err_msg=name)
        assert int((arr == MARKER[:, None, None]).all(axis=0).sum()) == 1, name
    # uns['spatial'] in the scanpy layout: the hires / lowres images present, the scale factors
    (lib,) = table.uns["spatial"]
    node = table.uns["spatial"][lib]
    assert set(node["images"]) == {i for i in images if i in ("hires", "lowres")}
    assert node["scalefactors"]["spot_diameter_fullres"] == 80.0


@pytest.mark.parametrize("name", ["tissue_image.btf", "tissue_image.tiff"])
def test_visium_fullres_bigtiff_tiled_reads_exactly(vin, tmp_path, name):
    """Space Ranger's full-resolution image as CytAssist runs ship it: a tiled BigTIFF, often named ``.btf``."""
    import tifffile

    out = vin.write(tmp_path / "outs", images=("hires",))
    tifffile.imwrite(out / name, vin.fullres, photometric="rgb", bigtiff=True, tile=(16, 16))
    sdata = sda.io.read_visium(out)
    full = _scale0(sdata.images[VISIUM_FULLRES])
    np.testing.assert_array_equal(np.asarray(full.values), vin.fullres.transpose(2, 0, 1))
    np.testing.assert_allclose(_matrix(sdata.images[VISIUM_FULLRES], VISIUM_CS), np.eye(3))


def test_lazy_image_reads_tiff_level0_by_tiles_and_names_a_bad_file(tmp_path):
    import tifffile

    from spatialdata_align.io._files import lazy_image

    a = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyr.ome.btf", bigtiff=True) as w:  # a pyramid: level 0 + one sub-level
        w.write(a, subifds=1, tile=(32, 32), photometric="rgb")
        w.write(a[::2, ::2], subfiletype=1, tile=(32, 32), photometric="rgb")
    im = lazy_image(tmp_path / "pyr.ome.btf")
    assert im.shape == a.shape and im.chunksize == (32, 32, 3)  # the file's tiles, not one whole plane
    np.testing.assert_array_equal(im.compute(), a)
    (tmp_path / "bad.btf").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match=r"bad\.btf could not be read as an image \(TiffFileError"):
        lazy_image(tmp_path / "bad.btf")


def _drawn_circles(ax) -> tuple[np.ndarray, np.ndarray]:
    """Centres and radii (axes data units) of the circles scanpy drew, sorted by centre."""
    paths = ax.collections[0].get_paths()
    lo = np.array([p.vertices.min(0) for p in paths])
    hi = np.array([p.vertices.max(0) for p in paths])
    centres, radii = (lo + hi) / 2, (hi - lo)[:, 0] / 2
    order = np.lexsort((centres[:, 1], centres[:, 0]))
    return centres[order], radii[order]


def test_scanpy_draws_spots_and_cells_on_their_images_without_arguments(vdirs, xdirs, tmp_path):
    """``uns['spatial']`` at read time: sc.pl.spatial needs no library id, image or scale factor argument."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    vis = sda.io.read_visium(vdirs[("tissue_positions.csv", "h5")]).tables[VISIUM_TABLE]
    ax = sc.pl.spatial(vis, color="in_tissue", show=False)[0]
    assert list(vis.uns["spatial"]) == ["visium"]  # the library id Space Ranger wrote into the HDF5 file
    assert ax.images[0].get_array().shape == vis.uns["spatial"]["visium"]["images"]["hires"].shape
    centres, radii = _drawn_circles(ax)
    expected = vis.obsm["spatial"] * 0.2  # full-res px -> hires px
    np.testing.assert_allclose(centres, expected[np.lexsort((expected[:, 1], expected[:, 0]))], atol=1e-6)
    np.testing.assert_allclose(radii, 40.0 * 0.2)  # spot_diameter_fullres / 2 in hires px
    plt.close("all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xen = sda.io.read_xenium(xdirs["full"]).tables[XENIUM_TABLE]
    ax = sc.pl.spatial(xen, color="total_counts", show=False)[0]
    s = xen.uns["spatial"]["synthetic"]["scalefactors"]["tissue_hires_scalef"]  # DAPI thumbnail px per µm
    assert s == pytest.approx(1 / PIXEL_SIZE)  # the small test image is its own thumbnail
    from spatialdata_align.io._xenium import morphology_thumbnail

    thumb, factor = morphology_thumbnail(xdirs["full"], max_px=100)  # every 5th pixel of the 329 x 471 image
    assert factor == 5 and thumb.shape == (66, 95, 3)
    centres, _ = _drawn_circles(ax)
    expected = xen.obsm["spatial"] * s
    np.testing.assert_allclose(centres, expected[np.lexsort((expected[:, 1], expected[:, 0]))], atol=1e-6)
    plt.close("all")
    # a minimal download without a morphology image: a white canvas over the cells (scanpy raised StopIteration)
    bare = shutil.copytree(xdirs["minimal_csv_h5"], tmp_path / "bare")
    for f in bare.glob("morphology*"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    xen = sda.io.read_xenium(bare).tables[XENIUM_TABLE]
    ax = sc.pl.spatial(xen, color="total_counts", show=False)[0]
    node = next(iter(xen.uns["spatial"].values()))
    s = node["scalefactors"]["tissue_hires_scalef"]
    assert node["images"]["hires"].min() == 255 and max(node["images"]["hires"].shape[:2]) <= 1000
    assert (node["images"]["hires"].shape[:2] >= np.ceil(xen.obsm["spatial"].max(axis=0)[::-1] * s)).all()
    centres, _ = _drawn_circles(ax)
    expected = xen.obsm["spatial"] * s
    np.testing.assert_allclose(centres, expected[np.lexsort((expected[:, 1], expected[:, 0]))], atol=1e-6)
    plt.close("all")


def test_large_images_get_pyramid_levels_for_the_registration(vin, tmp_path):
    """A large hires image (Visium HD writes several thousand pixels) is read with ~2000 px levels."""
    from spatialdata_align._elements import image_in_cs
    from spatialdata_align.io._visium import pyramid_levels

    assert pyramid_levels((3, 6000, 5000)) == [2, 2] and pyramid_levels((3, 2000, 1500)) is None
    big = np.full((2460, 3960, 3), 230, dtype=np.uint8)
    r, c = vin.marker_pixel(2.0)
    big[r, c] = MARKER
    sf = dict(vin.scalefactors, tissue_hires_scalef=2.0)
    out = vin.write(tmp_path / "outs", images=("hires",), hires_image=big, scalefactors=sf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no lowres image
        sdata = sda.io.read_visium(out)
    img = sdata.images[VISIUM_HIRES]
    assert hasattr(img, "children") and np.asarray(img["scale1"]["image"]).shape == (3, 1230, 1980)
    np.testing.assert_array_equal(np.asarray(_scale0(img).values)[:, r, c], MARKER)
    da = image_in_cs(sdata, VISIUM_HIRES, VISIUM_CS, max_pixels=4_000_000)
    assert da.shape == (3, 1230, 1980)
    np.testing.assert_allclose(da.coords["x"].values[:2], [0.5, 1.5])  # full-res px: level-1 pixels are 1 px wide


def test_visium_matches_spatialdata_io(vdirs):
    import spatialdata_io

    path = vdirs[("tissue_positions_list.csv", "h5")]
    ours = sda.io.read_visium(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = spatialdata_io.visium(path, dataset_id="v")
    t, r = ours.tables[VISIUM_TABLE], ref.tables["table"]
    assert list(t.obs_names) == list(r.obs_names)
    assert list(t.var_names) == list(r.var_names)
    np.testing.assert_array_equal(t.X.toarray(), r.X.toarray())
    np.testing.assert_array_equal(t.obsm["spatial"], r.obsm["spatial"])
    for ours_name, ref_name in ((VISIUM_HIRES, "v_hires_image"), (VISIUM_LOWRES, "v_lowres_image")):
        np.testing.assert_allclose(_matrix(ours.images[ours_name], VISIUM_CS), _matrix(ref.images[ref_name], "v"))
        np.testing.assert_array_equal(ours.images[ours_name].values, ref.images[ref_name].values)
    np.testing.assert_allclose(ours.shapes[VISIUM_SPOTS]["radius"], ref.shapes["v"]["radius"])


def test_visium_options(vdirs, tmp_path):
    src = vdirs[("tissue_positions.csv", "mtx")]
    sd = sda.io.read_visium(src.parent, images=False, fullres_image=None)  # the run folder holding outs/
    assert not sd.images and VISIUM_SPOTS in sd.shapes
    with pytest.raises(ValueError, match="no table 'visium_table'"):
        sda.io.visium_scalefactors(SpatialData())
    # raw matrix (in and out of tissue) through counts_file: no warning about the filtered set
    outs = shutil.copytree(src, tmp_path / "outs")
    shutil.move(outs / "filtered_feature_bc_matrix", outs / "raw_feature_bc_matrix")
    sd = sda.io.read_visium(outs, counts_file="raw_feature_bc_matrix", images=False)
    assert sd.tables[VISIUM_TABLE].n_obs == sd.shapes[VISIUM_SPOTS].shape[0]


# ------------------------------------------------------------------------------------------------ pair + zarr
def test_read_pair_and_zarr_round_trip(xdirs, vdirs, tmp_path):
    import spatialdata as sd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair = sda.io.read_pair(xdirs["full"], vdirs[("tissue_positions.csv", "h5")], transcripts=False)
    assert set(pair.coordinate_systems) == {XENIUM_CS, VISIUM_CS}
    assert set(pair.tables) == {XENIUM_TABLE, VISIUM_TABLE}
    assert XENIUM_TRANSCRIPTS not in pair.points
    assert {XENIUM_CELLS, VISIUM_SPOTS} <= set(pair.shapes)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        sda.io.read_pair(xdirs["full"], vdirs[("tissue_positions.csv", "h5")], bogus=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair.write(tmp_path / "pair.zarr")
        back = sd.read_zarr(tmp_path / "pair.zarr")
    assert (back.tables[XENIUM_TABLE].X != pair.tables[XENIUM_TABLE].X).nnz == 0
    assert sda.io.visium_scalefactors(back) == sda.io.visium_scalefactors(pair)
    np.testing.assert_allclose(_matrix(back.images[VISIUM_HIRES], VISIUM_CS), np.diag([5.0, 5.0, 1.0]))
    np.testing.assert_allclose(_matrix(back.images["xenium_morphology_focus"], XENIUM_CS), np.diag([0.2125] * 2 + [1]))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def xcopy(xdirs, tmp_path):
    return Path(shutil.copytree(xdirs["minimal_csv_h5"], tmp_path / "xen"))


@pytest.fixture
def vcopy(vdirs, tmp_path):
    return Path(shutil.copytree(vdirs[("tissue_positions.csv", "h5")], tmp_path / "outs"))


def test_inputs_are_never_modified(xdirs, vdirs):
    for folder, reader in ((xdirs["full"], sda.io.read_xenium), (vdirs[("tissue_positions.csv", "h5")], None)):
        before = _tree_digest(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (reader or sda.io.read_visium)(folder)
        assert _tree_digest(folder) == before


def test_xenium_missing_files(xcopy, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sda.io.read_xenium(tmp_path / "nope")
    (xcopy / "cell_feature_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"cell_feature_matrix.*holds: cells\.csv\.gz"):
        sda.io.read_xenium(xcopy)
    (xcopy / "cells.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"'cells\.parquet' or 'cells\.csv\.gz'.*morphology_focus/"):
        sda.io.read_xenium(xcopy)


def test_xenium_malformed_files(xcopy, xin):
    cells = pd.read_csv(xcopy / "cells.csv.gz")
    cells.drop(columns=["y_centroid"]).to_csv(xcopy / "cells.csv.gz", index=False)
    with pytest.raises(ValueError, match=r"cells\.csv\.gz lacks required column\(s\) \['y_centroid'\]"):
        sda.io.read_xenium(xcopy)
    cells.iloc[:-3].to_csv(xcopy / "cells.csv.gz", index=False)
    with pytest.raises(ValueError, match=r"0 cells are missing from the matrix and 3 matrix barcodes"):
        sda.io.read_xenium(xcopy)
    cells.to_csv(xcopy / "cells.csv.gz", index=False)
    (xcopy / "cell_feature_matrix.h5").write_bytes(b"this is not hdf5")
    with pytest.raises(ValueError, match=r"cell_feature_matrix\.h5 is not a readable HDF5 file"):
        sda.io.read_xenium(xcopy)
    (xcopy / "cell_feature_matrix.h5").unlink()
    write_feature_matrix_mtx(
        xcopy / "cell_feature_matrix",
        xin.counts,
        xin.cells["cell_id"],
        xin.feature_ids,
        xin.feature_names,
        xin.feature_types,
    )
    with gzip.open(xcopy / "cell_feature_matrix" / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"{n}\n" for n in xin.feature_names))
    with pytest.raises(ValueError, match=r"features\.tsv\.gz has 1 column"):
        sda.io.read_xenium(xcopy)
    (xcopy / "experiment.xenium").write_text("{not json")
    with pytest.raises(ValueError, match=r"experiment\.xenium is not valid JSON"):
        sda.io.read_xenium(xcopy)


def test_visium_missing_files(vcopy, tmp_path):
    # a missing image is a warning that lists what was found; the registration target falls back to lowres
    (vcopy / "spatial" / "tissue_hires_image.png").unlink()
    with pytest.warns(UserWarning, match=r"tissue_hires_image\.png not found in spatial/ \(it holds: .*"):
        sd = sda.io.read_visium(vcopy)
    assert sda.io.registration_target(sd) == VISIUM_LOWRES
    # only positions, matrix or scale factors missing is an error naming the file
    for rel, pattern in (
        ("spatial/scalefactors_json.json", r"scalefactors_json\.json.*holds:"),
        ("spatial/tissue_positions.csv", r"'tissue_positions\.parquet' or 'tissue_positions\.csv' or 'tissue_pos"),
        ("filtered_feature_bc_matrix.h5", r"filtered_feature_bc_matrix\.h5.*holds: spatial/"),
    ):
        (vcopy / rel).unlink()
        with pytest.raises(FileNotFoundError, match=pattern), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sda.io.read_visium(vcopy)
    with pytest.raises(ValueError, match=r"no Visium image to register onto.*images: none"):
        sda.io.registration_target(SpatialData())


def test_visium_malformed_files(vcopy):
    pos = vcopy / "spatial" / "tissue_positions.csv"
    good = pos.read_text()
    lines = good.splitlines()
    pos.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",abc", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"tissue_positions\.csv: column 'pxl_col_in_fullres' has 1 missing"):
        sda.io.read_visium(vcopy)
    pos.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    with pytest.raises(ValueError, match=r"tissue_positions\.csv: columns \['pxl_col_in_fullres'\] are missing"):
        sda.io.read_visium(vcopy)
    pos.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines[1:]) + "\n")  # no header, 5 columns
    with pytest.raises(ValueError, match=r"tissue_positions\.csv has 5 column\(s\), expected 6"):
        sda.io.read_visium(vcopy)
    # drop three in-tissue barcodes from the positions: reported with counts
    tissue = [line for line in lines[1:] if line.split(",")[1] == "1"]
    pos.write_text("\n".join(line for line in lines if line not in tissue[:3]) + "\n")
    with pytest.raises(ValueError, match=rf"3 of {len(tissue)} barcodes of filtered_feature_bc_matrix\.h5 are not in"):
        sda.io.read_visium(vcopy)
    # in_tissue outside {0, 1}; a barcode listed twice
    rows = [line.split(",") for line in lines]
    bad = [",".join([*r[:1], "2", *r[2:]]) if i == 5 else ",".join(r) for i, r in enumerate(rows)]
    pos.write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=r"tissue_positions\.csv: 'in_tissue' must be 0 or 1, found \[0, 1, 2\]"):
        sda.io.read_visium(vcopy)
    pos.write_text("\n".join([*lines, lines[-1]]) + "\n")
    with pytest.raises(ValueError, match=rf"1 barcode\(s\) are listed more than once \(e\.g\. \['{rows[-1][0]}'\]"):
        sda.io.read_visium(vcopy)
    pos.write_text(good)
    sf = vcopy / "spatial" / "scalefactors_json.json"
    sf.write_text("{'single quotes': 1}")
    with pytest.raises(ValueError, match=r"scalefactors_json\.json is not valid JSON"):
        sda.io.read_visium(vcopy)
    sf.write_text(json.dumps({"spot_diameter_fullres": 80.0, "tissue_lowres_scalef": 0.05}))
    with pytest.raises(ValueError, match=r"lacks \['tissue_hires_scalef'\], needed to place tissue_hires_image\.png"):
        sda.io.read_visium(vcopy)
    sf.write_text(json.dumps({"spot_diameter_fullres": 80.0, "tissue_hires_scalef": -1, "tissue_lowres_scalef": 0.05}))
    with pytest.raises(ValueError, match=r"'tissue_hires_scalef' must be a positive number"):
        sda.io.read_visium(vcopy)
    sf.write_text(json.dumps({"spot_diameter_fullres": 80.0, "tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.05}))
    (vcopy / "spatial" / "tissue_hires_image.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"tissue_hires_image\.png could not be read as an image"):
        sda.io.read_visium(vcopy)
    (vcopy / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"filtered_feature_bc_matrix\.h5 is not a readable HDF5 file"):
        sda.io.read_visium(vcopy, images=False)


# ------------------------------------------------------------------------------------------------ empty inputs
def test_xenium_with_no_cells_is_named(xin, tmp_path):
    from spatialdata_align.datasets._tenx import write_xenium

    out = tmp_path / "x"
    write_xenium(
        out, cells=xin.cells.iloc[:0], counts=xin.counts[:0], feature_ids=xin.feature_ids,
        feature_names=xin.feature_names, feature_types=xin.feature_types,
        transcripts=xin.transcripts.assign(cell_id="UNASSIGNED"), morphology=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"cells\.(csv\.gz|parquet) holds no cells"):
        sda.io.read_xenium(out)


def test_visium_with_no_tissue_spot_is_named(vin, tmp_path):
    from spatialdata_align.datasets._tenx import write_visium

    out = tmp_path / "outs"
    write_visium(
        out, barcodes=vin.barcodes, in_tissue=np.zeros(len(vin.barcodes), int), array_row=vin.array_row,
        array_col=vin.array_col, pxl_row_in_fullres=vin.pxl_row, pxl_col_in_fullres=vin.pxl_col,
        counts=sparse.csr_matrix((0, len(vin.feature_ids)), dtype=np.int32), feature_ids=vin.feature_ids,
        feature_names=vin.feature_names, scalefactors=vin.scalefactors, hires_image=vin.hires, lowres_image=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"filtered_feature_bc_matrix\.h5 holds no barcodes \(0 of the \d+ spots"):
        sda.io.read_visium(out)


@pytest.mark.parametrize("fmt", ["csv.gz", "parquet"])
def test_xenium_transcripts_file_with_no_rows_warns_and_reads_the_rest(xin, tmp_path, fmt):
    out = xin.write(tmp_path / "x", morphology=None, transcripts_format=fmt)
    f = out / f"transcripts.{fmt}"
    empty = pd.read_parquet(f) if fmt == "parquet" else pd.read_csv(f)
    empty = empty.iloc[:0]
    empty.to_parquet(f) if fmt == "parquet" else empty.to_csv(f, index=False)
    with pytest.warns(UserWarning, match=rf"transcripts\.{fmt.replace('.', '[.]')} holds no transcripts"):
        sdata = sda.io.read_xenium(out)
    assert not sdata.points
    assert sdata.tables["xenium_table"].n_obs == len(xin.cells)
