"""Many pairs on dask.distributed (``sda.batch``, CLI ``batch``); aligned elements computed on a cluster."""

from __future__ import annotations

import json
import shutil

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import spatialdata
from distributed import Client, LocalCluster, get_task_stream
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale

import spatialdata_align as sda
from spatialdata_align._batch import exit_code, read_manifest
from spatialdata_align._constants import VISIUM_CS, XENIUM_CS, XENIUM_TRANSCRIPTS
from spatialdata_align._elements import image_in_cs
from spatialdata_align.cli import main

#: the smallest LDDMM that runs every stage (the batch machinery is under test, not the fit)
FAST = {"lddmm_params": {"scales": (4,), "max_iter": (2,), "affine_iter": 1, "min_iter": 1}, "loo": "affine"}


@pytest.fixture(scope="module")
def client():
    """A 2-worker LocalCluster (worker processes, one thread each), shared by the tests of this module."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two twin pairs and a broken one (a Visium folder without its scale factors), in a manifest of relative paths."""
    root = tmp_path_factory.mktemp("batch")
    a = sda.datasets.twin_sections(root / "a", n_cells=2000, n_spots=80, seed=0)
    b = sda.datasets.twin_sections(root / "b", n_cells=2000, n_spots=80, seed=1)
    shutil.copy(b.landmarks_path, root / "b" / "my_landmarks.csv")
    shutil.copytree(a.visium_path, root / "broken" / "outs")
    (root / "broken" / "outs" / "spatial" / "scalefactors_json.json").unlink()
    rows = [
        ("a/xenium", "a/visium/outs", "a/truth/landmarks.csv", "pair_a"),
        ("b/xenium", "b/visium/outs", "b/my_landmarks.csv", "pair_b"),
        ("a/xenium", "broken/outs", "a/truth/landmarks.csv", "broken"),
    ]
    pd.DataFrame(rows, columns=["xenium", "visium", "landmarks", "name"]).to_csv(root / "manifest.csv", index=False)
    return root


def test_batch_on_a_two_worker_cluster(pairs, client, tmp_path, capsys, monkeypatch):
    """Runs, re-runs, forces and drives from the CLI one batch (one test: the runs build on each other)."""
    out = tmp_path / "out"
    summary = sda.batch(pairs / "manifest.csv", out, client=client, progress=False, **FAST)
    printed = capsys.readouterr().out.splitlines()
    assert summary["name"].tolist() == ["pair_a", "pair_b", "broken"]
    assert summary["status"].tolist() == ["ok", "ok", "failed"]
    assert exit_code(summary) == 0
    # each good pair: its own zarr, with the fitted transforms stored in it, and its report
    for name in ("pair_a", "pair_b"):
        back = spatialdata.read_zarr(out / name / "aligned.zarr")
        assert {"xenium_to_visium_affine", "xenium_to_visium_lddmm"} <= set(back.align.transforms.index)
        assert "xenium_cells_aligned" in back
        assert (out / name / "report" / "summary.md").is_file()
        assert json.loads((out / name / "status.json").read_text())["status"] == "ok"
    assert set(summary["verdict"].iloc[:2]) <= {"good", "check", "unreliable"}
    assert summary["heldout_median_um"].iloc[:2].notna().all()  # the affine's held-out landmark error
    assert set(summary["worker"]) <= set(client.scheduler_info()["workers"])  # every pair ran on the cluster
    # the broken pair: one clear row, its error and traceback in its status file, no zarr
    bad = summary.set_index("name").loc["broken"]
    assert "scalefactors_json.json" in bad["error"]
    assert not (out / "broken" / "aligned.zarr").exists()
    assert "Traceback" in json.loads((out / "broken" / "status.json").read_text())["traceback"]
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["ok", "ok", "failed"]
    # progress: one line per pair
    lines = [ln for ln in printed if ln.startswith("[")]
    assert len(lines) == 3 and sum("FAILED" in ln and "broken" in ln for ln in lines) == 1

    # re-runs
    lm = pairs / "b" / "my_landmarks.csv"
    saved = lm.read_bytes()
    lm.unlink()  # a finished pair is not even looked at again ...
    try:
        again = sda.batch(pairs / "manifest.csv", out, client=client, verbose=False, progress=False, **FAST)
        assert again["status"].tolist() == ["skipped", "skipped", "failed"]
        assert exit_code(again) == 0
        # ... unless forced: then pair_b really runs again (and now fails on its missing landmark file)
        only_b = pairs / "only_b.csv"
        pd.read_csv(pairs / "manifest.csv").query("name == 'pair_b'").to_csv(only_b, index=False)
        assert sda.batch(only_b, out, client=client, verbose=False, progress=False)["status"].tolist() == ["skipped"]
        forced = sda.batch(only_b, out, client=client, force=True, verbose=False, progress=False, **FAST)
        assert forced["status"].tolist() == ["failed"] and "my_landmarks.csv" in forced.loc[0, "error"]
        assert json.loads((out / "pair_b" / "status.json").read_text())["status"] == "failed"
    finally:
        lm.write_bytes(saved)

    # the command line, on the same cluster through its scheduler address
    addr = client.scheduler.address
    manifest = pd.read_csv(pairs / "manifest.csv")
    two = pairs / "two.csv"
    manifest[manifest["name"].isin(["pair_a", "broken"])].to_csv(two, index=False)
    # one pair done (earlier) and one failing: exit 0
    assert main(["batch", str(two), "--out-dir", str(out), "--scheduler", addr, "--quiet", "--loo", "none"]) == 0
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["skipped", "failed"]
    # every pair failing is the only non-zero exit of a batch that ran (1)
    only_bad = pairs / "only_broken.csv"
    manifest[manifest["name"] == "broken"].to_csv(only_bad, index=False)
    argv = ["batch", str(only_bad), "--out-dir", str(tmp_path / "o"), "--scheduler", addr, "--quiet", "--loo", "none"]
    assert main(argv) == 1
    # a bad manifest: exit 2 and a message naming the file and what is wrong
    bad = pairs / "bad.csv"
    bad.write_text("xenium,name\na/xenium,x\n")
    capsys.readouterr()
    assert main(["batch", str(bad), "--out-dir", str(tmp_path / "o"), "--scheduler", addr]) == 2
    assert "bad.csv lacks column(s) ['visium']" in capsys.readouterr().err
    # --force, --workers and the pipeline options reach sda.batch
    seen = {}
    monkeypatch.setattr(
        "spatialdata_align._batch.batch", lambda *a, **kw: seen.update(kw) or pd.DataFrame({"status": ["ok"]})
    )
    assert main(["batch", str(two), "--out-dir", "x", "--force", "--workers", "3", "--dx", "15", "--quiet"]) == 0
    assert seen["force"] is True and seen["n_workers"] == 3 and seen["dx"] == 15.0 and seen["scheduler"] is None
    assert seen["loo"] == "lddmm"  # the pipeline's default held-out error


