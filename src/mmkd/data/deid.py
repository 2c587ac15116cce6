"""Owns caption de-identification: finding the HIPAA Safe Harbor identifiers that occur in captions and masking them.

Rules are regular expressions per identifier kind; bare person names are found with the first-name, surname and
common-word lexicons of philter-lite (UCSF's rule-based PHI filter; its own pipeline needs an NLTK tagger model
that cannot be downloaded here, so only its lexicons are used, read from the installed package without importing
it). Kinds: name, date (more specific than a year), age (over 89), phone (and fax), email, url, ip, ssn,
record_number (MRN, account, health plan, licence, device, vehicle, biometric and other keyed ids),
long_number (any run of 7+ digits), address (street, city, county) and zip. Years alone, ages up to 89 and
states are kept, as Safe Harbor allows. Speed: a caption without a digit, an '@', a '/' or a capitalised word
pair skips most rules (curation scrubs every caption).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import tomllib
from pathlib import Path
from typing import Callable

_MON = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|" \
       r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
_STATE_ABBR = ("AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC "
               "ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC").split()
_STATES = ("Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|Idaho|"
           "Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|"
           "Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|New Mexico|New York|"
           "North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode Island|South Carolina|South Dakota|"
           "Tennessee|Texas|Utah|Vermont|Virginia|Washington|West Virginia|Wisconsin|Wyoming")
_STATE = rf"(?:{_STATES}|{'|'.join(_STATE_ABBR)})"
_CAPW = r"[A-Z](?:[a-z]|'[A-Z])[a-zA-Z-]*"            # a capitalised word: Smith, O'Brien, McDonald (not MRI)
_PLACE = rf"{_CAPW}(?:\s{_CAPW}){{0,2}}"
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Parkway|"
           r"Pkwy|Highway|Hwy|Circle|Cir|Square|Sq|Close|Crescent|Row)")
_AGE = r"(?:9\d|1[0-4]\d)"                             # 90-149: Safe Harbor aggregates ages over 89
_ID_WORDS = (r"MRN|medical record(?: number| no\.?)?|record (?:number|no\.?)|patient (?:id|number|no\.?)|"
             r"accession(?: number| no\.?)?|case (?:number|no\.?)|hospital (?:number|no\.?)|account(?: number| no\.?)?|"
             r"acct\.?(?: no\.?)?|health plan(?: beneficiary)?(?: number| no\.?| id)?|member (?:id|number|no\.?)|"
             r"policy (?:number|no\.?)|insurance (?:id|number|no\.?)|beneficiary (?:id|number|no\.?)|"
             r"subscriber (?:id|number)|medicaid(?: id| number| no\.?)?|medicare(?: id| number| no\.?)?|"
             r"licen[cs]e(?: number| no\.?)?|licen[cs]e plate|plate(?: number| no\.?)?|DEA(?: number| no\.?)?|NPI|"
             r"certificate(?: number| no\.?)?|serial(?: number| no\.?)?|S/N|SN|device (?:id|serial|number)|UDI|VIN|"
             r"specimen (?:id|number|no\.?)|study (?:id|number)|biometric (?:id|template)|fingerprint(?: id)?|"
             r"voiceprint(?: id)?|iris (?:scan|template)(?: id)?|retina(?:l)? scan(?: id)?|badge(?: number| no\.?)?|"
             r"passport(?: number| no\.?)?|ID")
_ID_TOKEN = r"(?=[A-Z0-9/-]*\d)[A-Z0-9][A-Z0-9/-]{3,}(?<![/-])"
_TITLE = r"(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof|Doctor|Professor|Nurse|Sister)"
_NAME = rf"{_CAPW}(?:\s+[A-Z]\.)?(?:\s+{_CAPW}){{0,2}}"
_NAME_CONTEXT = (r"patient(?: name)?|name|pt|attending|physician|surgeon|radiologist|pathologist|"
                 r"referring (?:physician|doctor)|signed by|reported by|dictated by|read by|seen by|courtesy of|"
                 r"photographer|technologist|reviewed by|examined by|performed by|consultant|contact|"
                 r"daughter|son|wife|husband|mother|father")
# words after a capitalised pair that make it an eponym (Dandy Walker malformation), not a person
_EPONYM_NEXT = re.compile(r"\s*(?:'s\b|-|syndrome|disease|malformation|sign|test|classification|score|criteria|"
                          r"lymphoma|sarcoma|tumou?r|palsy|phenomenon|reaction|procedure|operation|fracture|stain|"
                          r"staining|cells?|bod(?:y|ies)|nodes?|triad|law|scale|grade|grading|stage|staging|ulcer|"
                          r"lesion|deformity|anomaly|approach|manoeuvre|maneuver|method|index|ring|line|space|"
                          r"nodule|spot|fold|canal|duct|gland|membrane|layer|zone|area|artery|vein|nerve|"
                          r"disorder|encephalopathy|dystrophy|ataxia|myopathy|neuropathy|thyroiditis)\b",
                          re.IGNORECASE)

Rule = tuple[str, re.Pattern, "str | Callable[[re.Match], str]"]


def _keep(group: int, placeholder: str) -> Callable[[re.Match], str]:
    """Replacement that keeps the label in front (`MRN [ID]`, `seen by [NAME]`) so the caption still reads."""
    return lambda m: f"{m.group(group)} {placeholder}"


def _rules() -> tuple[list[Rule], list[Rule]]:
    """(rules run on every caption, rules that need a digit). Order matters: e-mails before URLs before names,
    keyed record numbers before bare digit runs, addresses before ZIP codes."""
    i = re.IGNORECASE
    text = [
        ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
        ("url", re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"')\]]+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\."
                           r"(?:com|org|net|edu|gov|info|io|biz|co\.uk|ac\.uk|nhs\.uk)(?:/[^\s<>\"')\]]*)?", i),
         "[URL]"),
        ("ip", re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*[A-Fa-f])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])"),
         "[IP]"),
        ("name", re.compile(rf"\b{_TITLE}\.?\s+{_NAME}"), "[NAME]"),
        ("name", re.compile(rf"\b((?i:{_NAME_CONTEXT}))\s*:?\s+(?:the\s+)?({_NAME})"), _keep(1, "[NAME]")),
        ("address", re.compile(r"\b(lives in|living in|resident of|resides in|residing in|native of|"
                               rf"(?:town|city|village|county) of)\s+({_PLACE})"), _keep(1, "[ADDRESS]")),
        ("address", re.compile(rf"\b{_PLACE}\s+(?:County|Parish|Borough|Township)\b"), "[ADDRESS]"),
        ("address", re.compile(rf"\b({_PLACE}),\s+((?:{_STATES})\b|(?:{'|'.join(_STATE_ABBR)})\b(?=\s+\d{{5}}))"),
         lambda m: f"[ADDRESS], {m.group(2)}"),
    ]
    digits = [
        ("ssn", re.compile(r"\b(SSN|social security(?: number| no\.?)?)\s*[:#]?\s*\d{3}[- ]?\d{2}[- ]?\d{4}\b", i),
         _keep(1, "[ID]")),
        ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ID]"),
        ("ip", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), "[IP]"),
        ("record_number", re.compile(rf"\b({_ID_WORDS})(?:\s*[:#]\s*|\s+(?:no\.?\s*|number\s*|#\s*)?)"
                                     rf"({_ID_TOKEN})", i), _keep(1, "[ID]")),
        ("phone", re.compile(r"\b(tel|telephone|phone|ph|fax|pager|cell|mobile|call|contact)\b\.?\s*[:#]?\s*"
                             r"(\+?\d[\d\s().-]{5,}\d)(?:\s*(?:ext\.?|x)\s*\d{1,5})?", i), _keep(1, "[PHONE]")),
        ("phone", re.compile(r"(?<![\w-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
                             r"(?:\s*(?:ext\.?|x)\s*\d{1,5})?"), "[PHONE]"),
        ("phone", re.compile(r"(?<![\w-])\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}\b"), "[PHONE]"),
        ("date", re.compile(
            rf"\b(?:\d{{4}}-\d{{2}}-\d{{2}}(?:T[\d:.]+Z?)?|\d{{4}}[/.]\d{{1,2}}[/.]\d{{1,2}}|"
            rf"\d{{1,2}}/\d{{1,2}}/\d{{2,4}}|\d{{1,2}}\.\d{{1,2}}\.\d{{2,4}}|\d{{1,2}}-\d{{1,2}}-\d{{2,4}}|"
            rf"\d{{1,2}}-{_MON}-\d{{2,4}}|"
            rf"(?:{_MON}|(?i:{_MON}))\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}|"
            rf"\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{_MON}|(?i:{_MON})),?\s+\d{{4}}|"
            rf"\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MON}|"
            rf"{_MON}\s+\d{{1,2}}(?:st|nd|rd|th)?(?![\d.:]|\s*(?:mm|cm|%))|"
            rf"{_MON},?\s+(?:19|20)\d{{2}}|(?:0?[1-9]|1[0-2])/(?:19|20)\d{{2}}(?!\s*dilution))\b"), "[DATE]"),
        ("date", re.compile(r"\b(on|dated|since|from|until|by|taken|acquired|obtained|performed|admitted|discharged|"
                            r"seen|DOB|born)\s+(\d{1,2}/\d{1,2})\b(?!/)", i), _keep(1, "[DATE]")),
        ("age", re.compile(rf"\b{_AGE}(?=(?:\s*|-)(?:years?|yrs?|y)(?:\s*|-)old\b|[- ]?(?:yo|y/o|y\.o\.)(?!\w)|"
                           r"\s?[MF]\b|-year\b)"), "[AGE]"),
        ("age", re.compile(rf"\b(aged?|age:)\s*{_AGE}\b", i), _keep(1, "[AGE]")),
        ("age", re.compile(rf"(?<=\[NAME\])(,?\s*\(?){_AGE}\b(?=\)|,)"), lambda m: f"{m.group(1)}[AGE]"),
        ("address", re.compile(rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+)?(?:{_CAPW}\s+){{1,3}}{_STREET}\b\.?"
                               r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|#)\.?\s*\w+)?"), "[ADDRESS]"),
        ("address", re.compile(r"\bP\.?\s?O\.?\s+Box\s+\d+", i), "[ADDRESS]"),
        ("zip", re.compile(rf"(?<=\b(?:{'|'.join(_STATE_ABBR)}) )\d{{5}}(?:-\d{{4}})?\b"), "[ZIP]"),
        ("zip", re.compile(r"\b(ZIP(?: code)?|postal code|postcode)\s*[:#]?\s*(\d{5}(?:-\d{4})?)\b", i),
         _keep(1, "[ZIP]")),
        ("record_number", re.compile(r"\b(?=[A-HJ-NPR-Z0-9]{17}\b)(?=\w*\d)(?=\w*[A-Z])[A-HJ-NPR-Z0-9]{17}\b"), "[ID]"),
        # ids such as PT-2019-00423; not cell lines (NCI-H1299)
        ("record_number", re.compile(r"\b(?!NCI-)(?=[A-Z0-9-]*\d{4})(?=[A-Z0-9-]*[A-Z])[A-Z0-9]+(?:-[A-Z0-9]+)+\b"),
         "[ID]"),
        ("long_number", re.compile(r"\b\d{7,}\b"), "[ID]"),
    ]
    return text, digits


TEXT_RULES, DIGIT_RULES = _rules()
_HAS_DIGIT = re.compile(r"\d")
_CAP_RUN = re.compile(rf"\b({_CAPW})(?:\s+([A-Z])\.)?\s+({_CAPW})\b")
_SURNAME_COMMA = re.compile(rf"\b({_CAPW}),\s+({_CAPW})\b")
_STREET_WORD = re.compile(_STREET)
_HOUSE_NUMBER = re.compile(r"\d\s+$")                # `77 Oak Lane` is an address, not Oak Lane the person
_QUOTED_WORD = re.compile(r'"([^"\\]*)"')
_INITIAL_SURNAME = re.compile(rf"(?<![\w.])[A-Z]\.\s?({_CAPW})\b")


@functools.cache
def lexicons() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(first names, surnames, common non-name words) of philter-lite, lower case; read once per process."""
    spec = importlib.util.find_spec("philter_lite")  # not imported: its package import loads NLTK
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mmkd.data.deid needs philter-lite (pip install 'philter-lite>=0.6,<0.7')")
    text = (Path(next(iter(spec.submodule_search_locations))) / "filters" / "set.toml").read_text("utf-8")
    # the file is three `key = [ "word", ... ]` lines without escapes: read as such (3x faster than tomllib,
    # once per curation worker); anything else goes through tomllib
    db = {k.strip(): v for k, sep, v in (line.partition(" = ") for line in text.splitlines()) if sep}
    if "\\" in text or set(db) != {"firstnames", "lastnames", "nonames"}:
        db = tomllib.loads(text)
    else:
        db = {k: _QUOTED_WORD.findall(v) for k, v in db.items()}
    return frozenset(db["firstnames"]), frozenset(db["lastnames"]), frozenset(db["nonames"])


