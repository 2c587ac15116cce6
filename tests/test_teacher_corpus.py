"""Data tests: the embedded teachers' own corpora (disjoint from the student's data and from each other)."""

import json

import numpy as np
import pytest

from mmkd.config import MODALITIES, ConfigError, SynthCfg, load_params
from mmkd.data.imaging import content_hash, square_view
from mmkd.data.store import load_curated
from mmkd.data.synth import SPECS, render_sample
from mmkd.data.teacher_corpus import (CorpusRequest, TeacherCorpusError, check_disjoint, corpus_stream,
                                      render_corpora, render_corpus)
from tests.conftest import REPO

SYNTH = SynthCfg(image_size=64, difficulty=0.7, train_per_modality=8, probe_per_modality=4, test_per_modality=4)


def student_keys(seed: int, synth: SynthCfg, modalities) -> dict[str, str]:
    """Content key -> id of every student sample (train, probe, test) of those modalities."""
    counts = {"train": synth.train_per_modality, "probe": synth.probe_per_modality, "test": synth.test_per_modality}
    out = {}
    for m in modalities:
        for split, n in counts.items():
            for i in range(n):
                img, rec = render_sample(seed, m, split, i, synth.image_size, synth.difficulty)
                out[content_hash(img)] = rec["id"]
    return out


def test_teacher_namespace_needs_a_stream_and_never_repeats_a_student_sample():
    with pytest.raises(ValueError, match="needs `stream`"):
        render_sample(0, "xray", "teacher", 0, 32, 0.5)
    with pytest.raises(ValueError, match="takes no `stream`"):
        render_sample(0, "xray", "train", 0, 32, 0.5, stream=1)
    student = {split: render_sample(0, "ct", split, 3, 64, 0.5) for split in ("train", "probe", "test")}
    a, ra = render_sample(0, "ct", "teacher", 3, 64, 0.5, stream=corpus_stream("rad-clip"))
    b, rb = render_sample(0, "ct", "teacher", 3, 64, 0.5, stream=corpus_stream("bio-clip"))
    assert ra["split"] == "teacher" and ra["id"] != rb["id"]
    assert ra["id"] not in {r["id"] for _, r in student.values()}
    for img, _ in student.values():  # same seed, modality and index: different pixels
        assert not np.array_equal(a, img) and not np.array_equal(b, img)
    assert not np.array_equal(a, b)
    # the student's samples are what they were before the teacher namespace existed: the curated key of
    # xray-train-00000 in the default corpus (seed 1234) made by the code before it
    img, _ = render_sample(1234, "xray", "train", 0, 64, 0.7)
    assert content_hash(img) == "b495096b79f5f76d9a635a6af1d41b21", "the student's corpus changed"


def test_corpora_are_disjoint_from_the_student_splits_and_from_each_other():
    mods = ["xray", "pathology", "oct"]
    reqs = [CorpusRequest("rad-clip", ("xray",), 20, 48), CorpusRequest("path-clip", ("pathology",), 20, 64),
            CorpusRequest("bio-clip", tuple(mods), 20, 48)]
    corpora = render_corpora(reqs, 1234, SYNTH)
    taken = student_keys(1234, SYNTH, mods)
    ids = set()
    for name, c in corpora.items():
        keys = [r["key"] for r in c.records]
        assert len(set(keys)) == len(keys), name
        assert not set(keys) & set(taken), f"{name} shares images with the student's splits"
        assert not {r["id"] for r in c.records} & ids
        ids |= {r["id"] for r in c.records}
        check_disjoint(c, taken)  # raises on a shared image
        taken.update({k: name for k in keys})
    # and by the pixels themselves: the first samples of each modality against the student's and each other's
    for m in mods:
        rows = {name: [i for i, r in enumerate(c.records) if r["modality"] == m][:3] for name, c in corpora.items()}
        native = {name: [render_sample(1234, m, "teacher", int(c.records[i]["id"].rsplit("-", 1)[1]), 64, 0.7,
                                       stream=c.info["stream"])[0] for i in rows[name]]
                  for name, c in corpora.items() if rows[name]}
        student = [render_sample(1234, m, s, i, 64, 0.7)[0] for s in ("train", "probe", "test") for i in range(3)]
        flat = [(name, img) for name, imgs in native.items() for img in imgs]
        for k, (name, img) in enumerate(flat):
            assert not any(np.array_equal(img, s) for s in student), (name, m)
            assert not any(np.array_equal(img, o) for n2, o in flat[k + 1:]), (name, m)


