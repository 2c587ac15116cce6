"""Owns instance-level caption words: where, how many, how large and how exposed a rendered image's content is."""

from __future__ import annotations

import numpy as np

# Captions must fit the embedded text towers' 32 tokens (SOT and EOT included): the words are short, and a
# study attribute at its middle level goes unsaid, as reports mention only deviations.
# Technique, from finish()'s gain (exposure) and bias (black level), every modality: the suite fixes one level
# each, the corpus draws them from 0.85-1.15 and -0.05-0.05 and its captions name the nearest level. Both raise
# the image's mean; gain is not called contrast, as bright images (H&E) clip, so their spread can fall with it.
EXPOSURE = ("very dim", "dim", "", "bright", "very bright")
GAINS = (0.87, 0.93, 1.0, 1.07, 1.13)
BLACK = ("crisp", "", "hazy")  # blacks crushed / lifted
BIASES = (-0.035, 0.0, 0.035)
POS9 = ("upper left", "upper", "upper right", "left", "centre", "right", "lower left", "lower", "lower right")
SHIFT_STEP = 0.06  # the suite's framing offset (xray, ct, mri, ultrasound, oct); the X-ray corpus draws -0.06..0.06
DISC = ("disc high", "", "disc low")  # fundus: the optic disc above / on / below the horizontal meridian
DISC_DY = (-0.06, 0.0, 0.06)
STAIN_LEVEL = {"pale": 1.07, "": 0.975, "dark": 0.88}  # H&E stain multiplier, corpus range 0.85-1.1
STAIN_HUE = {"pink": (0.03, 0.0, -0.03), "": (0.0, 0.0, 0.0), "purple": (-0.03, 0.0, 0.03)}
_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def nearest(value: float, centres) -> int:
    return int(np.argmin([abs(value - c) for c in centres]))


def count_word(n: int) -> str:
    return _WORDS.get(n, str(n))


def pos9(cy: float, cx: float, cut: float) -> str:
    """The 3x3 cell of (cy, cx) in normalised image coordinates (y down), cells split at +-cut."""
    row = 0 if cy < -cut else 2 if cy > cut else 1
    col = 0 if cx < -cut else 2 if cx > cut else 1
    return POS9[3 * row + col]


def grid_point(pos: str, step: float) -> tuple[float, float]:
    """The centre of a POS9 cell at +-step."""
    return (-step if "upper" in pos else step if "lower" in pos else 0.0,
            -step if "left" in pos else step if "right" in pos else 0.0)


def framing(pos: str) -> str:
    """A field of view moved off centre: "shifted up-left"; centred: nothing."""
    moves = [w for w, k in (("up", "upper"), ("down", "lower"), ("left", "left"), ("right", "right")) if k in pos]
    return f"shifted {'-'.join(moves)}" if moves else ""


def cup(cdr: float) -> str:
    return "small cup" if cdr < 0.35 else "medium cup" if cdr < 0.5 else "large cup" if cdr < 0.75 else "very large cup"


def stain_words(stain) -> tuple[str, str]:
    """(level, hue) of an H&E stain multiplier (r, g, b); "" for the middle ones."""
    level = list(STAIN_LEVEL)[nearest(float(np.mean(stain)), list(STAIN_LEVEL.values()))]
    d = stain[0] - stain[2]
    return level, "pink" if d > 0.03 else "purple" if d < -0.03 else ""


def study(w: dict) -> str:
    """The technique clause from word-level study attributes (the suite's, or the corpus's named from `seen`);
    "" when every one is at its middle level."""
    out = [w["exposure"], w["black"], framing(w.get("shift", "centre"))]
    if w.get("lumen", "centre") != "centre":
        out.append(f"lumen {w['lumen']}")
    out += ["hair" if w.get("hair") else "", w.get("disc", "")]
    if any(w.get("stain", ())):
        out.append(" ".join(x for x in (*w["stain"], "stain") if x))
    return ", ".join(x for x in out if x)