def _key(word: str) -> str:
    """A word as philter-lite's lexicons spell it: lower case, no apostrophe (o'brien -> obrien)."""
    return word.lower().replace("'", "")


def _lexicon_names(text: str) -> tuple[str, int]:
    """Bare person names: First [M.] Last, Last, First and J. Last, judged against philter-lite's lexicons."""
    first, last, common = lexicons()
    n = 0

    def pair(m: re.Match) -> str:
        nonlocal n
        a, b = _key(m.group(1)), _key(m.group(3))
        # a common word may be a surname (Walker, Young) after a first name that is not one, and vice versa
        if a in first and b in last and (a not in common or b not in common) and not _STREET_WORD.fullmatch(
                m.group(3)) and not _EPONYM_NEXT.match(m.string, m.end()) and not _HOUSE_NUMBER.search(
                m.string, 0, m.start()):
            n += 1
            return "[NAME]"
        return m.group(0)

    def comma(m: re.Match) -> str:
        nonlocal n
        a, b = _key(m.group(1)), _key(m.group(2))
        if a in last and b in first and a not in common and b not in common:
            n += 1
            return "[NAME]"
        return m.group(0)

    def initial(m: re.Match) -> str:
        nonlocal n
        b = _key(m.group(1))
        if b in last and b not in common and not _EPONYM_NEXT.match(m.string, m.end()):
            n += 1
            return "[NAME]"
        return m.group(0)

    text = _CAP_RUN.sub(pair, text)
    text = _SURNAME_COMMA.sub(comma, text)
    text = _INITIAL_SURNAME.sub(initial, text)
    return text, n


