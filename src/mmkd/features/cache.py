"""Owns the teacher feature cache: one safetensors file per teacher and split, rows aligned to an id index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmkd.config import TeacherSpec
from mmkd.data.store import open_images, split_records
from mmkd.data.splits import SPLITS
from mmkd.features.projector import save_projector, train_projector
from mmkd.models.encoder import ClipEncoder


class FeatureCacheError(RuntimeError):
    """The cache is missing or does not match the curated data."""


def feature_path(features_dir: Path, teacher: str, split: str) -> Path:
    return Path(features_dir) / teacher / f"{split}.safetensors"


def build_cache(curated_dir: Path, features_dir: Path, teachers: list[tuple[TeacherSpec, ClipEncoder]],
                latent_dim: int, projector_cfg, seed: int, batch_size: int) -> dict:
    """Embed every curated pair with every teacher, fit the projector on train rows, store raw + projected."""
    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    index: dict = {"splits": {}, "teachers": {}, "latent_dim": latent_dim}
    raw: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for split in SPLITS:
        records = split_records(curated_dir, split)
        index["splits"][split] = [r["id"] for r in records]
        captions = [r["caption"] for r in records]
        for spec, enc in teachers:
            images = open_images(curated_dir, records, enc.spec.size)  # each teacher at its own input size
            img = torch.from_numpy(enc.encode_images(images, batch_size))
            txt = torch.from_numpy(enc.encode_texts(captions, batch_size))
            raw.setdefault(spec.name, {})[split] = {"image": img, "text": txt}
            index["teachers"][spec.name] = {"dim": int(txt.shape[1]), "modalities": spec.modalities,
                                            "source": spec.source, "model": spec.model}
    train_rows = {t: torch.cat([s["train"]["image"], s["train"]["text"]]) for t, s in raw.items()}
    projector, proj_metrics = train_projector(train_rows, latent_dim, projector_cfg, seed)
    save_projector(projector, features_dir / "projector")
    for t, per_split in raw.items():
        for split, f in per_split.items():
            tensors = {**f, "image_proj": projector.project(t, f["image"]), "text_proj": projector.project(t, f["text"])}
            path = feature_path(features_dir, t, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous().float() for k, v in tensors.items()}, path)
    (features_dir / "index.json").write_text(json.dumps(index, indent=1))
    stats = {"teachers": len(raw), "pairs": sum(len(v) for v in index["splits"].values()), **proj_metrics}
    # how well each teacher's own image and caption embeddings agree, per split: a cheap sanity signal
    for t, per_split in raw.items():
        stats[f"pair_cosine_{t}"] = float((per_split["train"]["image"] * per_split["train"]["text"]).sum(1).mean())
    return stats


def load_split(features_dir: Path, split: str, expected_ids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """teacher -> {image, text, image_proj, text_proj} for one split, checked against the curated ids."""
    features_dir = Path(features_dir)
    index_path = features_dir / "index.json"
    if not index_path.exists():
        raise FeatureCacheError(f"{features_dir}: no index.json; run the `cache_features` step first")
    index = json.loads(index_path.read_text())
    if index["splits"].get(split) != list(expected_ids):
        raise FeatureCacheError(f"{features_dir}: cached {split} ids differ from the curated manifest; re-run cache_features")
    return {t: load_file(feature_path(features_dir, t, split)) for t in index["teachers"]}


def read_index(features_dir: Path) -> dict:
    return json.loads((Path(features_dir) / "index.json").read_text())


def availability(index: dict, modalities: list[str], route_by_modality: bool) -> np.ndarray:
    """[N, T] bool: which teachers may supervise each sample (by the teacher's declared domain, if routing)."""
    names = list(index["teachers"])
    mask = np.ones((len(modalities), len(names)), dtype=bool)
    if route_by_modality:
        for j, t in enumerate(names):
            allowed = set(index["teachers"][t]["modalities"])
            mask[:, j] = [m in allowed for m in modalities]
    return mask
