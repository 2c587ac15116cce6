"""Owns the alignment step: map every teacher's raw features into the student's space, write the projections, and
measure the space (features.diagnostics).

The map is fitted on the train split's raw teacher features, read batch by batch from the memory-mapped shards
(align.method: orthogonal maps onto the stage-1 student and a consensus of the teachers, plain Procrustes, or the
reference's autoencoder); then every raw shard is projected to the student's dimension, L2-normalised, and
written as a shard of the aligned store under the version `<teacher version>-<projector hash>` (new map, new
features). The diagnostic is taken on the probe split (never fitted on), with the Procrustes baseline beside it.

Memory does not grow with the corpus: the fit streams chunks of the raw features and of the student's embeddings
(features.student, on disk), the projection one shard at a time, the diagnostic reads only the probe samples it
measures (at most diagnostics' max_samples per modality and pair), and mapped shard pages are dropped from this
process's RSS after every read (FeatureStore.release). What stays per sample: keys, locations and modality codes.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmkd.config import AlignCfg
from mmkd.features import diagnostics
from mmkd.features.projector import Pull, fit_maps, save_projector, train_projector
from mmkd.features.reader import TeacherFeatures
from mmkd.features.store import FeatureError, FeatureStore, write_shard
from mmkd.features.student import as_rows, student_embeddings  # noqa: F401 (the step and the harness import it here)


@dataclass
class Split:
    """One curated split's samples: keys (S32), modality names, and class labels (None: unlabelled)."""

    keys: np.ndarray
    modality: np.ndarray
    labels: list | None = None


class Streamed(TeacherFeatures):
    """TeacherFeatures whose mapped shard pages leave this process's RSS after every batch: a pass over the
    split then peaks at one batch, not at the split (TeacherFeatures releases every 16 batches, tuned for
    training's small batches; the fit's are thousands of rows)."""

    def batch(self, idx):
        out = super().batch(idx)
        self.store.release()
        return out


class StoreRows:
    """One teacher's train rows (image rows, then text rows) as a lazily indexed [2n, dim] float tensor; the
    mapped shard pages are released every 16 reads (the autoencoder reads minibatches for its whole training)."""

    def __init__(self, store: FeatureStore, teacher: str, version: str, keys: np.ndarray):
        shard, row = store.locate(teacher, version, keys)
        keep = shard >= 0
        self.index = np.flatnonzero(keep)  # which of `keys` each of the n rows is
        self.store, self.shard, self.row = store, shard[keep], row[keep]
        self.dim = store.set_info(teacher, version)["dim"]
        self.n = int(keep.sum())
        self.shape = (2 * self.n, self.dim)
        self._reads = 0

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        is_text = idx >= self.n
        rows = np.where(is_text, idx - self.n, idx)
        img, txt = self.store.gather(self.shard[rows], self.row[rows], self.dim)
        self._reads += 1
        if self._reads % 16 == 0:
            self.store.release()
        return torch.from_numpy(np.where(is_text[:, None], txt, img))


class KeyModality:
    """Each stored key's modality, compact: sorted S32 keys and a small code per key (~34 bytes a key, where a dict
    of bytes keys to names costs ~200). lookup(keys) -> names, "unknown" for a key it does not hold."""

    def __init__(self, keys: np.ndarray, modality: np.ndarray):
        names, codes = np.unique(np.asarray(modality).astype(str), return_inverse=True)
        self._sorted(np.asarray(keys, dtype="S32"), codes.astype(np.int32), names)

    def _sorted(self, keys: np.ndarray, codes: np.ndarray, names: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.names, self.keys, self.codes = names, keys[order], codes[order]

    @classmethod
    def read(cls, curated_dir: Path, splits) -> "KeyModality":
        """Every key of the curated store's `splits`, read one split at a time as columns: keys and modality codes,
        never an array of names per key (at 1 M keys: 129 MiB at the peak, where names and their sort took 302)."""
        from mmkd.data.split_table import SplitTable

        index: dict[str, int] = {}
        keys, codes = [], []
        for name in splits:
            table = SplitTable(curated_dir, name)
            lut = np.array([index.setdefault("unknown" if m is None else m, len(index))
                            for m in table.modality_names] or [0], np.int32)
            keys.append(table.keys)
            codes.append(lut[table.modality])
            del table
        out = cls.__new__(cls)
        out._sorted(np.concatenate(keys), np.concatenate(codes), np.array(list(index) or ["unknown"]))
        return out

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype="S32")
        if not len(self.keys):
            return np.full(len(keys), "unknown")
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.names[self.codes[pos]], "unknown")


def projector_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def _fit(raw: FeatureStore, sets, train: Split, domains, latent, cfg: AlignCfg, seed: int, student):
    if cfg.method == "autoencoder":
        sources = {t: StoreRows(raw, t, v, train.keys) for t, v in sets}
        pull = None
        if cfg.anchor_weight > 0 or cfg.consistency_weight > 0:
            if cfg.anchor_weight > 0 and student is None:
                raise FeatureError("align.anchor_weight needs the stage-1 student's embeddings; run pretrain first")
            eligible = {t: np.isin(train.modality, domains.get(t, [])) for t in sources}
            pull = Pull(sources, {t: s.index for t, s in sources.items()}, student, eligible)
        return train_projector(sources, latent, cfg, seed, pull)
    if student is None:
        raise FeatureError(f"align.method '{cfg.method}' needs the stage-1 student's embeddings; run pretrain first")
    return fit_maps(Streamed(raw, sets, train.keys), student, train.modality, domains, cfg.method, cfg), {}


