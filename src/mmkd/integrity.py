"""Owns `mmkd verify`: every byte of a workspace's stores checked against their checksums (the curated store
through mmkd.data.store.verify_store, each feature store through FeatureStore.verify), problems named by file."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mmkd")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # each names a file; any problem is a failed check
    notes: list[str] = field(default_factory=list)  # what was not checked, or left by a killed run, and why
    checked: dict[str, str] = field(default_factory=dict)  # store -> what was checked

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_curated(curated_dir: Path, report: Report) -> None:
    from mmkd.data.generation import resolve
    from mmkd.data.store import verify_store

    if not resolve(Path(curated_dir)).is_dir():  # resolve: the generation readers open after a killed switch
        report.notes.append(f"{curated_dir}: no curated store (nothing to check)")
        return
    found = verify_store(curated_dir)
    report.problems += found
    report.checked["curated"] = f"{curated_dir}: {'ok' if not found else f'{len(found)} problem(s)'}"


def verify_features(label: str, folder: Path, report: Report, repair: bool = False) -> None:
    """Check one feature store fully; with repair, drop the damaged shards (their rows count as missing then)."""
    from mmkd.features.store import FeatureError, FeatureStore

    folder = Path(folder)
    if not (folder / "index.sqlite").exists():
        report.notes.append(f"{folder}: no {label} feature store (nothing to check)")
        return
    try:
        store = FeatureStore(folder)
        bad = [r[0] for r in store.db.execute("PRAGMA quick_check") if r[0] != "ok"]
    except (sqlite3.DatabaseError, FeatureError) as exc:
        report.problems.append(f"{folder / 'index.sqlite'}: unreadable index ({exc})")
        return
    try:
        report.problems += [f"{folder / 'index.sqlite'}: {b}" for b in bad]
        found = store.verify()
        report.problems += found
        n = store.db.execute("SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM shards").fetchone()
        report.checked[label] = (f"{folder}: {n[0]} shards, {n[1]} rows, {len(store.sets())} feature sets: "
                                 + ("ok" if not found else f"{len(found)} problem(s)"))
        leftovers = [p for p in (folder / "shards").glob("*/*/*") if p.name.endswith(".tmp")]
        listed = {f"{t}/{v}/{u}" for t, v, u in store.db.execute("SELECT teacher, version, unit FROM shards")}
        unlisted = [p for p in (folder / "shards").glob("*/*/*.keys.npy")
                    if f"{p.parent.parent.name}/{p.parent.name}/{p.name[:-9]}" not in listed]
        if leftovers or unlisted:
            report.notes.append(f"{folder}: {len(unlisted)} whole shard(s) not yet in the index and "
                                f"{len(leftovers)} partial file(s), left by a killed run; the next run adopts or "
                                "deletes them")
        if repair and found:
            for name in store.reindex_damaged():  # first: dropping a shard rewrites the set's key index
                report.notes.append(f"{folder}: rebuilt the key index of {name} from its shards' keys")
            for sid in store.damaged():
                report.notes.append(f"{folder}: dropped damaged shard {store.drop_shard(sid)}; re-run "
                                    + ("cache_features" if label == "teachers" else "align") + " to recompute it")
    finally:
        store.close()


def verify_workspace(curated_dir: Path, feature_stores: dict[str, Path], repair: bool = False) -> Report:
    """Check the curated store and each feature store ({label: folder}), reading every byte."""
    report = Report()
    verify_curated(curated_dir, report)
    for label, folder in feature_stores.items():
        verify_features(label, folder, report, repair)
    return report
