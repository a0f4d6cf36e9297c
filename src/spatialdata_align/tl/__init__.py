"""Tools on aligned data (scanpy-style: the SpatialData object first).

``shared_region``   the tissue both modalities cover, as a Shapes element in ``visium``
``subset_shared``   a new SpatialData restricted to it (or to any polygon / bounding box)
``shared_genes``    genes measured by both modalities (symbol matching)
``pseudo_spots``    Xenium cells aggregated into the Visium spot footprints (AnnData)
``compare_genes``   per-gene Pearson / Spearman between pseudo-spots and spots
``bin_cells``       Xenium cells aggregated into Visium HD bins of one size (AnnData)
``compare_bins``    per-gene Pearson / Spearman between binned cells and the Visium HD bins
``cell_type_labels`` coarse cell types (expression clusters) of a table, e.g. for alignment channels
"""

from ._bins import bin_cells, compare_bins
from ._compare import compare_genes, paired_expression, pseudo_spots
from ._data import cell_type_labels, shared_genes
from ._region import SHARED_REGION_KEY, shared_region, subset_shared

__all__ = [
    "SHARED_REGION_KEY",
    "bin_cells",
    "cell_type_labels",
    "compare_bins",
    "compare_genes",
    "paired_expression",
    "pseudo_spots",
    "shared_genes",
    "shared_region",
    "subset_shared",
]
