"""Owns stage-2 multi-teacher distillation: builds the chosen strategy's Objective from the feature stores and
runs the training loop with it (strategies: mmkd.training.strategies; formulas: docs/distillation.md).

Teacher targets come from the feature stores batch by batch: the aligned (projected, student-dimension) store for
FD and ICL, the raw (native-dimension) store for the routed strategy's teacher quality and the relational
strategy's similarity structure. No teacher runs here, and nothing corpus-sized but the per-sample shard
locations and the [N, T] eligibility mask is held in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch

from mmkd.config import DistillCfg
from mmkd.data.split_table import SplitTable
from mmkd.data.store import open_images
from mmkd.features.store import FeatureError, FeatureStore, TeacherFeatures
from mmkd.models.factory import image_spec, load_checkpoint, model_config, save_checkpoint
from mmkd.training import checkpoint, distributed
from mmkd.training.loop import tokenize_all, train
from mmkd.training.quality import RowFeatures, focus_factors, modality_lag, probe_lag, teacher_quality
from mmkd.training.strategies import STRATEGIES
from mmkd.training.supervision import Supervision
from mmkd import atomic

WEIGHTS_FILE = "teacher_weights.json"  # written next to the student: shares, and routed's quality/weight tables


def routing(domains: dict[str, list[str]], modalities: list[str], route_by_modality: bool) -> np.ndarray:
    """[N, T] bool: which teachers may supervise each sample (by the teacher's declared domain, if routing)."""
    names = list(domains)
    mask = np.ones((len(modalities), len(names)), dtype=bool)
    if route_by_modality:
        for j, t in enumerate(names):
            allowed = set(domains[t])
            mask[:, j] = [m in allowed for m in modalities]
    return mask


def eligibility(records: SplitTable, available: np.ndarray, domains: dict[str, list[str]],
                route: bool) -> tuple[np.ndarray, int]:
    """Routed and available teachers per sample; a sample outside every teacher's domain may learn from any
    available one. A sample with no teacher features at all is an error naming it."""
    eligible = routing(domains, records.modality_names, route)[records.modality] & available  # per modality, then rows
    orphans = ~eligible.any(1)
    eligible[orphans] = available[orphans]
    bare = np.flatnonzero(~eligible.any(1))
    if len(bare):
        ids = ", ".join(records.field("id", bare[:5]))
        raise FeatureError(f"{len(bare)} train samples have no teacher features (e.g. {ids}); run cache_features "
                           "and align, or widen features.coverage")
    return eligible, int(orphans.sum())


def _aligned_sets(store: FeatureStore, names: list[str], student_dim: int) -> dict[str, dict]:
    held = {s["teacher"]: s for s in store.sets()}
    missing = [t for t in names if t not in held]
    if missing:
        raise FeatureError(f"{store.root}: no aligned features of teachers {missing}; run align")
    wrong = {t: held[t]["dim"] for t in names if held[t]["dim"] != student_dim}
    if wrong:
        raise FeatureError(f"aligned teacher dims {wrong} != student embed_dim {student_dim}; re-run align for "
                           "this student")
    return held


def _raw_versions(store: FeatureStore, names: list[str], given: dict[str, str] | None,
                  aligned: dict[str, dict] | None) -> dict[str, str]:
    """The raw feature set of each teacher: as given (the step passes cache_features' record), else the one the
    aligned features were projected from, else the only one the raw store holds."""
    held: dict[str, list[str]] = {}
    for s in store.sets():
        held.setdefault(s["teacher"], []).append(s["version"])
    out = {}
    for t in names:
        if given and t in given:
            v = given[t]
        elif aligned and "raw_version" in aligned[t]["meta"]:
            v = aligned[t]["meta"]["raw_version"]
        elif len(held.get(t, [])) == 1:
            v = held[t][0]
        else:
            raise FeatureError(f"{store.root}: teacher '{t}' has {len(held.get(t, []))} raw feature sets; "
                               "run cache_features")
        if v not in held.get(t, []):
            raise FeatureError(f"{store.root}: no raw features of teacher '{t}' version {v}; run cache_features")
        if aligned and aligned[t]["meta"].get("raw_version", v) != v:
            raise FeatureError(f"the aligned features of teacher '{t}' were projected from version "
                               f"{aligned[t]['meta']['raw_version']}, the raw store holds {v}; re-run align")
        out[t] = v
    return out


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def _student_quality(stage1_dir: Path, curated_dir: Path, probe: SplitTable, modality: np.ndarray, n_modalities: int,
                     device, scratch_parent: Path) -> np.ndarray:
    """[M] the stage-1 student's probe quality per modality, on the measure the teachers' is taken with
    (quality.teacher_quality over its own image and caption embeddings of the probe split)."""
    import shutil
    import tempfile

    from mmkd.features.student import student_embeddings

    Path(scratch_parent).mkdir(parents=True, exist_ok=True)
    for stale in Path(scratch_parent).glob(".focus-*"):  # a killed run's (one writer per workspace: none is live)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".focus-") as scratch:
        rows = student_embeddings(stage1_dir, curated_dir, probe, device, Path(scratch))
        try:
            q = teacher_quality(RowFeatures("student_stage1", rows), probe.findings(), np.asarray(modality, np.int64),
                                n_modalities)
        finally:
            rows.close()
    return q[0]


def _train_probe_lag(model, meta: dict, images, records: SplitTable, sup: Supervision, raw_store: FeatureStore,
                     raw_sets: dict[str, str], seed: int, device, cap: int = 2000, chunk: int = 4096) -> tuple:
    """sampling_focus's lag per modality: the best declared teacher's linear-probe accuracy on its raw image
    features minus the stage-1 student's on its image embedding (quality.probe_lag), over at most `cap` seeded
    labelled train samples of each modality. Returns (lag [M], teacher accuracy [T, M], student accuracy [M])."""
    from mmkd.models.encoder import ClipEncoder

    rng = np.random.default_rng([int(seed), 0x1A6])
    picked = []
    for m in range(len(sup.modalities)):
        rows = np.flatnonzero(sup.modality == m)
        picked.append(rows if len(rows) <= cap else rng.choice(rows, cap, replace=False))
    sel = np.sort(np.concatenate(picked)).astype(np.int64)
    labels = np.array([(lab or {}).get("finding") for lab in records.field("labels", sel)], dtype=object)
    sel, labels = sel[labels != None], labels[labels != None]  # noqa: E711 (elementwise on an object array)
    names = list(sup.names)
    features = TeacherFeatures(raw_store, [(t, raw_sets[t]) for t in names], records.keys[sel])
    teacher_images = {t: np.full((len(sel), d), np.nan) for t, d in zip(names, features.dims)}
    encoder = ClipEncoder("student_stage1", model, open_clip.get_tokenizer(meta["model"]), device)
    student = []
    for at in range(0, len(sel), chunk):
        part = np.arange(at, min(len(sel), at + chunk))
        read = features.batch(part)
        for j, t in enumerate(names):
            ok = features.available[part, j]
            teacher_images[t][part[ok]] = read[t][0][ok]
        student.append(encoder.encode_images(np.asarray(images[sel[part]])))
        images.release()
    student_images = np.concatenate(student) if student else np.zeros((0, 1))
    return probe_lag(teacher_images, student_images, labels, sup.modality[sel], len(sup.modalities), sup.routed,
                     names, seed)


def distill(stage1_dir: Path, curated_dir: Path, aligned_dir: Path, domains: dict[str, list[str]], cfg: DistillCfg,
            seed: int, device: torch.device, out_dir: Path, log: Callable | None = None,
            teacher_dir: Path | None = None, raw_versions: dict[str, str] | None = None,
            state_dir: Path | None = None) -> dict:
    """Distil the teachers into the stage-1 student with `cfg.strategy`; save it to out_dir (rank 0).

    domains: teacher -> modalities, in registry order. aligned_dir: the aligned store (one version per teacher;
    read by reference, mean, routed). teacher_dir: the raw store (read by routed and relational); raw_versions:
    each teacher's raw feature version (default: the one its aligned features came from, else the store's only
    one).
    state_dir: the loop's resumable training state. Returns the loop's history with the objective's summary
    (teacher shares, ICL temperature, routed's weight table as `route_weight.<modality>.<teacher>`).
    """
    torch.manual_seed(seed)
    kind = STRATEGIES[cfg.strategy]
    model, meta = load_checkpoint(stage1_dir, device)
    records = SplitTable(curated_dir, "train")  # columns and line offsets: captions are read per batch
    images = open_images(curated_dir, records, image_spec(model).size)
    names = list(domains)
    keys = records.keys
    stores: list[FeatureStore] = []
    sup = Supervision(names=names, eligible=np.zeros((len(records), len(names)), bool))
    versions: dict[str, str] = {}
    aligned_held = None
    if "aligned" in kind.needs:
        store = FeatureStore(aligned_dir)
        stores.append(store)
        aligned_held = _aligned_sets(store, names, model_config(meta["model"])["embed_dim"])
        sup.aligned = TeacherFeatures(store, [(t, aligned_held[t]["version"]) for t in names], keys)
        versions.update({t: aligned_held[t]["version"] for t in names})
    raw_store = None
    wants_quality = "quality" in kind.needs or cfg.modality_focus > 0 or cfg.sampling_focus > 0
    if "raw" in kind.needs or wants_quality:
        if teacher_dir is None:
            raise FeatureError(f"distill.strategy '{cfg.strategy}' reads the raw teacher feature store; pass its "
                               "folder (artifacts/features/teachers)")
        raw_store = FeatureStore(teacher_dir)
        stores.append(raw_store)
        raw_sets = _raw_versions(raw_store, names, raw_versions, aligned_held)
        versions.update({f"{t}@raw": v for t, v in raw_sets.items()})
        if "raw" in kind.needs:
            sup.raw = TeacherFeatures(raw_store, [(t, raw_sets[t]) for t in names], keys)
    sampling = None  # [M] how often each modality's samples are drawn per epoch (sampling_focus; None: once)
    available = (sup.aligned if sup.aligned is not None else sup.raw).available
    if cfg.structure_weight > 0:  # the image-structure term compares a sample with its same-modality batch mates
        sup.modalities, codes = np.unique(records.modality_of("unknown"), return_inverse=True)
        sup.modalities, sup.modality = list(sup.modalities), codes.astype(np.int64)
    sup.eligible, orphans = eligibility(records, available, domains, cfg.route_by_modality)
    if wants_quality:
        probe = SplitTable(curated_dir, "probe")
        modalities = sorted(set(records.modality_names) | set(probe.modality_names))
        index = {m: i for i, m in enumerate(modalities)}

        def codes(table: SplitTable) -> np.ndarray:  # each record's position in `modalities`
            return np.array([index[m] for m in table.modality_names], dtype=np.int64)[table.modality]

        probe_features = TeacherFeatures(raw_store, [(t, raw_sets[t]) for t in names], probe.keys)
        sup.quality = teacher_quality(probe_features, probe.findings(), codes(probe), len(modalities))
        sup.modalities = modalities
        sup.modality = codes(records)
        sup.routed = routing(domains, modalities, cfg.route_by_modality)
        raw_store.release()
        if cfg.modality_focus > 0:
            sup.student_quality = _student_quality(stage1_dir, curated_dir, probe, codes(probe), len(modalities),
                                                   device, Path(out_dir).parent)
            lag = modality_lag(sup.quality, sup.student_quality, sup.routed)
            sup.focus = focus_factors(lag, sup.modality, cfg.modality_focus)
        if cfg.sampling_focus > 0:  # the lag a linear probe sees, on the train split's labelled images
            device = distributed.init_from_env(device)  # under torchrun, rank 0's factors are every rank's: one order
            probe_lags = _train_probe_lag(model, meta, images, records, sup, raw_store, raw_sets, seed, device)
            sampling = focus_factors(probe_lags[0], sup.modality, cfg.sampling_focus)  # [M], mean 1 over train rows
            sampling, probe_lags = distributed.broadcast_object((sampling, probe_lags))
    objective = kind(sup, cfg, seed, device)
    tokens = tokenize_all(open_clip.get_tokenizer(meta["model"]), records.captions())
    # the data's content: the curated keys (hashes of the decoded pixels) and the checksums of every feature set
    # read, so a re-curated corpus or rewritten features never resume an old state
    read = [(sup.aligned.store, t, v) for t, v in sup.aligned.sets] if sup.aligned is not None else []
    if raw_store is not None:
        read += [(raw_store, t, raw_sets[t]) for t in names]
    fingerprint = {"stage1": _file_hash(Path(stage1_dir) / "model.safetensors"), "teachers": versions,
                   "distill": cfg.model_dump(exclude={"train"}), "domains": domains,
                   "captions": records.caption_digest()[:16],
                   "keys": checkpoint.data_id(records.key_strings()),
                   "features": sorted({f"{t}@{v}:{s.set_digest(t, v)}" for s, t, v in read})}
    weights = None if sampling is None else sampling[sup.modality]
    history = train(model, images, tokens, cfg.train, objective, seed, device, "distill", log, state_dir, fingerprint,
                    sample_weights=weights)
    for store in stores:
        store.close()
    history["orphan_samples"] = orphans
    if sampling is not None:
        history.update({f"sampling.{mod}": float(sampling[m]) for m, mod in enumerate(sup.modalities)})
    if distributed.is_main():
        extra = {"stage": 2, "teachers": names, "strategy": cfg.strategy}
        if objective.uses_icl:
            extra["icl_temperature"] = objective.icl_temperature  # the clamped value the loss used
        save_checkpoint(model, out_dir, meta["model"], extra)
        report = objective.report()
        if sampling is not None:
            report["sampling_focus"] = cfg.sampling_focus
            lag, q, qs = probe_lags

            def by_modality(v):
                return {mod: (float(v[m]) if np.isfinite(v[m]) else None) for m, mod in enumerate(sup.modalities)}

            report["sampling"] = by_modality(sampling)
            report["sampling_lag"] = by_modality(lag)
            report["sampling_probe"] = {"student_stage1": by_modality(qs),
                                        **{t: by_modality(q[j]) for j, t in enumerate(names)}}
        atomic.write_json(Path(out_dir) / WEIGHTS_FILE, report, sort_keys=True)
    return history
