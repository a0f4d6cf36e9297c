"""Readers of 10x feature-barcode matrices (HDF5 and Matrix Market folder) with clear errors.

Both return a :class:`FeatureMatrix`: a ``(n_barcodes, n_features)`` CSR count matrix, the barcodes and a
feature table (``id``, ``name``, ``feature_type``, optional ``genome``), in file order.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import io as spio
from scipy import sparse

from ._files import find_first, missing

__all__ = ["FeatureMatrix", "read_feature_matrix", "read_feature_matrix_h5", "read_feature_matrix_mtx"]

_MTX_MATRIX = ("matrix.mtx.gz", "matrix.mtx")
_MTX_BARCODES = ("barcodes.tsv.gz", "barcodes.tsv")
_MTX_FEATURES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")


@dataclass
class FeatureMatrix:
    """A 10x feature-barcode matrix.

    Attributes
    ----------
    counts
        ``(n_barcodes, n_features)`` CSR matrix; integer (``int32``) when every value is integral.
    barcodes
        Barcodes (cell ids / spot barcodes), ``str``.
    features
        One row per feature: ``id``, ``name``, ``feature_type`` (and ``genome`` when the file has it), ``str``.
    source
        The file or folder read.
    attrs
        HDF5 file attributes (decoded), empty for Matrix Market folders.
    """

    counts: sparse.csr_matrix
    barcodes: np.ndarray
    features: pd.DataFrame
    source: Path
    attrs: dict = field(default_factory=dict)


def _decode(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind == "S" or arr.dtype == object:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.ravel()], dtype=object)
    return arr.astype(str).astype(object)


def _as_count_matrix(mat: sparse.spmatrix) -> sparse.csr_matrix:
    mat = sparse.csr_matrix(mat)
    data = mat.data
    if data.size == 0 or (np.all(np.isfinite(data)) and np.all(data == np.round(data))):
        if data.size == 0 or (data.min() >= np.iinfo(np.int32).min and data.max() <= np.iinfo(np.int32).max):
            mat = sparse.csr_matrix((data.astype(np.int32), mat.indices, mat.indptr), shape=mat.shape)
    else:
        mat = mat.astype(np.float32)
    mat.sort_indices()
    return mat


def read_feature_matrix_h5(path: str | Path) -> FeatureMatrix:
    """Read a 10x feature-barcode HDF5 file (Cell Ranger >= 3 layout, or the legacy per-genome layout).

    Parameters
    ----------
    path
        The ``.h5`` file.

    Returns
    -------
    :class:`FeatureMatrix`

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not HDF5, lacks a required dataset, or its arrays are inconsistent.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise missing(path.parent, "10x feature-barcode matrix", [path.name])
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}).") from None
    with f:
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        if "matrix" in f:
            grp = f["matrix"]
            need = ["barcodes", "data", "indices", "indptr", "shape", "features"]
            _require(grp, need, path, "/matrix")
            feats = grp["features"]
            _require(feats, ["id", "name"], path, "/matrix/features")
            ids = _decode(feats["id"][()])
            names = _decode(feats["name"][()])
            types = (
                _decode(feats["feature_type"][()])
                if "feature_type" in feats
                else np.full(len(ids), "Gene Expression", dtype=object)
            )
            features = pd.DataFrame({"id": ids, "name": names, "feature_type": types})
            if "genome" in feats:
                features["genome"] = _decode(feats["genome"][()])
        else:
            groups = [k for k in f if isinstance(f[k], h5py.Group)]
            if len(groups) != 1 or "genes" not in f[groups[0]]:
                raise ValueError(
                    f"{path} is not a 10x feature-barcode matrix: no '/matrix' group (top level holds {sorted(f)})."
                )
            grp = f[groups[0]]  # legacy (Cell Ranger 2) layout: one group per genome
            _require(grp, ["barcodes", "data", "indices", "indptr", "shape", "genes", "gene_names"], path, groups[0])
            ids = _decode(grp["genes"][()])
            features = pd.DataFrame(
                {"id": ids, "name": _decode(grp["gene_names"][()]), "feature_type": "Gene Expression"}
            )
            features["genome"] = groups[0]
        barcodes = _decode(grp["barcodes"][()])
        data = grp["data"][()]
        indices = grp["indices"][()]
        indptr = grp["indptr"][()]
        shape = tuple(int(s) for s in np.asarray(grp["shape"][()]).ravel())
    if len(shape) != 2:
        raise ValueError(f"{path}: 'shape' must hold 2 values (features, barcodes), found {shape}.")
    n_features, n_barcodes = shape
    problems = []
    if len(barcodes) != n_barcodes:
        problems.append(f"{len(barcodes)} barcodes but shape says {n_barcodes}")
    if len(features) != n_features:
        problems.append(f"{len(features)} features but shape says {n_features}")
    if len(indptr) != n_barcodes + 1:
        problems.append(f"indptr has {len(indptr)} entries, expected {n_barcodes + 1}")
    elif indptr[-1] != len(data) or len(indices) != len(data):
        problems.append(f"data/indices/indptr lengths disagree ({len(data)}, {len(indices)}, last indptr {indptr[-1]})")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_features):
        problems.append("feature indices out of range")
    if problems:
        raise ValueError(f"{path} is malformed: " + "; ".join(problems) + ".")
    # CSC of (features x barcodes) == CSR of (barcodes x features)
    counts = sparse.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    return FeatureMatrix(_as_count_matrix(counts), barcodes.astype(str), features.astype(str), path, attrs)


