"""The promotion gate on a real SQLite MLflow registry: paired val comparisons, the register step on a real suite,
the student pyfunc round trip, mmkd.load."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image

import mmkd
from mmkd.evaluation.selection import METRIC
from mmkd.evaluation.stats import paired_bootstrap, resample_plan
from mmkd.tracking.gate import (
    COMPARISON_TAGS,
    DECISION_TAG,
    METRIC_TAG,
    PIPELINE_TAG,
    SCORE_TAG,
    ChampionUnscorable,
    GateError,
    gate,
    register_student,
)

MODEL = "gate-student"
N_ITEMS = 400


def outcomes(n_right: int, n: int = N_ITEMS) -> np.ndarray:
    """1/0 per selection item: right on the first n_right items (so two of them are paired item by item)."""
    return (np.arange(n) < n_right).astype(float)


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """What mmkd.evaluation.selection.Selection.compare returns, on one stratum."""
    n = len(a)
    p = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), resample_plan(n, seed, 500), n)
    return {**p, "n_items": n, "level": 0.95}


def comparing(by_version: dict[str, np.ndarray], challenger: np.ndarray):
    """compare(champion_version): the challenger's outcomes against the champion's (looked up by version)."""
    return lambda champion: paired(challenger, by_version[champion])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh SQLite tracking + registry store, an experiment with local artifacts, one tiny student checkpoint."""
    from mmkd.models.factory import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("gate", artifact_location=(root / "artifacts").as_uri())
    torch.manual_seed(0)
    model = create_model("mmkd-student-tiny")
    ckpt = root / "student"
    save_checkpoint(model, ckpt, "mmkd-student-tiny")
    return {"root": root, "uri": uri, "client": client, "experiment": exp, "checkpoint": ckpt, "model": model}


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def register(reg: dict, mine: np.ndarray, by_version: dict, model_name: str = MODEL, **gate_args):
    """What the register step does with a scored challenger: a run, the student logged from it, gated."""
    client = reg["client"]
    run = client.create_run(reg["experiment"])
    decision = register_student(reg["uri"], run.info.run_id, reg["checkpoint"], model_name, float(mine.mean()),
                                METRIC, comparing(by_version, mine), 0.01, n_items=len(mine), **gate_args)
    by_version[decision.version] = mine
    client.set_terminated(run.info.run_id)
    return decision, run.info.run_id


@pytest.fixture(scope="module")
def ladder(registry):
    """Three real registrations on the same 400 items: v1 right on 200 (first), v2 on 160 (worse), v3 on 220."""
    def env():
        return {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}

    steps, by_version = {"env-before": env()}, {}
    for right in (200, 160, 220):
        decision, run_id = register(registry, outcomes(right), by_version)
        steps[decision.version] = (decision, run_id)
        steps[decision.version + "-aliases"] = aliases(registry["client"], MODEL)
    steps["env-after"] = env()
    return steps


def test_first_version_becomes_champion(ladder):
    d, _ = ladder["1"]
    assert d.promoted and d.champion_version == "1" and d.previous_champion_version is None
    assert d.challenger_score == 0.50 and d.champion_score is None and d.difference is None
    assert "no champion yet" in d.reason and d.n_items == N_ITEMS
    assert ladder["1-aliases"] == {"challenger": "1", "champion": "1"}
    # logging the model used MLflow's global URIs only meanwhile: later steps still log where they should
    assert ladder["env-after"] == ladder["env-before"]


def test_worse_challenger_does_not_become_champion(ladder, registry):
    d, _ = ladder["2"]
    assert not d.promoted
    assert (d.challenger_score, d.champion_score, d.previous_champion_version, d.champion_version) == (0.40, 0.50, "1", "1")
    assert d.difference == pytest.approx(-0.10) and d.ci_high < -0.01
    assert "champion stays on v1" in d.reason and f"over {N_ITEMS} items" in d.reason and "-margin -0.0100" in d.reason
    assert ladder["2-aliases"] == {"challenger": "2", "champion": "1"}
    tags = registry["client"].get_model_version(MODEL, "2").tags
    assert tags[METRIC_TAG] == METRIC and float(tags[SCORE_TAG]) == 0.40 and tags[DECISION_TAG] == "held"
    assert float(tags[COMPARISON_TAGS["difference"]]) == pytest.approx(-0.10)
    assert float(tags[COMPARISON_TAGS["ci_low"]]) == d.ci_low and float(tags[COMPARISON_TAGS["margin"]]) == 0.01
    assert int(tags[COMPARISON_TAGS["n_items"]]) == N_ITEMS and float(tags[COMPARISON_TAGS["champion_score"]]) == 0.5


