"""Public entry points of the pair families: one function per family, :func:`pair_family` and :data:`FAMILIES`."""

from __future__ import annotations

from collections.abc import Callable

from ._pairs import FamilyModel, SyntheticPair, build_pair

_COMMON_DOC = """
    Parameters
    ----------
    out_dir
        Output folder: ``xenium/`` (a Xenium output folder), ``visium/outs/`` (a Space Ranger ``outs/`` folder
        with hires and lowres H&E and scale factors) and ``truth/`` are written in it.
    seed
        Random seed; the same seed gives the same files. Every parameter left at ``None`` is drawn from it.
    density
        Xenium cells per mm² of Xenium-section tissue (the Visium section is as dense). Default: the
        family's own ({density:g}/mm²).
    size_mm
        Long side of the tissue (mm), default {size:g}.
    warp
        Largest smooth non-affine displacement over the tissue (µm), default {warp:g} ({model} model; scaled
        down with ``size_mm`` below the default size, as is its length scale); ``0`` leaves the affine (and any
        damage) only.
    rotation_deg, flip, anisotropy, um_per_px
        Placement of the Visium section on its slide: rotation (degrees, any angle; default drawn in
        [0, 360)), mirror image (default: drawn, one pair in two), relative x/y pixel-scale difference
        (default drawn in ±[0.03, 0.10]), µm per full-resolution pixel (default drawn in [0.3, 0.6]).
    stain
        H&E variation: ``"normal"``, ``"pale"``, ``"dark"``, ``"cast"`` (colour cast) or ``"uneven"``
        (uneven illumination); default ``"{stain}"``.
    xenium_fraction
        Fraction of the tissue inside the Xenium region (an axis-aligned rectangle cut on one or two sides;
        default drawn in [0.65, 0.85]).
    capture_fraction
        Fraction of the Visium section inside the capture area (spots), the rest only in the image
        (default drawn in [0.75, 0.9]).
    n_landmarks
        Landmarks written to ``truth/landmarks.csv`` (default drawn in 3..6), each with a click error drawn in
        ``landmark_noise_um`` (µm, on the Visium side); ``truth/landmarks_clean.csv`` holds the exact ones.
    landmark_noise_um
        Range of the click error (µm).
    hires_px
        Long side of ``tissue_hires_image.png`` (Space Ranger: 2000).
    n_xenium_genes, n_visium_genes
        Sizes of the Xenium panel and of the Visium gene set.
    transcripts
        Also write ``transcripts.parquet`` (slower; the alignment does not need it).
    overwrite
        Replace existing ``xenium/``, ``visium/`` and ``truth/`` folders.
    progress
        Show a progress bar over the stages.

    Returns
    -------
    :class:`~spatialdata_align.datasets.SyntheticPair`; ``pair.truth`` is a
    :class:`~spatialdata_align.datasets.PairTruth` (``forward``, ``inverse``, ``valid``, ``tre``, ``score``).

    Examples
    --------
    >>> pair = sda.datasets.{name}_pair("data/{name}", seed=1)  # doctest: +SKIP
    >>> sdata = sda.io.read_pair(pair.xenium_path, pair.visium_path)  # doctest: +SKIP
"""


def _make(model: type[FamilyModel], summary: str, extra_doc: str = "") -> Callable[..., SyntheticPair]:
    def generate(
        out_dir,
        *,
        seed: int = 0,
        density: float | None = None,
        size_mm: float | None = None,
        warp: float | None = None,
        rotation_deg: float | None = None,
        flip: bool | None = None,
        anisotropy: float | None = None,
        um_per_px: float | None = None,
        stain: str | None = None,
        xenium_fraction: float | None = None,
        capture_fraction: float | None = None,
        n_landmarks: int | None = None,
        landmark_noise_um: tuple[float, float] = (8.0, 15.0),
        hires_px: int = 2000,
        n_xenium_genes: int = 300,
        n_visium_genes: int = 3000,
        transcripts: bool = False,
        overwrite: bool = True,
        progress: bool = False,
        **options,
    ) -> SyntheticPair:
        return build_pair(
            model,
            out_dir,
            seed=seed,
            density=density,
            size_mm=size_mm,
            warp=warp,
            rotation_deg=rotation_deg,
            flip=flip,
            anisotropy=anisotropy,
            um_per_px=um_per_px,
            stain=stain,
            xenium_fraction=xenium_fraction,
            capture_fraction=capture_fraction,
            n_landmarks=n_landmarks,
            landmark_noise_um=landmark_noise_um,
            hires_px=hires_px,
            n_xenium_genes=n_xenium_genes,
            n_visium_genes=n_visium_genes,
            transcripts=transcripts,
            overwrite=overwrite,
            progress=progress,
            **options,
        )

    generate.__name__ = generate.__qualname__ = f"{model.name}_pair"
    generate.__doc__ = (
        summary
        + _COMMON_DOC.format(
            name=model.name,
            density=model.default_density,
            size=model.default_size_mm,
            warp=model.warp_um,
            model=model.deformation,
            stain=model.stain,
        ).rstrip()
        + extra_doc
        + "\n"
    )
    generate.model = model
    return generate


def _models() -> dict[str, type[FamilyModel]]:
    from ._fam_adipose import AdiposeModel
    from ._fam_cortex import CortexModel
    from ._fam_damaged import DamagedModel
    from ._fam_stroma import StromaModel
    from ._fam_texture import TextureModel
    from ._fam_tumour import TumourModel

    return {m.name: m for m in (StromaModel, CortexModel, TumourModel, AdiposeModel, TextureModel, DamagedModel)}


