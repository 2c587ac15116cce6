"""The embedded evaluation suite: training corpus untouched, formats as the contract, captions, survival, MIL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmkd.config import MODALITIES, EvalSurvivalCfg, SynthCfg, load_params
from mmkd.data import eval_items
from mmkd.data.eval_suite import MIL_FINDINGS, PRIMARY, SUITE_DIR, classification_plan, generate_suite
from mmkd.data.draw import finish
from mmkd.data.render import RENDERERS
from mmkd.data.synth import SPECS, generate, render_sample, zero_shot_prompts

from .conftest import REPO, write_params

# sha256 over render_sample(1234, m, split, i, 64, 0.7[, stream]) image bytes + record without its caption, for
# splits train, probe, test and teacher (stream 0x1234abcd) and i in (0, 1, 2, 5), computed before the suite's
# renderer hooks and the instance-level captions existed: only the captions changed since
PINNED = {
    "xray": "3842af3d8c7b5f772ba1baa32086fcac3dd7cef99045a7243729ca71f08672ed",
    "ct": "dc9fbd87d8faa6f41d75c66c1170751d16dfef6e0c2f5dc38a9a6a2bf1adfeff",
    "mri": "017c041a09586cad9720f54a92d6c6958de2f6a9c1815e5b3bcbaf43c9a7cc88",
    "ultrasound": "af4db54b6429163bcaeea874908fedbc9d116c8b43c6dac3956a7dfdfcd75298",
    "pathology": "f6c8fdb0067c1a344046ad5db085d2dda987c81807a01f0c351f4120147da374",
    "dermatology": "527cd632c1b28887fa70dc2fadc7ef3b4990d0651f898673954b619b63d07d68",
    "fundus": "77332ff68a197bf15765ca060d727331c80802951a639d2c1165e0b99eb336bd",
    "oct": "f190422c5bf01fa0da98d1651777acea9d00a6885fe30e03516d610ba330b07d",
    "endoscopy": "e02601d340069c780a3515d6932cc3129a2deda1b23392bfe5412ff228741eb8",
}
SMALL = {"classification": {"train": 12, "val": 6, "test": 30}, "vqa": {"train_images": 4, "test_images": 4},
         "survival": {"patients": 40, "images_per_patient": 2}, "mil": {"bags": 40, "instances": 4}}


def small_cfg(workers: int = 2, modalities: tuple[str, ...] = MODALITIES, **suite) -> SynthCfg:
    return SynthCfg(image_size=64, modalities=list(modalities), train_per_modality=24, probe_per_modality=6,
                    test_per_modality=9, difficulty=0.7, workers=workers,
                    eval_suite={"enabled": True, **SMALL, **suite})


@pytest.mark.parametrize("modality", MODALITIES)
def test_training_corpus_renders_as_before(modality):
    h = hashlib.sha256()
    for split, stream in (("train", None), ("probe", None), ("test", None), ("teacher", 0x1234ABCD)):
        for i in (0, 1, 2, 5):
            img, rec = render_sample(1234, modality, split, i, 64, 0.7, stream=stream)
            h.update(img.tobytes())
            h.update(json.dumps({k: v for k, v in rec.items() if k != "caption"}, sort_keys=True).encode())
    assert h.hexdigest() == PINNED[modality]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small corpus + suite through synth.generate (2 processes), and the suite alone in one process."""
    root = tmp_path_factory.mktemp("data")
    generate(small_cfg(2), 1234, root)
    alone = tmp_path_factory.mktemp("suite")
    generate_suite(small_cfg(1), 1234, alone)
    return root, root / SUITE_DIR, alone


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def test_suite_is_deterministic_and_order_free(run):
    _, suite, alone = run
    a, b = _files(suite), _files(alone)
    assert len(a) > 1000 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_no_suite_image_is_a_training_image(run):
    root, suite, _ = run
    train = {_pixels(p) for p in (root / "images").rglob("*.png")}
    assert len(train) == 9 * (24 + 6 + 9)
    teacher = {hashlib.sha256(render_sample(1234, m, "teacher", i, 64, 0.7, stream=7)[0].tobytes()).hexdigest()
               for m in MODALITIES for i in range(20)}
    ours = [_pixels(p) for p in suite.rglob("*.png")]
    assert not (set(ours) & (train | teacher))
    assert len(set(ours)) == len(ours)  # no two suite images alike either


