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


# ------------------------------------------------- the batch machinery with a stand-in pipeline (no alignment run)
@pytest.fixture(scope="module")
def thread_client():
    """An in-process cluster (threads): a pipeline replaced in this process is the one its tasks call."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c


def _stand_in(monkeypatch, fail=(), delay=None):
    """Replace ``run_pipeline`` by a recorder that writes an (empty) zarr store and returns made-up numbers.

    Pair ``pN`` reports N + 1000 cells, N + 200 spots, N + 50 shared genes and a held-out LDDMM median of N + 0.5 µm
    (the affine's is 99); pairs in ``fail`` raise.
    """
    import time
    from pathlib import Path
    from types import SimpleNamespace

    from spatialdata_align import _pipeline

    calls = {}

    def fake(xenium, visium, **kw):
        name = Path(kw["out"]).parent.name
        calls[name] = {"xenium": xenium, "visium": visium, **kw}
        calls[name]["status_file_while_running"] = (Path(kw["out"]).parent / "status.json").exists()
        time.sleep((delay or {}).get(name, 0.0))
        if name in fail:
            raise RuntimeError(f"the fit of {name} diverged")
        Path(kw["out"]).mkdir(parents=True, exist_ok=True)
        (Path(kw["out"]) / "zarr.json").write_text("{}")
        n = int(name[1:])
        summary = {
            "n_cells": 1000 + n,
            "n_spots": 200 + n,
            "n_shared_genes": 50 + n,
            "affine": {"method": "auto" if kw["auto_init"] else "landmarks"},
            "accuracy": {
                "loo_affine_um": {"median": 99.0, "max": 199.0},
                "loo_lddmm_um": {"median": n + 0.5, "max": 40.0},
            },
        }
        return SimpleNamespace(summary=summary, verdict="check" if n == 1 else "good")

    monkeypatch.setattr(_pipeline, "run_pipeline", fake)
    return calls


def _manifest(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["xenium", "visium", "landmarks", "name"]).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


THREE = [("x1", "v1", "l1.csv", "p1"), ("x2", "v2", "", "p2"), ("x3", "v3", "l3.csv", "p3")]


def test_summary_rows_follow_the_manifest_with_each_pairs_numbers(thread_client, tmp_path, monkeypatch):
    """One row per pair in manifest order (p1 finishes last), its own numbers, paths and outcome; options reach
    every pair, an empty landmarks cell means automatic initialisation, a failure is that pair's row only."""
    calls = _stand_in(monkeypatch, fail={"p3"}, delay={"p1": 1.0})
    m = _manifest(tmp_path / "m", THREE)
    out = tmp_path / "out"
    summary = sda.batch(
        m, out, client=thread_client, verbose=False, progress=False, dx=12.0, gene="ACTB", bin_size=8, loo="affine"
    )
    assert summary["name"].tolist() == ["p1", "p2", "p3"]
    assert summary["status"].tolist() == ["ok", "ok", "failed"]
    assert summary["n_cells"].tolist()[:2] == [1001, 1002]
    assert summary["n_spots"].tolist()[:2] == [201, 202]
    assert summary["n_shared_genes"].tolist()[:2] == [51, 52]
    assert summary["affine"].tolist()[:2] == ["landmarks", "auto"]
    assert summary["verdict"].tolist()[:2] == ["check", "good"]
    assert summary["heldout_median_um"].tolist()[:2] == [1.5, 2.5]  # the LDDMM's held-out error, not the affine's
    assert summary["error"].tolist() == ["", "", "RuntimeError: the fit of p3 diverged"]
    assert summary["zarr"].tolist() == [str(out / n / "aligned.zarr") for n in ("p1", "p2", "p3")]
    assert summary["report"].tolist() == [str(out / n / "report") for n in ("p1", "p2", "p3")]
    assert set(summary["worker"]) <= set(thread_client.scheduler_info()["workers"])
    assert (summary["runtime_s"] >= 0).all() and summary.loc[0, "runtime_s"] >= 1.0
    # the table on disk is the one returned
    on_disk = pd.read_csv(out / "summary.csv")
    assert on_disk["name"].tolist() == ["p1", "p2", "p3"] and on_disk["status"].tolist() == ["ok", "ok", "failed"]
    assert on_disk["n_cells"].tolist()[:2] == [1001, 1002] and on_disk["heldout_median_um"].tolist()[:2] == [1.5, 2.5]
    # what each pair's pipeline got
    for n in ("p1", "p2", "p3"):
        c = calls[n]
        assert (c["xenium"], c["visium"]) == (str(tmp_path / "m" / f"x{n[1]}"), str(tmp_path / "m" / f"v{n[1]}"))
        assert (c["out"], c["report"]) == (out / n / "aligned.zarr", out / n / "report")
        assert (c["dx"], c["gene"], c["bin_size"], c["loo"], c["verbose"], c["progress"]) == (
            12.0,
            "ACTB",
            8,
            "affine",
            False,
            False,
        )
    assert (calls["p1"]["landmarks"], calls["p1"]["auto_init"]) == (str(tmp_path / "m" / "l1.csv"), False)
    assert (calls["p2"]["landmarks"], calls["p2"]["auto_init"]) == (None, True)
    st = json.loads((out / "p3" / "status.json").read_text())
    assert st["status"] == "failed" and "RuntimeError: the fit of p3 diverged" in st["traceback"]
    assert json.loads((out / "p1" / "status.json").read_text())["n_cells"] == 1001


def test_force_inputs_and_flip_reach_every_pair_and_the_hint_names_the_batch_flag(thread_client, tmp_path, monkeypatch):
    """A mirrored section in a batch: ``flip`` and ``force_inputs`` reach every pair's pipeline (as ``flip`` and
    ``force``); a pair refused for a suspect input names the batch's --force-inputs, not run's --force (which in a
    batch redoes finished pairs)."""
    from pathlib import Path

    from spatialdata_align import _pipeline

    seen = {}

    def fake(xenium, visium, **kw):
        seen[Path(kw["out"]).parent.name] = kw
        raise ValueError("mirrored. (If you are sure the input is right, --force (Python: force=True) runs anyway.)")

    monkeypatch.setattr(_pipeline, "run_pipeline", fake)
    m = _manifest(tmp_path / "m", THREE[:2])
    summary = sda.batch(m, tmp_path / "o", client=thread_client, verbose=False, progress=False)
    assert {k: (kw.get("force", False), kw.get("flip", False)) for k, kw in seen.items()} == {
        "p1": (False, False),
        "p2": (False, False),
    }
    assert all("--force-inputs (Python: sda.batch(..., force_inputs=True))" in e for e in summary["error"])
    assert not any("--force (Python" in e for e in summary["error"])
    seen.clear()
    sda.batch(m, tmp_path / "o", client=thread_client, verbose=False, progress=False, force_inputs=True, flip=True)
    assert {k: (kw.get("force"), kw.get("flip")) for k, kw in seen.items()} == {"p1": (True, True), "p2": (True, True)}


def test_rerun_skips_only_finished_pairs_with_unchanged_inputs_and_a_store(thread_client, tmp_path, monkeypatch):
    calls = _stand_in(monkeypatch, fail={"p3"})
    m = _manifest(tmp_path / "m", THREE)
    out = tmp_path / "out"
    sda.batch(m, out, client=thread_client, verbose=False, progress=False)
    calls.clear()
    again = sda.batch(m, out, client=thread_client, verbose=False, progress=False)
    assert again["status"].tolist() == ["skipped", "skipped", "failed"] and set(calls) == {"p3"}
    assert again["n_cells"].tolist()[:2] == [1001, 1002] and again["error"].tolist()[:2] == ["", ""]
    # p1 given other landmarks, p2's zarr store gone: both run again (their old status is not trusted)
    rows = [("x1", "v1", "other.csv", "p1"), *THREE[1:]]
    m = _manifest(tmp_path / "m", rows)
    shutil.rmtree(out / "p2" / "aligned.zarr")
    calls.clear()
    third = sda.batch(m, out, client=thread_client, verbose=False, progress=False)
    assert set(calls) == {"p1", "p2", "p3"}
    assert third["status"].tolist() == ["ok", "ok", "failed"]
    assert calls["p1"]["landmarks"] == str(tmp_path / "m" / "other.csv")
    # while a pair runs again its earlier "ok" is gone (a batch killed meanwhile must not skip it next time)
    assert not calls["p1"]["status_file_while_running"] and not calls["p2"]["status_file_while_running"]


def test_a_task_that_dies_is_a_failed_row_and_the_others_finish(thread_client, tmp_path, monkeypatch):
    """A task whose worker dies (here: run_pair itself raises) is a failed row with its status file; not the batch."""
    from spatialdata_align import _batch

    _stand_in(monkeypatch)
    real = _batch.run_pair

    def dying(pair, out_dir, kw):
        if pair["name"] == "p2":
            (tmp_path / "out" / "p2").mkdir(parents=True)
            raise OSError("worker tcp://10.0.0.1:1234 died")
        return real(pair, out_dir, kw)

    monkeypatch.setattr(_batch, "run_pair", dying)
    summary = sda.batch(
        _manifest(tmp_path / "m", THREE), tmp_path / "out", client=thread_client, verbose=False, progress=False
    )
    assert summary["status"].tolist() == ["ok", "failed", "ok"]
    assert summary.loc[1, "error"] == "OSError: worker tcp://10.0.0.1:1234 died"
    assert summary.loc[1, "zarr"] == str(tmp_path / "out" / "p2" / "aligned.zarr")
    st = json.loads((tmp_path / "out" / "p2" / "status.json").read_text())
    assert st["status"] == "failed" and st["error"] == "OSError: worker tcp://10.0.0.1:1234 died"
    assert exit_code(summary) == 0


def test_default_out_dir_is_beside_the_manifest_and_a_file_is_refused(thread_client, tmp_path, monkeypatch):
    _stand_in(monkeypatch)
    m = _manifest(tmp_path / "m", THREE[:1])
    monkeypatch.chdir(tmp_path)  # (not beside the working directory)
    sda.batch(m, client=thread_client, verbose=False, progress=False)
    assert (tmp_path / "m" / "manifest_aligned" / "p1" / "status.json").is_file()
    assert (tmp_path / "m" / "manifest_aligned" / "summary.csv").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists and is not a folder"):
        sda.batch(m, tmp_path / "afile", client=thread_client, verbose=False, progress=False)


def test_manifest_headers_and_names(tmp_path, monkeypatch):
    m = tmp_path / "m.csv"
    m.write_text(" Xenium , VISIUM,Landmarks,NAME\n~/x1, v1 ,,p\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (pair,) = read_manifest(m)
    assert (pair.name, pair.xenium, pair.visium) == ("p", str(tmp_path / "home" / "x1"), str(tmp_path / "v1"))
    for bad in (".", ".."):
        m.write_text(f"xenium,visium,name\nx1,v1,{bad}\n")
        with pytest.raises(ValueError, match=rf"line 2: name '{bad}' cannot be a folder name"):
            read_manifest(m)


def test_a_local_cluster_of_the_asked_size_or_the_given_scheduler_and_closed_after(tmp_path, monkeypatch):
    """Without a client: a LocalCluster of single-threaded worker processes, ``n_workers`` of them (default one per
    pair to run, at most the CPUs), closed afterwards; with ``scheduler=``, a client of that address."""
    import distributed

    _stand_in(monkeypatch)
    real_cluster, real_client = distributed.LocalCluster, distributed.Client
    asked, made = [], []

    def cluster(**kw):  # record what was asked; run it in this process (the stand-in pipeline lives here)
        asked.append(kw)
        made.append(real_cluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None))
        return made[-1]

    monkeypatch.setattr(distributed, "LocalCluster", cluster)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    m = _manifest(tmp_path / "m", THREE)
    sda.batch(m, tmp_path / "o1", n_workers=5, verbose=False, progress=False)
    sda.batch(m, tmp_path / "o2", verbose=False, progress=False)  # 3 pairs, 2 CPUs
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    sda.batch(m, tmp_path / "o3", verbose=False, progress=False)  # 3 pairs
    assert [a["n_workers"] for a in asked] == [5, 2, 3]
    assert all(a["threads_per_worker"] == 1 and a["processes"] is True for a in asked)
    assert all(c.status.name == "closed" for c in made)
    # an existing scheduler: connect to its address, start no cluster
    addresses = []

    def client(address=None, **kw):
        addresses.append(address)
        return real_client(made[-1] if address == "tcp://sched:8786" else address, **kw)

    made.append(real_cluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None))
    monkeypatch.setattr(distributed, "Client", client)
    try:
        summary = sda.batch(m, tmp_path / "o4", scheduler="tcp://sched:8786", verbose=False, progress=False)
    finally:
        made[-1].close()
    assert addresses == ["tcp://sched:8786"] and len(asked) == 3
    assert summary["status"].tolist() == ["ok", "ok", "ok"]
