"""Owns the embedded evaluation suite's items: visible attributes, canonical captions, renderer controls, VQA."""

from __future__ import annotations

import itertools

import numpy as np

from mmkd.data import describe as d
from mmkd.data.synth import SPECS

# Per modality and finding, the attributes an image of it makes visible, with their values; every finding of a
# modality also has the STUDY attributes below (technique, framing). Each suite item draws one combination; its
# caption states exactly these words, so two images share a caption only when they share every described
# attribute. Every finding has at least 135 combinations: a 400-item split (134 per class) repeats none.
_LR, _SIZE, _GRADE = ("left", "right"), ("small", "large"), ("mild", "severe")
_POS5 = ("centre", "upper left", "upper right", "lower left", "lower right")
_POS9 = d.POS9
ATTRS: dict[str, dict[str, dict[str, tuple]]] = {
    "xray": {"normal": {}, "pneumonia": {"side": _LR, "size": _SIZE, "grade": _GRADE,
                                         "zone": ("upper", "middle", "lower")},
             "effusion": {"side": _LR, "size": _SIZE, "grade": _GRADE}},
    "ct": {"normal": {}, "liver_lesion": {"count": (1, 2), "size": _SIZE, "grade": _GRADE, "zone": ("upper", "lower")},
           "kidney_stone": {"count": (1, 2), "side": _LR, "size": _SIZE, "grade": _GRADE}},
    "mri": {"normal": {}, "tumor": {"side": _LR, "size": _SIZE, "grade": _GRADE,
                                    "zone": ("anterior", "central", "posterior")},
            "hydrocephalus": {"grade": _GRADE}},
    "ultrasound": {"normal": {}, **{f: {"size": _SIZE, "grade": _GRADE, "depth": ("superficial", "deep"),
                                        "lateral": ("left", "midline", "right")} for f in ("cyst", "mass")}},
    "pathology": {"normal": {"count": (2, 3)},
                  "carcinoma": {"grade": _GRADE, "nuclei": _SIZE, "extent": ("focal", "diffuse")},
                  "inflammation": {"grade": _GRADE, "extent": ("focal", "diffuse")}},
    "dermatology": {"nevus": {"size": _SIZE, "shade": ("tan", "dark brown"), "pos": _POS5,
                              "tone": ("light", "medium", "dark")},
                    **{f: {"size": _SIZE, "grade": _GRADE, "pos": _POS5, "tone": ("light", "medium", "dark")}
                       for f in ("melanoma", "psoriasis")}},
    "fundus": {"normal": {"side": _LR, "cup": ("small cup", "medium cup")},
               "retinopathy": {"side": _LR, "grade": _GRADE, "exudates": (True, False)},
               "glaucoma": {"side": _LR, "grade": _GRADE}},
    "oct": {"normal": {}, "fluid": {"count": (1, 2, 3), "size": _SIZE, "grade": _GRADE},
            "drusen": {"count": (2, 3, 4, 5, 6), "grade": _GRADE}},
    "endoscopy": {"normal": {}, **{f: {"size": _SIZE, "grade": _GRADE, "pos": _POS9} for f in ("polyp", "ulcer")}},
}
# study attributes, shared by every finding of a modality (normal images included): exposure and black level
# (finish()'s gain and bias, in the corpus's range) and one modality's own (framing, lumen, hair, disc, stain)
_TECH = {"exposure": d.EXPOSURE, "black": d.BLACK}
STUDY: dict[str, dict[str, tuple]] = {
    **{m: {**_TECH, "shift": d.POS9} for m in ("xray", "ct", "mri", "ultrasound", "oct")},
    "pathology": {**_TECH, "stain": tuple(itertools.product(d.STAIN_LEVEL, d.STAIN_HUE))},
    "dermatology": {**_TECH, "hair": (False, True)},
    "fundus": {**_TECH, "disc": d.DISC},
    "endoscopy": {**_TECH, "lumen": d.POS9},
}
LUMEN_STEP = 0.2  # endoscopy lumen cells: the corpus draws the lumen in -0.3..0.3
# {n} = count word, {s} = plural s; every other field is the attribute's value. Short: a caption, with its
# technique clause, fits the embedded text towers' 32 tokens.
PHRASES = {
    "xray": {"normal": "clear lungs",
             "pneumonia": "{grade} {size} {side} {zone} zone opacity, pneumonia",
             "effusion": "{grade} {size} {side} pleural effusion"},
    "ct": {"normal": "normal liver and kidneys",
           "liver_lesion": "{n} {grade} {size} hypodense lesion{s}, {zone} liver",
           "kidney_stone": "{n} {grade} {size} {side} kidney stone{s}"},
    "mri": {"normal": "normal brain",
            "tumor": "{grade} {size} {side} {zone} mass with edema",
            "hydrocephalus": "{grade} hydrocephalus"},
    "ultrasound": {"normal": "homogeneous tissue, no lesion",
                   "cyst": "{grade} {size} {depth} anechoic cyst, {lateral}",
                   "mass": "{grade} {size} {depth} hypoechoic mass, {lateral}"},
    "pathology": {"normal": "benign tissue, {n} glands",
                  "carcinoma": "{grade} {extent} carcinoma, {nuclei} nuclei",
                  "inflammation": "{grade} {extent} lymphocytic inflammation"},
    "dermatology": {"nevus": "{size} {shade} nevus, {pos}, {tone} skin",
                    "melanoma": "{grade} {size} melanoma, {pos}, {tone} skin",
                    "psoriasis": "{grade} {size} psoriatic plaque, {pos}, {tone} skin"},
    "fundus": {"normal": "healthy {side} eye, {cup}",
               "retinopathy": "{grade} retinopathy, hemorrhages{exudates}, {side} eye",
               "glaucoma": "{grade} glaucomatous cupping, {side} eye"},
    "oct": {"normal": "normal foveal contour",
            "fluid": "{n} {grade} {size} fluid pocket{s}",
            "drusen": "{n} {grade} drusen"},
    "endoscopy": {"normal": "normal mucosa",
                  "polyp": "{grade} {size} polyp, {pos}", "ulcer": "{grade} {size} ulcer, {pos}"},
}
# contrast per grade: separated bands, so the grade a caption states is visible (training's cut is 0.55)
CONTRAST = {"mild": (0.25, 0.45), "severe": (0.7, 1.0)}