def test_better_challenger_becomes_champion_against_the_champion(ladder, registry):
    d, _ = ladder["3"]
    # compared with v1 (the champion), not v2 (the last challenger)
    assert d.promoted and d.previous_champion_version == "1" and d.champion_score == 0.50
    assert d.difference == pytest.approx(0.05) and d.ci_low > 0
    assert ladder["3-aliases"] == {"challenger": "3", "champion": "3"}
    assert registry["client"].get_model_version(MODEL, "3").tags[DECISION_TAG] == "promoted"


def cheap_version(client: MlflowClient, name: str) -> str:
    """A model version without logging a model: for rules that do not need the artifact."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source="file:///nowhere").version)


def noisy(n_worse: int, seed: int, n: int = N_ITEMS) -> tuple[np.ndarray, np.ndarray]:
    """(challenger, champion): the champion right on half the items, the challenger on the same half but 2
    items swapped for others, and n_worse fewer: a difference the bootstrap cannot tell from noise."""
    rng = np.random.default_rng(seed)
    champ = (rng.random(n) < 0.5).astype(float)
    chall = champ.copy()
    right, wrong = np.flatnonzero(champ == 1), np.flatnonzero(champ == 0)
    chall[rng.choice(right, 2 + n_worse, replace=False)] = 0
    chall[rng.choice(wrong, 2, replace=False)] = 1
    return chall, champ


def test_the_margin_decides_on_the_paired_lower_bound(registry):
    """Equal outcomes promote (an equally good retrain on newer data takes over); a challenger slightly worse by
    noise is held when its lower bound is below -margin, promoted with a wider margin; the margin is checked."""
    client = registry["client"]
    first = outcomes(200)
    assert gate(client, "eq", cheap_version(client, "eq"), 0.5, METRIC, comparing({}, first)).promoted
    tie = gate(client, "eq", cheap_version(client, "eq"), 0.5, METRIC, comparing({"1": first}, first), 0.01)
    assert tie.promoted and tie.champion_version == "2" and (tie.difference, tie.ci_low, tie.ci_high) == (0, 0, 0)
    assert ">= -margin" in tie.reason

    chall, champ = noisy(4, seed=1)
    gate(client, "noisy", cheap_version(client, "noisy"), champ.mean(), METRIC, comparing({}, champ))
    held = gate(client, "noisy", cheap_version(client, "noisy"), chall.mean(), METRIC,
                comparing({"1": champ}, chall), margin=0.01)
    assert -0.02 < held.difference < 0 and held.ci_low < -0.01 and not held.promoted
    wide = gate(client, "noisy", cheap_version(client, "noisy"), chall.mean(), METRIC,
                comparing({"1": champ}, chall), margin=-held.ci_low + 1e-9)
    assert wide.promoted and wide.ci_low == held.ci_low and "stays" not in wide.reason
    with pytest.raises(GateError, match="margin"):
        gate(client, "noisy", cheap_version(client, "noisy"), 0.5, METRIC, comparing({}, champ), margin=-0.1)


def test_a_champion_that_cannot_be_scored_is_replaced_and_the_reason_says_so(registry):
    from mmkd.steps.register import _champion_encoder

    client = registry["client"]
    old = cheap_version(client, "legacy")  # registered by hand: no mmkd student behind it
    client.set_registered_model_alias("legacy", "champion", old)
    # its artifact folder holds no model: downloaded empty, it is named as neither a checkpoint nor an MLflow model
    with pytest.raises(ChampionUnscorable, match="neither an mmkd checkpoint folder"):
        _champion_encoder(registry["uri"], "legacy", old, "cpu")

    def compare(version):
        return _champion_encoder(registry["uri"], "legacy", version, "cpu")

    d = gate(client, "legacy", cheap_version(client, "legacy"), 0.1, METRIC, compare)
    assert d.promoted and d.champion_score is None and d.previous_champion_version == old
    assert d.reason.startswith("champion v1 cannot be scored on the selection items (")
    # custom aliases
    d = gate(client, "legacy", cheap_version(client, "legacy"), 0.0, METRIC, compare,
             challenger_alias="candidate", champion_alias="prod")
    assert d.promoted and "no prod yet" in d.reason
    assert str(client.get_model_version_by_alias("legacy", "candidate").version) == d.version


def test_a_champion_registered_on_another_evaluation_is_compared_on_todays_items(registry):
    """Deliberately changed: the champion is scored now, on the current items, so a suite that changed since it
    was registered no longer forfeits the comparison (it used to be replaced unseen)."""
    client = registry["client"]
    good, worse = outcomes(300), outcomes(200)
    first = gate(client, "evals", cheap_version(client, "evals"), 0.75, METRIC, comparing({}, good), evaluation="aaaa")
    assert first.promoted and first.evaluation == "aaaa"
    other = gate(client, "evals", cheap_version(client, "evals"), 0.5, METRIC, comparing({"1": good}, worse),
                 evaluation="bbbb")
    assert not other.promoted and other.champion_score == 0.75 and other.difference == pytest.approx(-0.25)
    assert client.get_model_version("evals", other.version).tags["mmkd.gate_evaluation"] == "bbbb"


def test_a_retried_registration_of_one_pipeline_run_reuses_its_version(registry):
    """A register step retried by Prefect (same parent run, a new step run) gates the version its first attempt
    created instead of creating a second one; another pipeline run gets a version of its own."""
    client, name, by_version = registry["client"], "mmkd-retried", {}
    first, _ = register(registry, outcomes(200), by_version, name, pipeline_run="parent-a")
    again, _ = register(registry, outcomes(200), by_version, name, pipeline_run="parent-a")
    assert again.version == first.version and again.promoted and again.champion_version == first.version
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [first.version]
    assert client.get_model_version(name, first.version).tags[PIPELINE_TAG] == "parent-a"
    other, _ = register(registry, outcomes(150), by_version, name, pipeline_run="parent-b")
    assert other.version != first.version and not other.promoted
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    assert aliases(client, name) == {"champion": first.version, "challenger": other.version}


def test_retired_register_params_are_refused_by_name():
    from pydantic import ValidationError

    from mmkd.config import RegisterCfg

    with pytest.raises(ValidationError, match="register.metric / register.higher_is_better are retired"):
        RegisterCfg(metric="student.mean.zeroshot_acc1")
    with pytest.raises(ValidationError, match="margin"):
        RegisterCfg(margin=-0.01)
    assert RegisterCfg().margin == 0.01


def _png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_pyfunc_round_trip_and_mmkd_load(ladder, registry):
    import mlflow
    import open_clip
    import pandas as pd
    from safetensors.torch import load_file

    from mmkd.models.factory import image_spec, to_tensor
    from mmkd.tracking.pyfunc import _mlflow_uris

    uri, model = registry["uri"], registry["model"].eval()
    spec = image_spec(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, spec.size, spec.size, 3), dtype=np.uint8)
    texts = ["Chest radiograph showing a left pleural effusion.", "Brain MRI with a left glioma."]
    with torch.no_grad():
        want_img = F.normalize(model.encode_image(to_tensor(images, spec, "cpu")).float(), dim=-1).numpy()
        tok = open_clip.get_tokenizer("mmkd-student-tiny")
        want_txt = F.normalize(model.encode_text(tok(texts)).float(), dim=-1).numpy()

    with _mlflow_uris(uri):
        pyf = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        out = pyf.predict(pd.DataFrame({"image": [_png_b64(i) for i in images], "text": texts}))
    np.testing.assert_allclose(np.array(out["image_embedding"].tolist()), want_img, atol=1e-5)
    np.testing.assert_allclose(np.array(out["text_embedding"].tolist()), want_txt, atol=1e-5)

    saved = load_file(registry["checkpoint"] / "model.safetensors")
    _, run_id = ladder["2"]
    for source in (f"models:/{MODEL}@champion", f"models:/{MODEL}/2", f"runs:/{run_id}/student",
                   str(registry["checkpoint"])):
        loaded = mmkd.load(source, tracking_uri=uri)
        assert isinstance(loaded, open_clip.CLIP) and not loaded.training, source
        state = loaded.state_dict()
        assert set(state) == set(saved), source
        assert all(torch.equal(state[k], saved[k]) for k in saved), source
    enc = mmkd.load_encoder(f"models:/{MODEL}/1", tracking_uri=uri)
    np.testing.assert_allclose(enc.encode_images(images), want_img, atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts(texts), want_txt, atol=1e-5)


# --- the register step on a real (tiny) suite ---------------------------------------------------------------------

SEEDS = {"champion": 0, "challenger": 1}  # two tiny students whose zero-shot answers differ on about half the images


def _students(root: Path) -> dict:
    """Each tiny student's checkpoint and encoder."""
    import open_clip

    from mmkd.models.encoder import ClipEncoder
    from mmkd.models.factory import create_model, save_checkpoint

    out = {}
    for name, seed in SEEDS.items():
        torch.manual_seed(seed)
        model = create_model("mmkd-student-tiny")
        save_checkpoint(model, root / name, "mmkd-student-tiny")
        out[name] = (root / name, ClipEncoder(name, model, open_clip.get_tokenizer("mmkd-student-tiny"), "cpu"))
    return out


