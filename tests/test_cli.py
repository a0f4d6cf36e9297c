"""The ``spatialdata-align`` console script: ``run`` reproduces the Python API, bad inputs give clear errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import spatialdata

import spatialdata_align as sda
from spatialdata_align._constants import VISIUM_CS, VISIUM_HIRES, XENIUM_CELLS, XENIUM_CS
from spatialdata_align._elements import element_xy
from spatialdata_align.cli import main


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return sda.datasets.twin_sections(tmp_path_factory.mktemp("cli"), n_cells=8000, n_spots=300, seed=2)


def _run_args(twin, out, *extra, visium=None):
    """``spatialdata-align run`` arguments for the twin folders (landmarks and flags in ``extra``)."""
    folders = ["--xenium", str(twin.xenium_path), "--visium", str(visium or twin.visium_path)]
    return ["run", *folders, "--out", str(out), *extra]


def test_run_reproduces_the_python_api(twin, tmp_path, capsys):
    out, report = tmp_path / "aligned.zarr", tmp_path / "report"
    # (--loo affine: the LDDMM refits of the held-out error are tested in test_report.py)
    args = ("--landmarks", str(twin.landmarks_path), "--report", str(report), "--quiet", "--loo", "affine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(_run_args(twin, out, *args))
    assert rc == 0
    # the last line says the held-out error is the affine's when the LDDMM was not refitted (--loo affine)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "held-out landmark error of the affine alone" in last, last
    # --quiet: not zarr's notice for every array written (208 lines on stderr)
    assert not [w for w in caught if "autosharding" in str(w.message)]
    # the same calls through the Python API
    sdata = sda.io.read_pair(twin.xenium_path, twin.visium_path)
    lm = pd.read_csv(twin.landmarks_path)
    sdata.align.set_landmarks(
        source=lm[["source_x", "source_y"]].to_numpy(), target=lm[["target_x", "target_y"]].to_numpy()
    )
    sdata.align.affine(XENIUM_CELLS, VISIUM_HIRES)
    sdata.align.lddmm(XENIUM_CELLS, VISIUM_HIRES, progress=False)
    sdata.align.apply(XENIUM_CELLS)
    back = spatialdata.read_zarr(out)
    np.testing.assert_allclose(
        element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS),
        element_xy(sdata, f"{XENIUM_CELLS}_aligned", VISIUM_CS),
        atol=1e-6,
    )
    # and it is a good alignment: the truth agrees to a few µm
    cells = element_xy(back, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS) - twin.truth.forward(cells), axis=1)
    assert np.median(err * twin.truth.um_per_px) < 10.0
    # the report folder
    names = {p.name for p in report.iterdir()}
    assert {"overlay.png", "energy.png", "EGFR_side_by_side.png", "gene_correlations.csv", "summary.md"} <= names
    # the alignment in Xenium Explorer's formats: its affine part and the landmarks, exactly
    pixel_size = back.tables["xenium_table"].uns["xenium"]["pixel_size"]
    explorer = sda.io.read_explorer_alignment(report / "xenium_explorer_alignment.csv", pixel_size=pixel_size)
    np.testing.assert_allclose(explorer, back.align.get("xenium_to_visium_lddmm").affine, rtol=1e-12, atol=1e-9)
    kp_src, kp_dst, _ = sda.io.read_explorer_keypoints(report / "xenium_explorer_keypoints.csv")
    np.testing.assert_allclose(kp_src, lm[["source_x", "source_y"]].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(kp_dst, lm[["target_x", "target_y"]].to_numpy(), rtol=1e-12)
    assert all((report / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_cells"] == 8000 and summary["n_shared_genes"] > 50
    assert summary["gene"] == "EGFR"  # the default: EGFR, measured by both
    # a dense section: the engine's own stopping rule (see test_accuracy_estimate_refits_a_fit_that_found_a_cut)
    lsum = summary["lddmm"]
    assert lsum["sparse_optimisation"] is False and lsum["cells_per_mm2"] > 1500, lsum
    assert summary["lddmm"]["tol"] == 0.02
    assert set(summary["time_per_stage_s"]) >= {"LDDMM", "read Xenium + Visium", f"write {out}", f"report {report}"}
    corr = pd.read_csv(report / "gene_correlations.csv")
    assert corr.set_index("gene").loc["EGFR", "pearson"] > 0.3


def test_run_with_automatic_initialisation(twin, tmp_path, monkeypatch):
    """No landmarks: the automatic affine search, then LDDMM, still lands within a few µm of the truth.

    The search's margin and expression agreement are in the summary, and an ambiguous search (its margin lowered
    here) is one of the verdict's reasons.
    """
    import dataclasses

    from spatialdata_align import _accessor
    from spatialdata_align._pipeline import run_pipeline

    real = _accessor.auto_init
    monkeypatch.setattr(_accessor, "auto_init", lambda *a, **k: dataclasses.replace(real(*a, **k), margin=0.05))
    res = run_pipeline(twin.xenium_path, twin.visium_path, auto_init=True, verbose=False, progress=False)
    assert res.summary["affine"]["method"] == "auto"
    assert res.summary["affine"]["margin"] == 0.05 and res.summary["affine"]["expression_r"] > 0.5
    assert any("initialisation is ambiguous" in r for r in res.summary["verdict"]["reasons"])
    sd = res.sdata
    cells = element_xy(sd, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(sd, f"{XENIUM_CELLS}_aligned", VISIUM_CS) - twin.truth.forward(cells), axis=1)
    assert np.median(err * twin.truth.um_per_px) < 10.0


def test_run_on_a_folder_with_the_lowres_image_only(twin, tmp_path, capsys):
    """A real Space Ranger 3 CytAssist download has only the lowres image: read with defaults, run completes."""
    outs = shutil.copytree(twin.visium_path, tmp_path / "outs")
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    out = tmp_path / "aligned.zarr"
    with pytest.warns(UserWarning, match="tissue_hires_image.png not found"):
        args = _run_args(twin, out, "--landmarks", str(twin.landmarks_path), "--dx", "30", visium=outs)
        args += ["--loo", "affine"]  # (the LDDMM refits are tested in test_report.py)
        rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # the stage counter counts the stages run: nine and the write (it ended at [10/11])
    counters = re.findall(r"^\[(\d+)/(\d+)\] .* done", captured.out, flags=re.M)
    assert counters[-1] == ("10", "10") and len(counters) == 10, counters
    back = spatialdata.read_zarr(out)
    assert "visium_hires_image" not in back.images and "visium_lowres_image" in back.images
    assert back.align.transforms.loc["xenium_to_visium_lddmm", "target_element"] == "visium_lowres_image"
    cells = element_xy(back, XENIUM_CELLS, XENIUM_CS)
    err = np.linalg.norm(element_xy(back, f"{XENIUM_CELLS}_aligned", VISIUM_CS) - twin.truth.forward(cells), axis=1)
    assert np.median(err * twin.truth.um_per_px) < 12.0


def test_run_with_stalign_style_npy_landmarks(twin, tmp_path):
    names = [f"p{i}" for i in range(4)]
    src = {n: [list(p)] for n, p in zip(names, twin.truth.landmarks_source[:4], strict=True)}
    dst = {n: [list(p)] for n, p in zip(names, twin.truth.landmarks_target[:4], strict=True)}
    np.save(tmp_path / "src.npy", src, allow_pickle=True)
    np.save(tmp_path / "dst.npy", dst, allow_pickle=True)
    from spatialdata_align._landmark_files import read_landmarks

    s, d, n = read_landmarks(tmp_path / "src.npy", tmp_path / "dst.npy")
    np.testing.assert_allclose(s, twin.truth.landmarks_source[:4])
    np.testing.assert_allclose(d, twin.truth.landmarks_target[:4])
    assert n == names


def test_bad_inputs_give_clear_errors(twin, tmp_path, capsys):
    base = _run_args(twin, tmp_path / "o.zarr")
    assert main(base) == 2
    assert "--landmarks" in capsys.readouterr().err
    # landmarks and --auto-init together: a clear error, not a silently ignored flag
    assert main([*base, "--landmarks", str(twin.landmarks_path), "--auto-init"]) == 2
    err = capsys.readouterr().err
    assert "--auto-init and --landmarks exclude each other" in err
    assert "error together with --landmarks" in " ".join(_help_text("run", capsys).split())
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main([*base, "--landmarks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "source_x" in err
    assert main([*base, "--landmarks", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    # a Visium folder without its scale factors: the file is named
    broken = tmp_path / "outs"
    shutil.copytree(twin.visium_path, broken)
    (broken / "spatial" / "scalefactors_json.json").unlink()
    assert main(_run_args(twin, tmp_path / "o2.zarr", "--auto-init", visium=broken)) == 2
    assert "scalefactors_json.json" in capsys.readouterr().err
    # --out pointing at something that is not a zarr store is never deleted
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    rc = main(_run_args(twin, precious, "--landmarks", str(twin.landmarks_path), "--quiet"))
    assert rc == 2 and (precious / "keep.txt").exists()


def test_a_gene_not_measured_by_both_is_an_input_error_before_the_alignment(twin, tmp_path, capsys, monkeypatch):
    """``--gene`` with a typo (or a gene of one panel only): exit 2 naming it and the shared genes, before the
    LDDMM, not a report that silently lacks the gene's plots. Case does not matter."""
    from spatialdata_align import _accessor
    from spatialdata_align._pipeline import _checked_gene

    monkeypatch.setattr(_accessor, "lddmm", lambda *a, **k: pytest.fail("the alignment ran"))
    lm = ["--landmarks", str(twin.landmarks_path), "--quiet"]
    assert main(_run_args(twin, tmp_path / "g.zarr", *lm, "--gene", "NOTAGENE")) == 2
    err = capsys.readouterr().err
    assert "--gene NOTAGENE" in err and "in neither table" in err and "shared genes" in err, err
    assert not (tmp_path / "g.zarr").exists()
    sdata = sda.io.read_pair(twin.xenium_path, twin.visium_path)
    assert _checked_gene(sdata, "egfr", "visium_table") == "EGFR"
    only_xenium = sorted(set(sdata.tables["xenium_table"].var_names) - set(sdata.tables["visium_table"].var_names))
    if only_xenium:  # a gene of the Xenium panel the Visium table lacks
        with pytest.raises(ValueError, match="only in Xenium"):
            _checked_gene(sdata, only_xenium[0], "visium_table")