def combos(modality: str, finding: str) -> list[dict]:
    space = {**ATTRS[modality][finding], **STUDY[modality]}
    return [dict(zip(space, vals)) for vals in itertools.product(*space.values())]


def caption(modality: str, finding: str, a: dict) -> str:
    """The one canonical caption of an item: the modality, the finding and its visible attributes, then the
    study's technique and framing."""
    fields = {k: v for k, v in a.items() if k not in ("count", "exudates")}
    if "count" in a:
        fields.update(n=d.count_word(a["count"]), s="" if a["count"] == 1 else "s")
    if "exudates" in a:
        fields["exudates"] = " and exudates" if a["exudates"] else ", no exudates"
    name = SPECS[modality].names[0]
    technique = d.study({k: a[k] for k in STUDY[modality]})
    return f"{name[:1].upper() + name[1:]}: {PHRASES[modality][finding].format(**fields)}" + \
        (f"; {technique}." if technique else ".")


class Cycler:
    """Attribute combinations of one finding without replacement, reshuffled once all are used."""

    def __init__(self, modality: str, finding: str, rng: np.random.Generator):
        self.all, self.rng, self.left = combos(modality, finding), rng, []

    def next(self) -> dict:
        if not self.left:
            self.left = [self.all[i] for i in self.rng.permutation(len(self.all))]
        return dict(self.left.pop())


def plan(rng: np.random.Generator, modality: str, n: int) -> list[tuple[str, dict]]:
    """n balanced (finding, visible attributes) items, combinations as distinct as the set size allows."""
    classes = list(SPECS[modality].findings)
    cyc = {f: Cycler(modality, f, rng) for f in classes}
    return [(classes[i % len(classes)], cyc[classes[i % len(classes)]].next()) for i in range(n)]


def _grid(rng, pos: str, step: float) -> tuple[float, float]:
    cy = -step if "upper" in pos else step if "lower" in pos else 0.0
    cx = -step if "left" in pos else step if "right" in pos else 0.0
    return cy + rng.uniform(-0.03, 0.03), cx + rng.uniform(-0.03, 0.03)


