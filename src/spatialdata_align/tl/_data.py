"""Reading the two modalities out of a SpatialData object for the tools and plots.

One place for: where the aligned Xenium cells are (``xenium_cells_aligned`` first, else
``xenium_cells`` through its native transformation into ``visium``), where the Visium spots are,
which table row belongs to which geometry, the Visium µm-per-pixel factor, shared-gene matching and
library-size normalisation.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from spatialdata import SpatialData, match_element_to_table
from spatialdata.models import TableModel, get_table_keys
from spatialdata.transformations import get_transformation

from .._constants import (
    ALIGNED_SUFFIX,
    UNS_VISIUM_KEY,
    VISIUM_CS,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOTS,
    VISIUM_TABLE,
    XENIUM_CELLS,
    XENIUM_CONTROL_PREFIXES,
    XENIUM_TABLE,
)
from .._elements import annotating_tables, apply_affine, shapes_xy, to_cs_matrix

_XY = ("x", "y")


@dataclass
class Modality:
    """Positions and counts of one modality, row-aligned with its table.

    Attributes
    ----------
    element
        Name of the shapes element holding the geometries.
    table_name
        Name of the table annotating it.
    table
        The table (not a copy: never modify it).
    xy
        ``(n_obs, 2)`` positions in coordinate system ``cs``, row ``i`` = table row ``i``.
    cs
        Coordinate system of ``xy``.
    radius
        ``(n_obs,)`` circle radius in ``cs`` units, or ``None`` for non-circle shapes.
    """

    element: str
    table_name: str
    table: ad.AnnData
    xy: np.ndarray
    cs: str
    radius: np.ndarray | None


def _names(sdata: SpatialData) -> list[str]:
    return sorted(name for _, name, _ in sdata.gen_elements())


def _table_for(sdata: SpatialData, element: str, preferred: str | None) -> str:
    tables = annotating_tables(sdata, element)
    if preferred is not None and preferred in tables:
        return preferred
    if not tables:
        raise ValueError(
            f"no table annotates {element!r}; tables present: {sorted(sdata.tables)} "
            f"(each table names the element it annotates in uns['{TableModel.ATTRS_KEY}'])."
        )
    return tables[0]


def modality(sdata: SpatialData, element: str, table_name: str | None, cs: str) -> Modality:
    """Positions of ``element`` in ``cs`` ordered like the rows of the table annotating it."""
    if element not in sdata.shapes:
        raise KeyError(f"no shapes element {element!r}; shapes present: {sorted(sdata.shapes)}.")
    table_name = _table_for(sdata, element, table_name)
    table = sdata.tables[table_name]
    gdf = sdata.shapes[element]
    m = to_cs_matrix(gdf, cs, element)
    _, region_key, instance_key = get_table_keys(table)
    obs = table.obs
    if region_key in obs and (obs[region_key].astype(str) != element).any():
        raise ValueError(
            f"table {table_name!r} annotates several elements; the tools need one table per element "
            f"(rows for {element!r}: {(obs[region_key].astype(str) == element).sum()} of {table.n_obs})."
        )
    # the geometries in the order of the table's rows (spatialdata's table <-> element join)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        matched, _ = match_element_to_table(sdata, element, table_name)
    gdf = matched[element]
    if len(gdf) != table.n_obs:
        missing = np.setdiff1d(obs[instance_key].to_numpy(), sdata.shapes[element].index.to_numpy())[:5].tolist()
        raise ValueError(
            f"{table.n_obs - len(gdf)} rows of table {table_name!r} have no geometry in {element!r} "
            f"(e.g. {instance_key} {missing})."
        )
    xy = apply_affine(m, shapes_xy(gdf))
    radius = None
    if "radius" in gdf.columns:
        scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        radius = gdf["radius"].to_numpy(dtype=np.float64) * scale
    return Modality(element=element, table_name=table_name, table=table, xy=xy, cs=cs, radius=radius)


def in_cs(element, cs: str) -> bool:
    """Whether an element is mapped to coordinate system ``cs``."""
    return cs in get_transformation(element, get_all=True)


def xenium(sdata: SpatialData, cs: str = VISIUM_CS, element: str | None = None) -> Modality:
    """The aligned Xenium cells in ``cs`` (default ``visium``: full-resolution pixels).

    Prefers ``xenium_cells_aligned`` / ``xenium_table_aligned`` (written by ``sdata.align.apply``);
    otherwise ``xenium_cells`` through its native (affine) transformation into ``cs``.
    """
    aligned = f"{XENIUM_CELLS}{ALIGNED_SUFFIX}"
    if element is not None:
        candidates = [element]
    else:
        candidates = [aligned, XENIUM_CELLS]
    for name in candidates:
        if name in sdata.shapes and in_cs(sdata.shapes[name], cs):
            preferred = f"{XENIUM_TABLE}{ALIGNED_SUFFIX}" if name == aligned else XENIUM_TABLE
            return modality(sdata, name, preferred, cs)
    if element is not None and element not in sdata.shapes:
        raise KeyError(f"no shapes element {element!r}; shapes present: {sorted(sdata.shapes)}.")
    raise ValueError(
        f"no aligned Xenium cells in coordinate system {cs!r}: looked for {aligned!r} and {XENIUM_CELLS!r} mapped "
        f"to {cs!r} (elements present: {_names(sdata)}). Align first: sdata.align.affine(...) registers an affine "
        f"into {cs!r}; sdata.align.lddmm(...) then sdata.align.apply({XENIUM_CELLS!r}) writes {aligned!r}."
    )


def visium(sdata: SpatialData, cs: str = VISIUM_CS) -> Modality:
    """The Visium spots (``visium_spots`` / ``visium_table``) in ``cs``."""
    if VISIUM_SPOTS not in sdata.shapes:
        from ._bins import hd_bin_sizes  # (here: _bins imports this module)

        hd = hd_bin_sizes(sdata)
        if hd:  # a Visium HD object: bins, no spots
            raise ValueError(
                f"no Visium spots: this is a Visium HD object (bins of {hd} µm). This function works on Visium "
                "spots; for Visium HD use sda.tl.bin_cells and sda.tl.compare_bins (genes at one bin size), "
                "sda.pl.bins_gene (a gene side by side) and sda.pl.overlay(sdata) (cells over the H&E)."
            )
        raise ValueError(
            f"no Visium spots: {VISIUM_SPOTS!r} is not a shapes element here (shapes present: "
            f"{sorted(sdata.shapes)}). Read the Visium folder with sda.io.read_visium / read_pair."
        )
    return modality(sdata, VISIUM_SPOTS, VISIUM_TABLE, cs)


def in_tissue(vis: Modality) -> np.ndarray:
    """Boolean in-tissue flag per Visium table row (all ``True`` when ``obs['in_tissue']`` is absent)."""
    obs = vis.table.obs
    if "in_tissue" not in obs:
        return np.ones(vis.table.n_obs, dtype=bool)
    return obs["in_tissue"].to_numpy().astype(bool)


def um_per_px(sdata: SpatialData, vis: Modality | None = None) -> float:
    """µm per full-resolution pixel of the Visium image.

    Read from ``visium_table.uns["visium"]["um_per_px"]``, else from the spot diameter
    (``scalefactors["spot_diameter_fullres"]`` or the spot radius: a spot is 55 µm across).
    """
    table = sdata.tables.get(VISIUM_TABLE)
    info = table.uns.get(UNS_VISIUM_KEY, {}) if table is not None else {}
    if isinstance(info, dict):
        if info.get("um_per_px"):
            return float(info["um_per_px"])
        sf = info.get("scalefactors", info)
        if isinstance(sf, dict) and sf.get("spot_diameter_fullres"):
            return VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
    vis = vis or visium(sdata)
    if vis.radius is not None and len(vis.radius):
        return VISIUM_SPOT_DIAMETER_UM / (2.0 * float(np.median(vis.radius)))
    raise ValueError(
        f"cannot tell the µm-per-pixel factor: {VISIUM_TABLE!r} has no uns[{UNS_VISIUM_KEY!r}]['um_per_px'] "
        f"and {VISIUM_SPOTS!r} has no radius column."
    )


# ------------------------------------------------------------------------------------------- genes
_SUFFIX = re.compile(r"^(.*)-(\d+)$")


def is_control(name: str) -> bool:
    """Whether a Xenium feature name is a control probe / blank or unassigned codeword."""
    return any(str(name).startswith(p) for p in XENIUM_CONTROL_PREFIXES)


def gene_symbols(table: ad.AnnData) -> pd.Series:
    """Gene symbol of every variable of a table (index: var_names).

    Uses ``var["gene_symbols"]`` when present. Otherwise the var_names, with the ``-<n>`` suffix
    that ``make_unique`` appends to repeated names removed only when the name without it also
    exists (so ``MYDUP-1`` next to ``MYDUP`` becomes ``MYDUP`` but ``NKX2-1`` stays ``NKX2-1``).
    """
    names = table.var_names.astype(str)
    if "gene_symbols" in table.var:
        sym = table.var["gene_symbols"].astype(str).to_numpy()
        return pd.Series(sym, index=names)
    present = set(names)
    out = []
    for n in names:
        m = _SUFFIX.match(n)
        out.append(m.group(1) if m and m.group(1) in present else n)
    return pd.Series(out, index=names)


def _non_control(table: ad.AnnData) -> np.ndarray:
    names = table.var_names.astype(str)
    keep = np.array([not is_control(n) for n in names], dtype=bool)
    if "feature_types" in table.var:
        ft = table.var["feature_types"]
        keep &= (ft.isna() | (ft.astype(str).str.lower() == "gene expression")).to_numpy()
    return keep


def shared_genes(sdata: SpatialData, genes=None) -> pd.DataFrame:
    """The genes measured by both modalities, matched on symbols.

    Matching rules: symbols are compared case-insensitively; Visium names made unique by
    ``make_unique`` (``A``, ``A-1``) are folded back to their symbol (``var["gene_symbols"]`` when
    the table has it); Xenium control probes and blank/unassigned codewords
    (:data:`~spatialdata_align._constants.XENIUM_CONTROL_PREFIXES`, or a ``feature_types`` other than
    ``Gene Expression``) are excluded; variables sharing a symbol within one modality are **summed**.

    Parameters
    ----------
    sdata
        SpatialData with ``xenium_table`` (or ``xenium_table_aligned``) and ``visium_table``.
    genes
        Restrict to these symbols (any case); ``None`` keeps every shared gene.

    Returns
    -------
    DataFrame, one row per shared gene, sorted by symbol, with columns ``gene`` (the Xenium
    spelling), ``xenium_var`` and ``visium_var`` (lists of the variable names summed).
    """
    xt = _xenium_table(sdata)
    vt = _table(sdata, VISIUM_TABLE)
    return _match(xt, vt, genes)


def _table(sdata: SpatialData, name: str) -> ad.AnnData:
    if name not in sdata.tables:
        raise KeyError(f"no table {name!r}; tables present: {sorted(sdata.tables)}.")
    return sdata.tables[name]


def _xenium_table(sdata: SpatialData) -> ad.AnnData:
    for name in (XENIUM_TABLE, f"{XENIUM_TABLE}{ALIGNED_SUFFIX}"):
        if name in sdata.tables:
            return sdata.tables[name]
    raise KeyError(f"no Xenium table ({XENIUM_TABLE!r}); tables present: {sorted(sdata.tables)}.")


def _match(xt: ad.AnnData, vt: ad.AnnData, genes=None) -> pd.DataFrame:
    xkeep = _non_control(xt)
    xsym = gene_symbols(xt)[xkeep]
    vsym = gene_symbols(vt)[_non_control(vt)]
    xgroups: dict[str, list[str]] = {}
    spelling: dict[str, str] = {}
    for var, s in xsym.items():
        key = s.upper()
        xgroups.setdefault(key, []).append(var)
        spelling.setdefault(key, s)
    vgroups: dict[str, list[str]] = {}
    for var, s in vsym.items():
        vgroups.setdefault(s.upper(), []).append(var)
    keys = sorted(set(xgroups) & set(vgroups))
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        wanted = [str(g).upper() for g in genes]
        missing = [g for g, w in zip(genes, wanted, strict=True) if w not in xgroups or w not in vgroups]
        if missing:
            detail = []
            for g in missing:
                where = [m for m, grp in (("Xenium", xgroups), ("Visium", vgroups)) if str(g).upper() in grp]
                detail.append(f"{g!r} ({'only in ' + where[0] if where else 'in neither table'})")
            shown = ", ".join(spelling[k] for k in keys[:20]) + (" ..." if len(keys) > 20 else "")
            raise KeyError(
                f"genes not measured by both modalities: {', '.join(detail)}. "
                f"{len(keys)} shared genes: {shown or 'none'}."
            )
        keys = list(dict.fromkeys(wanted))
    return pd.DataFrame(
        {
            "gene": [spelling[k] for k in keys],
            "xenium_var": [xgroups[k] for k in keys],
            "visium_var": [vgroups[k] for k in keys],
        }
    )


def summing_matrix(table: ad.AnnData, groups) -> sp.csr_matrix:
    """``(n_vars, n_groups)`` 0/1 matrix summing the listed variables of ``table`` into groups."""
    pos = pd.Index(table.var_names.astype(str))
    rows, cols = [], []
    for j, names in enumerate(groups):
        idx = pos.get_indexer(list(names))
        rows.extend(idx.tolist())
        cols.extend([j] * len(idx))
    data = np.ones(len(rows), dtype=np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(table.n_vars, len(groups)))


def shared_counts(table: ad.AnnData, groups, layer: str | None = None):
    """Counts of the shared genes of one modality: ``(n_obs, n_groups)``, the variables of each group summed.

    ``groups`` is a column of :func:`_match`'s frame (``"xenium_var"`` / ``"visium_var"``): per shared gene, the
    variables of ``table`` measuring it. ``layer``: as in :func:`counts`.
    """
    return counts(table, layer) @ summing_matrix(table, groups)


def counts(table: ad.AnnData, layer: str | None = None):
    """The counts matrix of a table (``X`` or a layer) as CSR (or dense ndarray)."""
    if layer is None:
        X = table.X
    else:
        if layer not in table.layers:
            raise KeyError(f"no layer {layer!r}; layers present: {sorted(table.layers)}.")
        X = table.layers[layer]
    if X is None:
        raise ValueError("the table has no X matrix.")
    if sp.issparse(X):
        return sp.csr_matrix(X)
    return np.asarray(X)


def gene_totals(table: ad.AnnData, layer: str | None = None, rows=None) -> np.ndarray:
    """Library size per row: total counts over the non-control variables."""
    X = counts(table, layer)
    if rows is not None:
        X = X[rows]
    keep = _non_control(table)
    if keep.all():
        return np.asarray(X.sum(1)).ravel().astype(np.float64)
    return np.asarray(X[:, np.flatnonzero(keep)].sum(1)).ravel().astype(np.float64)


def lognorm(X, library: np.ndarray, target_sum: float | None = None) -> np.ndarray:
    """``log1p(X / library * target_sum)`` as a dense float64 array, through :func:`scanpy.pp.normalize_total`.

    ``library`` is each row's library size, which may count genes that are not columns of ``X`` (the
    pseudo-spots hold only the shared genes, their library is every gene of their cells): that remainder joins
    as one extra column while :func:`scanpy.pp.normalize_total` scales the rows and
    :func:`scanpy.pp.log1p` logs them. ``target_sum`` defaults to the median of the positive libraries
    (scanpy's default); rows with an empty library stay 0.
    """
    import scanpy as sc

    library = np.asarray(library, dtype=np.float64)
    dense = (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64)
    rest = library - dense.sum(1)
    if np.any(rest < -1e-6 * np.maximum(library, 1.0)):
        raise ValueError("a row's library is smaller than the sum of its counts.")
    if target_sum is None:
        pos = library[library > 0]
        target_sum = float(np.median(pos)) if len(pos) else 1.0
    a = ad.AnnData(np.column_stack([dense, np.clip(rest, 0.0, None)]))
    sc.pp.normalize_total(a, target_sum=target_sum)
    sc.pp.log1p(a)
    return np.asarray(a.X[:, :-1], dtype=np.float64)


#: labels of the last few :func:`cell_type_labels` calls, keyed by a digest of the counts and the arguments
_LABELS_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_LABELS_CACHE_SIZE = 4


def _digest(X) -> bytes:
    """A digest of a matrix's shape, dtype and values (CSR arrays or a dense array)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((X.shape, str(X.dtype), sp.issparse(X))).encode())
    for a in (X.data, X.indices, X.indptr) if sp.issparse(X) else (X,):
        h.update(np.ascontiguousarray(a).view(np.uint8).ravel())
    return h.digest()


def cell_type_labels(table: ad.AnnData, n_types: int = 6, *, n_pcs: int = 15, seed: int = 0) -> np.ndarray:
    """Coarse cell types: k-means clusters of the cells' expression (one label per table row).

    :func:`scanpy.pp.normalize_total`, :func:`scanpy.pp.log1p` and :func:`scanpy.pp.pca` on the non-control
    genes, then :class:`sklearn.cluster.KMeans` on the leading components. Used as density channels for the
    alignment (:func:`~spatialdata_align.registration.celltype_channels`); the table is not modified.

    The last few results are kept, keyed by a digest of the counts that enter the clustering and the arguments,
    so the held-out refits of the accuracy estimate reuse the fit's labels: at 168k cells the clustering takes
    1.4 s and the digest 0.1 s (the pipeline on ``twin_sections(n_cells=168_000)``, ``cProfile``).
    """
    X = counts(table)[:, np.flatnonzero(_non_control(table))]
    key = (_digest(X), int(n_types), int(n_pcs), int(seed))
    if key in _LABELS_CACHE:
        _LABELS_CACHE.move_to_end(key)
        return _LABELS_CACHE[key].copy()
    labels = _cluster(X, n_types, n_pcs, seed)
    _LABELS_CACHE[key] = labels.copy()
    while len(_LABELS_CACHE) > _LABELS_CACHE_SIZE:
        _LABELS_CACHE.popitem(last=False)
    return labels


def _cluster(X, n_types: int, n_pcs: int, seed: int) -> np.ndarray:
    import scanpy as sc
    from sklearn.cluster import KMeans

    detected = np.flatnonzero(np.asarray(X.sum(axis=0)).ravel() > 0)
    n_expressing = int((np.asarray(X.sum(axis=1)).ravel() > 0).sum())
    if detected.size < 2 or n_expressing < max(int(n_types), 2):
        return np.zeros(X.shape[0], dtype=int)  # nothing to cluster: one type
    a = ad.AnnData(X[:, detected].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cells with no counts stay 0
        sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    k = int(min(n_pcs, a.n_vars - 1, a.n_obs - 1))
    if k < 1:
        return np.zeros(X.shape[0], dtype=int)
    sc.pp.pca(a, n_comps=k, random_state=seed)
    return KMeans(n_clusters=int(n_types), n_init=4, random_state=seed).fit_predict(a.obsm["X_pca"])
