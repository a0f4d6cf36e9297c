"""spatialdata-plot on aligned data, with the render method that works.

spatialdata-plot 0.4.0 renders shapes elements above 10,000 geometries through datashader, and that route
looks the element up in a coordinate system named ``"global"`` whatever ``coordinate_systems`` asks for: in
``"visium"`` it fails ("does not contain any coordinate system named 'global'"). Two ways round it:

* :meth:`~spatialdata_align.AlignAccessor.set_global` exposes the aligned frame as ``"global"`` too, so
  spatialdata-plot's defaults (and other tools' ``"global"`` defaults) work;
* :func:`render_method` / :func:`render` pick ``method="matplotlib"`` where the datashader route would fail.
"""

from __future__ import annotations

from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from .._constants import VISIUM_CS
from ._plots import _save

#: above this many geometries spatialdata-plot 0.4.0 switches shapes to datashader
DATASHADER_THRESHOLD = 10_000


def render_method(sdata: SpatialData, element: str, cs: str) -> str | None:
    """The ``method`` to pass to ``sdata.pl.render_shapes(element, method=...)`` for coordinate system ``cs``.

    ``None`` (spatialdata-plot's own choice) where it works; ``"matplotlib"`` where spatialdata-plot 0.4.0
    would take its datashader route (more than 10,000 shapes) and that route fails (``element`` not mapped to
    ``"global"`` the same way as to ``cs``).
    """
    el = sdata[element]
    if len(el) <= DATASHADER_THRESHOLD:
        return None
    transforms = get_transformation(el, get_all=True)
    if cs == "global" or ("global" in transforms and cs in transforms):
        g = transforms.get("global")
        if (
            cs == "global"
            or g.to_affine_matrix(("x", "y"), ("x", "y")).tolist()
            == transforms[cs].to_affine_matrix(("x", "y"), ("x", "y")).tolist()
        ):
            return None
    return "matplotlib"


def render(
    sdata: SpatialData,
    shapes=("xenium_cells_aligned",),
    *,
    image: str | None = "visium_hires_image",
    cs: str = VISIUM_CS,
    color: str | None = None,
    ax=None,
    save=None,
    **shapes_kwargs,
):
    """Draw shapes elements over an image with spatialdata-plot, choosing the working render method.

    Parameters
    ----------
    sdata
        The SpatialData (the ``sdata.pl`` accessor of spatialdata-plot is registered on import).
    shapes
        Shapes element name(s), e.g. the aligned cells and the Visium spots.
    image
        Image element drawn underneath (``None`` for none).
    cs
        Coordinate system to draw in.
    color
        Passed to ``render_shapes`` (a colour or a column / gene name).
    ax
        Axes to draw on (default: a new figure).
    save
        File to write.
    **shapes_kwargs
        Further ``render_shapes`` arguments (``method`` overrides the choice of :func:`render_method`).

    Returns
    -------
    The axes.
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers sdata.pl)

    if isinstance(shapes, str):
        shapes = (shapes,)
    if ax is None:
        ax = plt.figure(figsize=(7, 6), layout="constrained").add_subplot()
    chain = sdata
    if image is not None:
        chain = chain.pl.render_images(image)
    for name in shapes:
        kw = dict(shapes_kwargs)
        if "method" not in kw:
            method = render_method(sdata, name, cs)
            if method is not None:
                kw["method"] = method
        if color is not None:
            kw["color"] = color
        chain = chain.pl.render_shapes(name, **kw)
    chain.pl.show(coordinate_systems=cs, ax=ax)
    _save(ax.figure, save)
    return ax
