"""Owns the promotion gate: a new model version becomes the challenger, and the champion only if it scores as well.

Every registered version is tagged with the held-out score it was registered with (`mmkd.gate_metric`,
`mmkd.gate_score`), so the champion's score is read from the registry, never recomputed. The score is a
dotted path into reports/metrics.json (model -> held-out set -> metric), by default
`student.mean.zeroshot_acc1`: the student's zero-shot top-1 accuracy averaged over the held-out test sets.

The rule, for a new version with score s:
- it gets the challenger alias;
- no champion yet: it becomes the champion;
- the champion has no comparable score (no score tag, an unreadable one, one of another metric, e.g. after
  `register.metric` changed, or one measured on another evaluation: other datasets, sizes or task settings):
  it becomes the champion, and the reason says so (refusing would freeze the champion forever; a version
  scored by another metric or on other data cannot be compared);
- otherwise it becomes the champion when s >= the champion's score (s <= when lower is better), ties included,
  so an equally good retrain on newer data replaces the old champion.

Knows nothing of Prefect or DVC.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

METRIC_TAG = "mmkd.gate_metric"
SCORE_TAG = "mmkd.gate_score"
DECISION_TAG = "mmkd.gate_decision"  # promoted | held
REASON_TAG = "mmkd.gate_reason"
EVALUATION_TAG = "mmkd.gate_evaluation"  # what the score was measured on (reports/evaluation.json's id)
DATA_TAG = "mmkd.data_version"  # the data it was trained on: data.dvc's hash (set by the register step)
PIPELINE_TAG = "mmkd.pipeline_run"  # the parent run that registered it: a retried register step reuses the version


class GateError(ValueError):
    """The gate's metric cannot be read (a bad path, a missing or non-finite value)."""


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str                             # the new version (the challenger)
    metric: str
    higher_is_better: bool
    challenger_score: float
    previous_champion_version: str | None    # the champion it was compared with (None: there was none)
    champion_score: float | None             # that champion's recorded score (None: none comparable)
    champion_version: str                    # the champion after the gate
    promoted: bool
    reason: str
    challenger_alias: str
    champion_alias: str
    evaluation: str | None = None            # the evaluation id the challenger's score was measured on

    def as_dict(self) -> dict:
        return asdict(self)


def metric_value(metrics: dict, path: str) -> float:
    """The number at a dotted `path` (e.g. `student.mean.zeroshot_acc1`) of a nested dict.

    Keys may themselves contain dots: at each level the longest matching key wins.
    """
    node, parts, walked = metrics, path.split("."), []
    while parts:
        if not isinstance(node, dict):
            raise GateError(f"metric '{path}': '{'.'.join(walked)}' is a value, not a section")
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                node, parts = node[key], parts[n:]
                walked.append(key)
                break
        else:
            where = ".".join(walked) or "the top level"
            raise GateError(f"metric '{path}': no '{parts[0]}' under {where}; keys there: {sorted(node)}")
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        raise GateError(f"metric '{path}' is {node!r}, not a finite number")
    return float(node)


def read_score(metrics_path: Path, path: str) -> float:
    """The gate's score from a metrics file (reports/metrics.json: model -> held-out set -> metric)."""
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        raise GateError(f"{metrics_path} missing: run evaluate before register")
    return metric_value(json.loads(metrics_path.read_text()), path)


def better_or_equal(challenger: float, champion: float, higher_is_better: bool = True) -> bool:
    return challenger >= champion if higher_is_better else challenger <= champion


def _alias_version(client: MlflowClient, model_name: str, alias: str):
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        # a registry without that alias says INVALID_PARAMETER_VALUE "... alias ... not found"
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e.message):
            return None
        raise


def _recorded_score(version, metric: str, evaluation: str | None = None) -> tuple[float | None, str]:
    """(score, '') when the version carries a score of `metric` (on `evaluation`, when given), else (None, why)."""
    tags = version.tags or {}
    if SCORE_TAG not in tags or METRIC_TAG not in tags:
        return None, "no gate score recorded"
    if tags[METRIC_TAG] != metric:
        return None, f"scored by '{tags[METRIC_TAG]}', not '{metric}'"
    if evaluation is not None and tags.get(EVALUATION_TAG) != evaluation:
        return None, f"scored on another evaluation ({tags.get(EVALUATION_TAG, 'none recorded')}, now {evaluation})"
    try:
        score = float(tags[SCORE_TAG])
    except ValueError:
        return None, f"unreadable score '{tags[SCORE_TAG]}'"
    return (score, "") if math.isfinite(score) else (None, f"non-finite score '{tags[SCORE_TAG]}'")


