"""Owns the embedded synthetic corpus: modality vocabularies, captions, prompts, and `data/` generation."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from mmkd.progress import progress

from mmkd.config import MODALITIES, SynthCfg
from mmkd.data import describe
from mmkd.data.manifest import write_jsonl
from mmkd.data.draw import finish
from mmkd.data.render import RENDERERS
from mmkd import atomic


@dataclass(frozen=True)
class ModalitySpec:
    """Vocabulary of one modality: what it is called, its findings, and how captions speak of them."""

    names: tuple[str, ...]
    # finding -> caption phrases ({side}, {size}, {grade} filled in); the first class is "normal"
    findings: dict[str, tuple[str, ...]]
    # finding -> short descriptions used to build zero-shot prompts
    prompts: dict[str, tuple[str, ...]]


SPECS: dict[str, ModalitySpec] = {
    "xray": ModalitySpec(
        ("chest X-ray", "chest radiograph", "frontal chest film", "CXR"),
        {
            "normal": ("clear lungs", "no focal consolidation or effusion", "no acute cardiopulmonary process",
                       "normal lung fields without opacity"),
            "pneumonia": ("{grade} {side} lung opacity consistent with pneumonia", "{size} {side} consolidation",
                          "airspace disease in the {side} lung, likely pneumonia", "{side} pneumonia without effusion"),
            "effusion": ("{size} {side} pleural effusion", "{side} costophrenic angle blunting from pleural fluid",
                         "{grade} {side} effusion, no consolidation", "fluid layering at the {side} lung base"),
        },
        {
            "normal": ("a normal chest", "clear lungs"),
            "pneumonia": ("pneumonia", "a lung opacity"),
            "effusion": ("a pleural effusion", "fluid at the lung base"),
        },
    ),
    "ct": ModalitySpec(
        ("abdominal CT", "axial CT of the abdomen", "CT scan", "contrast CT slice"),
        {
            "normal": ("unremarkable liver and kidneys", "no focal hepatic lesion and no renal calculus",
                       "normal abdominal organs"),
            "liver_lesion": ("{size} hypodense liver lesion", "{grade} hypoattenuating hepatic lesion",
                             "a low-density mass in the liver", "{size} liver cyst or metastasis"),
            "kidney_stone": ("{size} {side} renal calculus", "{side} kidney stone",
                             "hyperdense stone in the {side} kidney", "{side} nephrolithiasis"),
        },
        {
            "normal": ("normal abdominal organs", "no lesion"),
            "liver_lesion": ("a liver lesion", "a hypodense hepatic mass"),
            "kidney_stone": ("a kidney stone", "a renal calculus"),
        },
    ),
    "mri": ModalitySpec(
        ("brain MRI", "axial MR image of the head", "MRI of the brain", "T2 brain MR"),
        {
            "normal": ("normal brain parenchyma", "no mass and normal ventricles", "unremarkable brain"),
            "tumor": ("{size} {side} hemispheric mass with surrounding edema", "{side} brain tumor",
                      "enhancing {side} cerebral lesion, {grade}", "{size} {side} glioma"),
            "hydrocephalus": ("{grade} ventriculomegaly", "enlarged lateral ventricles",
                              "hydrocephalus with dilated ventricles", "{grade} hydrocephalus, no mass"),
        },
        {
            "normal": ("a normal brain", "no abnormality"),
            "tumor": ("a brain tumor", "a cerebral mass"),
            "hydrocephalus": ("hydrocephalus", "enlarged ventricles"),
        },
    ),
    "ultrasound": ModalitySpec(
        ("ultrasound", "sonogram", "ultrasound image", "B-mode scan"),
        {
            "normal": ("homogeneous echotexture", "no focal lesion", "normal parenchymal echogenicity"),
            "cyst": ("{size} anechoic cyst with posterior enhancement", "simple cyst", "{size} cystic lesion",
                     "anechoic fluid-filled lesion"),
            "mass": ("{size} hypoechoic solid mass with posterior shadowing", "irregular solid lesion",
                     "{grade} hypoechoic mass", "solid nodule with acoustic shadow"),
        },
        {
            "normal": ("normal tissue", "no lesion"),
            "cyst": ("a cyst", "an anechoic cyst"),
            "mass": ("a solid mass", "a hypoechoic mass"),
        },
    ),
    "pathology": ModalitySpec(
        ("H&E histology", "histopathology slide", "H&E stained tissue", "pathology image"),
        {
            "normal": ("benign tissue with regular glands", "normal glandular architecture",
                       "no malignancy, orderly glands"),
            "carcinoma": ("{grade} adenocarcinoma with crowded atypical nuclei", "invasive carcinoma",
                          "malignant cells with large hyperchromatic nuclei", "tumor tissue, {grade}"),
            "inflammation": ("dense lymphocytic infiltrate", "{grade} chronic inflammation",
                             "inflamed tissue with many lymphocytes", "inflammatory cells, no carcinoma"),
        },
        {
            "normal": ("benign tissue", "normal glands"),
            "carcinoma": ("carcinoma", "malignant tumor cells"),
            "inflammation": ("inflammation", "lymphocytic infiltrate"),
        },
    ),
    "dermatology": ModalitySpec(
        ("dermoscopy image", "skin photograph", "dermatoscopic view", "clinical skin image"),
        {
            "nevus": ("{size} benign nevus with regular border", "symmetric pigmented mole",
                      "benign melanocytic nevus", "uniform brown nevus"),
            "melanoma": ("{size} melanoma with irregular border", "asymmetric multicolored lesion, melanoma",
                         "{grade} malignant melanoma", "irregular pigmented lesion suspicious for melanoma"),
            "psoriasis": ("{size} red scaly plaque, psoriasis", "psoriatic plaque with silvery scale",
                          "{grade} psoriasis", "erythematous scaly plaque"),
        },
        {
            "nevus": ("a benign nevus", "a mole"),
            "melanoma": ("melanoma", "a malignant skin lesion"),
            "psoriasis": ("psoriasis", "a red scaly plaque"),
        },
    ),
    "fundus": ModalitySpec(
        ("fundus photograph", "retinal fundus image", "color fundus photo", "fundus"),
        {
            "normal": ("healthy retina of the {side} eye", "normal optic disc and macula",
                       "no retinopathy, {side} eye"),
            "retinopathy": ("{grade} diabetic retinopathy with hemorrhages and exudates", "diabetic retinopathy, {side} eye",
                            "microaneurysms and hard exudates", "{grade} nonproliferative retinopathy"),
            "glaucoma": ("enlarged cup-to-disc ratio suggesting glaucoma", "{grade} glaucomatous cupping",
                         "glaucoma, {side} eye", "optic disc cupping"),
        },
        {
            "normal": ("a healthy retina", "a normal fundus"),
            "retinopathy": ("diabetic retinopathy", "retinal hemorrhages"),
            "glaucoma": ("glaucoma", "optic disc cupping"),
        },
    ),
    "oct": ModalitySpec(
        ("retinal OCT", "OCT B-scan", "optical coherence tomography", "macular OCT"),
        {
            "normal": ("normal foveal contour", "intact retinal layers without fluid", "normal macula"),
            "fluid": ("{size} intraretinal fluid", "macular edema with cystoid spaces", "{grade} fluid in the retina",
                      "fluid pockets, no drusen"),
            "drusen": ("drusen elevating the RPE", "{grade} drusen", "dry age-related macular degeneration with drusen",
                       "RPE bumps from drusen"),
        },
        {
            "normal": ("a normal retina", "normal retinal layers"),
            "fluid": ("macular fluid", "retinal edema"),
            "drusen": ("drusen", "macular degeneration"),
        },
    ),
    "endoscopy": ModalitySpec(
        ("colonoscopy frame", "endoscopic image", "endoscopy view", "GI endoscopy"),
        {
            "normal": ("normal mucosa", "healthy colonic mucosa without polyps", "no lesion seen"),
            "polyp": ("{size} polyp", "raised polypoid lesion", "{size} sessile polyp", "colonic polyp"),
            "ulcer": ("{size} ulcer with fibrin base", "mucosal ulceration", "{grade} ulcer with red rim",
                      "ulcer, no polyp"),
        },
        {
            "normal": ("normal mucosa", "healthy tissue"),
            "polyp": ("a polyp", "a polypoid lesion"),
            "ulcer": ("an ulcer", "mucosal ulceration"),
        },
    ),
}

TEMPLATES = (
    "{Mod} showing {finding}.",
    "{Finding} on {mod}.",
    "{Mod}: {finding}.",
    "Findings: {finding}. Study: {mod}.",
    "{Mod} of a patient with {finding}.",
    "Impression: {finding} ({mod}).",
)
# a training caption longer than this many characters takes the shortest template: the embedded text towers read
# 32 tokens, SOT and EOT included (these captions: about 4 characters a token; the suite's all fit)
CAPTION_CHARS = 105
PROMPT_TEMPLATES = ("a {mod} showing {what}", "{what} on {mod}", "a {mod} with {what}")
SPLITS = ("train", "probe", "test")
# the embedded teachers' own corpora (data/teacher_corpus.py): a fourth RNG namespace, one stream per teacher,
# so no teacher sample can coincide with a student sample or with another teacher's
TEACHER_SPLIT = "teacher"
_NAMESPACES = (*SPLITS, TEACHER_SPLIT)
# the embedded evaluation suite (data/eval_suite.py): a fifth namespace, after all of the above, so that no
# suite image can coincide with a training, probe, test or teacher image
EVAL_NAMESPACE = len(_NAMESPACES)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def caption_for(rng: np.random.Generator, modality: str, finding: str, attrs: dict, seen: dict) -> str:
    """A report sentence naming the finding (a synonym in a template), then what this image shows: the finding's
    grade, size, place, count or ratio, and the study's technique, from `seen` (what the renderer drew)."""
    spec = SPECS[modality]
    phrase = str(rng.choice(spec.findings[finding])).format(**attrs)
    mod = str(rng.choice(spec.names))
    tpl = str(rng.choice(TEMPLATES))
    detail = describe.findings(modality, finding, attrs, seen)
    technique = describe.study(describe.study_words(seen))

    def build(tpl: str, mod: str, phrase: str) -> str:
        head = tpl.format(Mod=_cap(mod), mod=mod, finding=phrase, Finding=_cap(phrase))
        said = detail  # words the sentence already has are not repeated
        for words in (f"{attrs['grade']}, ", f"{attrs['side']} eye, "):
            if words.split(",")[0] in phrase:
                said = said.replace(words, "", 1)
        return " ".join(" ".join([head, *(f"{_cap(t)}." for t in (said, technique) if t)]).split())

    # the instance first, then any technique; a caption longer than a text tower's context (the embedded towers
    # read 32 tokens) loses its tail, so a long one takes the shortest template, then the shortest words
    caption = build(tpl, mod, phrase)
    if len(caption) > CAPTION_CHARS:
        caption = build(TEMPLATES[2], mod, phrase)
    if len(caption) > CAPTION_CHARS:
        short = min((p.format(**attrs) for p in spec.findings[finding]), key=len)
        caption = build(TEMPLATES[2], min(spec.names, key=len), short)
    return caption


