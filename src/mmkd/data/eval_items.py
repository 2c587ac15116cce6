"""Owns the embedded evaluation suite's items: visible attributes, canonical captions, renderer controls, VQA."""

from __future__ import annotations

import itertools

import numpy as np

from mmkd.data.synth import SPECS

# Per modality and finding, the attributes an image of it makes visible, with their values. Each suite item
# draws one combination; its caption states exactly these words, so two images share a caption only when
# they share every described attribute (normal images, with nothing to describe, share one).
_LR, _SIZE, _GRADE = ("left", "right"), ("small", "large"), ("mild", "severe")
_POS5 = ("centre", "upper left", "upper right", "lower left", "lower right")
_POS9 = ("upper left", "upper", "upper right", "left", "centre", "right", "lower left", "lower", "lower right")
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
                                        "lateral": ("left", "middle", "right")} for f in ("cyst", "mass")}},
    "pathology": {"normal": {"count": (2, 3)},
                  "carcinoma": {"grade": _GRADE, "nuclei": _SIZE, "extent": ("focal", "diffuse")},
                  "inflammation": {"grade": _GRADE, "extent": ("focal", "diffuse")}},
    "dermatology": {"nevus": {"size": _SIZE, "shade": ("tan", "dark brown"), "pos": _POS5,
                              "tone": ("light", "medium", "dark")},
                    **{f: {"size": _SIZE, "grade": _GRADE, "pos": _POS5, "tone": ("light", "medium", "dark")}
                       for f in ("melanoma", "psoriasis")}},
    "fundus": {"normal": {"side": _LR}, "retinopathy": {"side": _LR, "grade": _GRADE, "exudates": (True, False)},
               "glaucoma": {"side": _LR, "grade": _GRADE}},
    "oct": {"normal": {}, "fluid": {"count": (1, 2, 3), "size": _SIZE, "grade": _GRADE},
            "drusen": {"count": (2, 3, 4, 5, 6), "grade": _GRADE}},
    "endoscopy": {"normal": {}, **{f: {"size": _SIZE, "grade": _GRADE, "pos": _POS9} for f in ("polyp", "ulcer")}},
}
_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# {n} = count word, {s} = plural s; every other field is the attribute's value
PHRASES = {
    "xray": {"normal": "clear lungs without opacity or effusion",
             "pneumonia": "{grade} {size} opacity in the {zone} {side} lung, consistent with pneumonia",
             "effusion": "{grade} {size} {side} pleural effusion"},
    "ct": {"normal": "unremarkable liver and kidneys",
           "liver_lesion": "{n} {grade} {size} hypodense lesion{s} in the {zone} liver",
           "kidney_stone": "{n} {grade} {size} stone{s} in the {side} kidney"},
    "mri": {"normal": "normal brain parenchyma and ventricles",
            "tumor": "{grade} {size} {zone} {side} hemispheric mass with edema",
            "hydrocephalus": "{grade} hydrocephalus with enlarged lateral ventricles"},
    "ultrasound": {"normal": "homogeneous echotexture without focal lesion",
                   "cyst": "{grade} {size} {depth} anechoic cyst {lateral}",
                   "mass": "{grade} {size} {depth} hypoechoic mass {lateral}"},
    "pathology": {"normal": "benign tissue with {n} regular glands",
                  "carcinoma": "{grade} {extent} carcinoma with {nuclei} atypical nuclei",
                  "inflammation": "{grade} {extent} lymphocytic inflammation"},
    "dermatology": {"nevus": "{size} {shade} benign nevus {pos}, on {tone} skin",
                    "melanoma": "{grade} {size} irregular melanoma {pos}, on {tone} skin",
                    "psoriasis": "{grade} {size} scaly psoriatic plaque {pos}, on {tone} skin"},
    "fundus": {"normal": "healthy retina, {side} eye",
               "retinopathy": "{grade} diabetic retinopathy with hemorrhages {exudates}, {side} eye",
               "glaucoma": "{grade} glaucomatous optic disc cupping, {side} eye"},
    "oct": {"normal": "normal foveal contour without fluid or drusen",
            "fluid": "{n} {grade} {size} intraretinal fluid pocket{s}",
            "drusen": "{n} {grade} drusen elevating the RPE"},
    "endoscopy": {"normal": "normal mucosa without polyp or ulcer",
                  "polyp": "{grade} {size} polyp {pos}", "ulcer": "{grade} {size} ulcer with fibrin base {pos}"},
}
# contrast per grade: separated bands, so the grade a caption states is visible (training's cut is 0.55)
CONTRAST = {"mild": (0.25, 0.45), "severe": (0.7, 1.0)}


def combos(modality: str, finding: str) -> list[dict]:
    space = ATTRS[modality][finding]
    return [dict(zip(space, vals)) for vals in itertools.product(*space.values())]


def _where(pos: str, frame: str) -> str:
    if pos in ("centre", "middle"):
        return f"in the {pos} of the {frame}"
    if pos in ("left", "right"):
        return f"on the {pos} of the {frame}"
    return f"in the {pos} {'part of the' if pos in ('upper', 'lower') else 'of the'} {frame}"


def caption(modality: str, finding: str, a: dict) -> str:
    """The one canonical caption of an item: the modality, the finding and its visible attributes."""
    fields = {k: v for k, v in a.items() if k not in ("count", "exudates")}
    if "count" in a:
        fields.update(n=_WORDS[a["count"]], s="" if a["count"] == 1 else "s")
    if "exudates" in a:
        fields["exudates"] = "and hard exudates" if a["exudates"] else "but no exudates"
    if "pos" in a:
        fields["pos"] = _where(a["pos"], "image")
    if "lateral" in a:
        fields["lateral"] = _where(a["lateral"], "field")
    name = SPECS[modality].names[0]
    return f"{name[:1].upper() + name[1:]}: {PHRASES[modality][finding].format(**fields)}."


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
                       {"left": -0.28, "middle": 0.0, "right": 0.28}[a["lateral"]] + u(-0.04, 0.04))
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
    return r, c


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