def test_a_shared_image_is_refused():
    c = render_corpus("rad-clip", ["xray"], 4, 0, SYNTH, 48)
    with pytest.raises(TeacherCorpusError, match="xray-teacher.*same pixels as student xray-train-00002"):
        check_disjoint(c, {c.records[1]["key"]: "student xray-train-00002"})


def test_sizes_labels_and_views_are_as_configured():
    c = render_corpus("bio-clip", list(MODALITIES), 9, 5, SYNTH, 48)
    assert len(c) == 81 and c.images.shape == (81, 48, 48, 3) and c.images.dtype == np.uint8
    assert [r["modality"] for r in c.records] == [m for m in MODALITIES for _ in range(9)]
    for m in MODALITIES:  # balanced findings, as the student's splits
        found = [r["labels"]["finding"] for r in c.records if r["modality"] == m]
        assert sorted(set(found)) == sorted(SPECS[m].findings) and len(set(map(found.count, set(found)))) == 1
    assert c.info == {"source": "synthetic", "seed": 5, "stream": corpus_stream("bio-clip"), "split": "teacher",
                      "modalities": list(MODALITIES), "per_modality": 9, "pairs": 81, "image_size": 48,
                      "native_size": 64, "difficulty": 0.7}
    # each image is the native render brought to the teacher's size by the curated views' resize
    img, rec = render_sample(5, "mri", "teacher", 4, 64, 0.7, stream=corpus_stream("bio-clip"))
    j = [r["id"] for r in c.records].index(rec["id"])
    assert np.array_equal(c.images[j], square_view(img, 48)) and c.captions[j] == rec["caption"]
    assert c.records[j]["key"] == content_hash(img)
    big = render_corpus("path-clip", ["pathology"], 3, 5, SYNTH, 64)  # at the native size: no resize
    assert np.array_equal(big.images[0], render_sample(5, "pathology", "teacher", 0, 64, 0.7,
                                                       stream=corpus_stream("path-clip"))[0])
    with pytest.raises(TeacherCorpusError, match="no modality"):
        render_corpus("x", [], 3, 5, SYNTH, 48)


def test_corpus_is_deterministic_for_a_seed_whatever_the_workers(monkeypatch):
    monkeypatch.setattr("mmkd.data.teacher_corpus.PARALLEL_MIN", 0)  # a pool even for this small corpus
    reqs = [CorpusRequest("rad-clip", ("xray", "ct"), 130, 48), CorpusRequest("vis-clip", ("oct",), 30, 48)]
    a = render_corpora(reqs, 3, SYNTH, workers=1)
    b = render_corpora(reqs, 3, SYNTH, workers=2)
    c = render_corpora(reqs, 4, SYNTH, workers=1)
    for name in a:
        assert np.array_equal(a[name].images, b[name].images)
        assert a[name].captions == b[name].captions and a[name].records == b[name].records
        assert not np.array_equal(a[name].images, c[name].images)
    # a teacher's corpus depends on its name, not on the others requested with it
    alone = render_corpus("vis-clip", ["oct"], 30, 3, SYNTH, 48)
    assert np.array_equal(alone.images, a["vis-clip"].images)


