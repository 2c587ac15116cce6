"""Owns the promotion gate: a new model version becomes the challenger, and the champion only if a paired comparison
on the selection items says it is not worse than the champion by more than a margin.

The comparison is made now, on the same items, for both models: `compare(champion_version)` (the register step's,
mmkd.evaluation.selection) scores the champion's weights from the registry and returns the paired bootstrap of
challenger - champion (diff, low, high, a, b, n_items, level). Scores recorded at earlier registrations are never
compared: they were measured on other items, or on another evaluation.

The rule, for a new version:
- it gets the challenger alias;
- no champion yet: it becomes the champion;
- the champion is this version (a retried registration): it stays the champion;
- the champion's weights cannot be scored (not an mmkd student, e.g. registered by hand): it becomes the
  champion and the reason says so (refusing would freeze that champion forever);
- otherwise it becomes the champion when the lower bound of the paired CI of challenger - champion is at least
  -margin: not detectably worse by more than the margin, so an equally good retrain on newer data takes over,
  while a difference the bootstrap cannot tell from noise never demotes a better champion by chance.
The decision (difference, bounds, margin, items) goes into the version's tags and the Decision.

Knows nothing of Prefect, DVC, or how the items are scored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

METRIC_TAG = "mmkd.gate_metric"
SCORE_TAG = "mmkd.gate_score"            # the challenger's selection score (never a test-split number)
DECISION_TAG = "mmkd.gate_decision"      # promoted | held
REASON_TAG = "mmkd.gate_reason"
EVALUATION_TAG = "mmkd.gate_evaluation"  # the evaluation the version was reported on (reports/evaluation.json's id)
DATA_TAG = "mmkd.data_version"  # the data it was trained on: data.dvc's hash (set by the register step)
PIPELINE_TAG = "mmkd.pipeline_run"  # the parent run that registered it: a retried register step reuses the version
# the paired comparison with the champion it met: challenger - champion, its CI, the margin, the items
COMPARISON_TAGS = {"difference": "mmkd.gate_difference", "ci_low": "mmkd.gate_ci_low",
                   "ci_high": "mmkd.gate_ci_high", "margin": "mmkd.gate_margin", "n_items": "mmkd.gate_items",
                   "champion_score": "mmkd.gate_champion_score"}


class GateError(ValueError):
    """The gate cannot decide: a comparison without its fields, a bad margin."""


class ChampionUnscorable(RuntimeError):
    """The champion's weights cannot be scored on the selection items (not an mmkd student, no checkpoint)."""


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str                             # the new version (the challenger)
    metric: str                              # what was compared (mmkd.evaluation.selection.METRIC)
    challenger_score: float                  # the challenger's selection score
    previous_champion_version: str | None    # the champion it was compared with (None: there was none)
    champion_score: float | None             # that champion's selection score, measured now (None: not compared)
    champion_version: str                    # the champion after the gate
    promoted: bool
    reason: str
    challenger_alias: str
    champion_alias: str
    evaluation: str | None = None            # the evaluation id the challenger was reported on
    margin: float = 0.0                      # promoted when ci_low >= -margin
    difference: float | None = None          # challenger - champion on the selection items (None: not compared)
    ci_low: float | None = None
    ci_high: float | None = None
    level: float | None = None               # the CI's level
    n_items: int = 0                         # selection items both models were scored on

    def as_dict(self) -> dict:
        return asdict(self)


def _alias_version(client: MlflowClient, model_name: str, alias: str):
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        # a registry without that alias says INVALID_PARAMETER_VALUE "... alias ... not found"
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e.message):
            return None
        raise


def _checked(paired: dict) -> dict:
    missing = [k for k in ("diff", "low", "high", "a", "b", "n_items") if k not in paired]
    if missing:
        raise GateError(f"the comparison lacks {missing}: {sorted(paired)}")
    return paired


