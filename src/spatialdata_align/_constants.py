"""Single source of truth for element names, coordinate systems and physical constants.

Every other module imports these names instead of spelling strings out; they are part of the
public contract (users and later code rely on them).

Conventions
-----------
* Point coordinates are always ``(x, y)`` in every public API (columns ``x`` and ``y``).
* Xenium positions are in micrometres (µm); Visium positions are in full-resolution image pixels.
* Raster pixel ``(row=i, col=j)`` has its centre at ``(j + 0.5, i + 0.5)`` in the image's intrinsic
  pixel coordinates (the spatialdata convention), so a hires image with scale factor ``s`` covers
  full-resolution pixel ``(x, y)`` with pixel ``(floor(y * s), floor(x * s))``.
"""

from __future__ import annotations

# --- coordinate systems -----------------------------------------------------------------------
XENIUM_CS = "xenium"  #: Xenium coordinate system, units: µm
VISIUM_CS = "visium"  #: Visium coordinate system, units: full-resolution pixels

# --- Xenium elements ----------------------------------------------------------------------------
XENIUM_CELLS = "xenium_cells"  #: cell centroids (circles, radius from cell area), µm
XENIUM_TABLE = "xenium_table"  #: cell x gene counts, annotates ``xenium_cells``
XENIUM_TRANSCRIPTS = "xenium_transcripts"  #: transcripts (points), µm
XENIUM_MORPHOLOGY = "xenium_morphology"  #: prefix of morphology images
XENIUM_CELL_BOUNDARIES = "xenium_cell_boundaries"
XENIUM_NUCLEUS_BOUNDARIES = "xenium_nucleus_boundaries"
XENIUM_CELL_LABELS = "xenium_cell_labels"  #: cell segmentation labels (full layout, optional)
XENIUM_NUCLEUS_LABELS = "xenium_nucleus_labels"  #: nucleus segmentation labels (full layout, optional)

# --- Visium elements ----------------------------------------------------------------------------
VISIUM_SPOTS = "visium_spots"  #: spot circles, full-res pixels, radius = spot_diameter_fullres / 2
VISIUM_TABLE = "visium_table"  #: spot x gene counts, annotates ``visium_spots``
VISIUM_HIRES = "visium_hires_image"
VISIUM_LOWRES = "visium_lowres_image"
VISIUM_FULLRES = "visium_fullres_image"
VISIUM_CYTASSIST = "visium_cytassist_image"  #: CytAssist camera image (``spatial/cytassist_image.tiff``)
#: Visium images in the order the registration target is chosen (:func:`spatialdata_align.io.registration_target`)
VISIUM_TARGET_ORDER = (VISIUM_HIRES, VISIUM_LOWRES, VISIUM_FULLRES, VISIUM_CYTASSIST)

# --- Visium HD elements (same ``visium`` coordinate system, full-resolution pixels) ----------------
VISIUM_HD_BINS = "visium_hd_bins_{:03d}um"  #: square bins of one size, e.g. ``visium_hd_bins_008um``
VISIUM_HD_TABLE = "visium_hd_table_{:03d}um"  #: bins x genes, annotates ``visium_hd_bins_<size>um``

# --- table keys ---------------------------------------------------------------------------------
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
SPATIAL_KEY = "spatial"  #: obsm key holding (x, y) positions in the element's own coordinate system

# --- physical constants -------------------------------------------------------------------------
VISIUM_SPOT_DIAMETER_UM = 55.0  #: Visium spot diameter (µm)
VISIUM_SPOT_PITCH_UM = 100.0  #: Visium centre-to-centre spot distance (µm)

# --- attrs keys (metadata stored in sdata.attrs / table.uns) ------------------------------------
ATTRS_KEY = "spatialdata_align"  #: root key in ``sdata.attrs`` for everything this package stores
UNS_VISIUM_KEY = "visium"  #: table.uns key with scale factors and the µm-per-pixel factor
UNS_XENIUM_KEY = "xenium"  #: xenium_table.uns key with reader metadata (layout, pixel size)
UNS_COMPARE_KEY = "sda_compare_genes"  #: visium_table.uns key of the gene comparison table
MATCH_WEIGHT_KEY = "align_match_weight"  #: obs column: per-cell posterior of being matched tissue
ALIGNED_SUFFIX = "_aligned"  #: suffix of elements materialised by ``sdata.align.apply``
SHARED_REGION_KEY = "shared_region"  #: Shapes element written by ``sda.tl.shared_region``
PSEUDO_SPOTS_KEY = "xenium_pseudo_spots"  #: table written by ``sda.tl.pseudo_spots`` (annotates the spots)

# --- feature filtering ---------------------------------------------------------------------------
#: Xenium feature types / name prefixes that are not genes and are kept out of ``X``.
XENIUM_CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region",
    "antisense_",
)
