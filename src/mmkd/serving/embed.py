"""Owns `mmkd embed`: images or captions to unit embeddings in a float32 .npy, with a sidecar naming each row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mmkd import atomic


def read_texts(args: list[str]) -> list[str]:
    """Each argument a caption, or `@file.txt`: one caption per non-empty line of that file (UTF-8)."""
    texts = []
    for arg in args:
        if arg.startswith("@"):
            path = Path(arg[1:]).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{arg}: cannot read captions: {exc}") from None
            texts.extend(s.strip() for s in lines if s.strip())
        elif arg.strip():
            texts.append(arg)
    if not texts:
        raise ValueError("no captions given")
    return texts


def out_paths(out: Path) -> tuple[Path, Path]:
    """X.npy and its sidecar X.index.json (a .npy suffix is added when missing, as numpy.save would)."""
    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    return out, out.with_name(out.name[: -len(".npy")] + ".index.json")


def write(out: Path, emb: np.ndarray, inputs: list[str], kind: str, loaded,
          skipped: list | None = None) -> tuple[Path, Path]:
    """The embeddings (rows = inputs, in order) and the index: which input each row is, the model, what was skipped."""
    npy, index = out_paths(out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(npy) as fh:
        np.save(fh, np.asarray(emb, dtype=np.float32))
    meta = {"kind": kind, "rows": len(inputs), "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
            "model": loaded.uri, "version": loaded.version, "tracking_uri": loaded.tracking_uri,
            "model_config": loaded.meta.get("model"),
            "inputs": list(inputs), "skipped": [{"input": s.input, "reason": s.reason} for s in (skipped or [])]}
    atomic.write_text(index, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return npy, index


def embed_images(loaded, images: list[np.ndarray]) -> np.ndarray:
    return loaded.encoder.encode_pil(images).astype(np.float32)


def embed_texts(loaded, texts: list[str]) -> np.ndarray:
    return loaded.encoder.encode_texts(texts).astype(np.float32)
