"""Owns loading the model users ask for: a registered student by MLflow URI (or a local folder), as an encoder."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "models:/mmkd-student@champion"


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the message names the URI and the tracking store."""


def resolve_tracking_uri(root: Path, explicit: str | None = None, params_path: Path | None = None) -> str:
    """As the pipeline resolves it (mlflow_runs.tracking_uri): --tracking-uri, else MLFLOW_TRACKING_URI, else
    params.yaml's tracking.tracking_uri, else ROOT/mlflow_server/mlflow.db, which must exist."""
    from mmkd.config import load_params
    from mmkd.tracking.mlflow_runs import tracking_uri

    if explicit:
        return explicit
    params_path = Path(params_path) if params_path else Path(root) / "params.yaml"
    configured = load_params(params_path).tracking.tracking_uri if params_path.exists() else None
    if not (os.environ.get("MLFLOW_TRACKING_URI") or configured):
        db = (Path(root) / "mlflow_server" / "mlflow.db").resolve()
        if not db.exists():  # MLflow would silently create an empty store here and then not find the model
            raise ModelError(f"no MLflow store at {db}: run the pipeline first (`mmkd run`), or give "
                             "--tracking-uri / MLFLOW_TRACKING_URI, or a --model folder")
    return tracking_uri(Path(root), configured)


@dataclass
class LoadedModel:
    """The student as an encoder (unit embeddings), its learnt logit scale and where it came from."""

    encoder: object  # mmkd.models.encoder.ClipEncoder
    logit_scale: float
    uri: str
    tracking_uri: str | None
    meta: dict
    version: str | None = None  # the registry version a models:/ URI resolved to

    def describe(self) -> str:
        return self.uri + (f" (v{self.version})" if self.version else "")


def load_model(uri: str = DEFAULT_MODEL, tracking_uri: str | None = None, device: str = "auto") -> LoadedModel:
    """Any MLflow model URI of a student (models:/name@alias, models:/name/3, runs:/<id>/student) or a local
    checkpoint / downloaded model folder."""
    import open_clip
    from mlflow.exceptions import MlflowException

    from mmkd.models.encoder import ClipEncoder
    from mmkd.models.factory import resolve_device
    from mmkd.tracking.pyfunc import load_student

    dev = resolve_device(device)
    local = Path(uri).is_dir()
    try:
        with _quiet_download():
            model, meta = load_student(uri, dev, None if local else tracking_uri)
    except MlflowException as exc:
        raise ModelError(f"cannot load {uri} from {tracking_uri}: {exc.message}") from None
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ModelError(f"cannot load {uri}: {exc}") from None
    encoder = ClipEncoder("student", model, open_clip.get_tokenizer(meta["model"]), dev)
    scale = float(model.logit_scale.detach().exp()) if getattr(model, "logit_scale", None) is not None else 100.0
    return LoadedModel(encoder, scale, str(uri), None if local else tracking_uri, meta,
                       None if local else _registry_version(str(uri), tracking_uri))


@contextmanager
def _quiet_download():
    """No MLflow download bar off a terminal: in a log it is one line of carriage returns per file."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    if before is None and not sys.stderr.isatty():
        os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def _registry_version(uri: str, tracking_uri: str | None) -> str | None:
    """models:/name@alias or models:/name/N -> N (None for other URIs, or when the registry cannot say)."""
    if not uri.startswith("models:/"):
        return None
    name, _, ref = uri[len("models:/"):].partition("@")
    if not ref:
        name, _, ref = name.partition("/")
        return ref if ref.isdigit() else None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return str(client.get_model_version_by_alias(name, ref).version)
    except Exception:  # noqa: BLE001 - the version is a label on the output, never a reason to fail
        return None
