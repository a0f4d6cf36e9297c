"""File discovery and error helpers shared by the readers (no SpatialData here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def folder_listing(folder: Path, limit: int = 40) -> str:
    """``'a, b/, c'``: what ``folder`` holds (folders with a trailing slash), for error messages."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return "(cannot be listed)"
    if not entries:
        return "(empty)"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_folder(path: str | Path, what: str) -> Path:
    """Return ``path`` as a :class:`Path` after checking it is an existing folder."""
    path = Path(path).expanduser()
    if not path.exists():
        parent = path.parent
        holds = f"; {parent} holds: {folder_listing(parent)}" if parent.is_dir() else ""
        raise FileNotFoundError(f"{what} folder {path} does not exist{holds}.")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} path {path} is a file; give the folder that holds it ({path.parent}).")
    return path


def find_first(folder: Path, candidates: Sequence[str], *, dirs: bool = False) -> Path | None:
    """The first of ``candidates`` (relative paths) that exists in ``folder`` as a file (or a folder if ``dirs``)."""
    for name in candidates:
        p = folder / name
        if p.is_dir() if dirs else p.is_file():
            return p
    return None


def missing(folder: Path, what: str, candidates: Sequence[str]) -> FileNotFoundError:
    """A :class:`FileNotFoundError` naming the missing file(s) and listing what ``folder`` holds."""
    names = " or ".join(repr(c) for c in candidates)
    return FileNotFoundError(f"{what}: none of {names} found in {folder}; it holds: {folder_listing(folder)}.")


#: suffixes read as TIFF (BigTIFF ``.btf`` is what Space Ranger and slide scanners write for large images)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf")


def lazy_image(file: Path, *, own_pages: bool = False):
    """A lazy dask array of an image file's pixels (full resolution), raising a ``ValueError`` naming the file.

    TIFF files (``.tif``, ``.tiff``, ``.btf``, OME-TIFF, BigTIFF, pyramidal: level 0) are opened with
    ``tifffile``'s zarr view, chunked by the file's own tiles or strips, so only the tiles a computation touches
    are read. ``dask_image.imread`` (pims) names its loader by the suffix and refused ``.btf`` outright, and it
    reads a whole plane per chunk. Other formats (PNG, JPEG) go through ``dask_image.imread``.

    ``own_pages=True`` reads only the pixels stored in ``file``, ignoring its OME-XML: a multi-file OME-TIFF
    (Xenium's ``morphology_focus/`` since XOA 2: one channel per file, every file's OME-XML listing all of them)
    otherwise opens as the whole set from each of its files.
    """
    import dask.array as da

    try:
        if file.suffix.lower() in TIFF_SUFFIXES:
            import tifffile
            import zarr

            kw = {"is_ome": False} if own_pages else {}
            node = zarr.open(tifffile.imread(file, aszarr=True, level=0, **kw), mode="r")
            if isinstance(node, zarr.Group):  # a multiscale (pyramidal) series: level 0 is the first array
                node = node[sorted(node.array_keys(), key=lambda k: (len(k), k))[0]]
            return da.from_zarr(node)
        from dask_image.imread import imread

        return imread(str(file))
    except Exception as e:  # tifffile/zarr/pims raise many types
        raise ValueError(f"{file} could not be read as an image ({type(e).__name__}: {e}).") from None