def render_attrs(rng: np.random.Generator, modality: str, finding: str, a: dict,
                 contrast: float | None = None) -> tuple[dict, float]:
    """The renderer's attrs and contrast that make the visible attributes `a` true in the image."""
    grade = a.get("grade", "mild" if contrast is not None and contrast < 0.55 else "severe")
    c = float(rng.uniform(*CONTRAST[grade])) if contrast is None else contrast
    r = {"side": a.get("side", "left"), "size": a.get("size", "small"), "grade": grade}
    u, n = rng.uniform, a.get("count", 1)
    key = (modality, finding)
    if key == ("xray", "pneumonia"):
        r["cy"] = {"upper": u(-0.42, -0.32), "middle": u(-0.12, -0.02), "lower": u(0.1, 0.18)}[a["zone"]]
    elif key == ("ct", "liver_lesion"):
        cy = (-0.3 if a["zone"] == "upper" else 0.04) + u(-0.03, 0.03)
        r["centers"] = [(cy, u(-0.5, -0.3))] if n == 1 else [(cy, -0.58 + u(-0.02, 0.02)), (cy, -0.24 + u(-0.02, 0.02))]
    elif key == ("ct", "kidney_stone") and n == 2:
        r["cys"] = [0.15 + u(-0.01, 0.01), 0.35 + u(-0.01, 0.01)]
    elif key == ("mri", "tumor"):
        r["cy"] = {"anterior": u(-0.42, -0.32), "central": u(-0.05, 0.05), "posterior": u(0.26, 0.34)}[a["zone"]]
    elif modality == "ultrasound" and finding != "normal":
        r["center"] = ((-0.03 if a["depth"] == "superficial" else 0.35) + u(-0.04, 0.04),
                       {"left": -0.28, "midline": 0.0, "right": 0.28}[a["lateral"]] + u(-0.04, 0.04))
    elif key == ("pathology", "normal"):  # glands spread apart so that they can be counted
        spots = [(-0.4, -0.4), (0.4, 0.4)] if n == 2 else [(-0.45, -0.45), (-0.4, 0.45), (0.45, 0.0)]
        r["glands"] = [(gy + u(-0.08, 0.08), gx + u(-0.08, 0.08), u(0.2, 0.26)) for gy, gx in spots]
    elif modality == "pathology":
        if a["extent"] == "focal":
            r["focus"] = (u(-0.4, 0.4), u(-0.4, 0.4), 0.45)
        if "nuclei" in a:
            r["nuclei"] = a["nuclei"]
    elif modality == "dermatology":
        r["center"], r["tone"] = _grid(rng, a["pos"], 0.22), a["tone"]
        if "shade" in a:
            r["shade"] = u(1.1, 1.3) if a["shade"] == "tan" else u(0.6, 0.75)
    elif key == ("fundus", "retinopathy"):
        r["exudates"] = a["exudates"]
    elif key == ("oct", "fluid"):
        base = {1: [0.0], 2: [-0.35, 0.35], 3: [-0.55, 0.0, 0.55]}[n]
        r["xs"] = [x + u(-0.05, 0.05) if n > 1 else u(-0.3, 0.3) for x in base]
    elif key == ("oct", "drusen"):
        r["xs"] = list(np.linspace(-0.6, 0.6, n) + u(-0.04, 0.04, n))
    elif modality == "endoscopy" and finding != "normal":
        r["center"] = _grid(rng, a["pos"], 0.45)
    elif key == ("fundus", "normal"):
        r["cdr"] = (0.28 if a["cup"] == "small cup" else 0.39) + u(-0.015, 0.015)  # describe.cup's bands
    return {**r, **_study_controls(rng, a)}, c


def _study_controls(rng: np.random.Generator, a: dict) -> dict:
    """Renderer controls for the study attributes: finish()'s gain and bias, framing, lumen, hair, disc, stain."""
    u = rng.uniform
    out = {"gain": d.GAINS[d.EXPOSURE.index(a["exposure"])] + u(-0.01, 0.01),
           "bias": d.BIASES[d.BLACK.index(a["black"])] + u(-0.004, 0.004)}
    if "shift" in a:
        out["shift"] = tuple(v + u(-0.005, 0.005) for v in d.grid_point(a["shift"], d.SHIFT_STEP))
    if "lumen" in a:
        out["lumen"] = tuple(v + u(-0.03, 0.03) for v in d.grid_point(a["lumen"], LUMEN_STEP))
    if "hair" in a:
        out["hair"] = a["hair"]
    if "disc" in a:
        out["dy"] = d.DISC_DY[d.DISC.index(a["disc"])] + u(-0.01, 0.01)
    if "stain" in a:
        level, hue = a["stain"]
        out["stain"] = tuple(d.STAIN_LEVEL[level] + h + u(-0.005, 0.005) for h in d.STAIN_HUE[hue])
    return out


# VQA: closed questions about what the image shows
def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" or name.startswith("H&E") else "a"


def side_question(modality: str) -> str:
    return "Is this the left or the right eye?" if modality == "fundus" else \
        "Is the abnormality on the patient's left or right side?"


def questions(rng: np.random.Generator, modality: str, finding: str, a: dict, present: bool | None,
              others: list[str], k: int) -> list[tuple[str, str, str]]:
    """Up to k (question, answer, type) for one image; `present`: the presence question's answer (balanced by
    the caller), asked about the image's finding when True, else about another abnormal finding."""
    spec = SPECS[modality]
    normal = finding == "normal"
    abnormal = [f for f in spec.findings if f != "normal"]
    asked = finding if present else str(rng.choice([f for f in abnormal if f != finding]))
    out = [(f"Is there {spec.prompts[asked][0]} in this image?", "yes" if present else "no", "presence")]
    extra = ["modality"]
    if "side" in a and (not normal or modality == "fundus"):
        extra.append("side")
    if "size" in a:
        extra.append("size")
    if "grade" in a:
        extra.append("grade")
    for t in rng.permutation(extra)[: max(0, k - 1)]:
        if t == "modality":
            yes = bool(rng.random() < 0.5)
            name = spec.names[0] if yes else SPECS[str(rng.choice(others))].names[0]
            out.append((f"Is this {_article(name)} {name}?", "yes" if yes else "no", "modality"))
        elif t == "side":
            out.append((side_question(modality), a["side"], "side"))
        elif t == "size":
            out.append(("Is the lesion small or large?", a["size"], "size"))
        else:
            out.append(("Is the finding mild or severe?", a["grade"], "grade"))
    return out
