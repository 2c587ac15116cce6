"""Owns record cleaning: caption normalisation and identifier scrubbing, and modality resolution."""

from __future__ import annotations

import re
import unicodedata

from mmkd.config import MODALITIES

UNKNOWN = "unknown"

# (kind, pattern, replacement). Order matters: e-mails before names, record numbers before bare digit runs.
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
SCRUBBERS: list[tuple[str, re.Pattern, str]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
    ("record_number", re.compile(
        r"\b(MRN|medical record(?: number| no\.?)?|record (?:number|no\.?)|patient (?:id|number|no\.?)|"
        r"accession(?: number| no\.?)?|case (?:number|no\.?)|hospital (?:number|no\.?)|ID)\s*[:#]?\s*"
        r"(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{3,}\b", re.IGNORECASE), r"\1 [ID]"),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ID]"),
    ("phone", re.compile(r"(?<![\w-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"),
     "[PHONE]"),
    ("date", re.compile(
        r"\b(?:\d{4}-\d{2}-\d{2}|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|" + _MONTH + r"\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}|"
        r"\d{1,2}(?:st|nd|rd|th)?\s+" + _MONTH + r",?\s+\d{4})\b", re.IGNORECASE), "[DATE]"),
    ("name", re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof|Doctor)\.?\s+[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+)?"),
     "[NAME]"),
    ("name", re.compile(r"\b(patient(?: name)?|name)\s*:\s*[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+){0,2}",
                        re.IGNORECASE), r"\1: [NAME]"),
    ("long_number", re.compile(r"\b\d{7,}\b"), "[ID]"),
]


def normalise_caption(text: str) -> str:
    """Unicode NFC, control characters dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return " ".join(text.split())


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Replace identifiers with [KIND] placeholders; returns the text and how many of each kind were removed."""
    counts: dict[str, int] = {}
    for kind, pattern, repl in SCRUBBERS:
        text, n = pattern.subn(repl, text)
        if n:
            counts[kind] = counts.get(kind, 0) + n
    return text, counts


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
