"""Builds benchmark corpora: the embedded corpus at any multiple of the default size, and large-image JPEG sets."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mmkd.config import load_params
from mmkd.data.synth import generate

REPO = Path(__file__).resolve().parents[1]


def curate_params(**overrides):
    """The default profile's curate section of params.yaml, with overrides: what `make run` curates with."""
    return load_params(REPO / "params.yaml", "default").curate.model_copy(update=overrides)


def embedded(root: Path, scale: float = 1.0) -> dict:
    """The default profile's synthetic corpus with every split `scale` times as large."""
    cfg = load_params(REPO / "params.yaml", "default").synth
    cfg = cfg.model_copy(update={k: max(4, round(getattr(cfg, k) * scale))
                                 for k in ("train_per_modality", "probe_per_modality", "test_per_modality")})
    return generate(cfg, 1234, Path(root))


def append_embedded(root: Path, extra_per_modality: int) -> int:
    """New train records (indices past the existing ones) appended to an embedded corpus: new data arriving."""
    from mmkd.data.synth import _render_chunk

    cfg = load_params(REPO / "params.yaml", "default").synth
    start = cfg.train_per_modality
    jobs = [(1234, m, "train", list(range(start, start + extra_per_modality)), cfg.image_size, cfg.difficulty,
             str(root)) for m in cfg.modalities]
    with ProcessPoolExecutor(2) as pool:
        records = [r for chunk in pool.map(_render_chunk, jobs) for r in chunk]
    with open(Path(root) / "manifest.jsonl", "a") as fh:
        fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return len(records)


def _photo(args) -> dict:
    root, i, side = args
    rng = np.random.default_rng(i)
    low = rng.normal(0, 1, (side // 32, side // 32, 3))
    img = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize((side, side),
                                                                                                     Image.BICUBIC))
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(Path(root) / f"img{i:05d}.jpg", quality=90)
    return {"id": f"p{i}", "image": f"img{i:05d}.jpg", "caption": f"figure {i}: a histology panel", "split": "train"}


def large_images(root: Path, n: int, side: int = 512) -> None:
    """n distinct JPEG figures of side x side pixels with a JSONL manifest (what figure-caption corpora hold)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(_photo, [(str(root), i, side) for i in range(n)], chunksize=16))
    (Path(root) / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def default_teachers(folder: Path, device: str = "cpu") -> list:
    """The default registry's embedded teachers (untrained weights: speed and memory do not depend on them),
    saved where the embedded loader finds them and loaded through the registry: [(spec, encoder)]."""
    import torch

    from mmkd.models.factory import create_model, save_checkpoint
    from mmkd.teachers.registry import load_teacher

    params = load_params(REPO / "params.yaml", "default")
    out = []
    for i, spec in enumerate(params.teachers.registry):
        torch.manual_seed(i)
        save_checkpoint(create_model(spec.model), Path(folder) / spec.name, spec.model)
        out.append((spec, load_teacher(spec, Path(folder), torch.device(device))))
    return out


def features_params(**overrides):
    """The default profile's features section of params.yaml, with overrides."""
    return load_params(REPO / "params.yaml", "default").features.model_copy(update=overrides)
