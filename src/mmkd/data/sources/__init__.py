"""Owns the raw-record interface: every source reader yields RawRecords, and loads their pixels in a worker.

A reader module defines `iter_records(spec, data_root) -> Iterator[RawRecord]` (cheap: no pixel decoding)
and `load_pixels(rec, cfg) -> np.ndarray` (uint8 RGB, run in a decoding worker). Add a kind: one module
plus one line in READERS.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

READERS = {
    "synthetic": "mmkd.data.sources.manifest",
    "manifest": "mmkd.data.sources.manifest",
    "webdataset": "mmkd.data.sources.webdataset",
    "folder": "mmkd.data.sources.folder",
    "dicom": "mmkd.data.sources.dicom",
    "nifti": "mmkd.data.sources.nifti",
    "volume": "mmkd.data.sources.volume",
    "wsi": "mmkd.data.sources.wsi",
}


@dataclass
class RawRecord:
    """One candidate image-caption pair as a source describes it, before any pixel is decoded."""

    source: str
    kind: str
    key: str                          # unique within the source (path, tar member key, file#frame, ...)
    origin: str                       # original location, relative to the source root, for provenance
    loc: dict[str, Any] = field(default_factory=dict)  # how the reader finds the pixels again (in a worker)
    id: str | None = None
    caption: str | None = None
    modality: str | None = None       # as declared by the source (normalised later)
    split: str | None = None
    group: str | None = None          # patient / study / article id, when the source has one
    labels: dict = field(default_factory=dict)
    licence: str | None = None
    line: int | None = None           # manifest line number, when there is one
    raw: Any = None                   # the record as the source had it, kept verbatim in quarantine
    problem: str | None = None        # a reason found while reading the source: quarantined without decoding

    def describe(self) -> dict:
        """The fields that define the record (its fingerprint covers these plus the raw pixel bytes)."""
        # free of absolute paths: the same corpus in another checkout has the same fingerprints
        return {"source": self.source, "key": self.key, "id": self.id, "caption": self.caption,
                "modality": self.modality, "split": self.split, "group": self.group, "labels": self.labels,
                "licence": self.licence, "loc": {k: v for k, v in self.loc.items() if k not in ("path", "tar", "root")}}


def take_metadata(rec: RawRecord, get) -> None:
    """Fill the optional per-record fields from a source's metadata; `get(role)` returns the value or None."""
    for role in ("modality", "split", "group", "licence"):
        value = get(role)
        if value not in (None, ""):
            setattr(rec, role, str(value))


def reader(kind: str):
    if kind not in READERS:
        raise KeyError(f"unknown source kind '{kind}'; kinds: {sorted(READERS)}")
    return importlib.import_module(READERS[kind])


def source_root(spec, data_root: Path) -> Path:
    path = Path(os.path.expanduser(spec.path))
    return (path if path.is_absolute() else Path(data_root) / path).resolve()


def inside(root: Path, rel: str) -> Path | None:
    """The resolved path of `rel` under root, or None when it escapes root (.., absolute paths, symlinks)."""
    root = root.resolve()
    target = (root / rel).resolve()
    return target if target == root or root in target.parents else None


def iter_source(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    """The source's records; `limits` (a CurateCfg) bounds what listing reads. An error while listing ends the
    source with a quarantined record naming where it stopped; a missing source root stops the run."""
    root = source_root(spec, data_root)
    if spec.kind == "synthetic" and not (root / "manifest.jsonl").exists():
        raise FileNotFoundError(f"source '{spec.name}' (synthetic): {root / 'manifest.jsonl'} not found; "
                                "generate the embedded corpus with `mmkd data synth`")
    if not root.exists() and spec.optional:  # e.g. the inbox's manifest before the first drop
        return
    if not root.exists() and not any(ch in spec.path for ch in "*?["):
        raise FileNotFoundError(f"source '{spec.name}' ({spec.kind}): {root} does not exist")
    n, last = 0, None
    try:
        mod = reader(spec.kind)
        for rec in (mod.iter_records(spec, data_root) if limits is None else mod.iter_records(spec, data_root, limits)):
            rec.licence = rec.licence or spec.licence
            rec.modality = rec.modality or spec.modality
            rec.split = rec.split or spec.split
            n, last = n + 1, rec.key
            yield rec
    except Exception as exc:  # noqa: BLE001 - a reader bug or an exotic file costs records, not the run
        # a generator that raised cannot resume: what the source had left is lost to this run, so the record
        # says where listing stopped; the other sources still follow
        after = f"after record {n} ('{last}')" if n else "before its first record"
        yield RawRecord(spec.name, spec.kind, f"<listing failed after record {n}>", last or "",
                        raw={"source": spec.name, "records_listed": n, "last_key": last},
                        problem=f"listing failed: source '{spec.name}' ({spec.kind}) stopped {after}: "
                                f"{type(exc).__name__}: {exc}")