def zero_shot_prompts(modality: str) -> dict[str, list[str]]:
    """Several descriptive prompts per class (averaged at evaluation, as in the reference)."""
    spec = SPECS[modality]
    return {
        cls: [t.format(mod=m, what=w) for t in PROMPT_TEMPLATES for m in spec.names[:2] for w in whats]
        for cls, whats in spec.prompts.items()
    }


def tasks_description(modalities: list[str]) -> dict:
    return {
        f"{m}-finding": {"modality": m, "label": "finding", "classes": list(SPECS[m].findings),
                         "prompts": zero_shot_prompts(m)}
        for m in modalities
    }


def render_sample(seed: int, modality: str, split: str, index: int, size: int, difficulty: float,
                  stream: int | None = None):
    """One (image, record) pair; an independent rng per sample keeps generation order-free.

    split: train, probe, test (the student's corpus) or `teacher` with `stream` (an embedded teacher's own
    corpus; data/teacher_corpus.py); the rng key is (seed, modality, split[, stream], index).
    """
    img, record, _ = render_instance(seed, modality, split, index, size, difficulty, stream)
    return img, record


def render_instance(seed: int, modality: str, split: str, index: int, size: int, difficulty: float,
                    stream: int | None = None) -> tuple[np.ndarray, dict, dict]:
    """render_sample's (image, record) and `seen`: what the renderer drew for the image, which its caption states."""
    if (split == TEACHER_SPLIT) != (stream is not None):
        raise ValueError(f"render_sample: split '{split}' {'needs' if stream is None else 'takes no'} `stream`")
    key = [seed, MODALITIES.index(modality), _NAMESPACES.index(split), *([] if stream is None else [stream]), index]
    rng = np.random.default_rng(key)
    classes = list(SPECS[modality].findings)
    finding = classes[index % len(classes)]  # balanced classes
    contrast = float(rng.uniform(0.6 - 0.55 * difficulty, 1.0))
    attrs = {
        "side": str(rng.choice(["left", "right"])),
        "size": str(rng.choice(["small", "large"])),
        "grade": "mild" if contrast < 0.55 else "severe",
    }
    seen: dict = {}
    img = RENDERERS[modality](rng, size, finding, attrs, contrast, seen)
    img = finish(img, rng, noise=0.02 + 0.08 * difficulty, seen=seen)
    caption = caption_for(rng, modality, finding, attrs, seen)
    sid = f"{modality}-{split}-{index:05d}" if stream is None else f"{modality}-{split}{stream:08x}-{index:05d}"
    record = {
        "id": sid, "image": f"images/{modality}/{split}/{sid}.png", "caption": caption,
        "modality": modality, "labels": {"finding": finding, **attrs}, "split": split,
    }
    return img, record, seen