def deidentify(text: str) -> tuple[str, dict[str, int]]:
    """Mask every identifier in text with a [KIND] placeholder; returns the text and the count per kind."""
    counts: dict[str, int] = {}

    def run(rules: list[Rule]) -> None:
        nonlocal text
        for kind, pattern, repl in rules:
            text, k = pattern.subn(repl, text)
            if k:
                counts[kind] = counts.get(kind, 0) + k

    run(TEXT_RULES)
    # bare names before the digit rules: an age right after a name (`[NAME] (94)`) is one of those
    if _CAP_RUN.search(text) or _SURNAME_COMMA.search(text) or _INITIAL_SURNAME.search(text):
        text, k = _lexicon_names(text)
        if k:
            counts["name"] = counts.get("name", 0) + k
    if _HAS_DIGIT.search(text):
        run(DIGIT_RULES)
    return text, counts


def deidentify_value(value, token: Callable[[str], str], text_keys: frozenset[str], key: str = ""):
    """A raw record's value with nothing identifying left: free-text fields de-identified, every other string
    replaced by its keyed token (ids, paths, group and patient ids), numbers above 89 tokenised (MRNs as ints)."""
    if isinstance(value, dict):
        return {k: deidentify_value(v, token, text_keys, str(k).lower()) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [deidentify_value(v, token, text_keys, key) for v in value]
    if isinstance(value, str):
        if key in SAFE_KEYS:
            return value
        return deidentify(value)[0] if key in text_keys else token(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if abs(value) <= 89 else token(json.dumps(value))
    return token(repr(value))


TEXT_KEYS = frozenset({"caption", "text", "report", "description", "findings", "impression", "title", "note",
                       "notes", "comment", "comments", "reason"})
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
SAFE_KEYS = frozenset({"modality", "split", "licence", "license"})   # vocabulary, kept as they are
_FIELD_NAMES = frozenset({"id", "image", "caption", "modality", "split", "group", "labels", "licence", "path"})
_PATHLIKE = re.compile(r"(?:[\w.~-]*[/\\])+[\w.-]+")


def deidentify_reason(reason: str, token: Callable[[str], str], values: tuple = ()) -> str:
    """A quarantine reason without identifiers: the record's own id, key and path, quoted ids of other records and
    any path become keyed tokens; the rest is de-identified text."""
    for v in sorted({str(v) for v in values if v is not None and len(str(v)) >= 4}, key=len, reverse=True):
        reason = reason.replace(v, token(v))
    reason = _QUOTED.sub(lambda m: f"'{token(m.group(0)[1:-1])}'" if not m.group(0).startswith(("'tok-", '"tok-'))
                         else m.group(0), reason)
    reason = _PATHLIKE.sub(lambda m: token(m.group(0)), reason)
    return deidentify(reason)[0]


def deidentify_quarantine_line(entry: dict, token: Callable[[str], str]) -> dict:
    """One quarantine.jsonl entry as it may leave the machine (MLflow): source, kind, line number and category
    as they are; id, key and origin as keyed tokens; the reason and the raw record de-identified; no fingerprint."""
    raw = entry.get("record")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:  # not JSON (the reason it was refused): de-identified as text, quoted values tokenised
            raw = deidentify(_PATHLIKE.sub(lambda m: token(m.group(0)), _QUOTED.sub(
                lambda m: m.group(0) if " " in m.group(0) or m.group(0)[1:-1] in _FIELD_NAMES | SAFE_KEYS
                else f'"{token(m.group(0)[1:-1])}"', raw)))[0]
    own = tuple(entry.get(k) for k in ("id", "key", "origin"))
    return {"source": entry.get("source"), "kind": entry.get("kind"), "line": entry.get("line"),
            "category": entry.get("category"),
            **{k: token(str(entry[k])) for k in ("id", "key", "origin") if entry.get(k) not in (None, "")},
            "reason": deidentify_reason(str(entry.get("reason", "")), token, own),
            "record": raw if isinstance(raw, str) else deidentify_value(raw, token, TEXT_KEYS)}


def deidentified_quarantine(src: Path, dst: Path, token: Callable[[str], str]) -> Path:
    """Write the de-identified copy of quarantine.jsonl src to dst (streamed: a quarantine can be large)."""
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for n, line in enumerate(fin, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"line": n, "category": "unreadable quarantine line", "reason": ""}
            fout.write(json.dumps(deidentify_quarantine_line(entry, token), sort_keys=True, default=str) + "\n")
    return dst