def gate(client: MlflowClient, model_name: str, version: str, score: float, metric: str,
         compare: Callable[[str], dict], margin: float = 0.0, challenger_alias: str = "challenger",
         champion_alias: str = "champion", evaluation: str | None = None, n_items: int = 0) -> Decision:
    """Tag `version` with its selection `score`, give it the challenger alias, and move the champion alias to it
    if it passes the gate. `compare(champion_version)`: the paired bootstrap of challenger - champion on the
    selection items ({diff, low, high, a, b, n_items, level}), or ChampionUnscorable."""
    if not (math.isfinite(margin) and margin >= 0):
        raise GateError(f"margin {margin!r} must be a finite number >= 0")
    version = str(version)
    client.set_model_version_tag(model_name, version, METRIC_TAG, metric)
    client.set_model_version_tag(model_name, version, SCORE_TAG, repr(float(score)))
    if evaluation is not None:
        client.set_model_version_tag(model_name, version, EVALUATION_TAG, evaluation)
    client.set_registered_model_alias(model_name, challenger_alias, version)

    champ = _alias_version(client, model_name, champion_alias)
    champ_version = str(champ.version) if champ is not None else None
    paired: dict | None = None
    if champ is None:
        promoted, reason = True, f"no {champion_alias} yet: version {version} is the first"
    elif champ_version == version:  # gated again (a retried registration): it stays what it became
        promoted = True
        reason = (champ.tags or {}).get(REASON_TAG) or f"version {version} is already {champion_alias}"
    else:
        try:
            paired = _checked(compare(champ_version))
        except ChampionUnscorable as e:
            promoted, reason = True, f"{champion_alias} v{champ_version} cannot be scored on the selection items ({e})"
        else:
            promoted = bool(paired["low"] >= -margin)  # a NaN bound (too few resamples defined) never passes
            level = paired.get("level", 0.95)
            reason = (f"{metric}: challenger {paired['a']:.4f} - {champion_alias} v{champ_version} {paired['b']:.4f} "
                      f"= {paired['diff']:+.4f}, {level:.0%} paired CI [{paired['low']:+.4f}, {paired['high']:+.4f}] "
                      f"over {paired['n_items']} items; lower bound {'>=' if promoted else '<'} -margin "
                      f"{-margin:.4f}")
            if not promoted:
                reason += f": {champion_alias} stays on v{champ_version}"
    if promoted:
        client.set_registered_model_alias(model_name, champion_alias, version)
    client.set_model_version_tag(model_name, version, DECISION_TAG, "promoted" if promoted else "held")
    client.set_model_version_tag(model_name, version, REASON_TAG, reason)
    decision = Decision(
        model_name=model_name, version=version, metric=metric, challenger_score=float(score),
        previous_champion_version=champ_version, champion_score=None if paired is None else float(paired["b"]),
        champion_version=version if promoted else str(champ_version), promoted=promoted, reason=reason,
        challenger_alias=challenger_alias, champion_alias=champion_alias, evaluation=evaluation, margin=float(margin),
        difference=None if paired is None else float(paired["diff"]),
        ci_low=None if paired is None else float(paired["low"]),
        ci_high=None if paired is None else float(paired["high"]),
        level=None if paired is None else float(paired.get("level", 0.95)),
        n_items=int(paired["n_items"]) if paired is not None else int(n_items))
    for field, tag in COMPARISON_TAGS.items():
        value = getattr(decision, field)
        if value is not None:  # the comparison's fields exist only when a champion was compared
            client.set_model_version_tag(model_name, version, tag, repr(value))
    return decision


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


def register_student(tracking_uri: str, run_id: str, checkpoint: Path, model_name: str, score: float, metric: str,
                     compare: Callable[[str], dict], margin: float = 0.0, challenger_alias: str = "challenger",
                     champion_alias: str = "champion", metadata: dict | None = None,
                     evaluation: str | None = None, serving: dict | None = None,
                     pipeline_run: str | None = None, n_items: int = 0) -> Decision:
    """Log the student checkpoint as a new version of `model_name` (from run `run_id`) and gate it.

    `score` (the challenger's selection score) is computed by the caller before this is called, so a dataset that
    cannot be scored fails before any version is created. `pipeline_run` (the parent run) makes registration
    idempotent: the version is created tagged with it, and a retried register step of the same pipeline run gates
    that version again instead of creating a second one.
    """
    from mmkd.tracking.pyfunc import log_student

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = version_of_pipeline_run(client, model_name, pipeline_run) if pipeline_run else None
    if version is None:
        info = log_student(Path(checkpoint), run_id, tracking_uri, model_name,
                           {**(metadata or {}), "gate_metric": metric, "gate_score": score}, serving=serving,
                           version_tags={PIPELINE_TAG: pipeline_run} if pipeline_run else None)
        version = str(info.registered_model_version)
    return gate(client, model_name, version, score, metric, compare, margin, challenger_alias, champion_alias,
                evaluation, n_items)