def gate(client: MlflowClient, model_name: str, version: str, score: float, metric: str,
         higher_is_better: bool = True, challenger_alias: str = "challenger",
         champion_alias: str = "champion", evaluation: str | None = None) -> Decision:
    """Tag `version` with its score, give it the challenger alias, and move the champion alias to it if it wins.
    `evaluation`: the id of what the score was measured on; a champion scored on another one is not compared."""
    version = str(version)
    client.set_model_version_tag(model_name, version, METRIC_TAG, metric)
    client.set_model_version_tag(model_name, version, SCORE_TAG, repr(float(score)))
    if evaluation is not None:
        client.set_model_version_tag(model_name, version, EVALUATION_TAG, evaluation)
    client.set_registered_model_alias(model_name, challenger_alias, version)

    champ = _alias_version(client, model_name, champion_alias)
    champ_version = str(champ.version) if champ is not None else None
    champ_score = None
    if champ is None:
        promoted, reason = True, f"no {champion_alias} yet: version {version} is the first"
    elif champ_version == version:  # gated again (a retried registration): it stays what it became
        promoted = True
        reason = (champ.tags or {}).get(REASON_TAG) or f"version {version} is already {champion_alias}"
    else:
        champ_score, why = _recorded_score(champ, metric, evaluation)
        if champ_score is None:
            promoted, reason = True, f"{champion_alias} v{champ_version} has no comparable score ({why})"
        else:
            promoted = better_or_equal(score, champ_score, higher_is_better)
            op = (">=" if promoted else "<") if higher_is_better else ("<=" if promoted else ">")
            reason = (f"{metric} {score:.6g} {op} {champ_score:.6g} of {champion_alias} v{champ_version} "
                      f"({'higher' if higher_is_better else 'lower'} is better)")
            if not promoted:
                reason += f": {champion_alias} stays on v{champ_version}"
    if promoted:
        client.set_registered_model_alias(model_name, champion_alias, version)
    client.set_model_version_tag(model_name, version, DECISION_TAG, "promoted" if promoted else "held")
    client.set_model_version_tag(model_name, version, REASON_TAG, reason)
    return Decision(model_name=model_name, version=version, metric=metric, higher_is_better=higher_is_better,
                    challenger_score=float(score), previous_champion_version=champ_version,
                    champion_score=champ_score, champion_version=version if promoted else str(champ_version),
                    promoted=promoted, reason=reason, challenger_alias=challenger_alias,
                    champion_alias=champion_alias, evaluation=evaluation)


def version_of_pipeline_run(client: MlflowClient, model_name: str, pipeline_run: str) -> str | None:
    """The version of `model_name` that pipeline run `pipeline_run` registered already (an earlier attempt of a
    retried register step), or None."""
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`{PIPELINE_TAG}` = '{pipeline_run}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such registered model yet
            return None
        raise
    return str(min(int(v.version) for v in found)) if found else None


def register_student(tracking_uri: str, run_id: str, checkpoint: Path, metrics_path: Path, model_name: str,
                     metric: str, higher_is_better: bool = True, challenger_alias: str = "challenger",
                     champion_alias: str = "champion", metadata: dict | None = None,
                     evaluation: str | None = None, serving: dict | None = None,
                     pipeline_run: str | None = None) -> Decision:
    """Log the student checkpoint as a new version of `model_name` (from run `run_id`) and gate it.

    The score is read first: a bad metric path fails before any version is created. `pipeline_run` (the parent
    run) makes registration idempotent: the version is created tagged with it, and a retried register step of the
    same pipeline run gates that version again instead of creating a second one.
    """
    from mmkd.tracking.pyfunc import log_student

    score = read_score(metrics_path, metric)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = version_of_pipeline_run(client, model_name, pipeline_run) if pipeline_run else None
    if version is None:
        info = log_student(Path(checkpoint), run_id, tracking_uri, model_name,
                           {**(metadata or {}), "gate_metric": metric, "gate_score": score}, serving=serving,
                           version_tags={PIPELINE_TAG: pipeline_run} if pipeline_run else None)
        version = str(info.registered_model_version)
    return gate(client, model_name, version, score, metric, higher_is_better, challenger_alias, champion_alias,
                evaluation)
