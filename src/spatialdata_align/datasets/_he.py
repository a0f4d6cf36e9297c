"""H&E rendering of the pair families: pull-back of the image grid, nuclei, colour models, stain variation.

A family describes its Visium section as stain-amount rasters in the Xenium frame (µm) and a nucleus style;
this module maps them into the image through the truth (every piece of a torn or folded section
contributes; where a flap lies on other tissue the amounts add up, as two layers of stained tissue do), draws
the nuclei of the section's own cells, turns amounts into colour with the family's colour model and applies a
per-slide stain variation (pale/dark staining, colour cast, uneven illumination, noise).

Colour models
-------------
* ``"beer_lambert"``: optical densities add, ``rgb = glass * 10^-(sum_c amount_c * od_c)`` (stain vectors
  perturbed per slide).
* ``"additive"``: colours painted over the glass one after the other, ``rgb <- rgb (1 - alpha) + colour alpha``
  with ``alpha = 1 - exp(-amount)``: no physics, different colour mixing (a scanner-agnostic "flat" look).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from ._pairtruth import PairTruth, _apply_h

#: stain optical-density vectors (R, G, B), unit length
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
HEMATOXYLIN /= np.linalg.norm(HEMATOXYLIN)
EOSIN /= np.linalg.norm(EOSIN)
#: blood (erythrocytes): strongly eosinophilic, orange-red
BLOOD = np.array([0.10, 0.80, 0.59]) / np.linalg.norm([0.10, 0.80, 0.59])


@dataclass
class Raster:
    """A field on a regular grid of the Xenium frame: pixel ``[i, j]`` centred at ``origin + spacing * (j, i)`` µm."""

    origin: np.ndarray
    spacing: float
    data: np.ndarray  # (h, w) or (c, h, w)

    def sample(self, xy: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Values at ``(N, 2)`` µm points (bilinear, ``cval`` outside)."""
        ij = np.stack([(xy[:, 1] - self.origin[1]) / self.spacing, (xy[:, 0] - self.origin[0]) / self.spacing])
        if self.data.ndim == 2:
            return map_coordinates(self.data, ij, order=order, mode="constant", cval=cval)
        return np.stack([map_coordinates(c, ij, order=order, mode="constant", cval=cval) for c in self.data])

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, Y)`` µm coordinates of the pixel centres."""
        h, w = self.data.shape[-2:]
        return np.meshgrid(self.origin[0] + self.spacing * np.arange(w), self.origin[1] + self.spacing * np.arange(h))


@dataclass
class StainStyle:
    """Per-slide stain variation.

    Attributes
    ----------
    intensity
        Multiplies every stain amount (``< 1`` pale, ``> 1`` dark staining).
    hematoxylin_eosin
        Relative strength of hematoxylin to eosin.
    cast
        Per-channel gains (R, G, B) of the transmitted light: a colour cast.
    illumination
        Depth (0..1) of the smooth uneven illumination (vignetting plus a gradient).
    glass
        RGB of bare glass in ``[0, 1]``.
    od_rotation_deg
        Random rotation (degrees) of each stain vector (protocol / scanner differences).
    noise
        Pixel noise standard deviation (grey levels).
    """

    intensity: float = 1.0
    hematoxylin_eosin: float = 1.0
    cast: np.ndarray = field(default_factory=lambda: np.ones(3))
    illumination: float = 0.0
    glass: np.ndarray = field(default_factory=lambda: np.array([0.96, 0.955, 0.95]))
    od_rotation_deg: float = 0.0
    noise: float = 2.0

    def as_dict(self) -> dict:
        """JSON-friendly parameters."""
        return {
            "intensity": float(self.intensity),
            "hematoxylin_eosin": float(self.hematoxylin_eosin),
            "cast": [float(c) for c in self.cast],
            "illumination": float(self.illumination),
            "glass": [float(c) for c in self.glass],
            "od_rotation_deg": float(self.od_rotation_deg),
            "noise": float(self.noise),
        }


STAIN_KINDS = ("normal", "pale", "dark", "cast", "uneven")


def draw_style(rng: np.random.Generator, kind: str) -> StainStyle:
    """Draw a :class:`StainStyle` of one of :data:`STAIN_KINDS` (each also varies a little in every other way)."""
    if kind not in STAIN_KINDS:
        raise ValueError(f"stain must be one of {STAIN_KINDS}, got {kind!r}.")
    s = StainStyle(
        intensity=rng.uniform(0.85, 1.15),
        hematoxylin_eosin=rng.uniform(0.85, 1.15),
        cast=1.0 + rng.uniform(-0.02, 0.02, 3),
        illumination=rng.uniform(0.0, 0.06),
        glass=np.array([0.96, 0.955, 0.95]) + rng.uniform(-0.02, 0.02, 3),
        od_rotation_deg=rng.uniform(2.0, 6.0),
        noise=rng.uniform(1.5, 3.0),
    )
    if kind == "pale":
        s.intensity = rng.uniform(0.4, 0.6)
    elif kind == "dark":
        s.intensity = rng.uniform(1.5, 1.9)
        s.hematoxylin_eosin = rng.uniform(1.2, 1.5)
    elif kind == "cast":
        tint = rng.choice([np.array([1.0, 0.96, 0.86]), np.array([0.9, 0.95, 1.0]), np.array([1.0, 0.9, 0.96])])
        s.cast = tint * (1.0 + rng.uniform(-0.02, 0.02, 3))
        s.glass = np.clip(s.glass * tint, 0, 1)
    elif kind == "uneven":
        s.illumination = rng.uniform(0.2, 0.35)
    return s


def _rotate_vector(rng, v: np.ndarray, deg: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis -= axis.dot(v) * v
    axis /= np.linalg.norm(axis)
    t = np.radians(deg)
    out = np.abs(np.cos(t) * v + np.sin(t) * axis)
    return out / np.linalg.norm(out)


# ---------------------------------------------------------------------------------------------- geometry
@dataclass
class Pullback:
    """Each image pixel's preimage(s) in the Xenium frame: one ``(flat pixel index, xy µm)`` pair per piece."""

    shape: tuple[int, int]
    layers: list[tuple[np.ndarray, np.ndarray]]


