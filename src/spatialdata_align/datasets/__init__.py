"""Synthetic data with ground truth.

* :func:`twin_sections` - a Xenium folder and a Visium ``outs/`` folder in the real 10x layouts,
  cut from one ground-truth tissue, with the true Xenium µm -> Visium full-res px map.
* :func:`load_twin` / :func:`load_truth` - reopen what :func:`twin_sections` wrote.
* :class:`Truth` - the map both ways (``forward`` / ``inverse``), its affine part, landmarks and
  the tissue fields (``egfr_pattern``).
"""

from ._tissue import CELL_TYPES, REGIONS, TissueModel
from ._truth import Truth, load_truth
from ._twin import TwinSections, load_twin, twin_sections

__all__ = ["CELL_TYPES", "REGIONS", "TissueModel", "Truth", "TwinSections", "load_truth", "load_twin", "twin_sections"]