_SUMMARIES = {
    "stroma": """Write a low-texture pair: uniform fibrous stroma with a few ducts and tumour nests.

    Stroma cells sit on a jittered lattice (almost constant density); a handful of ducts (lumen, luminal and
    myoepithelial rings) and small tumour nests at four times the stroma density are the only structures.
    H&E: Beer-Lambert hematoxylin/eosin, fibre-textured eosin, nuclei as solid dots, pale staining.
    Deformation: exponential of a stationary Gaussian-random velocity field (~1 mm swirls). EGFR: a hot
    spot (Gaussian bump) in every cell type.
""",
    "cortex": """Write a layered pair: a curved, brain-cortex-like band of six layers of different cell density.

    Layers parallel to a wavy outer surface (a sparse molecular layer, dense granular layers, a medium layer,
    a sparse white-matter core), cells modulated in radial minicolumns, radial vessels. H&E: an additive
    colour model (depth-dependent neuropil tint over the glass, then a smooth hematoxylin density, nuclei not
    resolved one by one), colour cast. Deformation: free-form (cubic B-spline over a coarse random control
    grid). EGFR: a gradient along the band. Cell types stand in for neurons and glia.
""",
    "tumour": """Write a dense pair: a solid tumour sheet (>= 8000 cells/mm²) with necrotic holes and vessels.

    A lobulated lump of tumour cells on jittered hexagonal lattices whose orientation changes between
    ~300 µm domains; irregular necrotic areas (few cells, pink debris, nuclear dust); winding vessels with
    blood, lined by endothelial cells. H&E: Beer-Lambert with hematoxylin, eosin and blood, nuclei as solid
    dots, dark staining. Deformation: thin-plate spline through random displacements of a few control
    points. EGFR: clonal patches.
""",
    "adipose": """Write a sparse pair (<= 1000 cells/mm²): fatty tissue with fibrous septa and lymphoid follicles.

    Adipocytes (Voronoi cells of blue-noise centres, 60-110 µm, empty) with one flattened nucleus on their
    thin membranes, fibrous septa with fibroblasts and vessels, two or three dense lymphoid follicles: most of
    the area holds no cell. H&E: Beer-Lambert, the membrane net as the main texture, nuclei drawn as rings,
    uneven illumination. Deformation: a composition of local twists (vortices). EGFR: rises with the distance
    from a point outside the tissue.
""",
    "texture": """Write a texture pair: tissue architecture drawn by a random field (a Turing-like labyrinth).

    The outline is a level set of a smooth Gaussian random field; a band-pass field draws tumour-rich ridges
    and stroma-rich valleys and the cells are a log-Gaussian Cox process on it: texture at one scale, no
    discrete structures. H&E: Beer-Lambert with a smooth hematoxylin density, colour cast. Deformation: a
    microtome model (bow, compression gradient along the cut, chatter bands). EGFR: an independent smooth
    random field.
""",
    "damaged": """Write a damaged pair: a gut-wall-like strip whose Visium section is torn, folded and bitten.

    Layers across the strip (mucosa with crypts, muscularis mucosae, submucosa with lymphoid aggregates,
    muscle). In the Visium section one part is pulled away across a wavy tear (80-160 µm, turned by a few
    degrees), one end is folded over onto the tissue next to it, and a piece is missing at an edge; the
    truth's status marks each (the folded flap is not scored). H&E: additive colour model, nuclei as dots.
    Deformation: compactly supported Wendland radial functions. EGFR: a gradient across the wall.
""",
}

_M = _models()
stroma_pair = _make(_M["stroma"], _SUMMARIES["stroma"])
cortex_pair = _make(_M["cortex"], _SUMMARIES["cortex"])
tumour_pair = _make(_M["tumour"], _SUMMARIES["tumour"])
adipose_pair = _make(_M["adipose"], _SUMMARIES["adipose"])
texture_pair = _make(_M["texture"], _SUMMARIES["texture"])
damaged_pair = _make(
    _M["damaged"],
    _SUMMARIES["damaged"],
    """

    Other Parameters
    ----------------
    tear, fold, missing
        Switch each kind of damage of the Visium section (all on by default).""",
)

#: name -> generator function of every pair family
FAMILIES: dict[str, Callable[..., SyntheticPair]] = {
    "stroma": stroma_pair,
    "cortex": cortex_pair,
    "tumour": tumour_pair,
    "adipose": adipose_pair,
    "texture": texture_pair,
    "damaged": damaged_pair,
}


def pair_family(name: str, out_dir, *, seed: int = 0, density: float | None = None, **kwargs) -> SyntheticPair:
    """Write one pair of the named family (see :data:`FAMILIES`).

    Parameters
    ----------
    name
        Family name, one of ``sda.datasets.FAMILIES``.
    out_dir
        Output folder (``xenium/``, ``visium/outs/``, ``truth/``).
    seed
        Random seed.
    density
        Xenium cells per mm² (default: the family's own).
    **kwargs
        Any other parameter of the family's function (e.g. :func:`stroma_pair`).

    Returns
    -------
    :class:`~spatialdata_align.datasets.SyntheticPair`.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}.")
    return FAMILIES[name](out_dir, seed=seed, density=density, **kwargs)
