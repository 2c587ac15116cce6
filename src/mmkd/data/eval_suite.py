"""Owns the embedded evaluation suite: held-out classification, VQA, survival and MIL sets written by synth."""

from __future__ import annotations

import csv
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mmkd.config import EMBEDDED_SUITE_DIR, MODALITIES, SynthCfg
from mmkd.data import eval_items as items
from mmkd.data.draw import finish
from mmkd.data.render import RENDERERS
from mmkd.data.synth import EVAL_NAMESPACE, SPECS
from mmkd.progress import progress
from mmkd import atomic

SUITE_DIR = EMBEDDED_SUITE_DIR  # under paths.data (one definition: config.Workspace.embedded_suite)
# Every suite rng is keyed [seed, modality, EVAL_NAMESPACE, set id, ...]: the namespace index follows the
# corpus's train/probe/test/teacher ones, so no suite image can coincide with a training or teacher image.
# Keys of length 4 plan a set (attributes, questions, times); longer ones render one image.
SET_IDS = {"train": 0, "val": 1, "test": 2, "vqa-train": 3, "vqa-test": 4, "survival": 5, "mil": 6}
# survival: the finding whose severity weighs most on risk; the first class (normal, or benign nevus) has none
PRIMARY = {"xray": "pneumonia", "ct": "liver_lesion", "mri": "tumor", "ultrasound": "mass", "pathology": "carcinoma",
           "dermatology": "melanoma", "fundus": "retinopathy", "oct": "fluid", "endoscopy": "ulcer"}
RISK_WEIGHT = {"primary": 2.0, "other": 0.8}
WEIBULL_SHAPE, WEIBULL_SCALE_DAYS = 1.5, 1000.0
# mil: (negative findings, the positive finding); a positive bag holds 1-2 positive instances
MIL_FINDINGS = {
    "xray": (("normal",), "pneumonia"), "ct": (("normal",), "liver_lesion"), "mri": (("normal",), "tumor"),
    "ultrasound": (("normal", "cyst"), "mass"), "pathology": (("normal", "inflammation"), "carcinoma"),
    "dermatology": (("nevus", "psoriasis"), "melanoma"), "fundus": (("normal",), "retinopathy"),
    "oct": (("normal",), "fluid"), "endoscopy": (("normal",), "polyp"),
}


def _rng(seed: int, modality: str, set_id: str, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, MODALITIES.index(modality), EVAL_NAMESPACE, SET_IDS[set_id], *index])


class _Jobs:
    """The images to render: (rng key, modality, finding, renderer attrs, contrast, path)."""

    def __init__(self, seed: int):
        self.seed, self.jobs, self.dirs = seed, [], set()

    def add(self, plan_rng, modality, set_id, index, finding, a, path: Path, contrast=None):
        attrs, c = items.render_attrs(plan_rng, modality, finding, a, contrast)
        key = [self.seed, MODALITIES.index(modality), EVAL_NAMESPACE, SET_IDS[set_id], *index]
        if path.parent not in self.dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dirs.add(path.parent)
        self.jobs.append((key, modality, finding, attrs, c, str(path)))


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def classification_plan(seed: int, modality: str, split: str, n: int) -> tuple[np.random.Generator, list]:
    """The plan of one classification split, (finding, visible attributes) per item, and its rng (which then
    draws the renderer controls)."""
    rng = _rng(seed, modality, split)
    return rng, items.plan(rng, modality, n)


def _classification(cfg, modality: str, root: Path, jobs: _Jobs) -> dict:
    sizes = cfg.eval_suite.classification
    rows, splits = [], {}
    for split in ("train", "val", "test"):
        rng, planned = classification_plan(jobs.seed, modality, split, getattr(sizes, split))
        caps = []
        for i, (finding, a) in enumerate(planned):
            image = f"images/{modality}-{split}-{i:05d}.png"
            jobs.add(rng, modality, split, [i], finding, a, root / image)
            caps.append(items.caption(modality, finding, a))
            rows.append((image, finding, split, caps[-1]))
        splits[split] = {"items": len(caps), "n_unique_captions": len(set(caps))}
    _write_csv(root / "manifest.csv", ["image", "label", "split", "caption"], rows)
    return {"format": "csv_manifest", "items": len(rows), "n_unique_captions": len({r[3] for r in rows}),
            "splits": splits}