def _logits(encoder, images: np.ndarray, prompts: list[list[str]]) -> np.ndarray:
    from mmkd.evaluation.tasks.zeroshot import class_embeddings

    return encoder.encode_pil(list(images)) @ class_embeddings([encoder.encode_texts(p) for p in prompts]).T


@pytest.fixture(scope="module")
def suite_ws(tmp_path_factory):
    """A smoke workspace whose embedded-xray set (the only classification set present) is labelled so that the
    challenger only looks better on test: on val each label is the champion's zero-shot answer, on test the
    challenger's (24 items where the two disagree, 8 where they agree, per split). Real images, real models."""
    from mmkd.evaluation.catalog import suite_entries
    from mmkd.steps import Context
    from tests.conftest import write_params

    root = tmp_path_factory.mktemp("suite-ws")
    write_params(root)
    ctx = Context.load(root)
    entry = next(e for e in suite_entries(ctx.params) if e.name == "embedded-xray")
    prompts = [list(entry.prompts[c]) for c in entry.classes]
    students = _students(root / "checkpoints")
    images = np.random.default_rng(7).integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    logits = {k: _logits(enc, images, prompts) for k, (_, enc) in students.items()}
    pred = {k: v.argmax(1) for k, v in logits.items()}
    # answers with a clear top class only: re-encoding in other batches cannot flip them
    clear = np.all([np.diff(np.sort(v, 1)[:, -2:], axis=1)[:, 0] > 1e-4 for v in logits.values()], axis=0)
    differ = np.flatnonzero(clear & (pred["champion"] != pred["challenger"]))
    agree = np.flatnonzero(clear & (pred["champion"] == pred["challenger"]))
    assert len(differ) >= 54 and len(agree) >= 16, (len(differ), len(agree))
    split = {"val": (np.r_[differ[:24], agree[:8]], "champion"), "test": (np.r_[differ[24:48], agree[8:16]], "challenger"),
             "train": (np.r_[differ[48:54]], "champion")}
    folder = ctx.ws.embedded_suite / entry.path
    (folder / "images").mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split", "caption"])
        for s, (idx, whose) in split.items():
            for i in idx:
                Image.fromarray(images[i]).save(folder / "images" / f"{s}-{i:03d}.png")
                label = entry.classes[pred[whose][i]]
                w.writerow([f"images/{s}-{i:03d}.png", label, s, f"Chest X-ray: {label}."])
    # the old gate's number, zero-shot top-1 on test, as the evaluation computes it
    from mmkd.evaluation.tasks.zeroshot import zero_shot

    test_idx = split["test"][0]
    y = pred["challenger"][test_idx]
    test_acc = {k: zero_shot(enc.encode_pil(list(images[test_idx])), [enc.encode_texts(p) for p in prompts], y)
                ["zeroshot_acc1"] for k, (_, enc) in students.items()}
    return {"root": root, "checkpoints": {k: v[0] for k, v in students.items()}, "test_acc": test_acc}


