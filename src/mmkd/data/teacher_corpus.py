"""Owns the embedded teachers' own training corpora: rendered in memory by the generator, never curated.

The real teachers were trained on corpora the student never sees (PMC-15M, Quilt-1M, ...). The embedded
world mirrors that: each embedded teacher gets pairs from the generator's `teacher` namespace, in a stream
of its own (from its name), so no sample can coincide with a student train/probe/test sample or with another
teacher's. Images are rendered at `synth.image_size` (the native size of the curated images) and brought to the
teacher's input size by `square_view`, the same resize that makes curation's decoded views: a teacher trains on
exactly the pixels it would read for a curated image (PNG round trips are lossless).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from mmkd.config import SynthCfg
from mmkd.data.imaging import content_hash, square_view
from mmkd.data.synth import TEACHER_SPLIT, render_sample
from mmkd.progress import progress

CHUNK = 100  # samples per rendering job
# below this many images rendering stays in-process: a process pool takes ~2 s to start, about what 2,000 images
# take to render on one core (default corpora, 19,050 images on 2 cores: 15-17 s with 2 workers, 22-24 s with 1)
PARALLEL_MIN = 2000


class TeacherCorpusError(ValueError):
    """A teacher corpus cannot be built as configured (too small, no modality, overlapping the student's data)."""


def corpus_stream(name: str) -> int:
    """A teacher's stream in the generator's `teacher` namespace, from its name (stable when the registry is
    reordered or grows)."""
    return int.from_bytes(hashlib.sha256(f"teacher-corpus:{name}".encode()).digest()[:4], "little")


@dataclass
class TeacherCorpus:
    """One teacher's pairs: images uint8 [n, size, size, 3], captions, light records (id, modality, labels, key)."""

    images: np.ndarray
    captions: list[str]
    records: list[dict]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def _render_chunk(args) -> tuple[np.ndarray, list[str], list[dict]]:
    seed, stream, modality, indices, native, size, difficulty = args
    views = np.empty((len(indices), size, size, 3), np.uint8)
    captions, records = [], []
    for k, i in enumerate(indices):
        img, rec = render_sample(seed, modality, TEACHER_SPLIT, i, native, difficulty, stream=stream)
        views[k] = img if size == native else square_view(img, size)
        captions.append(rec["caption"])
        # key: the content hash of the native pixels, the curated store's key for the same image
        records.append({"id": rec["id"], "modality": modality, "labels": rec["labels"], "key": content_hash(img)})
    return views, captions, records


@dataclass(frozen=True)
class CorpusRequest:
    """One teacher's corpus: per_modality pairs of each of its modalities, at `size` px."""

    name: str
    modalities: tuple[str, ...]
    per_modality: int
    size: int


def render_corpora(requests: list[CorpusRequest], seed: int, synth: SynthCfg, workers: int = 1,
                   desc: str = "teacher corpora") -> dict[str, TeacherCorpus]:
    """Render every requested corpus (one process pool for all of them). Each is deterministic for (seed, its
    teacher's name, its modalities and size, synth.image_size, synth.difficulty), whatever `workers` is."""
    jobs, owner = [], []
    for req in requests:
        if not req.modalities:
            raise TeacherCorpusError(f"teacher '{req.name}': no modality to render (none of its modalities is in "
                                     f"synth.modalities {list(synth.modalities)})")
        if req.per_modality < 1:
            raise TeacherCorpusError(f"teacher '{req.name}': per_modality must be positive, got {req.per_modality}")
        stream = corpus_stream(req.name)
        for m in req.modalities:
            for s in range(0, req.per_modality, CHUNK):
                jobs.append((seed, stream, m, list(range(s, min(req.per_modality, s + CHUNK))), synth.image_size,
                             req.size, synth.difficulty))
                owner.append(req.name)
    out = {}
    for req in requests:
        total = req.per_modality * len(req.modalities)
        info = {"source": "synthetic", "seed": seed, "stream": corpus_stream(req.name), "split": TEACHER_SPLIT,
                "modalities": list(req.modalities), "per_modality": req.per_modality, "pairs": total,
                "image_size": req.size, "native_size": synth.image_size, "difficulty": synth.difficulty}
        out[req.name] = TeacherCorpus(np.empty((total, req.size, req.size, 3), np.uint8), [], [], info)

    def take(name: str, chunk) -> None:
        views, caps, recs = chunk
        c = out[name]
        c.images[len(c.captions): len(c.captions) + len(caps)] = views
        c.captions.extend(caps)
        c.records.extend(recs)
        bar.update(len(caps))

    with progress(total=sum(len(j[3]) for j in jobs), desc=desc, unit="img") as bar:
        if workers > 1 and len(jobs) > 1 and bar.total >= PARALLEL_MIN:
            # forkserver, not fork: the caller may have torch's threads running (data/workers.py says why)
            ctx = get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                for name, chunk in zip(owner, pool.map(_render_chunk, jobs)):  # in job order, whatever `workers`
                    take(name, chunk)
        else:
            for name, job in zip(owner, jobs):
                take(name, _render_chunk(job))
    return out


def render_corpus(name: str, modalities: list[str], per_modality: int, seed: int, synth: SynthCfg, size: int,
                  workers: int = 1) -> TeacherCorpus:
    """One teacher's corpus (render_corpora for a single request)."""
    return render_corpora([CorpusRequest(name, tuple(modalities), per_modality, size)], seed, synth, workers,
                          f"corpus {name}")[name]


def check_disjoint(corpus: TeacherCorpus, taken: dict[str, str]) -> None:
    """Refuse a corpus holding an image that is also in `taken` (content key -> where: the curated store, other
    teachers' corpora). Distinct rng streams make this practically impossible; it is checked anyway (cheap)."""
    for rec in corpus.records:
        where = taken.get(rec["key"])
        if where is not None:
            raise TeacherCorpusError(f"teacher corpus sample {rec['id']} has the same pixels as {where}: the "
                                     f"teacher would see data of the student or of another teacher")