def _attr(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray):
        return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else x.item() for x in v.ravel()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _require(group, names, path: Path, where: str) -> None:
    lacking = [n for n in names if n not in group]
    if lacking:
        raise ValueError(f"{path} is malformed: {where} lacks {lacking} (it holds {sorted(group)}).")


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, compression="infer")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable tab-separated file ({type(e).__name__}: {e}).") from None


def read_feature_matrix_mtx(folder: str | Path) -> FeatureMatrix:
    """Read a 10x Matrix Market folder (``matrix.mtx.gz``, ``barcodes.tsv.gz``, ``features.tsv.gz``).

    Uncompressed files and the legacy ``genes.tsv`` are accepted too.

    Parameters
    ----------
    folder
        The folder (e.g. ``filtered_feature_bc_matrix/`` or ``cell_feature_matrix/``).

    Returns
    -------
    :class:`FeatureMatrix`

    Raises
    ------
    FileNotFoundError
        A required file is missing (the message lists what the folder holds).
    ValueError
        A file is malformed or the three files disagree on the dimensions.
    """
    folder = Path(folder)
    found = {}
    for key, cands in (("matrix", _MTX_MATRIX), ("barcodes", _MTX_BARCODES), ("features", _MTX_FEATURES)):
        p = find_first(folder, cands)
        if p is None:
            raise missing(folder, f"10x matrix folder ({key})", cands)
        found[key] = p
    mpath = found["matrix"]
    try:
        opener = gzip.open if mpath.suffix == ".gz" else open
        with opener(mpath, "rb") as fh:
            mat = spio.mmread(fh)
    except (ValueError, OSError, EOFError, IndexError, TypeError) as e:
        raise ValueError(f"{mpath} is not a readable Matrix Market file ({type(e).__name__}: {e}).") from None
    if not sparse.issparse(mat):
        mat = sparse.csr_matrix(mat)
    barcodes = _read_tsv(found["barcodes"])
    feats = _read_tsv(found["features"])
    if feats.shape[1] < 2:
        raise ValueError(
            f"{found['features']} has {feats.shape[1]} column(s); expected feature id, name (and type), tab-separated."
        )
    n_features, n_barcodes = mat.shape
    if len(barcodes) != n_barcodes or len(feats) != n_features:
        raise ValueError(
            f"{folder}: {mpath.name} is {n_features} features x {n_barcodes} barcodes but {found['barcodes'].name} "
            f"lists {len(barcodes)} barcodes and {found['features'].name} {len(feats)} features."
        )
    features = pd.DataFrame(
        {
            "id": feats[0].to_numpy(),
            "name": feats[1].to_numpy(),
            "feature_type": feats[2].to_numpy() if feats.shape[1] > 2 else "Gene Expression",
        }
    )
    counts = _as_count_matrix(sparse.csr_matrix(mat.T))
    return FeatureMatrix(counts, barcodes[0].to_numpy().astype(str), features.astype(str), folder, {})


def read_feature_matrix(path: str | Path) -> FeatureMatrix:
    """Read a 10x feature-barcode matrix: an ``.h5`` file or a Matrix Market folder."""
    path = Path(path)
    if path.is_dir():
        return read_feature_matrix_mtx(path)
    return read_feature_matrix_h5(path)