def test_suite_json_names_every_set(run):
    _, suite, _ = run
    meta = json.loads((suite / "suite.json").read_text())
    assert meta["seed"] == 1234 and meta["image_size"] == 64
    expected = {f"embedded-{m}": (m, "csv_manifest") for m in MODALITIES} | {"embedded-vqa": ("vqa", "vqa_json")}
    expected |= {f"embedded-survival-{m}": (f"survival-{m}", "survival_table") for m in ("pathology", "mri")}
    expected |= {f"embedded-mil-{m}": (f"mil-{m}", "mil_bags") for m in ("pathology", "ct")}
    assert {k: (v["folder"], v["format"]) for k, v in meta["sets"].items()} == expected
    assert meta["sets"]["embedded-xray"]["items"] == 48 and meta["sets"]["embedded-mil-ct"]["items"] == 40


@pytest.mark.parametrize("modality", MODALITIES)
def test_classification_set_format_and_captions(run, modality):
    _, suite, _ = run
    folder = suite / modality
    df = pd.read_csv(folder / "manifest.csv")
    assert list(df.columns) == ["image", "label", "split", "caption"]
    assert df.split.value_counts().to_dict() == {"test": 30, "train": 12, "val": 6}
    classes = list(SPECS[modality].findings)
    assert set(zero_shot_prompts(modality)) == set(classes)
    for split, part in df.groupby("split"):
        counts = part.label.value_counts()
        assert set(counts.index) == set(classes) and counts.max() - counts.min() == 0
        # combinations are used without replacement: an abnormal class repeats a caption only once all are used
        for finding, rows in part.groupby("label"):
            assert rows.caption.nunique() == min(len(rows), len(eval_items.combos(modality, finding)))
    meta = json.loads((suite / "suite.json").read_text())["sets"][f"embedded-{modality}"]
    assert meta["n_unique_captions"] == df.caption.nunique()
    assert meta["splits"]["test"] == {"items": 30, "n_unique_captions": df[df.split == "test"].caption.nunique()}
    with Image.open(folder / df.image.iloc[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert all((folder / p).is_file() for p in df.image)


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_visible_attribute_is_in_the_caption(modality):
    for finding in SPECS[modality].findings:
        captions = [eval_items.caption(modality, finding, a) for a in eval_items.combos(modality, finding)]
        assert len(set(captions)) == len(captions), finding  # any attribute change changes the caption
        assert all(c.startswith(SPECS[modality].names[0][:1].upper()) and c.endswith(".") for c in captions)
    # normal images too: every finding has enough combinations that the default test split repeats none
    test = load_params(REPO / "params.yaml").synth.eval_suite.classification.test
    per_class = -(-test // len(SPECS[modality].findings))
    assert min(len(eval_items.combos(modality, f)) for f in SPECS[modality].findings) >= per_class


@pytest.mark.parametrize("modality", MODALITIES)
def test_default_suite_captions_are_distinct(modality):
    """Issue 18: at least 90% distinct captions in every classification split of the default profile's suite (the
    captions generate_suite writes: the same plan, without rendering)."""
    params = load_params(REPO / "params.yaml", profile="default")
    sizes = params.synth.eval_suite.classification
    for seed in (params.seed, 0):
        for split in ("train", "val", "test"):
            _, planned = classification_plan(seed, modality, split, getattr(sizes, split))
            caps = [eval_items.caption(modality, f, a) for f, a in planned]
            assert len(set(caps)) >= 0.9 * len(caps), (seed, split, len(set(caps)), len(caps))


@pytest.mark.parametrize(("modality", "finding", "attr", "step"),
                         [("endoscopy", "polyp", "pos", 0.45), ("ultrasound", "cyst", "lateral", 0.28)])
def test_the_lesion_is_where_the_caption_says(modality, finding, attr, step):
    # these renderers draw nothing for the lesion itself: the same rng with finding normal renders the same
    # image without it, so the difference is the lesion alone
    for a in {a[attr]: a for a in eval_items.combos(modality, finding)}.values():  # one per place
        attrs, _ = eval_items.render_attrs(np.random.default_rng(1), modality, finding, {**a, "grade": "severe"})
        img = [finish(RENDERERS[modality](np.random.default_rng(5), 64, f, attrs, 1.0), np.random.default_rng(6), 0)
               for f in (finding, "normal")]
        diff = np.abs(img[0].astype(float) - img[1].astype(float)).sum(-1)
        ax = np.linspace(-1, 1, 64)
        cx = (diff.sum(0) * ax).sum() / diff.sum()
        want = -step if "left" in a[attr] else step if "right" in a[attr] else 0.0
        assert abs(cx - want) < 0.12, (a, cx)


def _suite_image(modality: str, finding: str, a: dict, seed: int) -> np.ndarray:
    attrs, c = eval_items.render_attrs(np.random.default_rng(seed), modality, finding, a)
    rng = np.random.default_rng(seed + 1)
    return finish(RENDERERS[modality](rng, 64, finding, attrs, c), rng, 0.02, controls=attrs).astype(float)


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_technique_is_in_the_pixels(modality):
    """The exposure, black level and framing a suite caption states (normal images' only distinction) are the
    image's: each level is brighter than the one below it, everything else alike."""
    base = eval_items.combos(modality, list(SPECS[modality].findings)[0])[0]
    normal = list(SPECS[modality].findings)[0]
    for attr in ("exposure", "black"):
        levels = [np.mean([_suite_image(modality, normal, {**base, attr: w}, s).mean() for s in range(4)])
                  for w in eval_items.STUDY[modality][attr]]
        assert levels == sorted(levels), (attr, levels)
    ax = np.linspace(-1, 1, 64)
    if "shift" in eval_items.STUDY[modality]:  # the same image moved down: its brightness centroid with it
        gray = [_suite_image(modality, normal, {**base, "shift": w}, 3).sum(-1) for w in ("upper", "lower")]
        y = [(g.sum(1) * ax).sum() / g.sum() for g in gray]
        assert y[1] > y[0], y
    if "lumen" in eval_items.STUDY[modality]:  # the dark lumen moved right
        gray = [_suite_image(modality, normal, {**base, "lumen": w}, 3).sum(-1) for w in ("left", "right")]
        x = [((g.max() - g).sum(0) * ax).sum() / (g.max() - g).sum() for g in gray]
        assert x[1] > x[0], x


def test_vqa_set(run):
    _, suite, _ = run
    for split in ("train", "test"):
        entries = json.loads((suite / "vqa" / f"{split}.json").read_text())
        assert {"img_name", "question", "answer", "answer_type", "content_type", "q_lang"} <= set(entries[0])
        assert {e["answer_type"] for e in entries} == {"CLOSED"} and {e["q_lang"] for e in entries} == {"en"}
        assert {e["img_name"].split("-")[0] for e in entries} == set(MODALITIES)
        assert all((suite / "vqa" / "imgs" / e["img_name"]).is_file() for e in entries)
        presence = [e["answer"] for e in entries if e["content_type"] == "presence"]
        assert presence.count("yes") == presence.count("no") == 9 * 2
        assert 2 <= len(entries) / 36 <= 3
        for e in entries:
            allowed = {"presence": {"yes", "no"}, "modality": {"yes", "no"}, "side": {"left", "right"},
                       "size": {"small", "large"}, "grade": {"mild", "severe"}}[e["content_type"]]
            assert e["answer"] in allowed


def test_mil_bags(run):
    _, suite, _ = run
    for m in ("pathology", "ct"):
        labels = pd.read_csv(suite / f"mil-{m}" / "labels.csv")
        assert list(labels.columns) == ["bag_id", "label"] and labels.label.value_counts().to_dict() == {
            "negative": 20, "positive": 20}
        inst = pd.read_csv(suite / f"mil-{m}" / "instances.csv")
        negatives, positive = MIL_FINDINGS[m]
        assert set(inst.finding) <= {*negatives, positive}
        n_pos = inst.assign(pos=inst.finding == positive).groupby("bag_id").pos.sum()
        truth = labels.set_index("bag_id").label
        assert (n_pos[truth[truth == "negative"].index] == 0).all()
        assert n_pos[truth[truth == "positive"].index].between(1, 2).all()
        for bag in labels.bag_id:
            assert len(list((suite / f"mil-{m}" / "patches" / bag).glob("*.png"))) == 4


def test_survival_risk_follows_visible_severity(tmp_path):
    cfg = small_cfg(2, ("pathology",), classification={"train": 3, "val": 3, "test": 3},
                    vqa={"train_images": 2, "test_images": 2}, mil={"modalities": [], "bags": 4, "instances": 2},
                    survival={"patients": 450, "images_per_patient": 1, "censoring": 0.3})
    generate_suite(cfg, 3, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pathology", "suite.json", "survival-mri",
                                                          "survival-pathology", "vqa"]
    for m in ("pathology", "mri"):
        clin = pd.read_csv(tmp_path / f"survival-{m}" / "clinical.csv")
        assert list(clin.columns) == ["patient_id", "time", "event"] and set(clin.event) == {0, 1}
        assert abs((1 - clin.event.mean()) - 0.3) < 0.07
        assert (clin.time > 0).all()
        d = clin.merge(pd.read_csv(tmp_path / f"survival-{m}" / "patients.csv"), on="patient_id")
        prim = d[d.finding == PRIMARY[m]]
        times = [prim[prim.grade == "severe"].time.mean(), prim[prim.grade == "mild"].time.mean(),
                 d[d.finding == "normal"].time.mean()]
        assert times == sorted(times), times
        assert d.log_risk.corr(np.log(d.event_time), method="spearman") < -0.3
        assert sorted(p.name for p in (tmp_path / f"survival-{m}" / "patches" / "P0000").iterdir()) == ["00.png"]
    # a re-run with fewer sets leaves none of the old ones behind
    generate_suite(small_cfg(1, ("pathology",), survival={"modalities": [], "patients": 10},
                             mil={"modalities": [], "bags": 4}), 3, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pathology", "suite.json", "vqa"]


def test_config_validation_and_smoke_profile(tmp_path):
    generate(SynthCfg(image_size=32, modalities=["ct"], train_per_modality=4, probe_per_modality=4,
                      test_per_modality=4, workers=1), 0, tmp_path / "data")
    assert not (tmp_path / "data" / "eval").exists()  # a SynthCfg built in code: the corpus alone
    with pytest.raises(ValueError, match="unknown modalities"):
        EvalSurvivalCfg(modalities=["xray", "brain"])
    smoke = load_params(write_params(tmp_path, "smoke")).synth.eval_suite
    default = load_params(REPO / "params.yaml", profile="default").synth.eval_suite
    assert smoke.enabled and smoke.classification.test < default.classification.test == 400
    assert smoke.survival.modalities == default.survival.modalities == ["pathology", "mri"]
    assert default.enabled and not SynthCfg().eval_suite.enabled  # on through params.yaml only
    assert default.model_dump(exclude={"enabled"}) == SynthCfg().eval_suite.model_dump(exclude={"enabled"})
