"""Owns whole-slide images: opening a slide (OpenSlide, else tiffslide), tissue detection, the tile grid, tile reads.

Memory is bounded per call, never by the slide: tissue detection reads the smallest level in blocks and keeps
a mask of at most THUMB_SIDE pixels a side, and a tile read decodes one region of `size` pixels at one level.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

THUMB_SIDE = 2048              # the tissue mask's longest side, at most
BLOCK = 1024                   # tissue detection reads the smallest level in blocks of at most this side
MIN_SATURATION = 20            # 0..255: below this a pixel is glass whatever Otsu says (a blank slide has no tissue)
SMOOTH = 7                     # mask pixels: saturation is averaged over this window before thresholding
DARK_VALUE = 30                # 0..255: pen marks and scanner black borders are dark, not tissue
MAX_SIDE = 500_000             # level-0 side refused beyond this (a forged header, not a slide)
MAX_TILE_PIXELS = 16 * 2**20   # a TIFF tile OpenSlide would decode whole; a forged 64k x 64k tile is refused
MAX_READ_PIXELS = 4096 * 4096  # one region read (a tile at a level far finer than asked, a block): 64 MiB RGBA
MAX_BLOCK_READS = 256          # tissue detection on a slide with no small level is refused past this many blocks
CACHE_BYTES = 32 * 2**20       # one OpenSlide tile cache for all slides of a process (default: one each)
MAX_MPP = 100.0                # a resolution coarser than this is a TIFF placeholder (72 dpi = 353 um/px), not a scan
UPSAMPLE_LIMIT = 0.8           # requests at most 25% finer than level 0 are read at level 0 and upsampled


class SlideError(Exception):
    """A slide cannot be opened or tiled; the message names the file."""


@dataclass(frozen=True)
class Tile:
    """One tile: level-0 top-left (x, y); `size` pixels square read at `level`, resized to `out` pixels."""

    x: int
    y: int
    level: int
    size: int
    out: int


class Slide:
    """An open slide (OpenSlide or tiffslide underneath, named by `backend`); close it, or use it as a context."""

    def __init__(self, path: Path, handle, backend: str, assume_mpp: float | None = None):
        self.path = Path(path)
        self.backend = backend
        self._h = handle
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)
        self.level_count: int = int(handle.level_count)
        self.level_dimensions: list[tuple[int, int]] = [tuple(int(v) for v in d) for d in handle.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in handle.level_downsamples]
        self.properties: dict[str, str] = {str(k): str(v) for k, v in dict(handle.properties).items() if v is not None}
        self.vendor: str | None = self.properties.get("openslide.vendor") or self.properties.get("tiffslide.vendor")
        declared = _mpp(self.properties)
        # where mpp came from: the vendor's or TIFF's value, else the caller's assumption
        self.mpp_source: str | None = "declared" if declared else ("assumed" if assume_mpp else None)
        self.mpp: float | None = declared or assume_mpp

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._h is not None:
            self._h.close()
            self._h = None

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) at `level` from level-0 (x, y); alpha and area off the slide are white."""
        if self._h is None:
            raise SlideError(f"slide is closed: {self.path.name}")
        if width * height > MAX_READ_PIXELS:
            raise SlideError(f"region too large: {width}x{height} of {self.path.name} (limit {MAX_READ_PIXELS})")
        if not 0 <= level < self.level_count:
            raise SlideError(f"level {level} out of range for {self.path.name} ({self.level_count} levels)")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = int(x // ds), int(y // ds)  # the region's origin at that level
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, lw), min(ly + height, lh)
        out = np.full((height, width, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        # read only the part on the slide (tiffslide pads with black, OpenSlide with transparent)
        origin = (int(round(x0 * ds)) if x0 != lx else int(x), int(round(y0 * ds)) if y0 != ly else int(y))
        try:
            region = self._h.read_region(origin, level, (x1 - x0, y1 - y0))
        except Exception as exc:  # a corrupt tile, a truncated file
            raise SlideError(f"cannot read {self.path.name} at level {level} ({x}, {y}) {width}x{height}: "
                             f"{type(exc).__name__}: {exc}") from None
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = _rgb_on_white(np.asarray(region))
        return out


def _rgb_on_white(a: np.ndarray) -> np.ndarray:
    """uint8 RGB from gray, gray+alpha, RGB or RGBA (OpenSlide's alpha is not premultiplied): alpha over white."""
    if a.dtype != np.uint8:
        raise SlideError(f"unsupported sample type {a.dtype} (only 8-bit slides are read)")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] in (2, 4) and (a[..., -1] == 255).all():
        a = a[..., :-1]  # opaque (most regions): nothing to blend
    if a.shape[-1] in (2, 4):
        alpha = a[..., -1:].astype(np.uint16)
        rgb = a[..., :-1].astype(np.uint16)
        a = ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def _mpp(props: dict[str, str]) -> float | None:
    """Microns per pixel at level 0: the vendor's value, else the TIFF resolution (inch or centimetre units);
    None when absent or a placeholder (OpenSlide reports a TIFF writer's default 72 dpi as 352.8 um/px)."""
    values = [props.get("openslide.mpp-x"), props.get("tiffslide.mpp-x")]
    unit = props.get("tiff.ResolutionUnit", "").lower()
    per_unit = {"centimeter": 1e4, "centimetre": 1e4, "inch": 25_400.0}.get(unit)
    if per_unit:
        try:
            values.append(per_unit / float(props.get("tiff.XResolution", "")))
        except (ValueError, ZeroDivisionError):
            pass
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and 0 < v <= MAX_MPP:
            return v
    return None


@functools.cache
def _shared_cache():
    import openslide
    return openslide.OpenSlideCache(CACHE_BYTES)


def open_slide(path: Path, *, assume_mpp: float | None = None) -> Slide:
    """The slide at `path` through OpenSlide, or tiffslide where OpenSlide cannot open it (`backend` says which);
    `assume_mpp` is its level-0 mpp when it declares none. SlideError naming the file."""
    import openslide  # imported here: the library's shared object loads only where slides are read
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise SlideError(f"slide not found: {name}")
    errors = []
    try:
        handle = openslide.OpenSlide(str(path))
        handle.set_cache(_shared_cache())  # memory flat across slides: one bounded cache, not one per slide
        slide = Slide(path, handle, "openslide", assume_mpp)
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError: try tiffslide
        errors.append(f"OpenSlide: {type(exc).__name__}: {exc}")
        slide = None
    if slide is None:
        try:
            import tiffslide
            slide = Slide(path, tiffslide.TiffSlide(str(path)), "tiffslide", assume_mpp)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds on a non-TIFF
            errors.append(f"tiffslide: {type(exc).__name__}: {exc}")
    if slide is None:
        raise SlideError(f"unreadable slide {name}: " + "; ".join(errors))
    try:
        _check(slide)
    except SlideError:
        slide.close()
        raise
    return slide


def _check(slide: Slide) -> None:
    name = slide.path.name
    w, h = slide.dimensions
    if w < 1 or h < 1 or max(w, h) > MAX_SIDE:
        raise SlideError(f"implausible slide size: {name} declares {w}x{h} (limit {MAX_SIDE} a side)")
    for lv in range(slide.level_count):
        key = f"{slide.backend}.level[{lv}].tile-"  # both backends name a level's TIFF tile size so
        tw, th = (int(float(slide.properties.get(key + d) or 0)) for d in ("width", "height"))
        if tw * th > MAX_TILE_PIXELS:
            raise SlideError(f"TIFF tile too large: {name} level {lv} has {tw}x{th} tiles "
                             f"(> {MAX_TILE_PIXELS} pixels, each decoded whole)")


def tissue_mask(slide: Slide) -> tuple[np.ndarray, float]:
    """(bool mask, level-0 pixels per mask pixel): Otsu on saturation of the smallest level, read in blocks."""
    lv = slide.level_count - 1
    lw, lh = slide.level_dimensions[lv]
    f = max(1, math.ceil(max(lw, lh) / THUMB_SIDE))  # level pixels per mask pixel
    mw, mh = max(1, lw // f), max(1, lh // f)
    step = max(f, (BLOCK // f) * f)
    if math.ceil(lw / step) * math.ceil(lh / step) > MAX_BLOCK_READS:
        raise SlideError(f"no low-resolution level for tissue detection: {slide.path.name}'s smallest level is "
                         f"{lw}x{lh}; make a pyramid (e.g. `vips tiffsave --pyramid --tile`)")
    sat = np.zeros((mh, mw), np.uint8)
    val = np.zeros((mh, mw), np.uint8)
    ds = slide.level_downsamples[lv]
    for by in range(0, mh * f, step):
        for bx in range(0, mw * f, step):
            bw, bh = min(step, mw * f - bx), min(step, mh * f - by)
            rgb = slide.read_region(int(bx * ds), int(by * ds), lv, bw, bh)
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            v = np.maximum(np.maximum(r, g), b)
            s = v - np.minimum(np.minimum(r, g), b)  # HSV saturation x value: 0 on grey glass, high on stain
            rows, cols = slice(by // f, (by + bh) // f), slice(bx // f, (bx + bw) // f)
            sat[rows, cols] = _reduce(s, f)
            val[rows, cols] = _reduce(v, f)
    sat = _box(sat, SMOOTH)  # stained tissue has pale gaps between cells: the mask should cover them
    thr = max(_otsu(sat), MIN_SATURATION)
    mask = (sat >= thr) & (val > DARK_VALUE)
    return mask, ds * f


def _reduce(a: np.ndarray, f: int) -> np.ndarray:
    """The f x f block means of a uint8 array whose sides are multiples of f (PIL's box reduction, in C)."""
    return a if f == 1 else np.asarray(Image.fromarray(a).reduce(f))


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """The k x k mean of a uint8 array (PIL's box blur, in C: no full-size temporaries)."""
    return np.asarray(Image.fromarray(a).filter(ImageFilter.BoxBlur(k // 2)))


def _otsu(a: np.ndarray) -> int:
    """Otsu's threshold of a uint8 array (the first level of the upper class)."""
    hist = np.bincount(a.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 255
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - total * m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between)) + 1


def level_for(slide: Slide, mpp: float) -> tuple[int, float]:
    """(level, level-0 pixels per output pixel) for `mpp`: the coarsest level at or finer than the request."""
    if slide.mpp is None:
        raise SlideError(f"no microns per pixel in {slide.path.name} (no vendor mpp, no TIFF resolution); "
                         "set the source's wsi_assume_mpp to tile it")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise SlideError(f"requested mpp must be positive, got {mpp}")
    ds = mpp / slide.mpp
    if ds < UPSAMPLE_LIMIT:
        raise SlideError(f"{slide.path.name} is {slide.mpp:.4g} um/px at level 0: {mpp} um/px would upsample "
                         f"it {1 / ds:.2f}x")
    fits = [lv for lv, d in enumerate(slide.level_downsamples) if d <= ds * 1.001]  # float slack on exact levels
    return (max(fits, key=lambda lv: slide.level_downsamples[lv]) if fits else 0), ds


def tissue_tiles(slide: Slide, mpp: float, tile_px: int, *, tissue_fraction: float = 0.5,
                 max_tiles: int | None = None, seed: int = 0) -> list[Tile]:
    """The non-overlapping tiles of `tile_px` output pixels at `mpp` with at least `tissue_fraction` tissue, in
    raster order; past `max_tiles`, one seeded pick from each of max_tiles equal runs of that order."""
    if tile_px < 1:
        raise SlideError(f"tile_px must be >= 1, got {tile_px}")
    level, ds = level_for(slide, mpp)
    extent = tile_px * ds  # level-0 pixels a tile covers
    size = max(1, round(extent / slide.level_downsamples[level]))
    if size * size > MAX_READ_PIXELS:
        raise SlideError(f"no level of {slide.path.name} near {mpp} um/px: a tile would read {size}x{size} pixels "
                         f"at level {level} (limit {MAX_READ_PIXELS}); make a pyramid")
    w, h = slide.dimensions
    nx, ny = int(w // extent), int(h // extent)
    if nx == 0 or ny == 0:
        return []
    mask, scale = tissue_mask(slide)
    integral = np.pad(mask.astype(np.int32).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    tiles = []
    for j in range(ny):
        y = round(j * extent)
        r0, r1 = min(mh, int(y / scale)), min(mh, max(int(y / scale) + 1, round((y + extent) / scale)))
        for i in range(nx):
            x = round(i * extent)
            c0, c1 = min(mw, int(x / scale)), min(mw, max(int(x / scale) + 1, round((x + extent) / scale)))
            area = (r1 - r0) * (c1 - c0)
            if area == 0:
                continue
            n = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
            if n / area >= tissue_fraction and n > 0:
                tiles.append(Tile(x, y, level, size, tile_px))
    if max_tiles is not None and len(tiles) > max_tiles:
        rng = np.random.default_rng(seed)
        # run k holds the indices i with k <= i * max_tiles / len < k + 1 (each at least one: len > max_tiles)
        edges = [-(-k * len(tiles) // max_tiles) for k in range(max_tiles + 1)]
        picks = [int(rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        tiles = [tiles[k] for k in picks]
    return tiles


def read_tile(slide: Slide, tile: Tile) -> np.ndarray:
    """uint8 RGB (out, out, 3): the tile's region, alpha composited on white, resized when size != out."""
    rgb = slide.read_region(tile.x, tile.y, tile.level, tile.size, tile.size)
    if tile.size != tile.out:
        rgb = np.asarray(Image.fromarray(rgb).resize((tile.out, tile.out), Image.Resampling.LANCZOS))
    return rgb
