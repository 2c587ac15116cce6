"""Owns record cleaning: caption normalisation and identifier scrubbing, and modality resolution."""

from __future__ import annotations

import re
import unicodedata

from mmkd.config import MODALITIES
from mmkd.data.deid import deidentify

UNKNOWN = "unknown"


def normalise_caption(text: str) -> str:
    """Unicode NFC, control characters dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return " ".join(text.split())


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Replace identifiers with [KIND] placeholders; returns the text and how many of each kind were removed.

    The rules and lexicons live in mmkd.data.deid (every Safe Harbor kind that occurs in captions)."""
    return deidentify(text)


ALIASES = {
    "xray": ("x-ray", "xray", "x ray", "xr", "cr", "dx", "radiograph", "radiography", "cxr", "mammography", "mg"),
    "ct": ("ct", "computed tomography", "cta"),
    "mri": ("mri", "mr", "magnetic resonance"),
    "ultrasound": ("ultrasound", "us", "sonography", "echo", "echocardiography"),
    "pathology": ("pathology", "histopathology", "histology", "wsi", "sm", "microscopy", "cytology"),
    "dermatology": ("dermatology", "dermoscopy", "derm", "skin"),
    "fundus": ("fundus", "fundoscopy", "retinal photograph", "op", "cfp"),
    "oct": ("oct", "optical coherence tomography", "opt"),
    "endoscopy": ("endoscopy", "colonoscopy", "gastroscopy", "es", "capsule endoscopy"),
}
_ALIAS = {a: m for m, names in ALIASES.items() for a in (m, *names)}

KEYWORDS = {
    "xray": r"x-?ray|radiograph|\bcxr\b|chest film|mammogra",
    "ct": r"\bct\b|computed tomograph|\bcta\b|hounsfield",
    "mri": r"\bmri?\b|magnetic resonance|t[12]-weighted|\bflair\b|\bdwi\b",
    "ultrasound": r"ultrasound|sonograph|doppler|echocardiogra|hypoechoic|hyperechoic",
    "pathology": r"histolog|histopatholog|\bh&e\b|hematoxylin|haematoxylin|micrograph|biopsy|immunohisto|stain",
    "dermatology": r"dermoscop|dermatolog|skin lesion|nevus|naevus",
    "fundus": r"fundus|fundoscop|optic disc|retinal photograph",
    "oct": r"\boct\b|optical coherence",
    "endoscopy": r"endoscop|colonoscop|gastroscop|polyp",
}
_KEYWORDS = {m: re.compile(p, re.IGNORECASE) for m, p in KEYWORDS.items()}


def normalise_modality(declared: str | None) -> str | None:
    if not declared:
        return None
    return _ALIAS.get(" ".join(declared.lower().replace("_", " ").split()))


def classify_caption(caption: str) -> str | None:
    """The modality whose keywords the caption matches most; None when none or a tie."""
    scores = {m: len(p.findall(caption)) for m, p in _KEYWORDS.items()}
    best = max(scores.values())
    winners = [m for m, s in scores.items() if s == best]
    return winners[0] if best and len(winners) == 1 else None


def resolve_modality(declared: str | None, caption: str) -> tuple[str, str]:
    """(modality, how): from the source's metadata, else the caption keyword classifier, else `unknown`."""
    m = normalise_modality(declared)
    if m:
        return m, "source"
    m = classify_caption(caption)
    if m:
        return m, "caption"
    return UNKNOWN, "none"


assert set(ALIASES) == set(MODALITIES) == set(KEYWORDS)
