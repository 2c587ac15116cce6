"""Owns bags tiled straight from whole-slide images: each bag's slides, their tissue tiles (read lazily), and
their encoding through the per-slide, per-tile embedding cache (slide_cache.py).

The MIL and survival loaders call `slide_bags` when their `slides_dir` is set: every slide of a bag is opened once
at load to find its tissue tiles (a low-resolution level only, mmkd.data.wsi), and each tile's pixels are read,
at the level its mpp needs, only when the encoder asks for them. A missing, unreadable or tissue-less slide is a rejected record naming it; its
bag is dropped only when none of its slides gave a tile.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import field_validator

from mmkd.data.sources import inside
from mmkd.evaluation.dataset import DatasetFormatError, ImageSource
from mmkd.evaluation.loaders import common

log = logging.getLogger("mmkd")
# what OpenSlide (and tiffslide) open; an .mrxs's data folder holds .dat/.ini files, never listed
SLIDE_EXTS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu"})
TCGA_PATIENT = r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})"  # a TCGA barcode's first 12 characters: the patient (case)
STEM = r"^([^.]+)"  # the file name up to its first dot: CAMELYON16's tumor_001.tif -> tumor_001
CHUNK = 512  # tiles decoded per encoder call: bounds memory whatever the slide


class SlideOptions(common.Options):
    """The slide fields of mil_bags and survival_table (docs/formats/wsi_evaluation.md)."""

    slides_dir: str | None = None  # set: bags are tiled from the slides under this folder (searched recursively)
    slide_col: str | None = None  # a table column naming each row's slide file under slides_dir (one per bag)
    slide_id: str | None = None  # regex on a slide's file name, group 1 = its bag id (default: up to the first dot;
    # survival with tcga: the barcode's 12-character patient, so a patient's slides make one bag)
    tile_mpp: float = 0.5  # microns per pixel of the tiles (0.5: 20x)
    tile_px: int = 256  # tile side in pixels at tile_mpp (the encoder resizes it to its input)
    max_tiles: int | None = 256  # per slide: a seeded spread over the tissue in raster order; null: every tile
    tissue_fraction: float = 0.5  # a tile is kept when at least this fraction of it is tissue
    tile_seed: int = 0  # the pick when a slide has more than max_tiles tissue tiles
    assume_mpp: float | None = None  # level-0 microns per pixel for slides that declare none (else refused)

    @field_validator("slide_id")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        if v is not None and re.compile(v).groups < 1:
            raise ValueError(f"slide_id '{v}' needs a group: group 1 is the bag id")
        return v

    @field_validator("tile_mpp", "tissue_fraction", "assume_mpp")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("tile_px", "max_tiles")
    @classmethod
    def _count(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


class SlideTiles(ImageSource):
    """Every tile of a dataset's bags: (slide, Tile) pairs, each read from its slide when loaded. One slide is
    held open at a time (tiles come slide by slide), behind a lock: evaluation units may share the dataset."""

    lazy = True  # never decoded whole up front (steps.evaluate): a slide set's tiles do not fit in memory

    def __init__(self, slides: list[Path], tiles: list[tuple[int, object]], mpp: float, tile_px: int):
        self.slides, self.tiles, self.mpp, self.tile_px = slides, tiles, mpp, tile_px
        self._lock = threading.Lock()
        self._open: tuple[int, object] | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def _slide(self, k: int):
        from mmkd.data.wsi import open_slide

        if self._open is None or self._open[0] != k:
            self._close()
            self._open = (k, open_slide(self.slides[k]))
        return self._open[1]

    def load(self, i: int) -> Image.Image:
        from mmkd.data.wsi import SlideError, read_tile

        k, tile = self.tiles[i]
        with self._lock:
            try:
                return Image.fromarray(read_tile(self._slide(k), tile))
            except SlideError as e:
                raise DatasetFormatError(f"slide '{self.slides[k]}' tile at ({tile.x}, {tile.y}) level "
                                         f"{tile.level}: {e}") from e

    def _close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def close(self) -> None:
        """Close the slide held open (the next load reopens it)."""
        with self._lock:
            self._close()

    def __getstate__(self) -> dict:  # a copy (pickled, deep-copied) opens its own slides
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_open")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _open=None)

    def coords(self, idx) -> np.ndarray:
        """(n, 5) int64 x, y, level, size, out of the tiles `idx`: what a cached embedding row is matched on."""
        return np.array([[t.x, t.y, t.level, t.size, t.out] for t in (self.tiles[i][1] for i in idx)],
                        np.int64).reshape(-1, 5)

    def by_slide(self) -> list[tuple[int, np.ndarray]]:
        """(slide index, its tile indices), slides in tile order."""
        ks = np.array([k for k, _ in self.tiles], np.int64)
        return [(int(k), np.flatnonzero(ks == k)) for k in dict.fromkeys(ks.tolist())]

    def fingerprint(self) -> str:
        """Each slide's path, size and mtime, and every tile's coordinates, level, size and output size."""
        h = hashlib.sha256(f"{self.mpp}\0{self.tile_px}\n".encode())
        for k, idx in self.by_slide():
            h.update(f"{_stat_key(self.slides[k])}\n".encode())
            h.update(self.coords(idx).tobytes())
        return h.hexdigest()[:16]

    def encode_cached(self, encoder, model_version: str, batch: int, cache_dir: Path | None) -> np.ndarray:
        """A row per tile; with `cache_dir`, a file per (slide, encoder weights, input size, mpp, tile size) holds
        its tiles' rows by coordinates, valid while the slide's path, size and mtime are unchanged: a second
        evaluation, or one with more tiles, encodes only the tiles it lacks."""
        from mmkd.evaluation.slide_cache import TileCache
        from mmkd.progress import progress

        out = np.zeros((len(self.tiles), 0), np.float32)
        with progress(total=len(self.tiles), desc=f"embed {encoder.name} tiles", unit="tile", leave=False,
                      disable=None) as bar:
            for k, idx in self.by_slide():
                cache = TileCache(cache_dir, self.slides[k], _stat_key(self.slides[k]), model_version,
                                  encoder.spec.size, self.mpp, self.tile_px)
                coords = self.coords(idx)
                hit, rows = cache.lookup(coords)
                todo = np.flatnonzero(~hit)
                bar.update(len(idx) - len(todo))
                for s in range(0, len(todo), CHUNK):
                    part = todo[s: s + CHUNK]
                    emb = encoder.encode_pil([self.load(int(idx[j])) for j in part], batch)
                    if rows is None:
                        rows = np.zeros((len(idx), emb.shape[1]), np.float32)
                    rows[part] = emb
                    bar.update(len(part))
                if len(todo):
                    cache.store(coords, rows)
                if out.shape[1] == 0:
                    out = np.zeros((len(self.tiles), rows.shape[1]), np.float32)
                out[idx] = rows
        self.close()
        return out


def slide_files(root: Path, exclude: list[str]) -> list[Path]:
    """Slide files under root (recursively, sorted), minus names matching `exclude`; nothing outside root."""
    found = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in SLIDE_EXTS and not any(p.match(g) for g in exclude):
            target = inside(root, p.relative_to(root).as_posix())
            if target is not None and target.is_file():
                found.append(p)
    return found


def find_slides(root: Path, ids: list[str], pattern: str, exclude: list[str], rejected: list,
                named: dict[str, str] | None = None) -> dict[str, list[Path]]:
    """Each id's slide files: the one `named` gives (a table column; relative to root), else every slide file
    under root whose name's `pattern` group 1 is the id. Names that escape root are rejected records."""
    out: dict[str, list[Path]] = {i: [] for i in ids}
    if named is not None:
        for i, rel in named.items():
            target = inside(root, rel) if rel else None
            if target is None:
                rejected.append((f"slide {rel or '(empty)'}", f"bag {i}: slide path empty or outside {root}"))
            elif i in out:
                out[i].append(root / rel)
        return out
    rx = re.compile(pattern)
    for p in slide_files(root, exclude):
        m = rx.match(p.name)
        if m is None:
            rejected.append((f"slide {common.rel(p, root)}", f"name does not match slide_id '{pattern}'"))
        elif m.group(1) in out:
            out[m.group(1)].append(p)
    return out