def pullback(truth: PairTruth, shape: tuple[int, int], scalef: float, step: int = 8) -> Pullback:
    """Preimages of every pixel of an image at ``scalef`` image px per full-res px (exact on a coarse grid).

    Between the coarse grid's nodes (every ``step`` pixels) the preimages are interpolated bilinearly (the
    warp is smooth over hundreds of µm); each piece's preimage is then exact (a rigid motion).
    """
    h, w = shape
    ic = np.arange(0, h + step, step, dtype=float)
    jc = np.arange(0, w + step, step, dtype=float)
    J, I = np.meshgrid(jc, ic)
    px = np.column_stack([(J.ravel() + 0.5) / scalef, (I.ravel() + 0.5) / scalef])
    y = truth.warp.invert(_apply_h(np.linalg.inv(truth.affine), px))
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float32) / step, np.arange(w, dtype=np.float32) / step, indexing="ij")
    coords = np.stack([ii.ravel(), jj.ravel()])
    yy = np.column_stack([map_coordinates(y[:, c].reshape(I.shape), coords, order=1) for c in range(2)])
    layers = []
    for k, x in enumerate(truth.piece_preimages(yy)):
        ok = np.flatnonzero(np.isfinite(x[:, 0]))
        layers.append((ok, x[ok]))
        del k
    return Pullback((h, w), layers)


def composite(pb: Pullback, raster: Raster, weight: Raster | None = None) -> np.ndarray:
    """``(c, h, w)`` sum over pieces of ``raster`` (``(c, H, W)`` channels) sampled at each pixel's preimages.

    ``weight`` (e.g. the Visium section's soft tissue membership) multiplies every channel.
    """
    data = raster.data if raster.data.ndim == 3 else raster.data[None]
    out = np.zeros((data.shape[0], pb.shape[0] * pb.shape[1]), np.float32)
    r = Raster(raster.origin, raster.spacing, data)
    for idx, xy in pb.layers:
        if idx.size == 0:
            continue
        vals = r.sample(xy)
        if weight is not None:
            vals = vals * weight.sample(xy)[None]
        out[:, idx] += vals.astype(np.float32)
    return out.reshape(data.shape[0], *pb.shape)


