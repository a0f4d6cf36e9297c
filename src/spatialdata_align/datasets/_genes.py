"""Gene sets and cell-type expression programmes of the synthetic twin sections.

Named marker genes (real symbols) carry the biology; filler genes ``GENE00001``... fill the
Xenium panel (a few hundred genes) and the Visium whole-transcriptome-like set (a few thousand,
most of them low background). Every named marker is measured by both platforms; so is most of the
Xenium panel, except a few "custom add-on" fillers absent from the Visium set. Gene ids are
ENSG-like (``ENSG9...``, clearly synthetic) and identical across platforms for the same symbol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._tissue import CELL_TYPES

#: marker gene -> {cell type: relative level}; every marker is in both gene sets.
MARKERS: dict[str, dict[str, float]] = {
    "EGFR": {"tumour": 6.0, "myoepithelial": 1.5, "fibroblast": 0.2, "luminal": 0.3},
    "ERBB2": {"tumour": 10.0, "luminal": 1.5},
    "GRB7": {"tumour": 4.0, "luminal": 0.3},
    "KRT8": {"tumour": 8.0, "luminal": 10.0},
    "KRT18": {"tumour": 6.0, "luminal": 6.0},
    "KRT19": {"tumour": 5.0, "luminal": 5.0},
    "EPCAM": {"tumour": 6.0, "luminal": 5.0},
    "CDH1": {"tumour": 4.0, "luminal": 4.0},
    "MKI67": {"tumour": 2.0, "t_cell": 0.3},
    "TOP2A": {"tumour": 2.0},
    "CCND1": {"tumour": 3.0, "luminal": 1.0},
    "ESR1": {"luminal": 4.0, "tumour": 0.5},
    "PGR": {"luminal": 2.0},
    "FOXA1": {"luminal": 3.0, "tumour": 1.0},
    "KRT5": {"myoepithelial": 8.0},
    "KRT14": {"myoepithelial": 7.0},
    "ACTA2": {"myoepithelial": 6.0, "fibroblast": 3.0, "endothelial": 1.0},
    "MYH11": {"myoepithelial": 3.0},
    "COL1A1": {"fibroblast": 12.0},
    "COL1A2": {"fibroblast": 10.0},
    "COL3A1": {"fibroblast": 8.0},
    "POSTN": {"fibroblast": 6.0},
    "DCN": {"fibroblast": 6.0},
    "LUM": {"fibroblast": 5.0},
    "FN1": {"fibroblast": 5.0, "tumour": 0.5},
    "PDGFRB": {"fibroblast": 3.0},
    "PECAM1": {"endothelial": 8.0},
    "VWF": {"endothelial": 8.0},
    "CDH5": {"endothelial": 5.0},
    "KDR": {"endothelial": 3.0},
    "PTPRC": {"t_cell": 6.0, "b_cell": 6.0, "macrophage": 4.0},
    "CD3E": {"t_cell": 6.0},
    "CD3D": {"t_cell": 4.0},
    "CD8A": {"t_cell": 3.0},
    "CD4": {"t_cell": 2.0, "macrophage": 1.5},
    "GZMB": {"t_cell": 1.5},
    "MS4A1": {"b_cell": 6.0},
    "CD79A": {"b_cell": 5.0},
    "CD19": {"b_cell": 3.0},
    "CD68": {"macrophage": 6.0},
    "CD163": {"macrophage": 4.0},
    "LYZ": {"macrophage": 6.0},
    "CSF1R": {"macrophage": 3.0},
    "ITGAX": {"macrophage": 1.5},
}
#: Mean Xenium counts per cell of each type (size factor 1).
XENIUM_TOTAL = {
    "tumour": 200.0,
    "luminal": 160.0,
    "myoepithelial": 130.0,
    "fibroblast": 100.0,
    "endothelial": 90.0,
    "t_cell": 60.0,
    "b_cell": 70.0,
    "macrophage": 110.0,
}
#: Fraction of a cell's Xenium counts that fall on the named markers.
MARKER_SHARE = 0.45
#: Visium sensitivity for a shared gene relative to Xenium (per cell), and background UMIs per cell.
VISIUM_EFFICIENCY = 0.35
VISIUM_BACKGROUND_PER_CELL = 120.0
#: Xenium control features: (prefix, feature type, count, expected counts per cell each).
XENIUM_CONTROLS = (
    ("NegControlProbe_", "Negative Control Probe", 12, 0.004),
    ("NegControlCodeword_", "Negative Control Codeword", 12, 0.002),
    ("BLANK_", "Blank Codeword", 16, 0.002),
)


def gene_id(i: int) -> str:
    """Synthetic ENSG-like id of gene number ``i``."""
    return f"ENSG9{i:010d}"


@dataclass
class GeneSets:
    """All genes of the twin sections and their expression programmes.

    Attributes
    ----------
    symbols, ids
        The gene universe (markers first, then fillers).
    xenium, visium, shared
        Index arrays into the universe (sorted by symbol for the two platforms).
    rate
        ``(n_types, n_genes)`` expected counts per cell (size factor 1) on Xenium's scale; EGFR in
        tumour cells is further multiplied by the EGFR field.
    visium_rate
        ``(n_types, n_genes)`` expected Visium UMIs per cell (size factor 1).
    """

    symbols: np.ndarray
    ids: np.ndarray
    xenium: np.ndarray
    visium: np.ndarray
    shared: np.ndarray
    rate: np.ndarray
    visium_rate: np.ndarray

    def to_csv(self, path) -> None:
        """Write ``gene, gene_id, in_xenium, in_visium`` (the truth folder's ``genes.csv``)."""
        import pandas as pd

        pd.DataFrame(
            {
                "gene": self.symbols,
                "gene_id": self.ids,
                "in_xenium": np.isin(np.arange(len(self.symbols)), self.xenium),
                "in_visium": np.isin(np.arange(len(self.symbols)), self.visium),
            }
        ).to_csv(path, index=False)

    def index(self, symbol: str) -> int:
        """Universe index of a gene symbol."""
        hit = np.flatnonzero(self.symbols == symbol)
        if hit.size == 0:
            raise KeyError(f"gene {symbol!r} is not in the synthetic gene universe.")
        return int(hit[0])


def make_genes(rng: np.random.Generator, n_xenium: int, n_visium: int, xenium_only: float = 0.05) -> GeneSets:
    """Build the gene universe and programmes (see module docstring)."""
    n_mark = len(MARKERS)
    if n_xenium < n_mark:
        raise ValueError(f"n_xenium_genes must be >= {n_mark} (the named markers), got {n_xenium}.")
    n_x_fill = n_xenium - n_mark
    n_x_only = round(xenium_only * n_x_fill)
    n_shared_fill = n_x_fill - n_x_only
    n_v_fill = n_visium - n_mark - n_shared_fill
    if n_v_fill < 0:
        raise ValueError(
            f"n_visium_genes ({n_visium}) must be >= the genes shared with the Xenium panel ({n_mark + n_shared_fill})."
        )
    n_fill = n_x_fill + n_v_fill
    symbols = np.array(list(MARKERS) + [f"GENE{i + 1:05d}" for i in range(n_fill)])
    ids = np.array([gene_id(i + 1) for i in range(len(symbols))])
    fill = np.arange(n_mark, n_mark + n_fill)
    shared_fill = fill[:n_shared_fill]
    x_only = fill[n_shared_fill:n_x_fill]
    v_only = fill[n_x_fill:]
    marker_idx = np.arange(n_mark)
    xen = np.concatenate([marker_idx, shared_fill, x_only])
    vis = np.concatenate([marker_idx, shared_fill, v_only])
    shared = np.concatenate([marker_idx, shared_fill])

    n_types = len(CELL_TYPES)
    g = len(symbols)
    rate = np.zeros((n_types, g))
    for j, (_, levels) in enumerate(MARKERS.items()):
        for t, v in levels.items():
            rate[CELL_TYPES.index(t), j] = v
    # panel fillers: low baseline plus a type-specific boost for about a third of them
    pf = np.concatenate([shared_fill, x_only])
    if pf.size:
        base = rng.gamma(0.6, 1.0, size=pf.size)
        boost = np.zeros((n_types, pf.size))
        pick = rng.uniform(size=pf.size) < 0.35
        boost[rng.integers(n_types, size=pf.size)[pick], np.flatnonzero(pick)] = rng.gamma(2.0, 2.0, pick.sum())
        filler = base[None] * rng.uniform(0.5, 1.5, (n_types, pf.size)) + boost
    for ti, t in enumerate(CELL_TYPES):
        m = rate[ti, marker_idx]
        total = XENIUM_TOTAL[t]
        if pf.size:
            rate[ti, marker_idx] = m / m.sum() * total * MARKER_SHARE
            rate[ti, pf] = filler[ti] / filler[ti].sum() * total * (1 - MARKER_SHARE)
        else:
            rate[ti, marker_idx] = m / m.sum() * total
    # Visium: per-gene sensitivity differences on the shared genes, plus background genes
    vrate = np.zeros_like(rate)
    eff = VISIUM_EFFICIENCY * rng.lognormal(0.0, 0.4, size=shared.size)
    vrate[:, shared] = rate[:, shared] * eff[None]
    if v_only.size:
        bg = rng.gamma(0.3, 1.0, size=v_only.size)
        vrate[:, v_only] = (bg / bg.sum() * VISIUM_BACKGROUND_PER_CELL)[None] * rng.uniform(
            0.8, 1.2, (n_types, v_only.size)
        )
    order_x = xen[np.argsort(symbols[xen], kind="stable")]
    order_v = vis[np.argsort(symbols[vis], kind="stable")]
    return GeneSets(symbols, ids, order_x, order_v, np.sort(shared), rate, vrate)