def _render_chunk(args) -> list[dict]:
    seed, modality, split, indices, size, difficulty, root = args
    out = []
    for i in indices:
        img, rec = render_sample(seed, modality, split, i, size, difficulty)
        path = Path(root) / rec["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format="PNG")
        out.append(rec)
    return out


def generate(cfg: SynthCfg, seed: int, root: Path) -> dict:
    """Write PNGs, `manifest.jsonl` and `tasks.json` under root, and the evaluation suite under root/eval/embedded
    when enabled. Deterministic for a given seed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": cfg.train_per_modality, "probe": cfg.probe_per_modality, "test": cfg.test_per_modality}
    jobs = []
    for m in cfg.modalities:
        for split, n in counts.items():
            for start in range(0, n, 100):
                idx = list(range(start, min(n, start + 100)))
                jobs.append((seed, m, split, idx, cfg.image_size, cfg.difficulty, str(root)))
    total = sum(len(j[3]) for j in jobs)
    records: list[dict] = []
    with progress(total=total, desc="synth", unit="img") as bar:
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                for chunk in pool.map(_render_chunk, jobs):
                    records += chunk
                    bar.update(len(chunk))
        else:
            for job in jobs:
                chunk = _render_chunk(job)
                records += chunk
                bar.update(len(chunk))
    write_jsonl(root / "manifest.jsonl", records)
    atomic.write_json(root / "tasks.json", tasks_description(cfg.modalities))
    summary = {"records": len(records), "modalities": len(cfg.modalities)}
    if cfg.eval_suite.enabled:
        from mmkd.data.eval_suite import SUITE_DIR, generate_suite  # it imports this module

        summary |= generate_suite(cfg, seed, root / SUITE_DIR)
    return summary
