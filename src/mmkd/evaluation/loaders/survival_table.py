"""Owns the survival_table format: follow-up time and event per patient, and each patient's images (a bag): patches,
or the tiles of the patient's whole slides (evaluation.slide_bags; TCGA: every slide of the case, one bag)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmkd.evaluation import slide_bags
from mmkd.evaluation.dataset import DatasetFormatError, EvalDataset, FileImages
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "survival_table"
TCGA_COLS = ("case_submitter_id", "vital_status", "days_to_death", "days_to_last_follow_up")


class Options(slide_bags.SlideOptions):
    file: str = "clinical.csv"
    sep: str = ","  # GDC's clinical.tsv: "\t"
    tcga: bool = False  # time/event from GDC clinical columns (TCGA_COLS); the id is case_submitter_id
    id_col: str = "patient_id"
    time_col: str = "time"
    event_col: str = "event"
    split_col: str = "split"  # used when the column exists
    split_map: dict[str, str] = {}
    bags_file: str = "bags.csv"  # patient_id, image; when absent, images are patches/<patient_id>/
    patches_dir: str = "patches"
    exclude: list[str] = []


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _tcga(rows: list[dict], where: str, rejected: list) -> dict[str, tuple[str, float, int]]:
    """GDC clinical rows (several per case: one per treatment) -> (split, time, event) per case.
    Dead: time = days_to_death; Alive: time = days_to_last_follow_up (censored)."""
    cases: dict[str, list[dict]] = {}
    for row in rows:
        cases.setdefault(row["case_submitter_id"], []).append(row)
    out = {}
    for case, rs in cases.items():
        dead = any(r["vital_status"].lower() == "dead" for r in rs)
        col = "days_to_death" if dead else "days_to_last_follow_up"
        times = [t for t in (_number(r[col]) for r in rs) if t is not None and t >= 0]
        if not times:
            rejected.append((f"{where} case {case}", f"non-numeric time: {col} = '{rs[0][col]}'"))
            continue
        out[case] = ("", max(times), int(dead))
    return out


def _plain(rows: list[dict], o: Options, has_split: bool, rejected: list) -> dict[str, tuple[str, float, int]]:
    out = {}
    for n, row in enumerate(rows, start=2):
        pid, where = row[o.id_col], f"{o.file} row {n} ({row[o.id_col]})"
        t, e = _number(row[o.time_col]), _number(row[o.event_col])
        if not pid or pid in out:
            rejected.append((where, "empty patient id" if not pid else "duplicate patient id"))
        elif t is None or t < 0:
            rejected.append((where, f"non-numeric or negative time '{row[o.time_col]}'"))
        elif e not in (0.0, 1.0):
            rejected.append((where, f"event '{row[o.event_col]}' not 0/1"))
        elif has_split and common.map_split(row[o.split_col], o.split_map) is None:
            rejected.append((where, f"bad split '{row[o.split_col]}'"))
        else:
            out[pid] = (common.map_split(row[o.split_col], o.split_map) if has_split else "", t, int(e))
    return out


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    o: Options = entry.opts
    path = folder / o.file
    rejected: list = []
    if o.tcga:
        rows = common.read_table(path, TCGA_COLS, o.sep)
        table = _tcga(rows, o.file, rejected)
        has_split = False
    else:
        slide = (o.slide_col,) if o.slides_dir and o.slide_col else ()
        rows = common.read_table(path, (o.id_col, o.time_col, o.event_col) + slide, o.sep)
        has_split = bool(rows) and o.split_col in rows[0]
        table = _plain(rows, o, has_split, rejected)
    if o.slides_dir:
        root = slide_bags.slides_root(folder, o)
        named = None
        if o.slide_col and not o.tcga:  # one slide per patient named by the table (GDC tables name none)
            named = {r[o.id_col]: r[o.slide_col] for r in reversed(rows) if r[o.id_col] in table}  # first row wins
        pattern = o.slide_id or (slide_bags.TCGA_PATIENT if o.tcga else slide_bags.STEM)
        slides = slide_bags.find_slides(root, list(table), pattern, o.exclude, rejected, named)
        images, bags = slide_bags.slide_bags(root, slides, o, rejected, what="patient")
        kept = [pid for pid in table if bags[pid]]
    else:
        paths, bags = common.collect_bags(folder, list(table), o.bags_file, o.patches_dir, o.exclude, rejected)
        images = FileImages(paths)
        kept = []
        for pid in table:
            if bags[pid]:
                kept.append(pid)
            else:
                rejected.append((f"patient {pid}", f"empty bag: no images in {o.patches_dir}/{pid}/ or {o.bags_file}"))
    if len(kept) < 2:
        raise DatasetFormatError(f"{path}: {len(kept)} patient(s) with images and valid follow-up ({rejected[:3]})")
    return EvalDataset(name=entry.name, modality=common.modality_of(entry), images=images,
                       bags=[np.array(bags[p]) for p in kept], bag_ids=kept,
                       bag_split=np.array([table[p][0] for p in kept]) if has_split else None,
                       time=np.array([table[p][1] for p in kept], np.float64),
                       event=np.array([table[p][2] for p in kept], np.int64), rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    o: Options = entry.opts
    path = folder / o.file
    if not path.is_file():
        return common.missing(entry, path)
    need = TCGA_COLS if o.tcga else (o.id_col, o.time_col, o.event_col)
    lacking = [c for c in need if c not in common.table_header(path, o.sep)]
    if lacking:
        return "incomplete", f"{path}: missing column(s) {lacking}"
    if o.slides_dir and not (folder / o.slides_dir).is_dir():
        return "incomplete", f"{path} present, but not the slides folder {folder / o.slides_dir}/"
    if not o.slides_dir and not (folder / o.bags_file).is_file() and not (folder / o.patches_dir).is_dir():
        return "incomplete", f"{path} present, but neither {folder / o.bags_file} nor {folder / o.patches_dir}/"
    return "present", str(path)