def _vqa(cfg, modalities: list[str], root: Path, jobs: _Jobs) -> dict:
    vcfg, out = cfg.eval_suite.vqa, {}
    for split, n in (("train", vcfg.train_images), ("test", vcfg.test_images)):
        entries = []
        for m in modalities:
            rng = _rng(jobs.seed, m, f"vqa-{split}")
            planned = items.plan(rng, m, n)
            # presence answers balanced: "yes" for half the images, drawn among those with a finding
            with_finding = [i for i, (f, _) in enumerate(planned) if f != "normal"]
            yes = set(rng.choice(with_finding, min(len(with_finding), n // 2), replace=False).tolist())
            others = [o for o in MODALITIES if o != m]
            for i, (finding, a) in enumerate(planned):
                name = f"{m}-{split}-{i:04d}.png"
                jobs.add(rng, m, f"vqa-{split}", [i], finding, a, root / "imgs" / name)
                for q, ans, qtype in items.questions(rng, m, finding, a, i in yes, others, vcfg.questions_per_image):
                    entries.append({"qid": len(entries), "img_name": name, "question": q, "answer": ans,
                                    "answer_type": "CLOSED", "content_type": qtype, "q_lang": "en", "modality": m})
        atomic.write_json(root / f"{split}.json", entries, indent=0)
        out[split] = len(entries)
    return {"format": "vqa_json", "items": sum(out.values()), "splits": out,
            "images": len(modalities) * (vcfg.train_images + vcfg.test_images)}


def _censoring_rate(t: np.ndarray, fraction: float) -> float:
    """Rate of exponential censoring times that censor `fraction` of these event times in expectation."""
    lo, hi = -12.0, 6.0  # log10 rate, bisected: the expected censored share rises with the rate
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 - np.exp(-(10**mid) * t)) < fraction else (lo, mid)
    return 10 ** ((lo + hi) / 2)


def _survival(cfg, modality: str, root: Path, jobs: _Jobs) -> dict:
    scfg = cfg.eval_suite.survival
    rng = _rng(jobs.seed, modality, "survival")
    classes = list(SPECS[modality].findings)
    cyc = {f: items.Cycler(modality, f, rng) for f in classes}
    truth, t = [], []
    for p in range(scfg.patients):
        finding = classes[p % len(classes)]
        a = cyc[finding].next()
        c = float(rng.uniform(0.25, 1.0))  # visible severity: the finding's contrast
        if "grade" in a:
            a["grade"] = "mild" if c < 0.55 else "severe"
        role = "none" if finding == classes[0] else "primary" if finding == PRIMARY[modality] else "other"
        large = "large" in (a.get("size"), a.get("nuclei"))
        lr = 0.0 if role == "none" else RISK_WEIGHT[role] * (0.5 + (c - 0.25) / 0.75) + 0.4 * large
        t.append(WEIBULL_SCALE_DAYS * (rng.exponential() * np.exp(-lr)) ** (1 / WEIBULL_SHAPE))
        pid = f"P{p:04d}"
        for j in range(scfg.images_per_patient):
            jobs.add(rng, modality, "survival", [p, j], finding, a, root / "patches" / pid / f"{j:02d}.png", c)
        truth.append((pid, finding, a.get("grade", ""), "large" if large else "small", round(c, 4), round(lr, 4)))
    t = np.asarray(t)
    cens = np.full_like(t, np.inf)  # independent of risk: exponential times at the rate giving the asked share
    if scfg.censoring > 0:
        cens = rng.exponential(1 / _censoring_rate(t, scfg.censoring), len(t))
    time, event = np.maximum(np.minimum(t, cens), 0.1), (t <= cens).astype(int)
    _write_csv(root / "clinical.csv", ["patient_id", "time", "event"],
               [(r[0], f"{x:.1f}", e) for r, x, e in zip(truth, time, event)])
    # the generating truth (not read by loaders): for tests and for reading results
    _write_csv(root / "patients.csv", ["patient_id", "finding", "grade", "size", "contrast", "log_risk", "event_time"],
               [(*r, f"{x:.1f}") for r, x in zip(truth, t)])
    return {"format": "survival_table", "items": len(truth), "events": int(event.sum()),
            "censored_fraction": round(float(1 - event.mean()), 4)}


def _mil(cfg, modality: str, root: Path, jobs: _Jobs) -> dict:
    mcfg = cfg.eval_suite.mil
    rng = _rng(jobs.seed, modality, "mil")
    negatives, positive = MIL_FINDINGS[modality]
    cyc = {f: items.Cycler(modality, f, rng) for f in (*negatives, positive)}
    positive_bags = set(rng.permutation(mcfg.bags)[: mcfg.bags // 2].tolist())
    labels, members = [], []
    for b in range(mcfg.bags):
        bid = f"B{b:04d}"
        n_pos = int(rng.integers(1, 3)) if b in positive_bags else 0
        at = set(rng.choice(mcfg.instances, min(n_pos, mcfg.instances), replace=False).tolist())
        for j in range(mcfg.instances):
            finding = positive if j in at else str(rng.choice(negatives))
            image = f"patches/{bid}/{j:02d}.png"
            jobs.add(rng, modality, "mil", [b, j], finding, cyc[finding].next(), root / image)
            members.append((bid, image, finding))
        labels.append((bid, "positive" if n_pos else "negative"))
    _write_csv(root / "labels.csv", ["bag_id", "label"], labels)
    _write_csv(root / "instances.csv", ["bag_id", "image", "finding"], members)  # truth, not read by loaders
    return {"format": "mil_bags", "items": len(labels), "positive": len(positive_bags)}


def _render(args) -> int:
    size, noise, chunk = args
    for key, modality, finding, attrs, contrast, path in chunk:
        rng = np.random.default_rng(key)
        img = finish(RENDERERS[modality](rng, size, finding, attrs, contrast), rng, noise=noise, controls=attrs)
        Image.fromarray(img).save(path, format="PNG", compress_level=1)  # noise barely compresses: save time
    return len(chunk)


def generate_suite(cfg: SynthCfg, seed: int, root: Path) -> dict:
    """Write every suite set and suite.json under root (data/eval/embedded). Deterministic for a seed."""
    root, ecfg = Path(root), cfg.eval_suite
    folders = {f"embedded-{m}": m for m in cfg.modalities} | {"embedded-vqa": "vqa"}
    folders |= {f"embedded-survival-{m}": f"survival-{m}" for m in ecfg.survival.modalities}
    folders |= {f"embedded-mil-{m}": f"mil-{m}" for m in ecfg.mil.modalities}
    old = root / "suite.json"
    stale = [s["folder"] for s in json.loads(old.read_text())["sets"].values()] if old.exists() else []
    for folder in {*stale, *folders.values()}:  # only what the suite writes: root may hold other things
        shutil.rmtree(root / folder, ignore_errors=True)
    jobs, sets = _Jobs(seed), {}
    for name, folder in folders.items():
        (root / folder).mkdir(parents=True)
        kind, _, m = folder.partition("-")
        if folder == "vqa":
            entry = _vqa(cfg, list(cfg.modalities), root / folder, jobs)
        elif kind == "survival":
            entry = _survival(cfg, m, root / folder, jobs)
        elif kind == "mil":
            entry = _mil(cfg, m, root / folder, jobs)
        else:
            entry = _classification(cfg, folder, root / folder, jobs)
        sets[name] = {"folder": folder, **entry}
    noise = 0.02 + 0.08 * cfg.difficulty  # the corpus's own noise level
    chunks = [(cfg.image_size, noise, jobs.jobs[i:i + 200]) for i in range(0, len(jobs.jobs), 200)]
    with progress(total=len(jobs.jobs), desc="eval suite", unit="img") as bar:
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                for n in pool.map(_render, chunks):
                    bar.update(n)
        else:
            for chunk in chunks:
                bar.update(_render(chunk))
    atomic.write_json(old, {"seed": seed, "image_size": cfg.image_size, "sets": sets})
    return {"eval_sets": len(sets), "eval_images": len(jobs.jobs)}
