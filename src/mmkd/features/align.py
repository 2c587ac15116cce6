"""Owns the alignment step: train the multi-teacher projector by streaming over the store, write projections.

The projector reads the train split's raw teacher features batch by batch from the memory-mapped shards;
then every raw shard is projected to the student's dimension, L2-normalised, and written as a shard of the
aligned store under the version `<teacher version>-<projector hash>` (new projector, new features).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from mmkd.config import AlignCfg
from mmkd.features.projector import save_projector, train_projector
from mmkd.features.store import FeatureError, FeatureStore, write_shard


class StoreRows:
    """One teacher's train rows (image rows, then text rows) as a lazily indexed [2n, dim] float tensor."""

    def __init__(self, store: FeatureStore, teacher: str, version: str, keys: np.ndarray):
        shard, row = store.locate(teacher, version, keys)
        keep = shard >= 0
        self.store, self.shard, self.row = store, shard[keep], row[keep]
        self.dim = store.set_info(teacher, version)["dim"]
        self.n = int(keep.sum())
        self.shape = (2 * self.n, self.dim)

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        is_text = idx >= self.n
        rows = np.where(is_text, idx - self.n, idx)
        img, txt = self.store.gather(self.shard[rows], self.row[rows], self.dim)
        return torch.from_numpy(np.where(is_text[:, None], txt, img))


def projector_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def align(raw_root: Path, sets: list[tuple[str, str]], train_keys: np.ndarray, out_root: Path, latent: int,
          cfg: AlignCfg, seed: int, dtype: str, chunk: int = 8192) -> dict:
    """Fit the projector on the train rows of `sets` (teacher, version), project every raw shard into out_root."""
    raw = FeatureStore(raw_root)
    sources = {}
    for t, v in sets:
        rows = StoreRows(raw, t, v, train_keys)
        if rows.n == 0:
            raise FeatureError(f"teacher '{t}' version {v}: no train-split features in {raw_root}; run cache_features")
        sources[t] = rows
    model, metrics = train_projector(sources, latent, cfg, seed)
    raw.release()
    phash = projector_hash(model)
    out_root = Path(out_root)
    if out_root.exists():
        shutil.rmtree(out_root)  # projections of an older projector are worthless: rebuilt whole
    out = FeatureStore(out_root, create=True)
    written = 0
    for t, v in sets:
        version = f"{v}-{phash}"
        out.register_set(t, version, latent, dtype, {"raw_version": v, "projector": phash})
        shards = raw.db.execute("SELECT id, unit FROM shards WHERE teacher=? AND version=? ORDER BY id", (t, v))
        for sid, unit in shards.fetchall():
            img_in, txt_in = raw.arrays(sid)  # checked (sums, keys) on first open: a damaged shard is refused
            keys = raw.shard_keys(sid)
            img = np.concatenate([model.project(t, torch.from_numpy(np.array(img_in[i : i + chunk], np.float32))).numpy()
                                  for i in range(0, len(keys), chunk)])
            txt = np.concatenate([model.project(t, torch.from_numpy(np.array(txt_in[i : i + chunk], np.float32))).numpy()
                                  for i in range(0, len(keys), chunk)])
            write_shard(out_root, t, version, unit, keys, img, txt, latent, dtype)
            written += out.commit(t, version, unit)
    save_projector(model, out_root / "projector")
    raw.close()
    out.close()
    return {"projector": phash, "projected_rows": written, **metrics}