def align(raw_root: Path, sets: list[tuple[str, str]], train: "Split | np.ndarray", out_root: Path, latent: int,
          cfg: AlignCfg, seed: int, dtype: str, domains: dict[str, list[str]] | None = None, student=None,
          probe: Split | None = None, modality_of: "KeyModality | dict[bytes, str] | None" = None,
          chunk: int = 8192) -> dict:
    """Fit the map on the train rows of `sets` (teacher, version), project every raw shard into out_root; with
    `probe`, measure the space (returned under "space"). student: the stage-1 student's (image, text) embeddings
    of the train samples (features.student.StudentRows, or two [N, d] arrays; needed by shared, procrustes, and the
    autoencoder's anchor). modality_of: each stored key's modality (a KeyModality, or a dict of key bytes to
    names), which picks the `shared` and `consensus` methods' per-modality map (a key without one: the teacher's `*`
    map)."""
    if not isinstance(train, Split):  # keys alone: no modality known (the autoencoder without pulls needs none)
        train = Split(np.asarray(train, dtype="S32"), np.full(len(train), "unknown"))
    domains = domains or {}
    student = None if student is None else as_rows(student)
    raw = FeatureStore(raw_root)
    for t, v in sets:
        if StoreRows(raw, t, v, train.keys).n == 0:
            raise FeatureError(f"teacher '{t}' version {v}: no train-split features in {raw_root}; run cache_features")
    model, metrics = _fit(raw, sets, train, domains, latent, cfg, seed, student)
    raw.release()
    phash = projector_hash(model)
    out_root = Path(out_root)
    if out_root.exists():
        shutil.rmtree(out_root)  # projections of an older map are worthless: rebuilt whole
    out = FeatureStore(out_root, create=True)
    written = 0
    for t, v in sets:
        version = f"{v}-{phash}"
        out.register_set(t, version, latent, dtype, {"raw_version": v, "projector": phash, "method": cfg.method})
        shards = raw.db.execute("SELECT id, unit FROM shards WHERE teacher=? AND version=? ORDER BY id", (t, v))
        for sid, unit in shards.fetchall():
            img_in, txt_in = raw.arrays(sid)  # checked (sums, keys) on first open: a damaged shard is refused
            keys = raw.shard_keys(sid)
            if isinstance(modality_of, KeyModality):
                mods = modality_of.lookup(keys)
            else:
                mods = np.array([(modality_of or {}).get(bytes(k), "unknown") for k in keys])

            def project(rows, i):
                out = model.project(t, torch.from_numpy(np.array(rows[i : i + chunk], np.float32)), mods[i : i + chunk])
                raw.release()  # the mapped pages read so far: the pass peaks at one chunk, not at the shard or store
                return out.numpy()

            img = np.concatenate([project(img_in, i) for i in range(0, len(keys), chunk)])
            txt = np.concatenate([project(txt_in, i) for i in range(0, len(keys), chunk)])
            write_shard(out_root, t, version, unit, keys, img, txt, latent, dtype)
            written += out.commit(t, version, unit)
    save_projector(model, out_root / "projector")
    result = {"projector": phash, "method": cfg.method, "projected_rows": written, **metrics}
    if probe is not None:
        out_sets = [(t, f"{v}-{phash}") for t, v in sets]
        baseline = None
        if student is not None:  # the Procrustes baseline the shared space must beat, on the same probe samples
            baseline = fit_maps(Streamed(raw, sets, train.keys), student, train.modality, domains, "procrustes", cfg)
        result["space"] = measure(raw, out, sets, out_sets, probe, domains, seed, baseline)
    raw.close()
    out.close()
    return result


def _quality(features: TeacherFeatures, split: Split, domains: dict[str, list[str]]) -> dict[str, float]:
    """Each teacher's nearest-caption-prototype balanced accuracy on the split, averaged over its modalities."""
    from mmkd.training.quality import teacher_quality

    mods = sorted(set(split.modality.tolist()))
    q = teacher_quality(features, split.labels, np.array([mods.index(m) for m in split.modality]), len(mods))
    out = {}
    for j, t in enumerate(features.names):
        vals = [q[j, mods.index(m)] for m in domains.get(t, []) if m in mods and np.isfinite(q[j, mods.index(m)])]
        out[t] = float(np.mean(vals)) if vals else float("nan")
    return out


class _Projected:
    """TeacherFeatures' reading interface over raw features passed through fixed maps (the baseline's space)."""

    def __init__(self, raw: TeacherFeatures, maps):
        self.raw, self.maps, self.names, self.available = raw, maps, raw.names, raw.available

    def batch(self, idx):
        parts = self.raw.batch(idx)
        return {t: tuple(self.maps.project(t, torch.from_numpy(np.asarray(a))).numpy() for a in parts[t])
                for t in self.names}


def measure(raw: FeatureStore, out: FeatureStore, sets, out_sets, probe: Split, domains, seed: int,
            baseline=None) -> dict:
    """The diagnostic and the teachers' own probe quality on the probe split: in the new space, in the raw
    features (quality only: raw spaces of different teachers are not comparable) and in the Procrustes baseline.
    Both stream: the diagnostic reads only the samples it measures (diagnostics.shared_space_read), the quality
    passes over the split in chunks (training.quality)."""
    def space(features) -> dict:
        avail = {t: features.available[:, j] for j, t in enumerate(features.names)}
        rows = diagnostics.shared_space_read(lambda idx: {t: a for t, (a, _) in features.batch(idx).items()}, avail,
                                             probe.modality, domains, seed)
        return {"pairs": rows, "summary": diagnostics.summary(rows), "quality": _quality(features, probe, domains)}

    raw_feats = Streamed(raw, sets, probe.keys)
    report = {"split": "probe", "aligned": space(Streamed(out, out_sets, probe.keys)),
              "raw_quality": _quality(raw_feats, probe, domains)}
    if baseline is not None:
        report["procrustes"] = space(_Projected(raw_feats, baseline))
    return report