def slide_bags(root: Path, slides: dict[str, list[Path]], o: SlideOptions, rejected: list,
               what: str = "bag") -> tuple[SlideTiles, dict[str, list[int]]]:
    """The tissue tiles of every id's slides (one SlideTiles for all) and each id's tile indices. A slide that is
    missing, unreadable, has no mpp or no tissue is rejected by name; an id left with no tile is rejected too."""
    from mmkd.data.wsi import SlideError, open_slide, tissue_tiles

    paths: list[Path] = []
    tiles: list[tuple[int, object]] = []
    bags: dict[str, list[int]] = {i: [] for i in slides}
    for bid, files in slides.items():
        for path in files:
            name = f"slide {common.rel(path, root)}"
            if not path.is_file():
                rejected.append((name, f"{what} {bid}: slide file not found"))
                continue
            try:
                with open_slide(path) as slide:
                    if slide.mpp is None and o.assume_mpp is None:
                        raise SlideError(f"no microns per pixel in {path.name} (no vendor mpp, no TIFF resolution): "
                                         "set the dataset's assume_mpp option to tile it")
                    slide.mpp = slide.mpp or o.assume_mpp
                    found = tissue_tiles(slide, o.tile_mpp, o.tile_px, tissue_fraction=o.tissue_fraction,
                                         max_tiles=o.max_tiles, seed=o.tile_seed)
            except SlideError as e:
                rejected.append((name, f"{what} {bid}: {e}"))
                continue
            if not found:
                rejected.append((name, f"{what} {bid}: no tissue tile ({o.tile_px} px at {o.tile_mpp} um/px, "
                                       f"tissue_fraction {o.tissue_fraction})"))
                continue
            paths.append(path)
            bags[bid] += range(len(tiles), len(tiles) + len(found))
            tiles += [(len(paths) - 1, t) for t in found]
    for bid, files in slides.items():
        if not bags[bid]:
            reason = "no slide under " + str(root) if not files else "none of its slides gave a tissue tile"
            rejected.append((f"{what} {bid}", f"empty bag: {reason}"))
    log.info("slide bags: %d tiles from %d slides under %s", len(tiles), len(paths), root)
    return SlideTiles(paths, tiles, o.tile_mpp, o.tile_px), bags


def slides_root(folder: Path, o: SlideOptions) -> Path:
    root = folder / (o.slides_dir or ".")
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: slides folder not found (slides_dir '{o.slides_dir}')")
    return root
