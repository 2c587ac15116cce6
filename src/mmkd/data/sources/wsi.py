"""Owns the whole-slide-image source: one record per tissue tile of each slide, the slide as the group.

Listing opens each slide once (tissue detection on its smallest level, bounded by mmkd.data.wsi) and closes it;
a worker reads one tile per record, keeping at most OPEN_SLIDES slides open. One bad slide is one quarantined
record naming it.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mmkd.data.imaging import RecordError, check_size
from mmkd.data.sources import RawRecord, inside, source_root
from mmkd.data.sources.files import contained, per_file_records, sidecar_caption
from mmkd.data.wsi import Slide, SlideError, Tile, open_slide, read_tile, tissue_tiles

EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".bif", ".vms")
OPEN_SLIDES = 2  # slides a worker keeps open between records (tiles come slide by slide, so 2 covers a boundary)
_TCGA = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    root = source_root(spec, data_root)
    if spec.caption_template:
        _format(spec, "name", 0, 0)  # a bad template is a config error: fail early
    yield from per_file_records(spec, root, "**/*", "slide", _file_records, limits)


def _file_records(spec, path: Path, base: Path, rel: str, limits) -> list[RawRecord]:
    if spec.pattern is None and path.suffix.lower() not in EXTENSIONS:
        return []  # the default pattern lists every file; a slide's companions (.mrxs data, sidecars) are not slides
    rec = RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel}, group=group_of(rel))
    try:
        if inside(base, rel) is None:  # a symlink pointing outside the root
            raise RecordError(f"path escapes the source root: {rel}")
        text = sidecar_caption(base, path.with_suffix(".txt"), limits, rel)
        with open_slide(path, assume_mpp=spec.wsi_assume_mpp) as slide:
            info = _info(slide)
            rec.raw.update(info)
            tiles = tissue_tiles(slide, spec.wsi_mpp, spec.wsi_tile_px, tissue_fraction=spec.wsi_tissue_fraction,
                                 max_tiles=spec.wsi_max_tiles, seed=slide_seed(spec.wsi_seed, rel))
    except (RecordError, SlideError) as exc:
        rec.problem = str(exc) if rel in str(exc) or Path(rel).name in str(exc) else f"{rel}: {exc}"
        return [rec]
    if not tiles:
        extent = spec.wsi_tile_px * spec.wsi_mpp / info["mpp"]  # level-0 pixels of one tile
        size = f"{info['width']}x{info['height']}"
        rec.problem = (f"slide smaller than one tile: {rel} is {size}, a {spec.wsi_tile_px}px tile at "
                       f"{spec.wsi_mpp} um/px spans {extent:.0f}" if min(info["width"], info["height"]) < extent else
                       f"no tissue tiles in {rel}: none of {spec.wsi_tile_px}px at {spec.wsi_mpp} um/px has "
                       f"{spec.wsi_tissue_fraction:.0%} tissue (slide {size})")
        return [rec]
    name = Path(rel).stem
    recs = []
    for t in tiles:
        caption = text if text is not None else (_format(spec, name, t.x, t.y) if spec.caption_template else "")
        loc = {"path": str(path), "rel": rel, "root": str(base), "x": t.x, "y": t.y, "level": t.level,
               "size": t.size, "out": t.out, "assume_mpp": spec.wsi_assume_mpp}
        recs.append(RawRecord(spec.name, spec.kind, f"{rel}#{spec.wsi_mpp}mpp-{t.out}px-x{t.x}-y{t.y}", rel,
                              loc=loc, caption=caption, modality=spec.modality or "pathology", group=rec.group,
                              raw={"path": rel, "x": t.x, "y": t.y, "level": t.level, "size": t.size, **info}))
    return recs


def _info(slide: Slide) -> dict:
    w, h = slide.dimensions
    return {"width": w, "height": h, "levels": slide.level_count, "mpp": slide.mpp, "mpp_source": slide.mpp_source,
            "vendor": slide.vendor, "backend": slide.backend}


def group_of(rel: str) -> str:
    """The TCGA patient (`TCGA-XX-XXXX`) when the slide's name has one, so a patient's slides share a split;
    else the slide itself."""
    m = _TCGA.match(Path(rel).name)
    return m.group(1).upper() if m else rel


def slide_seed(seed: int, rel: str) -> int:
    """The tile-choice seed of one slide: the source's seed mixed with the slide's path (stable across runs)."""
    return (int(seed) * 1_000_003 + zlib.crc32(rel.encode())) % 2**32


def _format(spec, name: str, x: int, y: int) -> str:
    fields = {"name": name, "mpp": spec.wsi_mpp, "x": x, "y": y, "modality": spec.modality or ""}
    try:
        return " ".join(spec.caption_template.format(**fields).split())
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise ValueError(f"bad wsi caption_template {spec.caption_template!r} (fields: {sorted(fields)}): "
                         f"{type(exc).__name__}: {exc}") from None


_open: OrderedDict[str, Slide] = OrderedDict()


def _slide(path: Path, assume_mpp) -> Slide:
    """An open slide from this process's small LRU (at most OPEN_SLIDES; the oldest is closed)."""
    key = f"{path}|{assume_mpp}"
    if key in _open:
        _open.move_to_end(key)
        return _open[key]
    slide = open_slide(path, assume_mpp=assume_mpp)
    _open[key] = slide
    while len(_open) > OPEN_SLIDES:
        _open.popitem(last=False)[1].close()
    return slide


def close_all() -> None:
    """Close the slides this process holds open (tests and benchmarks; workers end with their process)."""
    while _open:
        _open.popitem(last=False)[1].close()


def load_pixels(rec: RawRecord, cfg) -> np.ndarray:
    loc = rec.loc
    path = Path(loc["path"])
    if "root" in loc:
        path = contained(loc["root"], loc.get("rel", path), rec.origin)
    if not path.is_file():
        raise RecordError(f"slide not found: {rec.origin}")
    out = int(loc["out"])
    check_size(out, out, cfg)
    tile = Tile(int(loc["x"]), int(loc["y"]), int(loc["level"]), int(loc["size"]), out)
    try:
        return read_tile(_slide(path, loc.get("assume_mpp")), tile)
    except SlideError as exc:
        raise RecordError(f"{rec.origin}: {exc}") from None
