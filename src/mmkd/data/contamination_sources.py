"""Owns which images the contamination check looks up: every image of the evaluation datasets on disk (the
embedded suite and the catalog's sets, through their loaders), with its id, its dataset splits and its pixels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class EvalImage:
    """One image of an evaluation dataset: where it is, the dataset splits that use it, and how to read it."""

    dataset: str
    id: str  # the file relative to its data root, or "<dataset folder>#<index>" for an image array
    splits: tuple[str, ...]
    key: str  # cache key: absolute path (or folder#index)
    stamp: str  # changes when the bytes may have changed (size and mtime of the file(s))
    pixels: Callable[[], np.ndarray]  # uint8 RGB, as curation decodes it


def _splits_per_image(ds) -> list[tuple[str, ...]]:
    """The dataset splits whose items (or bags) use each image; ("unsplit",) for one no split names."""
    per: list[set] = [set() for _ in range(len(ds.images))]
    if ds.item_image is not None:
        split = ds.item_split if ds.item_split is not None else ["unsplit"] * len(ds.item_image)
        for i, s in zip(ds.item_image, split):
            per[int(i)].add(str(s))
    for j, bag in enumerate(ds.bags or []):
        s = str(ds.bag_split[j]) if ds.bag_split is not None else "unsplit"
        for i in np.asarray(bag).ravel():
            per[int(i)].add(s)
    return [tuple(sorted(s)) or ("unsplit",) for s in per]


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:  # read later, it fails and is listed as unreadable
        return "absent"
    return f"{st.st_size}:{st.st_mtime_ns}"


def dataset_images(name: str, ds, folder: Path, root: Path, cfg) -> list[EvalImage]:
    """Every image of a loaded EvalDataset (mmkd.evaluation.dataset), ids relative to `root`."""
    from mmkd.evaluation.dataset import ArrayImages, FileImages

    splits = _splits_per_image(ds)
    images, out = ds.images, []
    if isinstance(images, FileImages):
        for i, p in enumerate(images.paths):
            rid = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
            out.append(EvalImage(name, rid, splits[i], os.path.abspath(p), _stamp(p),
                                 lambda p=p, i=i: _file_pixels(p, cfg, lambda: images.load(i))))
    elif isinstance(images, ArrayImages):
        # the arrays come from the folder's .npz files: their stats stand for every row
        stamp = ";".join(f"{q.name}={_stamp(q)}" for q in sorted(Path(folder).glob("*.npz"))) or "array"
        rel = Path(folder).relative_to(root).as_posix() if Path(folder).is_relative_to(root) else str(folder)
        for i in range(len(images)):
            out.append(EvalImage(name, f"{rel}#{i}", splits[i], f"{os.path.abspath(folder)}#{i}", stamp,
                                 lambda i=i: np.asarray(images.load(i).convert("RGB"), dtype=np.uint8)))
    else:
        raise TypeError(f"{name}: image source {type(images).__name__} is not checked for contamination")
    return out


def _file_pixels(path: Path, cfg, fallback: Callable) -> np.ndarray:
    """Pixels as curation would decode a copy of this file; the dataset's own reader where curation refuses it
    (a format or size curation does not accept cannot be a curated copy either, but its near duplicates can)."""
    from mmkd.data.sources.files import decode_bytes

    try:
        return decode_bytes(path.read_bytes(), cfg)
    except Exception:  # noqa: BLE001 - any refusal: read it as evaluation does
        return np.asarray(fallback().convert("RGB"), dtype=np.uint8)



def present_datasets(params, ws, names: list[str] | None = None) -> tuple[list, dict[str, str]]:
    """([(name, folder, root, loaded dataset)], skipped name -> why) over the embedded suite and the catalog's
    datasets on disk (or `names`, as evaluate.datasets names them); a dataset not on disk is left out, one that
    fails to load is skipped with its error (evaluation reports it too), not fatal."""
    from mmkd.config import MODALITIES
    from mmkd.evaluation.catalog import embedded_entries, load_catalog, load_dataset, resolve, status, suite_entries

    # every set the suite can hold, whatever synth's params say: curation reads no synth params (its DVC stage
    # and step fingerprint do not list them), and an absent set is left out below anyway
    entries = {e.name: e for e in [*embedded_entries(MODALITIES, MODALITIES, MODALITIES), *load_catalog()]}
    chosen = {}
    for n in (names if names is not None else ["present"]):  # evaluate.datasets' names: `embedded`, `present`
        if n in ("embedded", "present"):
            chosen.update({e.name: e for e in (suite_entries(params) if n == "embedded" else entries.values())})
        elif n in entries:
            chosen[n] = entries[n]
        else:
            raise KeyError(f"contamination check: unknown evaluation dataset '{n}'")
    out, skipped = [], {}
    for e in chosen.values():
        folder = resolve(e, ws.eval_data, ws.embedded_suite)
        if status(e, folder)[0] == "missing":
            continue
        root = ws.embedded_suite if e.embedded else ws.eval_data
        try:
            ds = load_dataset(e, folder)
        except (OSError, ValueError) as exc:
            skipped[e.name] = f"not loadable: {type(exc).__name__}: {exc}"
            continue
        if ds.images is None or len(ds.images) == 0:
            skipped[e.name] = "no images (precomputed features only)"
            continue
        out.append((e.name, folder, root, ds))
    return out, skipped
