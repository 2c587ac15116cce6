"""Owns a feature store's checks and repairs: verify every shard and key index run, confirm located keys, find
damaged shards, drop one, rebuild a set's key index from its shards (a mixin of FeatureStore, store.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from mmkd.features.checks import KEY_DTYPE, FeatureError, check_file

log = logging.getLogger("mmkd")


class StoreUpkeep:
    """verify, damaged, drop_shard, check_index, confirm, rebuild_index: on FeatureStore's db, index, check, _shard."""

    def check_index(self, shard_id: int) -> list[str]:
        """Whether the key index finds each of the shard's keys at its row (keys.npy read whole: verify only)."""
        t, v, u, n, _ = self._shard(shard_id)
        path = Path(f"{self._prefix(t, v, u)}.keys.npy")
        shard, row = self.index.lookup(t, v, np.load(path))
        wrong = (shard != shard_id) | (row != np.arange(len(row)))
        if not wrong.any():
            return []
        i = int(np.flatnonzero(wrong)[0])
        return [f"{path}: {int(wrong.sum())} of its {n} keys are not at their row in the key index (e.g. row {i} "
                f"is found at shard {shard[i]} row {row[i]})"]

    def confirm(self, keys: np.ndarray, shard: np.ndarray, row: np.ndarray) -> None:
        """FeatureError unless each located key is the one its shard's keys.npy holds at its row (keys.npy checked
        against its record first: sha256 if hash_on_open): a damaged or stale key index never sends a sample another
        sample's features. Only keys.npy is read (32 bytes a row), not the features."""
        order = np.argsort(shard, kind="stable")
        ids, starts = np.unique(shard[order], return_index=True)
        for s, a, b in zip(ids.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
            if s < 0:
                continue
            t, v, u, n, sums = self._shard(s)
            path = Path(f"{self._prefix(t, v, u)}.keys.npy")
            if s not in self._keys_ok:
                problems = check_file(path, (n,), np.dtype(KEY_DTYPE), sums and sums["keys"], self.hash_on_open)
                if problems:
                    raise FeatureError(f"feature shard {t}@{v}/{u} of {self.root} is damaged: " + "; ".join(problems))
                self._keys_ok.add(s)
            sel = order[a:b]
            held = np.load(path, mmap_mode="r")[row[sel]]
            wrong = np.flatnonzero(held != keys[sel])
            if len(wrong):
                i = int(sel[wrong[0]])
                raise FeatureError(f"{path}: {len(wrong)} of the {b - a} keys the key index places in this shard are "
                                   f"not at their row (e.g. {keys[i].decode()} at row {row[i]}); the key index "
                                   f"disagrees with the shard: `mmkd verify --repair` rebuilds it")

    def verify(self) -> list[str]:
        """Check every shard fully (sha256 of every file, keys against the index) whatever this process already
        checked; returns the problems, each naming a file ([] if the store is sound)."""
        from mmkd.features import checks

        checks._VERIFIED.clear()  # verify re-reads every byte: a file may have changed since this process hashed it
        problems, sound = [], set()
        for s in self.sets():
            runs = [p for r in self.index.runs(s["teacher"], s["version"])
                    for p in self.index.check(s["teacher"], s["version"], r, hashed=True)]
            problems += runs
            if not runs:
                sound.add((s["teacher"], s["version"]))
        for (sid, t, v) in self.db.execute("SELECT id, teacher, version FROM shards ORDER BY id").fetchall():
            try:
                found = self.check(sid, hashed=True)
                problems += found or (self.check_index(sid) if (t, v) in sound else [])
            except FeatureError as exc:
                problems.append(str(exc))
        return problems

    def rebuild_index(self, teacher: str, version: str) -> list[int]:
        """Replace a set's runs by one per listed shard whose keys.npy matches its record (inside the caller's
        transaction); a shard whose keys do not is left out (its rows count as missing). Returns the replaced run
        ids."""
        old = [r[0] for r in self.index.runs(teacher, version)]
        self.db.execute("DELETE FROM runs WHERE teacher=? AND version=?", (teacher, version))
        for sid, unit, n, sums in self.db.execute("SELECT id, unit, rows, sums FROM shards WHERE teacher=? AND "
                                                  "version=? ORDER BY id", (teacher, version)).fetchall():
            keys_file = Path(f"{self._prefix(teacher, version, unit)}.keys.npy")
            if check_file(keys_file, (n,), np.dtype(KEY_DTYPE), sums and json.loads(sums)["keys"], False):
                log.warning("feature store %s: %s does not match its record; its rows count as missing",
                            self.root, keys_file)
                continue
            self.index.add(teacher, version, sid, np.load(keys_file))
        return old

    def reindex_damaged(self) -> list[str]:
        """Rebuild the key index of each set whose runs fail their check or misplace a sound shard's key (from the
        shards' keys.npy); returns the sets rebuilt."""
        out = []
        for s in self.sets():
            t, v = s["teacher"], s["version"]
            bad = any(self.index.check(t, v, r, hashed=True) for r in self.index.runs(t, v)) or any(
                self.check_index(sid) for (sid,) in self.db.execute(
                    "SELECT id FROM shards WHERE teacher=? AND version=?", (t, v)).fetchall() if not self.check(sid))
            if bad:
                self.reindex(t, v)
                out.append(f"{t}@{v}")
        return out

    def damaged(self) -> list[int]:
        """Ids of the shards that fail their full check."""
        return [sid for (sid,) in self.db.execute("SELECT id FROM shards ORDER BY id").fetchall() if self.check(sid)]

    def drop_shard(self, shard_id: int) -> str:
        """Remove one shard (index rows and files): its rows count as missing, so the next run recomputes them."""
        t, v, u, _, _ = self._shard(shard_id)
        with self.db:  # its key index entries go in the same transaction: a later shard may get its id
            self.db.execute("DELETE FROM shards WHERE id=?", (int(shard_id),))
            runs = self.index.runs(t, v)
            gone = self.index.merge(t, v, runs, max((r[1] for r in runs), default=0)) if runs else []
        self.index.remove_files(t, v, gone)
        self._maps.pop(shard_id, None)
        self._checked.pop(shard_id, None)
        self._keys_ok.discard(shard_id)
        for kind in ("image", "text"):
            self.rows.forget(f"{self._prefix(t, v, u)}.{kind}.npy")
        for f in self._prefix(t, v, u).parent.glob(f"{u}.*"):
            f.unlink()
        return f"{t}@{v}/{u}"

