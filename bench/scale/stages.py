"""The scale harness's stages, one per child process: `stages.py STAGE WORK [--teachers T --layers L]` runs STAGE
on the folders under WORK and prints one JSON line: seconds, pairs, peak RSS (VmHWM), disk and index bytes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from corpus import REPO, curate_params, features_params  # noqa: E402

STEP_BATCHES = 4  # training steps timed per stage: a step's cost does not depend on the corpus size


def vmhwm_kib() -> int:
    """This process's own peak RSS (a forked child's ru_maxrss would start from its parent's)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def params():
    from mmkd.config import load_params

    return load_params(REPO / "params.yaml", "default")


def curate(work: Path, args) -> dict:
    import mmkd.data.curate as cm

    seen = {}

    class Sized(cm.CurationIndex):  # the de-duplication index lives in a temp folder: its size before removal
        def close(self) -> None:
            seen["index_bytes"] = disk_bytes(Path(self.tmp.name))
            seen.update({f"near_dup_{k}": v for k, v in self.stats.items()})
            super().close()

    cm.CurationIndex = Sized
    cfg = curate_params(workers=2, incremental=False, check_contamination=False)
    s = cm.curate(work / "data", work / "curated", cfg)
    return {"pairs": s["input_records"], "kept": s["kept"], "quarantined": s["quarantined"],
            "disk_bytes": disk_bytes(work / "curated"), **seen}


def validate(work: Path, args) -> dict:
    from mmkd.validation.suite import validate as run

    p = params()
    s = run(work / "curated", p.curate, p.validate_, work / "data_docs", work / "validation.json", p.synth.modalities)
    # the pairs validated, from its own report: reading the manifest again here would put it in the stage's peak RSS
    return {"pairs": s["rows"], "failed": s["failed"], "disk_bytes": disk_bytes(work / "data_docs")}


def cache_features(work: Path, args) -> dict:
    import torch

    from mmkd.features.cache import cache_corpus
    from standin import standins  # torch: imported by the stages that use it, not by curate's process

    torch.set_num_threads(2)
    out = cache_corpus(work / "curated", work / "teachers", standins(args.teachers, args.layers), features_params(),
                       show_progress=False)
    n = max(out["forwarded"].values())
    return {"pairs": n, "forwarded": out["forwarded"], "disk_bytes": disk_bytes(work / "teachers"),
            "index_bytes": (work / "teachers" / "index.sqlite").stat().st_size}


def align(work: Path, args) -> dict:
    """As the `align` step does it: the stage-1 student's embeddings of the train split, the fit, every shard
    projected, the probe split's diagnostics."""
    import torch

    from mmkd.data.split_table import SplitTable
    from mmkd.data.splits import SPLITS
    from mmkd.features.align import KeyModality, Split, student_embeddings
    from mmkd.features.align import align as run
    from mmkd.features.store import FeatureStore
    from mmkd.models.factory import model_config

    torch.set_num_threads(2)
    p = params()
    store = FeatureStore(work / "teachers")
    sets = [(s["teacher"], s["version"]) for s in store.sets()]
    store.close()

    def split(name, labelled=False):  # as the step's _split
        table = SplitTable(work / "curated", name)
        return table, Split(table.keys, table.modality_of("unknown"), table.findings() if labelled else None)

    records, train = split("train")
    _, probe = split("probe", labelled=True)
    student = student_embeddings(work / "stage1", work / "curated", records, torch.device("cpu"),
                                 work / "align-student")  # on disk, read back by chunk (as the step does)
    pairs, records = len(records), None  # captions: only the embeddings needed them (the step drops them too)
    modality_of = KeyModality.read(work / "curated", SPLITS)  # as the step builds it
    domains = {t: list(p.synth.modalities) for t, _ in sets}
    run(work / "teachers", sets, train, work / "aligned", model_config(p.pretrain.model)["embed_dim"], p.align,
        p.seed, features_params().dtype, domains, student, probe, modality_of)
    return {"pairs": pairs, "disk_bytes": disk_bytes(work / "aligned"),
            "index_bytes": (work / "aligned" / "index.sqlite").stat().st_size}


def _limited(rows: int):
    """The training loop on the first `rows` samples: a few real steps after the stage's whole setup."""
    from mmkd.training import loop

    def limited(model, images, tokens, *a, **kw):
        images, tokens = images.subset(np.arange(rows)), loop.Tokens(tokens.tokenizer, tokens.texts[:rows])
        return loop.train(model, images, tokens, *a, **kw)
    return limited