def study_words(seen: dict) -> dict:
    """The corpus image's study attributes, named as the suite names its levels."""
    w = {"exposure": EXPOSURE[nearest(seen["gain"], GAINS)], "black": BLACK[nearest(seen["bias"], BIASES)]}
    if "shift" in seen:
        w["shift"] = pos9(*seen["shift"], SHIFT_STEP / 2)
    if "lumen" in seen:
        w["lumen"] = pos9(*seen["lumen"], 0.1)
    if "hair" in seen:
        w["hair"] = seen["hair"]
    if "dy" in seen:
        w["disc"] = DISC[nearest(seen["dy"], DISC_DY)]
    if "stain" in seen:
        w["stain"] = stain_words(seen["stain"])
    return w


def _n(n: int, noun: str) -> str:
    return f"{count_word(n)} {noun}{'' if n == 1 else 's'}"


def findings(modality: str, finding: str, attrs: dict, seen: dict) -> str:
    """What the corpus renderer drew for this image's finding: grade, size, place, count, ratio (training captions);
    "" where nothing varies (a normal CT, ultrasound, OCT, endoscopy)."""
    side, size, grade = attrs["side"], attrs["size"], attrs["grade"]
    m, f = modality, finding
    out = ""
    if (m, f) == ("xray", "pneumonia"):
        zone = "upper" if seen["cy"] < -0.2 else "middle" if seen["cy"] < 0.05 else "lower"
        out = f"{size} {side} {zone} zone opacity"
    elif (m, f) == ("xray", "effusion"):
        out = f"{size} {side} effusion"
    elif (m, f) == ("ct", "liver_lesion"):
        zone = "upper" if seen["centers"][0][0] < -0.12 else "lower"
        out = f"{_n(len(seen['centers']), f'{size} lesion')}, {zone} liver"
    elif (m, f) == ("ct", "kidney_stone"):
        out = f"{_n(len(seen['cys']), f'{size} {side} stone')}"
    elif m == "mri":
        v = seen["ventricles"]
        vent = "small ventricles" if v < 0.95 else "prominent ventricles" if v > 1.1 and f != "hydrocephalus" else ""
        if f == "hydrocephalus":
            out = "dilated ventricles"
        if f == "tumor":
            zone = "anterior" if seen["cy"] < -0.15 else "central" if seen["cy"] < 0.15 else "posterior"
            out = f"{size} {side} {zone} mass"
        out = ", ".join(x for x in (out, vent) if x)
    elif m == "ultrasound" and f != "normal":
        cy, cx = seen["center"]
        lateral = "left" if cx < -0.1 else "right" if cx > 0.1 else "midline"
        out = f"{size} {'superficial' if cy < 0.15 else 'deep'} lesion, {lateral}"
    elif m == "pathology":
        out = {"normal": lambda: f"{count_word(seen['glands'])} glands",
               "carcinoma": lambda: f"about {round(seen['cells'], -1)} "
                                    f"{'large' if seen['nuclear_radius'] > 0.06 else 'small'} nuclei",
               "inflammation": lambda: f"about {round(seen['cells'], -1)} lymphocytes"}[f]()
    elif m == "dermatology":
        what = f"{'tan' if seen['shade'] > 1.0 else 'dark brown'} nevus" if f == "nevus" else "lesion"
        out = f"{size} {what}, {pos9(*seen['center'], 0.1)}, {seen['tone']} skin"
    elif m == "fundus":
        out = f"{side} eye, {cup(seen['cdr'])}"
        if f == "retinopathy":
            out += f", about {round(seen['hemorrhages'] / 5) * 5} hemorrhages"
    elif (m, f) == ("oct", "drusen"):
        out = f"{count_word(len(seen['xs']))} drusen"
    elif (m, f) == ("oct", "fluid"):
        out = _n(len(seen["xs"]), f"{size} pocket")
    elif m == "endoscopy" and f != "normal":
        out = f"{size} {f}, {pos9(*seen['center'], 0.2)}"
    if f != "normal" and not (m, f) == ("dermatology", "nevus"):
        out = f"{grade}, {out}" if out else grade
    return out
