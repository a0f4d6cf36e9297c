"""The tutorial notebook runs end to end (any cell error fails the suite) and shows sane numbers.

The notebook is executed once per session with nbclient on a kernel started from *this*
interpreter (``sys.executable -m ipykernel_launcher``, through a kernelspec written to a temporary
folder), so it runs in whatever virtual environment runs pytest, with no installed ``python3``
kernelspec needed. A hidden cell appended to the executed copy (never to the file) reports the
tutorial's results as JSON for the assertions below.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "xenium_visium_alignment.ipynb"
KERNEL_NAME = "spatialdata-align-tests"
CELL_TIMEOUT_S = 600  # the LDDMM cell takes ~40 s on 2 busy CPU cores; generous for slow CI runners
RESULTS_TAG = "SDA_NOTEBOOK_RESULTS "

nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read the tutorial (pip install -e '.[test]')")

_RESULTS_CELL = f"""
import json as _json
print({RESULTS_TAG!r} + _json.dumps({{
    "tre": tre.to_dict(orient="index"),
    "round_trip": checks,
    "n_cells": int(sdata["xenium_table"].n_obs),
    "n_spots": int(sdata["visium_table"].n_obs),
    "n_cells_shared": int(shared["xenium_table"].n_obs),
    "n_spots_shared": int(shared["visium_table"].n_obs),
    "n_shared_genes": int(len(comparison)),
    "egfr_pearson": float(comparison.loc[comparison["gene"].str.upper() == "EGFR", "pearson"].iloc[0]),
    "landmark_sets": sorted(sdata.attrs["spatialdata_align"]["landmarks"]),
    "aligned_elements": sorted(k for k in back.shapes.keys() | back.points.keys() if k.endswith("_aligned")),
}}))
"""


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_is_stripped_and_valid():
    """The committed file has no outputs (clean diffs) and declares a python3 kernel."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert len(cells) >= 20
    with_outputs = [c.id for c in cells if c.outputs or c.execution_count is not None]
    assert with_outputs == [], f"strip the outputs of cells {with_outputs} before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    ids = [c.id for c in nb.cells]
    assert len(set(ids)) == len(ids)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed on a kernel of the current interpreter, plus its results and runtime."""
    pytest.importorskip("nbclient", reason="nbclient is needed to execute the tutorial (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to execute the tutorial (pip install -e '.[test]')")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("notebook")
    spec_dir = tmp / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_original = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(_RESULTS_CELL.strip(), id="sda-test-results"))
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the failing cell and traceback) on any error
    runtime = time.perf_counter() - t0
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next((ln for ln in out.splitlines() if ln.startswith(RESULTS_TAG)), None)
    assert line is not None, f"the results cell printed no results: {out!r}"
    results = json.loads(line[len(RESULTS_TAG) :])
    return nb.cells[:n_original], results, runtime


def test_every_cell_runs_and_plots_render(executed):
    cells, _, runtime = executed
    code = _code_cells(nbformat.v4.new_notebook(cells=cells))
    assert all(c.execution_count is not None for c in code)
    errors = [c.id for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    pngs = [c.id for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    # raw data, annotator, landmarks, energy, overlay, spatialdata-plot, overlay+region, total counts, EGFR x2
    assert len(pngs) >= 10, pngs
    print(f"tutorial executed in {runtime:.1f} s")


def test_tutorial_numbers(executed):
    _, r, _ = executed
    # data as generated (2,000 cells; ~200 spots under tissue), both landmark routes stored
    assert r["n_cells"] == 8000
    assert 150 <= r["n_spots"] <= 260
    assert r["landmark_sets"] == ["landmarks", "napari"]
    # the shared region drops the Xenium strip outside the capture area, but keeps most of both
    assert 0.6 * r["n_cells"] < r["n_cells_shared"] < r["n_cells"]
    assert 0.6 * r["n_spots"] < r["n_spots_shared"] <= r["n_spots"]
    assert r["n_shared_genes"] > 100
    # TRE against the truth (µm): a landmark affine is within ~half a spot; LDDMM must not break it
    tre = r["tre"]
    assert set(tre) == {"affine (landmarks)", "affine + LDDMM"}
    assert tre["affine (landmarks)"]["median"] < 20.0
    assert tre["affine + LDDMM"]["median"] <= 10.0
    assert tre["affine + LDDMM"]["median"] < tre["affine (landmarks)"]["median"]
    assert tre["affine + LDDMM"]["95th pct"] < 30.0
    # EGFR follows the tumour nests in both technologies
    assert r["egfr_pearson"] > 0.3
    # transforms survive the zarr round trip exactly, aligned copies come back
    assert r["round_trip"] and max(r["round_trip"].values()) < 1e-9
    assert {"xenium_cells_aligned", "xenium_transcripts_aligned"} <= set(r["aligned_elements"])