def test_a_raster_too_coarse_for_the_section_is_an_input_error(twin, tmp_path, capsys, monkeypatch):
    """``--dx`` so coarse that the cells span a few raster pixels (the LDDMM diverged at its first level and the run
    ended with the affine alone): exit 2 before the alignment, with a pixel size that works."""
    from spatialdata_align import _accessor

    monkeypatch.setattr(_accessor, "lddmm", lambda *a, **k: pytest.fail("the alignment ran"))
    lm = ["--landmarks", str(twin.landmarks_path), "--quiet"]
    assert main(_run_args(twin, tmp_path / "c.zarr", *lm, "--dx", "400")) == 2
    err = capsys.readouterr().err
    assert "--dx 400 µm is too coarse" in err and "raster pixels" in err, err
    for bad in ("0", "-5", "nan"):
        assert main(_run_args(twin, tmp_path / "c.zarr", *lm, "--dx", bad)) == 2
        assert "--dx must be a positive pixel size" in capsys.readouterr().err


def test_an_unusable_device_is_an_input_error_before_reading(twin, tmp_path, capsys, monkeypatch):
    """``--device`` that torch cannot parse or this build cannot use: exit 2 naming the device, before the folders
    are read (the reader is never called), not a traceback after the affine."""
    import torch

    from spatialdata_align import io

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only build, whatever the machine
    monkeypatch.setattr(io, "read_pair", lambda *a, **k: pytest.fail("the folders were read"))
    lm = ["--landmarks", str(twin.landmarks_path), "--quiet"]
    for device, says in (("cuda", "sees no CUDA GPU"), ("tpu", "is not a torch device"), ("meta", "'cpu', 'cuda'")):
        assert main(_run_args(twin, tmp_path / f"{device}.zarr", *lm, "--device", device)) == 2
        err = capsys.readouterr().err
        assert f"device {device!r}" in err and says in err, err
        assert not (tmp_path / f"{device}.zarr").exists()