# ---------------------------------------------------------------------------------------------- nuclei
def splat(shape: tuple[int, int], px: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Bilinear, mass-conserving deposit of ``mass`` at continuous pixel positions ``px`` (x, y; centre convention)."""
    h, w = shape
    out = np.zeros(h * w, np.float64)
    fx, fy = px[:, 0] - 0.5, px[:, 1] - 0.5
    ok = (fx >= 0) & (fx < w - 1) & (fy >= 0) & (fy < h - 1)
    fx, fy, m = fx[ok], fy[ok], mass[ok]
    j0, i0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - j0, fy - i0
    for di, wy in ((0, 1 - ty), (1, ty)):
        for dj, wx in ((0, 1 - tx), (1, tx)):
            out += np.bincount((i0 + di) * w + j0 + dj, weights=m * wy * wx, minlength=h * w)
    return out.reshape(h, w)


def disc_kernel(radius_px: float) -> np.ndarray:
    """Normalised disc (supersampled edge) of radius ``radius_px``."""
    r = max(radius_px, 0.5)
    n = int(np.ceil(r)) + 1
    sub = 4
    g = (np.arange(-n * sub, (n + 1) * sub) + 0.5) / sub - 0.5
    X, Y = np.meshgrid(g, g)
    inside = (np.hypot(X, Y) <= r).astype(float)
    k = inside.reshape(2 * n + 1, sub, 2 * n + 1, sub).mean(axis=(1, 3))
    return k / k.sum()


def nuclei_image(
    shape: tuple[int, int],
    px: np.ndarray,
    radius_um: np.ndarray,
    um_per_img_px: float,
    style: str,
) -> np.ndarray:
    """Hematoxylin amount of the nuclei (cells at image px ``px``, nucleus radii in µm).

    ``style``: ``"dots"`` (each nucleus a solid disc of its area), ``"smooth"`` (a smooth hematoxylin
    density, a Gaussian of 12 µm: nuclei not resolved), ``"rings"`` (a dark rim of chromatin around a
    paler centre).
    """
    from scipy.signal import fftconvolve  # (here: scipy.signal costs 0.4 s to import, only the families use it)

    area_px = np.pi * (radius_um / um_per_img_px) ** 2
    r_mean = float(np.mean(radius_um)) / um_per_img_px if len(radius_um) else 1.0
    if style == "dots":
        return fftconvolve(splat(shape, px, area_px), disc_kernel(r_mean), mode="same")
    if style == "smooth":
        return gaussian_filter(splat(shape, px, area_px), max(12.0 / um_per_img_px, 0.7))
    if style == "rings":
        outer, inner = disc_kernel(r_mean * 1.1), disc_kernel(r_mean * 0.6)
        pad = (outer.shape[0] - inner.shape[0]) // 2
        ring = outer - 0.5 * np.pad(inner, pad) * inner.size / outer.size
        ring = np.clip(ring, 0, None)
        ring /= ring.sum()
        return fftconvolve(splat(shape, px, area_px), ring, mode="same")
    raise ValueError(f"nucleus style must be 'dots', 'smooth' or 'rings', got {style!r}.")


# ---------------------------------------------------------------------------------------------- colour
def beer_lambert(amounts: dict[str, np.ndarray], vectors: dict[str, np.ndarray], style: StainStyle, rng) -> np.ndarray:
    """Float RGB in ``[0, 1]``: ``glass * cast * 10^-(intensity * sum_c amount_c od_c)``."""
    od = None
    for name, amt in amounts.items():
        v = _rotate_vector(rng, vectors[name], style.od_rotation_deg)
        gain = style.intensity * (style.hematoxylin_eosin if name == "hematoxylin" else 1.0)
        term = (gain * amt)[..., None] * v.astype(np.float32)
        od = term if od is None else od + term
    return (style.glass * style.cast).astype(np.float32) * np.power(np.float32(10.0), -od)


def additive(
    amounts: dict[str, np.ndarray], colours: dict[str, np.ndarray], style: StainStyle, order: list[str]
) -> np.ndarray:
    """Float RGB in ``[0, 1]``: colours painted over the glass in ``order`` with ``alpha = 1 - exp(-amount)``."""
    h, w = next(iter(amounts.values())).shape
    rgb = np.broadcast_to((style.glass * style.cast).astype(np.float32), (h, w, 3)).copy()
    for name in order:
        gain = style.intensity * (style.hematoxylin_eosin if name == "hematoxylin" else 1.0)
        alpha = (1.0 - np.exp(-gain * amounts[name])).astype(np.float32)[..., None]
        rgb = rgb * (1 - alpha) + (np.asarray(colours[name], np.float32) * style.cast.astype(np.float32)) * alpha
    return rgb


def finish(rgb: np.ndarray, style: StainStyle, rng) -> np.ndarray:
    """Uneven illumination and noise, then ``uint8``."""
    h, w = rgb.shape[:2]
    c = rng.uniform(-0.6, 0.6, 2)
    a = rng.uniform(0, 2 * np.pi)
    if style.illumination > 0:  # smooth: computed on a 64 x 64 grid and interpolated
        yy, xx = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), indexing="ij")
        vign = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / 4.0
        grad = 0.5 * (1 + np.cos(a) * xx + np.sin(a) * yy) / 2.0
        light = 1.0 - style.illumination * np.clip(0.6 * vign + 0.4 * grad, 0, 1)
        light = zoom(light, (h / 64, w / 64), order=1, grid_mode=True, mode="nearest")[:h, :w]
        rgb = rgb * light.astype(np.float32)[..., None]
    out = rgb * np.float32(255.0) + np.float32(style.noise) * rng.standard_normal(size=rgb.shape, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
