"""10x feature-barcode matrices (HDF5 or Matrix Market folder) through scanpy, with errors that name the file.

:func:`read_feature_matrix` calls :func:`scanpy.read_10x_h5` / :func:`scanpy.read_10x_mtx` and only adds what they
lack: an error naming the file and what is wrong with it (scanpy raises a bare ``Exception`` or ``KeyError``), and
integer counts (scanpy converts the ``int32`` counts of the file to ``float32``; we restore ``int32``, exact).

Own code is kept for one documented failure only: :func:`scanpy.read_10x_mtx` (1.11) reads a Cell Ranger >= 3
folder only when it is gzipped (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``) and a legacy one only
when it is not (``matrix.mtx``, ``genes.tsv``); folders a user gunzipped (``features.tsv``) or gzipped
(``genes.tsv.gz``) raise ``FileNotFoundError`` there. Those are read here with :func:`scipy.io.mmread`.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import io as spio
from scipy import sparse

from ._files import find_first, missing

__all__ = ["features_of", "read_feature_matrix"]

_MTX_MATRIX = ("matrix.mtx.gz", "matrix.mtx")
_MTX_BARCODES = ("barcodes.tsv.gz", "barcodes.tsv")
_MTX_FEATURES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
#: the two complete sets :func:`scanpy.read_10x_mtx` reads
_SCANPY_MTX_SETS = (
    ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"),
    ("matrix.mtx", "barcodes.tsv", "genes.tsv"),
)


def _int_counts(X) -> sparse.csr_matrix:
    """CSR counts; ``int32`` when every value is integral (10x files hold integers; scanpy hands back float32)."""
    X = sparse.csr_matrix(X)
    data = X.data
    if data.size == 0 or (
        np.all(np.isfinite(data))
        and np.all(data == np.round(data))
        and data.min() >= np.iinfo(np.int32).min
        and data.max() <= np.iinfo(np.int32).max
    ):
        X = sparse.csr_matrix((data.astype(np.int32), X.indices, X.indptr), shape=X.shape)
    else:
        X = X.astype(np.float32)
    X.sort_indices()
    return X


def _finish(adata: ad.AnnData, source: Path) -> ad.AnnData:
    adata.X = _int_counts(adata.X)
    adata.obs_names = adata.obs_names.astype(str)
    if "feature_types" not in adata.var:
        adata.var["feature_types"] = "Gene Expression"
    if "gene_ids" not in adata.var:
        adata.var["gene_ids"] = adata.var_names.astype(str)
    adata.uns["source"] = str(source)
    return adata


def _read_h5(path: Path) -> ad.AnnData:
    import h5py
    import scanpy as sc

    if not path.is_file():
        raise missing(path.parent, "10x feature-barcode matrix", [path.name])
    try:
        with h5py.File(path, "r") as f:
            top = sorted(f)
            attrs = {k: f.attrs[k] for k in f.attrs}
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}).") from None
    if "matrix" not in top and len(top) != 1:
        raise ValueError(f"{path} is not a 10x feature-barcode matrix: no '/matrix' group (top level holds {top}).")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*names are not unique.*")
            adata = sc.read_10x_h5(path, gex_only=False)
    except Exception as e:  # scanpy raises a bare Exception for a missing dataset
        cause = e.__cause__ or e
        raise ValueError(f"{path} is malformed: {e} ({type(cause).__name__}: {cause}).") from None
    lib = attrs.get("library_ids")
    if lib is not None:
        lib = np.atleast_1d(lib)
        if len(lib):
            adata.uns["library_id"] = lib[0].decode() if isinstance(lib[0], bytes) else str(lib[0])
    return _finish(adata, path)


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, compression="infer")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable tab-separated file ({type(e).__name__}: {e}).") from None


def _read_mtx(folder: Path) -> ad.AnnData:
    import scanpy as sc

    found = {}
    for key, cands in (("matrix", _MTX_MATRIX), ("barcodes", _MTX_BARCODES), ("features", _MTX_FEATURES)):
        p = find_first(folder, cands)
        if p is None:
            raise missing(folder, f"10x matrix folder ({key})", cands)
        found[key] = p
    feats = _read_tsv(found["features"])
    legacy = found["features"].name.startswith("genes")
    if feats.shape[1] < 2 or (feats.shape[1] < 3 and not legacy):
        raise ValueError(
            f"{found['features']} has {feats.shape[1]} column(s); expected feature id, name and type, tab-separated."
        )
    names = (found["matrix"].name, found["barcodes"].name, found["features"].name)
    try:
        if names in _SCANPY_MTX_SETS:
            adata = sc.read_10x_mtx(folder, gex_only=False, make_unique=False)
        else:  # see the module docstring: scanpy cannot read these combinations
            adata = _read_mtx_own(found, feats)
    except (ValueError, OSError, EOFError, IndexError, TypeError, KeyError) as e:
        raise ValueError(f"{folder} is not a readable 10x Matrix Market folder ({type(e).__name__}: {e}).") from None
    if adata.n_vars != len(feats):
        raise ValueError(f"{folder}: {found['matrix'].name} has {adata.n_vars} features, {names[2]} {len(feats)}.")
    return _finish(adata, folder)


def _read_mtx_own(found: dict, feats: pd.DataFrame) -> ad.AnnData:
    mpath = found["matrix"]
    opener = gzip.open if mpath.suffix == ".gz" else open
    with opener(mpath, "rb") as fh:
        mat = sparse.csr_matrix(spio.mmread(fh)).T
    barcodes = _read_tsv(found["barcodes"])[0].to_numpy().astype(str)
    if mat.shape != (len(barcodes), len(feats)):
        raise ValueError(
            f"{mpath.name} is {mat.shape[1]} features x {mat.shape[0]} barcodes but {found['barcodes'].name} lists "
            f"{len(barcodes)} barcodes and {found['features'].name} {len(feats)} features"
        )
    var = pd.DataFrame({"gene_ids": feats[0].to_numpy()}, index=pd.Index(feats[1].to_numpy()))
    if feats.shape[1] > 2:
        var["feature_types"] = feats[2].to_numpy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique.*")
        return ad.AnnData(X=mat, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)


def read_feature_matrix(path: str | Path) -> ad.AnnData:
    """Read a 10x feature-barcode matrix (``.h5`` file or Matrix Market folder) with scanpy.

    Parameters
    ----------
    path
        A ``*.h5`` file (Cell Ranger >= 3 or legacy layout) or a folder with ``matrix.mtx(.gz)``,
        ``barcodes.tsv(.gz)`` and ``features.tsv(.gz)`` (or the legacy ``genes.tsv``).

    Returns
    -------
    AnnData (barcodes x features) as scanpy reads it, with integer (``int32``) CSR counts, ``var_names`` = the
    feature names as in the file (not made unique), ``var['gene_ids']`` and ``var['feature_types']``;
    ``uns['source']`` the path read and (HDF5) ``uns['library_id']``.

    Raises
    ------
    FileNotFoundError
        A required file is missing (the message lists what the folder holds).
    ValueError
        A file that is not a 10x matrix or is malformed (named, with the problem).
    """
    path = Path(path)
    if path.is_dir():
        return _read_mtx(path)
    return _read_h5(path)


def features_of(adata: ad.AnnData) -> pd.DataFrame:
    """The 10x feature table (``id``, ``name``, ``feature_type``, ``genome``) of a read_feature_matrix result."""
    out = pd.DataFrame(
        {
            "id": adata.var["gene_ids"].astype(str).to_numpy(),
            "name": adata.var_names.astype(str).to_numpy(),
            "feature_type": adata.var["feature_types"].astype(str).to_numpy(),
        }
    )
    if "genome" in adata.var:
        out["genome"] = adata.var["genome"].astype(str).to_numpy()
    return out
