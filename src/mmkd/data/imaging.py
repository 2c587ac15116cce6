"""Owns pixels: checked decoding of image bytes, windowing high-bit data to 8 bits, hashes and resizes."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class RecordError(ValueError):
    """A record cannot be curated; the message is the quarantine reason."""


def check_size(width: int, height: int, limits) -> None:
    """Size limits from the header, before any pixel is decoded (min/max side, max pixels)."""
    if width * height > limits.max_pixels:
        raise RecordError(f"decompression bomb: {width}x{height} = {width * height} pixels > max_pixels "
                          f"{limits.max_pixels}")
    if max(width, height) > limits.max_input_side:
        raise RecordError(f"image too large: {width}x{height} > max_input_side {limits.max_input_side}")
    if min(width, height) < limits.min_side:
        raise RecordError(f"image too small: {width}x{height} < min_side {limits.min_side}")


def open_image(data: bytes, limits, allowed: list[str]) -> Image.Image:
    """Decode image bytes fully, refusing empty files, non-images, bombs and truncated data with a reason."""
    if not data:
        raise RecordError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RecordError(f"not an image: content is no known image format (starts {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise RecordError(f"decompression bomb: {exc}") from None
    if im.format not in allowed:
        raise RecordError(f"format {im.format} not in allowed formats {allowed}")
    check_size(im.width, im.height, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise RecordError(f"truncated or corrupt {im.format} data: {exc}") from None
    return im


def window(arr: np.ndarray, lo: float, hi: float, invert: bool = False) -> np.ndarray:
    """Linear map of [lo, hi] onto 0..255 (values outside the window saturate); a flat image maps to 0."""
    a = arr.astype(np.float64)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((a - lo) * scale, 0, 255)
    if invert:
        out = 255.0 - out
    return np.rint(out).astype(np.uint8)


def percentile_window(arr: np.ndarray, percentiles: tuple[float, float], invert: bool = False) -> np.ndarray:
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        raise RecordError("no finite pixel values")
    lo, hi = np.percentile(finite, percentiles)
    return window(np.nan_to_num(arr, nan=lo), float(lo), float(hi), invert)


def to_rgb8(im: Image.Image, highbit_percentiles: tuple[float, float] = (0.0, 100.0)) -> np.ndarray:
    """8-bit RGB pixels of any PIL mode: high-bit-depth data is windowed (never clipped at 255), CMYK converted."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return gray_to_rgb(percentile_window(np.asarray(im), highbit_percentiles))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))  # transparent areas become black, not garbage
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray


def content_hash(rgb: np.ndarray) -> str:
    """The curated key: a hash of the decoded pixels (shape included), so re-encodings of one image collide."""
    h = hashlib.sha256(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()[:32]


def _gray(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(rgb).convert("L").resize(size, Image.BILINEAR)
    return np.asarray(im, dtype=np.float64)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit pHash: the 8x8 lowest DCT frequencies of a 32x32 grey image against their median."""
    g = _gray(rgb, (32, 32))
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8].flatten()
    return _bits(low > np.median(low[1:]))


def _bits(flags: np.ndarray) -> int:
    return int(sum(1 << i for i, f in enumerate(flags) if f))


def fit_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    s = max_side / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC))


def square_view(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop, bicubic: exactly the default ImageSpec's preprocessing
    (open_clip's Resize + CenterCrop), so a model with that spec reads these views instead of decoding."""
    from mmkd.models.preprocess import ImageSpec, prepare

    return prepare(rgb, ImageSpec(size))


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