def _epoch_reads(images, tokens, batch: int, features=None) -> float:
    """Seconds to read one shuffled epoch of batches (sorted within a batch, as the loop reads them)."""
    order = np.random.default_rng(0).permutation(len(images))
    t0 = time.perf_counter()
    for step, at in enumerate(range(0, len(order) - batch + 1, batch)):
        idx = np.sort(order[at:at + batch])
        np.asarray(images[idx]).sum()
        tokens[idx]
        if features is not None:
            features.stacked(idx)  # releases the store's mapped pages every 16 reads itself
        if step % 16 == 15 and hasattr(images, "release"):
            images.release()  # as the training loop does: mapped views read so far leave this process's RSS
    return time.perf_counter() - t0


def stage1(work: Path, args) -> dict:
    import open_clip
    import torch
    from unittest import mock

    from mmkd.data.split_table import SplitTable
    from mmkd.data.store import open_images
    from mmkd.models.factory import input_size
    from mmkd.training import clip as clip_mod
    from mmkd.training.loop import tokenize_all

    torch.set_num_threads(2)
    p = params()
    name, cfg = p.pretrain.model, p.pretrain.train.model_copy(update={"epochs": 1, "prefetch": 0})
    t0 = time.perf_counter()
    records = SplitTable(work / "curated", "train")  # as the pretrain step reads the split
    images = open_images(work / "curated", records, input_size(name))
    captions = records.captions()
    tokens = tokenize_all(open_clip.get_tokenizer(name), captions)
    setup = time.perf_counter() - t0
    reads = _epoch_reads(images, tokens, cfg.batch_size)
    with mock.patch.object(clip_mod, "train", _limited(STEP_BATCHES * cfg.batch_size)), \
            open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        hist = clip_mod.train_clip(name, images, captions, cfg, p.seed, torch.device("cpu"), work / "stage1", "stage1",
                                   keys=records.key_strings())
    return {"pairs": len(records), "setup_seconds": setup, "read_epoch_seconds": reads,
            "step_seconds": hist["train_seconds"] / hist["steps"], "batch": cfg.batch_size}


def stage2(work: Path, args) -> dict:
    import open_clip
    import torch
    from unittest import mock

    from mmkd.data.split_table import SplitTable
    from mmkd.data.store import open_images
    from mmkd.features.reader import TeacherFeatures
    from mmkd.features.store import FeatureStore
    from mmkd.models.factory import input_size
    from mmkd.training import distill as distill_mod
    from mmkd.training.loop import tokenize_all

    torch.set_num_threads(2)
    p = params()
    name, cfg = p.pretrain.model, p.distill.train.model_copy(update={"epochs": 1, "prefetch": 0})
    t0 = time.perf_counter()
    records = SplitTable(work / "curated", "train")  # as distill reads the split
    images = open_images(work / "curated", records, input_size(name))
    tokens = tokenize_all(open_clip.get_tokenizer(name), records.captions())
    store = FeatureStore(work / "aligned")
    feats = TeacherFeatures(store, [(s["teacher"], s["version"]) for s in store.sets()], records.keys)
    setup = time.perf_counter() - t0
    reads = _epoch_reads(images, tokens, cfg.batch_size, feats)
    store.close()
    domains = {f"standin-{k}": list(p.synth.modalities) for k in range(args.teachers)}
    dcfg = p.distill.model_copy(update={"train": cfg})
    with mock.patch.object(distill_mod, "train", _limited(STEP_BATCHES * cfg.batch_size)), \
            open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        hist = distill_mod.distill(work / "stage1", work / "curated", work / "aligned", domains, dcfg, p.seed,
                                   torch.device("cpu"), work / "student", teacher_dir=work / "teachers")
    return {"pairs": len(records), "setup_seconds": setup, "read_epoch_seconds": reads,
            "step_seconds": hist["train_seconds"] / hist["steps"], "batch": cfg.batch_size,
            "strategy": p.distill.strategy}


def encode(work: Path, args) -> dict:
    """The distilled student's embeddings of the test split (images from the decoded views, then captions), chunk
    by chunk to disk with features.student (the code align embeds the train split with): a corpus-sized split is
    never held. Evaluation's metrics then hold one evaluation dataset's [n, d] rows, sized by that dataset."""
    import torch

    from mmkd.data.split_table import SplitTable
    from mmkd.features.student import student_embeddings

    torch.set_num_threads(2)
    records = SplitTable(work / "curated", "test")
    rows = student_embeddings(work / "student", work / "curated", records, torch.device("cpu"), work / "encoded")
    out = {"pairs": len(records), "dim": rows.dim, "disk_bytes": disk_bytes(work / "encoded")}
    rows.close()
    return out


STAGES = {"curate": curate, "validate": validate, "cache_features": cache_features, "align": align,
          "stage1": stage1, "stage2": stage2, "encode": encode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("work", type=Path)
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = STAGES[args.stage](args.work, args)
    print(json.dumps({"stage": args.stage, "seconds": time.perf_counter() - t0, "hwm_kib": vmhwm_kib(), **res},
                     default=str))


if __name__ == "__main__":
    main()
