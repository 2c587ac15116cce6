"""Owns the `teachers` step: train the embedded teachers, each on its own corpus; and loading every registry teacher."""

from __future__ import annotations

import json
import time

import numpy as np

from mmkd.steps.common import Context, _device, _metric_logger, StepRun, log
from mmkd import atomic


def _curated_keys(curated_dir) -> dict[str, str]:
    """Content key -> record id of every curated record, all splits: what no teacher corpus may contain."""
    with open(curated_dir / "manifest.jsonl", encoding="utf-8") as fh:
        return {r["key"]: f"curated {r['split']} record {r['id']}" for r in map(json.loads, filter(str.strip, fh))}


CORPUS_KEYS = "corpus_keys.json"


def check_corpora_against_curated(ctx: Context) -> None:
    """The disjointness check again, for teachers trained earlier on their own corpora (a flow that reuses them):
    no curated record, of any split, may have the pixels of a sample a teacher trained on."""
    from mmkd.data.teacher_corpus import TeacherCorpusError

    path = ctx.ws.teachers / CORPUS_KEYS
    if ctx.params.teachers.corpus.source != "synthetic" or not path.exists():
        return
    taken = _curated_keys(ctx.ws.curated)
    for teacher, keys in json.loads(path.read_text()).items():
        for key in keys:
            if key in taken:
                raise TeacherCorpusError(f"teacher '{teacher}' trained on an image with the same pixels as "
                                         f"{taken[key]} (content key {key}): the teacher has seen data of the student")


def step_teachers(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.store import open_images, split_records
    from mmkd.data.teacher_corpus import CorpusRequest, check_disjoint, render_corpora
    from mmkd.models.factory import input_size
    from mmkd.training.clip import train_clip

    p, ws = ctx.params, ctx.ws
    run.log_params({"teachers": p.teachers.model_dump()})
    corpus_cfg = p.teachers.corpus
    synthetic = corpus_cfg.source == "synthetic"
    records = None if synthetic else split_records(ws.curated, "train")
    embedded = [s for s in p.teachers.registry if s.loader == "embedded"]
    corpora = {}
    if synthetic and embedded:  # each its own corpus, as the real teachers': never any of the student's pairs
        if not any(src.kind == "synthetic" for src in p.curate.sources):
            log.warning("teachers: the embedded teachers train on the generator's images (teachers.corpus.source: "
                        "synthetic) but curate.sources holds no synthetic source; for a corpus of your own use "
                        "teachers.corpus.source: curated, or real teachers")
        t0 = time.perf_counter()
        requests = [CorpusRequest(s.name, tuple(m for m in s.modalities if m in p.synth.modalities),
                                  corpus_cfg.size_for(s.name), input_size(s.model)) for s in embedded]
        corpora = render_corpora(requests, p.seed, p.synth, corpus_cfg.workers)
        taken = _curated_keys(ws.curated)
        for name, corpus in corpora.items():
            check_disjoint(corpus, taken)
            taken.update({r["key"]: f"teacher '{name}' corpus sample {r['id']}" for r in corpus.records})
        # what a flow reusing these teachers checks new curated records against (check_corpora_against_curated)
        ws.teachers.mkdir(parents=True, exist_ok=True)
        atomic.write_json(ws.teachers / CORPUS_KEYS, {n: sorted(r["key"] for r in c.records)
                                                      for n, c in sorted(corpora.items())}, indent=None)
        run.log_metrics({"corpus_seconds": time.perf_counter() - t0})
    else:  # no corpus of their own: a list left by an earlier configuration would check the wrong keys
        (ws.teachers / CORPUS_KEYS).unlink(missing_ok=True)
    out: dict = {}
    ws.teachers.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(p.teachers.registry):
        if spec.loader != "embedded":
            out[spec.name] = {"loader": spec.loader, "trained": False}  # external teachers arrive pretrained
            continue
        size = input_size(spec.model)  # images at the teacher's own input size
        if synthetic:
            corpus = corpora.pop(spec.name)  # released once trained
            images, captions, info = corpus.images, corpus.captions, corpus.info
        else:  # the curated train split of its modalities: the student's own data
            rows = np.array([j for j, r in enumerate(records) if r["modality"] in spec.modalities])
            if len(rows) < 2:
                raise ValueError(f"teacher '{spec.name}': only {len(rows)} curated train pairs in {spec.modalities}")
            images = open_images(ws.curated, records, size).subset(rows)
            captions = [records[j]["caption"] for j in rows]
            info = {"source": "curated", "pairs": len(rows), "image_size": size}
        hist = train_clip(spec.model, images, captions, p.teachers.train, p.seed + 100 + i, _device(ctx),
                          ws.teachers / spec.name, f"teacher {spec.name}", _metric_logger(run, spec.name),
                          {"teacher": spec.name, "modalities": spec.modalities, "corpus": info})
        # teachers.json is a DVC output: keep it free of timings so a repeated run gives the same bytes
        out[spec.name] = {"loader": "embedded", "trained": True, "corpus": info,
                          **{k: hist[k] for k in ("loss", "steps", "pairs")}}
        run.log_metrics({f"{spec.name}.final_loss": hist["loss"], f"{spec.name}.pairs": hist["pairs"],
                         f"{spec.name}.train_seconds": hist["train_seconds"]})
    atomic.write_json(ws.teachers / "teachers.json", out, sort_keys=True)
    run.log_artifact(ws.teachers / "teachers.json")
    return out


def load_teachers(ctx: Context):
    from mmkd.teachers.registry import load_teacher

    return [(spec, load_teacher(spec, ctx.ws.teachers, _device(ctx))) for spec in ctx.params.teachers.registry]