def _help_text(command: str, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("spatialdata-align") or f"{sys.executable} -m spatialdata_align.cli"
    res = subprocess.run([*exe.split(), "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0
    assert "run" in res.stdout and "demo" in res.stdout


# ------------------------------------------------------------------ flags reach the pipeline (no alignment run)
def _record_calls(monkeypatch, verdict="good"):
    """Replace the pipeline's entry points by recorders: each call's positional and keyword arguments."""
    from types import SimpleNamespace

    from spatialdata_align import _pipeline

    calls = []

    def fake(name):
        def f(*args, **kwargs):
            calls.append((name, args, kwargs))
            summary = {"n_cells": 1, "n_spots": 1, "n_shared_genes": 1, "verdict": {"level": verdict, "reasons": []}}
            return SimpleNamespace(summary=summary, verdict=verdict)

        return f

    monkeypatch.setattr(_pipeline, "run_pipeline", fake("run"))
    monkeypatch.setattr(_pipeline, "run_demo", fake("demo"))
    return calls


def test_run_passes_every_flag_to_run_pipeline(monkeypatch, tmp_path):
    """Each ``run`` flag, at a non-default value, arrives at ``run_pipeline`` as the argument it names.

    (Replacing any of them by its default in ``cli.main``, e.g. ``landmarks_target=None`` or ``dx=20.0``, passed
    every test: the runs above use the default of most flags.)
    """
    calls = _record_calls(monkeypatch)
    x, v, lm, lt = tmp_path / "xen", tmp_path / "vis", tmp_path / "src.npy", tmp_path / "dst.npy"
    out, report = tmp_path / "o.zarr", tmp_path / "rep"
    argv = ["run", "--xenium", str(x), "--visium", str(v), "--out", str(out), "--report", str(report)]
    argv += ["--landmarks", str(lm), "--landmarks-target", str(lt), "--landmark-units", "hires", "--allow-flip"]
    argv += ["--dx", "12.5", "--gene", "ACTB", "--bin-size", "8", "--device", "cuda:1", "--force", "--loo", "none"]
    assert main([*argv, "--quiet"]) == 0
    ((name, args, kw),) = calls
    assert name == "run" and args == (x, v)
    assert kw == {
        "landmarks": lm,
        "landmarks_target": lt,
        "landmark_units": "hires",
        "auto_init": False,
        "out": out,
        "report": report,
        "flip": True,
        "dx": 12.5,
        "gene": "ACTB",
        "verbose": False,
        "progress": False,
        "lddmm_params": {"device": "cuda:1"},
        "force": True,
        "loo": "none",
        "bin_size": 8,
    }
    # --auto-init, and without --quiet: stage messages and progress bars
    calls.clear()
    argv = ["run", "--xenium", str(x), "--visium", str(v), "--out", str(out), "--auto-init"]
    assert main(argv) == 0
    kw = calls[0][2]
    assert kw["auto_init"] is True and kw["landmarks"] is None and kw["report"] is None
    assert kw["verbose"] is True and kw["progress"] is True


def test_cli_defaults_are_the_api_defaults(monkeypatch, tmp_path):
    """A flag left out means what leaving the argument out of the Python call means (and the documented value)."""
    import inspect

    from spatialdata_align._pipeline import run_pipeline

    api = {k: p.default for k, p in inspect.signature(run_pipeline).parameters.items()}
    calls = _record_calls(monkeypatch)
    argv = ["run", "--xenium", "x", "--visium", "v", "--out", "o.zarr", "--landmarks", "l.csv", "--quiet"]
    assert main(argv) == 0
    kw = calls[0][2]
    for k in ("landmarks_target", "landmark_units", "report", "dx", "gene", "flip", "force", "loo", "bin_size"):
        assert kw[k] == api[k], k
    want = (20.0, None, "lddmm", 16, "fullres")
    assert (kw["dx"], kw["gene"], kw["loo"], kw["bin_size"], kw["landmark_units"]) == want
    assert kw["lddmm_params"] == {"device": "cpu"}


def test_demo_with_bad_sizes_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-cells", "0", "--quiet"]) == 2
    assert "n_cells must be >= 50" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # an existing folder stays
    assert main(["demo", "--out", str(out), "--n-cells", "0", "--quiet"]) == 2 and out.is_dir()


def test_demo_passes_its_flags_to_run_demo(monkeypatch, tmp_path):
    calls = _record_calls(monkeypatch)
    argv = ["demo", "--out", str(tmp_path), "--n-cells", "1234", "--n-spots", "77", "--seed", "5", "--auto-init"]
    argv += ["--visium-hd", "--bin-size", "8", "--dx", "30", "--gene", "ACTB", "--loo", "affine", "--quiet"]
    assert main(argv) == 0
    ((name, args, kw),) = calls
    assert name == "demo" and args == (tmp_path,)
    assert (kw["n_cells"], kw["n_spots"], kw["seed"], kw["auto_init"], kw["visium_hd"]) == (1234, 77, 5, True, True)
    assert (kw["bin_size"], kw["dx"], kw["gene"], kw["loo"]) == (8, 30.0, "ACTB", "affine")
    calls.clear()
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    kw = calls[0][2]
    assert (kw["n_cells"], kw["n_spots"], kw["seed"], kw["auto_init"], kw["visium_hd"]) == (20000, 500, 0, False, False)


def test_unreliable_verdict_exits_3_unless_forced(monkeypatch, tmp_path, capsys):
    _record_calls(monkeypatch, verdict="unreliable")
    argv = ["run", "--xenium", "x", "--visium", "v", "--out", "o.zarr", "--auto-init", "--quiet"]
    assert main(argv) == 3
    assert "Exit status 3; rerun with --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_batch_passes_its_flags_to_sda_batch(monkeypatch, tmp_path):
    """Every ``batch`` flag reaches ``sda.batch`` (``--bin-size`` was accepted and silently dropped)."""
    seen = []
    monkeypatch.setattr(
        "spatialdata_align._batch.batch", lambda *a, **kw: seen.append((a, kw)) or pd.DataFrame({"status": ["ok"]})
    )
    m, o = tmp_path / "m.csv", tmp_path / "out"
    argv = ["batch", str(m), "--out-dir", str(o), "--scheduler", "tcp://h:8786", "--workers", "3", "--force"]
    argv += ["--dx", "15", "--gene", "ACTB", "--bin-size", "8", "--device", "cuda", "--loo", "affine", "--quiet"]
    argv += ["--force-inputs", "--allow-flip", "--landmark-units", "hires"]
    assert main(argv) == 0
    ((args, kw),) = seen
    assert args == (m, o)
    assert kw == {
        "scheduler": "tcp://h:8786",
        "n_workers": 3,
        "force": True,
        "verbose": False,
        "progress": False,
        "dx": 15.0,
        "gene": "ACTB",
        "lddmm_params": {"device": "cuda"},
        "loo": "affine",
        "bin_size": 8,
        "force_inputs": True,
        "flip": True,
        "landmark_units": "hires",
    }
    seen.clear()
    assert main(["batch", str(m), "--out-dir", str(o)]) == 0
    kw = seen[0][1]
    assert (kw["scheduler"], kw["n_workers"], kw["force"], kw["verbose"]) == (None, None, False, True)
    assert (kw["force_inputs"], kw["flip"], kw["landmark_units"]) == (False, False, "fullres")
    want = (20.0, None, "lddmm", 16, {"device": "cpu"})
    assert (kw["dx"], kw["gene"], kw["loo"], kw["bin_size"], kw["lddmm_params"]) == want


def test_import_is_light_and_registers_the_accessor():
    """``import spatialdata_align`` registers ``sdata.align`` without importing torch, matplotlib or scanpy (they
    come with the subpackages, on first use), so ``--help`` and input errors are quick; the accessor and the
    subpackages still resolve."""
    code = (
        "import sys, spatialdata_align as sda, spatialdata as sd\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'scanpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sd.SpatialData.align.__name__, sda.tl.__name__, sda.write_zarr.__name__, sda.batch.__name__)\n"
        "assert 'torch' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AlignAccessor", "spatialdata_align.tl", "write_zarr", "batch"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sda.nothing  # noqa: B018