def test_views_equal_the_curated_views_of_the_same_image(smoke_corpus):
    """A teacher trains on exactly the pixels it reads for a curated image (render -> PNG -> curate -> view)."""
    p = load_params(smoke_corpus / "params.yaml")
    for size in (48, 64):
        records, images = load_curated(smoke_corpus / "artifacts" / "curated", "train", size)
        for j in range(0, len(records), max(1, len(records) // 12)):
            r = records[j]
            img, rec = render_sample(p.seed, r["modality"], "train", int(r["id"].rsplit("-", 1)[1]),
                                     p.synth.image_size, p.synth.difficulty)
            assert rec["id"] == r["id"] and content_hash(img) == r["key"]
            assert np.array_equal(square_view(img, size), images[j]), (size, r["id"])


def test_the_default_registry_has_a_generalist_and_larger_teacher_corpora():
    for profile in ("default", "smoke"):
        p = load_params(REPO / "params.yaml", profile)
        embedded = [t for t in p.teachers.registry if t.loader == "embedded"]
        general = [t for t in embedded if set(t.modalities) == set(MODALITIES)]
        assert [t.name for t in general] == ["bio-clip"], profile
        assert p.teachers.corpus.source == "synthetic"
        for t in embedded:
            assert p.teachers.corpus.size_for(t.name) > p.synth.train_per_modality, (profile, t.name)
        # specialists see more of their domain than the generalist does of it
        assert all(p.teachers.corpus.size_for(t.name) > p.teachers.corpus.size_for("bio-clip")
                   for t in embedded if t not in general)


def _params_with(tmp_path, pattern: str, new: str):
    """The repo's params.yaml with the first match of a regex replaced (whatever the current default value)."""
    import re

    text = (REPO / "params.yaml").read_text()
    changed, n = re.subn(pattern, new, text, count=1)
    assert n == 1, pattern
    (tmp_path / "p.yaml").write_text(changed)
    return tmp_path / "p.yaml"


def test_a_teacher_corpus_not_larger_than_the_students_share_is_refused(tmp_path):
    share = load_params(REPO / "params.yaml").synth.train_per_modality
    path = _params_with(tmp_path, r"\n    per_modality: \d+", f"\n    per_modality: {share}")
    with pytest.raises(ConfigError, match=rf"teachers\.corpus\.per_modality: {share} .*must exceed "
                                          rf"synth\.train_per_modality \({share}\)"):
        load_params(path)
    path = _params_with(tmp_path, r"bio-clip: \d+", "bio-clip: 12")
    with pytest.raises(ConfigError, match=r"teachers\.corpus\.per_teacher\.bio-clip: 12 .*synth\.train_per_modality"):
        load_params(path)
    path = _params_with(tmp_path, r"per_teacher: \{", "per_teacher: {nobody: 900, ")
    with pytest.raises(ConfigError, match=r"nobody.*not embedded teachers"):
        load_params(path)
    # the curated source trains on the student's own split: no size to check
    path = _params_with(tmp_path, r"\n    source: synthetic", "\n    source: curated\n    per_modality: 2 #")
    assert load_params(path).teachers.corpus.source == "curated"


def test_teachers_step_trains_each_on_its_own_corpus(smoke_run):
    """The step as the smoke flow ran it: teachers.json records each corpus. That a second run gives the same bytes
    (and so the same teacher versions, keeping the feature store valid) is checked where the inbox flow retrains
    (tests/test_inbox.py), so the teachers are not trained once more here."""
    from mmkd.steps import Context

    root = smoke_run["root"]
    p = Context.load(root).params
    first = (root / "artifacts" / "teachers" / "teachers.json").read_bytes()
    out = json.loads(first)
    assert set(out) == {t.name for t in p.teachers.registry}
    for t in p.teachers.registry:
        c = out[t.name]["corpus"]
        n = p.teachers.corpus.size_for(t.name)
        assert c["source"] == "synthetic" and c["per_modality"] == n and c["seed"] == p.seed
        assert c["stream"] == corpus_stream(t.name) and c["modalities"] == t.modalities
        assert out[t.name]["pairs"] == c["pairs"] == n * len(t.modalities)
        meta = json.loads((root / "artifacts" / "teachers" / t.name / "model.json").read_text())
        assert meta["train_pairs"] == c["pairs"] and meta["corpus"] == c
    assert "seconds" not in first.decode()


def test_curated_source_trains_on_the_students_train_split(smoke_corpus, tmp_path):
    import shutil

    from mmkd.data.store import split_records
    from mmkd.steps import Context, run_step

    root = tmp_path / "ws"
    shutil.copytree(smoke_corpus, root, ignore=shutil.ignore_patterns("mlruns", "mlflow*"))
    text = (root / "params.yaml").read_text().replace("    source: synthetic", "    source: curated", 1)
    (root / "params.yaml").write_text(text.replace("train: {epochs: 2, batch_size: 32, warmup_steps: 2}}",
                                                   "train: {epochs: 1, batch_size: 32, warmup_steps: 2}}", 1))
    ctx = Context.load(root)
    assert ctx.params.teachers.corpus.source == "curated"
    run_step("teachers", ctx)
    out = json.loads((root / "artifacts" / "teachers" / "teachers.json").read_text())
    train = split_records(root / "artifacts" / "curated", "train")
    for t in ctx.params.teachers.registry:
        n = sum(r["modality"] in t.modalities for r in train)
        assert out[t.name]["corpus"]["source"] == "curated" and out[t.name]["pairs"] == n
