"""Synthetic data with ground truth.

* :func:`twin_sections` - a Xenium folder and a Visium ``outs/`` folder in the real 10x layouts,
  cut from one ground-truth tissue, with the true Xenium µm -> Visium full-res px map.
* :func:`load_twin` / :func:`load_truth` - reopen what :func:`twin_sections` wrote.
* :class:`Truth` - the map both ways (``forward`` / ``inverse``), its affine part, landmarks and
  the tissue fields (``egfr_pattern``).
* :data:`FAMILIES` / :func:`pair_family` - the validation corpus: pair families built from their own tissue
  models, H&E renderers and deformation models (one function each, e.g. :func:`stroma_pair`), all written as
  real 10x folders with a :class:`PairTruth`.
* :func:`load_pair` / :func:`load_pair_truth` - reopen any pair folder (a family's or the twin's) and score it
  through one interface (:class:`PairTruth`, :class:`TwinPairTruth`).
"""

from ._families import (
    FAMILIES,
    adipose_pair,
    cortex_pair,
    damaged_pair,
    pair_family,
    stroma_pair,
    texture_pair,
    tumour_pair,
)
from ._pairs import SyntheticPair, load_pair
from ._pairtruth import STATUS, PairTruth, PairTruthBase, TwinPairTruth, load_pair_truth
from ._tissue import CELL_TYPES, REGIONS, TissueModel
from ._truth import Truth, load_truth
from ._twin import TwinSections, load_twin, twin_sections

__all__ = [
    "CELL_TYPES",
    "FAMILIES",
    "REGIONS",
    "STATUS",
    "PairTruth",
    "PairTruthBase",
    "SyntheticPair",
    "TissueModel",
    "Truth",
    "TwinPairTruth",
    "TwinSections",
    "adipose_pair",
    "cortex_pair",
    "damaged_pair",
    "load_pair",
    "load_pair_truth",
    "load_truth",
    "load_twin",
    "pair_family",
    "stroma_pair",
    "texture_pair",
    "tumour_pair",
    "twin_sections",
]
