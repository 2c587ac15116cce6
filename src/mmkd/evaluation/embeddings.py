"""Owns the embedding cache: every image and text of a dataset encoded once per (model, dataset), on disk."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.evaluation.dataset import EvalDataset
from mmkd.progress import progress
from mmkd import atomic

log = logging.getLogger("mmkd")
IMAGE_CHUNK = 512  # images decoded per encoder call: bounds memory on large real datasets


@dataclass
class Embeddings:
    """One model's view of one dataset: a row per image, and a row per distinct text (captions, questions,
    prompts)."""

    image: np.ndarray
    texts: list[str]
    text: np.ndarray

    def __post_init__(self):
        self._row = {t: i for i, t in enumerate(self.texts)}

    def of(self, texts: list[str]) -> np.ndarray:
        return self.text[[self._row[t] for t in texts]]


def texts_of(ds: EvalDataset, prompts: dict[str, list[str]] | None) -> list[str]:
    """Every text the tasks will ask for: the dataset's captions and questions, then the class prompts."""
    seen = dict.fromkeys(ds.texts())
    for p in (prompts or {}).values():
        seen.update(dict.fromkeys(p))
    return list(seen)


def cache_key(model_version: str, ds: EvalDataset, texts: list[str], image_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{model_version}\0{image_size}\0{ds.images.fingerprint()}\0".encode())
    h.update("\0".join(texts).encode())
    return h.hexdigest()[:24]


def encode_dataset(encoder, ds: EvalDataset, texts: list[str], batch: int, images=None, model_version: str = "",
                   tile_cache: Path | None = None) -> Embeddings:
    """images: the dataset's decoded images when the caller already holds them (one decode for many models).
    Tiles of whole slides (evaluation.slide_bags) encode themselves, cached per slide and tile in `tile_cache`."""
    tiles = getattr(ds.images, "encode_cached", None)
    if tiles is not None and images is None:
        image = tiles(encoder, model_version, batch, tile_cache)
        text = encoder.encode_texts(texts, batch) if texts else np.zeros((0, image.shape[1]), np.float32)
        return Embeddings(image.astype(np.float32), texts, text.astype(np.float32))
    n = len(ds.images)
    parts = []
    # one bar per unit is noise in a log file: shown on a terminal only (disable=None)
    with progress(total=n, desc=f"embed {encoder.name}/{ds.name}", unit="img", leave=False, disable=None) as bar:
        for start in range(0, n, IMAGE_CHUNK):
            idx = range(start, min(n, start + IMAGE_CHUNK))
            chunk = [images[i] for i in idx] if images is not None else [ds.images.load(i) for i in idx]
            parts.append(encoder.encode_pil(chunk, batch))
            bar.update(len(chunk))
    image = np.concatenate(parts) if parts else np.zeros((0, encoder.embed_dim), np.float32)
    text = encoder.encode_texts(texts, batch) if texts else np.zeros((0, image.shape[1]), np.float32)
    return Embeddings(image.astype(np.float32), texts, text.astype(np.float32))


def dataset_embeddings(encoder, model_version: str, ds: EvalDataset, prompts: dict | None, batch: int,
                       cache_dir: Path | None, images=None) -> tuple[Embeddings, bool]:
    """(embeddings, from_cache). The cache file is keyed by the weights' version, the images' fingerprint, the
    model's input size and the texts; any change re-encodes. Written atomically (a crash leaves no half file)."""
    texts = texts_of(ds, prompts)
    key = cache_key(model_version, ds, texts, encoder.spec.size)
    path = Path(cache_dir) / encoder.name / f"{ds.name}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return Embeddings(z["image"], [str(t) for t in z["texts"]], z["text"]), True
        log.info("embedding cache %s is stale (weights, images or texts changed): re-encoding", path)
    emb = encode_dataset(encoder, ds, texts, batch, images, model_version,
                         Path(cache_dir) / encoder.name / "tiles" if cache_dir else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as fh:
            np.savez(fh, key=np.array(key), image=emb.image, texts=np.array(texts, dtype=str), text=emb.text)
        atomic.write_json(path.with_suffix(".json"), {"model_version": model_version, "key": key,
                                                      "images": len(ds.images), "texts": len(texts)}, indent=None)
    return emb, False