def _install(ctx, checkpoint: Path, test_acc: float) -> None:
    """The student the register step registers, and evaluate's reports/metrics.json for it."""
    import shutil

    shutil.rmtree(ctx.ws.student, ignore_errors=True)
    shutil.copytree(checkpoint, ctx.ws.student)
    ctx.ws.metrics.parent.mkdir(parents=True, exist_ok=True)
    ctx.ws.metrics.write_text(json.dumps({"student": {"mean": {"zeroshot_acc1": test_acc}}}))


def test_the_gate_refuses_a_challenger_that_only_looks_better_on_test(suite_ws, tmp_path, monkeypatch):
    """The register step, three times on a real suite: the champion (first), a challenger with the better test
    zero-shot but the worse val zero-shot (held: the old test-split gate would have promoted it), then a retrain
    as good as the champion on val (promoted). MLflow run, version tags and registration.json record why."""
    from mmkd.steps import Context, run_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'step.db'}")
    ctx = Context.load(suite_ws["root"])
    assert ctx.params.tracking.system_metrics and ctx.params.register_.margin == 0.01
    acc = suite_ws["test_acc"]
    assert acc["challenger"] > acc["champion"] + 0.5  # test zero-shot: >= would have promoted it

    _install(ctx, suite_ws["checkpoints"]["champion"], acc["champion"])
    first = run_step("register", ctx)["summary"]
    assert first["promoted"] and first["version"] == "1" and first["champion_score"] is None
    assert first["metric"] == METRIC and first["challenger_score"] == 1.0  # val labels are the champion's answers
    assert first["selection"]["datasets"] == ["embedded-xray"] and first["n_items"] == 32

    _install(ctx, suite_ws["checkpoints"]["challenger"], acc["challenger"])
    result = run_step("register", ctx)
    second = result["summary"]
    assert not second["promoted"] and second["reason"].endswith("champion stays on v1")
    assert second["champion_score"] == 1.0 and second["challenger_score"] == pytest.approx(8 / 32)
    assert second["difference"] == pytest.approx(-24 / 32) and second["ci_high"] < -0.01
    assert second["n_items"] == 32 and second["margin"] == 0.01
    for part in ("-0.7500", "95% paired CI [", "over 32 items", "< -margin -0.0100"):
        assert part in second["reason"], (part, second["reason"])
    assert second["selection"]["per_set"] == {"embedded-xray": {"challenger": 0.25, "champion": 1.0}}
    assert second["model_uri"] == "models:/mmkd-student/2"
    assert second["champion_uri"] == "models:/mmkd-student@champion"
    assert json.loads(ctx.ws.registration.read_text()) == json.loads(json.dumps(second))

    client = MlflowClient(tracking_uri=second["tracking_uri"], registry_uri=second["tracking_uri"])
    tags = client.get_model_version("mmkd-student", "2").tags
    assert tags[DECISION_TAG] == "held" and tags["mmkd.gate_reason"] == second["reason"]
    assert float(tags[COMPARISON_TAGS["ci_low"]]) == second["ci_low"] and tags[COMPARISON_TAGS["n_items"]] == "32"
    run = client.get_run(result["run_id"])
    assert run.data.params["register.margin"] == "0.01" and run.data.params["register.champion_alias"] == "champion"
    assert run.data.metrics["gate.challenger_score"] == 0.25 and run.data.metrics["gate.champion_score"] == 1.0
    assert run.data.metrics["gate.ci_low"] == second["ci_low"] and run.data.metrics["gate.promoted"] == 0.0
    assert run.data.tags["mmkd.gate.decision"] == "held" and run.data.tags["mmkd.champion_version"] == "1"
    # MLflow system metrics on the step's run, even though the step is shorter than the sampling interval
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in run.data.metrics, sorted(run.data.metrics)

    _install(ctx, suite_ws["checkpoints"]["champion"], acc["champion"])  # a retrain exactly as good on val
    third = run_step("register", ctx)["summary"]
    assert third["promoted"] and third["previous_champion_version"] == "1"
    assert (third["difference"], third["ci_low"], third["ci_high"]) == (0.0, 0.0, 0.0)
    assert aliases(client, "mmkd-student") == {"challenger": "3", "champion": "3"}