def test_manifest_errors_name_the_rows(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("xenium,visium,landmarks,name\nx1,v1,,p\nx2,,,q\nx3,v3,l3,p\nx4,v4,,a/b\n")
    with pytest.raises(ValueError, match=r"line 3: empty visium; line 5: name 'a/b' cannot be a folder name; dup"):
        read_manifest(m)
    m.write_text("xenium,visium,name\nx1,v1,p\n")
    (pair,) = read_manifest(m)
    assert pair.landmarks is None and pair.xenium == str(tmp_path / "x1")  # relative to the manifest
    with pytest.raises(FileNotFoundError, match=r"manifest .*nope\.csv does not exist"):
        read_manifest(tmp_path / "nope.csv")


def test_transcripts_and_images_are_computed_on_the_workers(pairs, client, tmp_path):
    """With a distributed client active, apply builds lazy graphs and the workers compute them, block by block."""
    sd = sda.io.read_pair(pairs / "a" / "xenium", pairs / "a" / "visium" / "outs")
    lm = pd.read_csv(pairs / "a" / "truth" / "landmarks.csv")
    sd.align.set_landmarks(
        source=lm[["source_x", "source_y"]].to_numpy(), target=lm[["target_x", "target_y"]].to_numpy()
    )
    sd.align.affine("xenium_cells", "visium_hires_image")
    reg = sd.align.get()
    img = np.random.default_rng(0).integers(0, 255, (3, 1200, 1100), dtype=np.uint8)
    sd.images["morphology"] = Image2DModel.parse(
        da.from_array(img, chunks=(3, 256, 256)),
        dims=("c", "y", "x"),
        transformations={XENIUM_CS: Scale([1.0, 1.0], axes=("x", "y"))},
    )
    assert client is not None and Client.current() is client
    with get_task_stream(client) as building:
        tname = sd.align.apply(XENIUM_TRANSCRIPTS)
        iname = sd.align.apply("morphology", chunk=256, map_step=1)
    assert building.data == []  # applying computes nothing
    aligned = spatialdata.SpatialData(points={tname: sd[tname]}, images={iname: sd[iname]})
    with get_task_stream(client) as writing:
        aligned.write(tmp_path / "aligned.zarr")
    ran = writing.data
    assert {t["worker"] for t in ran} <= set(client.scheduler_info()["workers"])
    assert any("_warp_task" in str(t["key"]) for t in ran)
    assert any("transform_partition" in str(t["key"]) for t in ran)
    # nothing ever held the whole image: the largest array any task returned is a block, not the ~1.5k² output
    out_bytes = image_in_cs(sd, iname, VISIUM_CS, lazy=True).nbytes
    arrays = [t["nbytes"] for t in ran if t["typename"] == "numpy.ndarray"]
    assert len(arrays) > 20 and max(arrays) < out_bytes / 8
    # and the written results are right: the same as the registration applied in this process
    back = spatialdata.read_zarr(tmp_path / "aligned.zarr")
    raw = sd[XENIUM_TRANSCRIPTS][["x", "y"]].compute(scheduler="sync").to_numpy()
    got = back[tname][["x", "y"]].compute(scheduler="sync").to_numpy()
    np.testing.assert_allclose(got, reg.transform_points(raw), rtol=1e-6)
    warped = image_in_cs(back, iname, VISIUM_CS)
    ref = reg.warp_image(
        img, np.arange(1100) + 0.5, np.arange(1200) + 0.5, out_x=warped.x.values, out_y=warped.y.values, map_step=1
    )
    np.testing.assert_array_equal(warped.values, ref.values)