def test_the_challenger_reuses_the_evaluations_embeddings_and_scores_the_same(suite_ws, monkeypatch):
    """With evaluate's embedding cache of the student (its name, its weights' version), the challenger's val
    outcomes are read from it, not encoded again, and equal a fresh encoding of the val images; the test items
    are never among the selection items."""
    import mmkd.evaluation.embeddings as embeddings
    from mmkd.evaluation.catalog import suite_entries
    from mmkd.steps import Context
    from mmkd.steps.evaluate import _file_sha
    from mmkd.steps.register import _encoder, _selection

    ctx = Context.load(suite_ws["root"])
    selection = _selection(ctx)
    (s,) = selection.sets
    assert set(s.view.item_split) == {"val"} and len(s.view.images) == selection.n == 32
    ckpt = suite_ws["checkpoints"]["challenger"]
    student, version = _encoder("student", ckpt, "cpu"), _file_sha(ckpt / "model.safetensors")
    fresh = selection.outcomes(student, 64)
    cache = ctx.ws.evaluation / "embeddings-test"
    entry = next(e for e in suite_entries(ctx.params) if e.name == "embedded-xray")
    embeddings.dataset_embeddings(student, version, s.dataset, entry.prompts, 64, cache)  # what evaluate leaves

    def no_encoding(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(embeddings, "encode_dataset", no_encoding)
    np.testing.assert_array_equal(selection.outcomes(student, 64, cache, version), fresh)
    with pytest.raises(AssertionError, match="encoded again"):  # other weights: the cache does not apply
        selection.outcomes(student, 64, cache, "other-weights")


def test_no_selection_items_fails_before_a_version_is_created(suite_ws, tmp_path, monkeypatch):
    """Without a zero-shot set with a val split there is nothing to select on: the step stops, naming why."""
    from mmkd.evaluation.selection import SelectionError
    from mmkd.steps import Context, run_step
    from tests.conftest import write_params

    uri = f"sqlite:///{tmp_path / 'none.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_params(tmp_path)  # no data/eval: every evaluated set is missing
    ctx = Context.load(tmp_path)
    _install(ctx, suite_ws["checkpoints"]["champion"], 0.5)
    with pytest.raises(SelectionError, match="no selection items"):
        run_step("register", ctx)
    assert MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []


def test_system_metrics_are_sampled_through_a_step_and_can_be_off(tmp_path):
    import time

    from mmkd.tracking.mlflow_runs import Tracker

    uri = f"sqlite:///{tmp_path / 'sys.db'}"
    tracker = Tracker(tmp_path, "sys", uri, system_metrics=0.2)
    with tracker.run("long-step", {}) as run:
        time.sleep(1.0)
    hist = tracker.client.get_metric_history(run.run_id, "system/system_memory_usage_megabytes")
    assert len(hist) >= 2 and [m.step for m in hist] == list(range(len(hist)))  # whole intervals + the last one
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"
    off = Tracker(tmp_path, "sys", uri, system_metrics=None)
    with off.run("quiet-step", {}) as run:
        pass
    assert not any(k.startswith("system/") for k in off.client.get_run(run.run_id).data.metrics)
