"""Owns the student as an MLflow pyfunc model: base64 images and/or captions in, unit embeddings out.

`log_student` logs (and registers) it with the serving limits as its model_config; `load_student` turns any
model URI back into the torch model. A refused request is an MLflow error with its HTTP status (400, 413 too
large, 504 past the server's timeout) and a message naming the rows, never a stack trace.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED
from mlflow.types.schema import Array, ColSpec, Schema

_logger = logging.getLogger(__name__)
_CODES = {400: INVALID_PARAMETER_VALUE, 413: RESOURCE_EXHAUSTED, 504: DEADLINE_EXCEEDED, 500: INTERNAL_ERROR}


def encode_image_b64(path_or_array) -> str:
    """An image file's bytes (any format the model reads, DICOM and NIfTI included) or a uint8 HxWx3 array (as PNG)
    as the base64 string the model's `image` column takes."""
    if isinstance(path_or_array, (str, Path)):
        return base64.b64encode(Path(path_or_array).read_bytes()).decode()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(path_or_array, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class ServingRefusal(MlflowException):
    """A refused request as MLflow's scoring server answers it: `status` as the HTTP status (MLflow maps error
    codes to 400/429/500/504 only; 413 needs this), the model's message as the body's."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message, error_code=_CODES.get(status, INVALID_PARAMETER_VALUE))
        self.status = status

    def get_http_status_code(self) -> int:
        return self.status

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        # the scoring server re-wraps it as "Failed to predict data '<the request's rows>'. Error: ...": that would
        # echo the client's images (base64) into the error body and the logs; the first message is kept
        if "_message" not in self.__dict__:
            self._message = value


class StudentEmbedder(mlflow.pyfunc.PythonModel):
    """Rows with `image` (base64 bytes of an image file: PNG/JPEG/TIFF/BMP/WebP incl. 16-bit, DICOM, NIfTI) and/or
    `text`; returns `image_embedding` and `text_embedding`. Images are held to the serving limits it was logged
    with (its model_config; defaults for a model logged before them)."""

    def load_context(self, context):
        import open_clip

        from mmkd.config import ServingCfg
        from mmkd.models.encoder import ClipEncoder
        from mmkd.models.factory import load_checkpoint, resolve_device
        from mmkd.serving.requests import DecodeGate

        device = resolve_device("auto")
        model, meta = load_checkpoint(Path(context.artifacts["checkpoint"]), device)
        self.encoder = ClipEncoder("student", model, open_clip.get_tokenizer(meta["model"]), device)
        config = dict(getattr(context, "model_config", None) or {})
        self.limits = ServingCfg(**{k: v for k, v in config.items() if k in ServingCfg.model_fields})
        self.gate = DecodeGate(self.limits)

    def _view(self, data: bytes, name: str) -> np.ndarray:
        """A row's image through curation's readers (PNG/JPEG/TIFF/BMP/WebP, 16-bit, DICOM, NIfTI) as 8-bit RGB,
        at once resized as the model was trained (its own spec: short side + centre crop), so that a request
        holds one small view per row, not every decoded image."""
        from mmkd.models.preprocess import prepare
        from mmkd.serving.inputs import decode_bytes

        return prepare(decode_bytes(data, name=name, limits=self.limits), self.encoder.spec)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mmkd.serving.requests import RequestError

        try:
            return self._predict(pd.DataFrame(model_input))
        except RequestError as exc:
            raise ServingRefusal(str(exc), exc.status) from None
        except Exception:  # a bug, not the input: the trace goes to the server's log, not to the client
            _logger.exception("mmkd student: predict failed")
            raise ServingRefusal("internal error while embedding the request (the server's log has it)", 500) from None

    def _predict(self, df: pd.DataFrame) -> pd.DataFrame:
        from mmkd.serving.requests import deadline_from_env

        deadline = deadline_from_env()
        self.gate.check_rows(len(df))
        texts = {i: v for i, v in enumerate(df["text"]) if isinstance(v, str) and v} if "text" in df else {}
        self.gate.check_texts(texts)  # before any image is decoded
        out = pd.DataFrame(index=df.index)
        img_emb: list = [None] * len(df)
        txt_emb: list = [None] * len(df)
        if "image" in df:
            payloads = {i: v for i, v in enumerate(df["image"]) if isinstance(v, str) and v}
            if payloads:
                views = self.gate.images(payloads, self._view, deadline)
                emb = self.encoder.encode_pil([views[i] for i in payloads])
                for i, e in zip(payloads, emb):
                    img_emb[i] = e.astype(float).tolist()
        if texts:
            emb = self.encoder.encode_texts(list(texts.values()))
            for i, e in zip(texts, emb):
                txt_emb[i] = e.astype(float).tolist()
        out["image_embedding"] = img_emb
        out["text_embedding"] = txt_emb
        return out


def example_input() -> pd.DataFrame:
    # 32 px: curation's readers refuse images under curate.min_side (16)
    return pd.DataFrame({"image": [encode_image_b64(np.zeros((32, 32, 3), np.uint8))], "text": ["a chest X-ray"]})


def signature() -> ModelSignature:
    """Both inputs optional per row: embed an image, a caption, or both."""
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "text", required=False)])
    outputs = Schema([ColSpec(Array("double"), "image_embedding", required=False),
                      ColSpec(Array("double"), "text_embedding", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


MODEL_NAME = "student"  # the model's name in its run (runs:/<run_id>/student)
# pydicom, nibabel: DICOM / NIfTI request payloads go through curation's readers (mmkd.serving.inputs)
PIP_REQUIREMENTS = ["torch", "open_clip_torch", "safetensors", "pillow", "pandas", "numpy", "pydantic", "pyyaml",
                    "pydicom", "nibabel"]


def log_student(checkpoint: Path, run_id: str, tracking_uri: str, registered_model_name: str | None = None,
                metadata: dict | None = None, serving: dict | None = None, version_tags: dict | None = None):
    """Log a student checkpoint folder as the models-from-code pyfunc `student` of run `run_id`.

    With `registered_model_name` it is also registered as a new version of that model, created with
    `version_tags` (so that a tag and its version exist together or not at all). `serving` (a ServingCfg's fields,
    default its defaults) becomes the model's model_config: the limits the served model enforces.
    Returns MLflow's ModelInfo (`registered_model_version`, `model_uri`).
    """
    from mmkd.config import ServingCfg

    limits = ServingCfg(**(serving or {})).model_dump()
    with _mlflow_uris(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(Path(__file__).with_name("student_model_code.py")),
            artifacts={"checkpoint": str(checkpoint)}, signature=signature(), input_example=example_input(),
            code_paths=[str(Path(__file__).parents[1])], pip_requirements=PIP_REQUIREMENTS, metadata=metadata,
            model_config=limits)
        if registered_model_name:
            version = mlflow.register_model(info.model_uri, registered_model_name, await_registration_for=60,
                                            tags=version_tags)
            info.registered_model_version = int(version.version)
    return info


@contextmanager
def _mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model) on `uri`, then MLflow's global URIs and their env variables as they were
    (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would redirect every later step)."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: os.environ.get(k) for k in names}
    saved = (tracking._tracking_uri, registry._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry._registry_uri = saved[1]
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def checkpoint_dir(uri: str | Path, tracking_uri: str | None = None) -> Iterator[Path]:
    """The local student checkpoint folder (model.json + model.safetensors) behind `uri`, while the context lasts.

    `uri`: a checkpoint folder, a downloaded MLflow model folder, or any MLflow model URI
    (models:/name@alias, models:/name/3, runs:/<run_id>/student, m-<model id> as models:/m-...).
    An MLflow URI's model is downloaded whole (copied, from a local artifact store) into a temporary folder removed
    when the context ends: MLflow's default for a remote store is a fresh temp folder it never removes, one model's
    worth of disk per load. A folder path is used as it is. With `tracking_uri`, MLflow's global tracking/registry
    URIs point at it during the download (not thread-safe).
    """
    import tempfile

    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = Path(str(uri))
    with nullcontext() if local.is_dir() else tempfile.TemporaryDirectory(prefix="mmkd-model-") as tmp:
        if tmp is not None:
            # models:/ URIs resolve against MLflow's global registry URI whatever download_artifacts is given
            with _mlflow_uris(tracking_uri) if tracking_uri else nullcontext():
                local = Path(download_artifacts(artifact_uri=str(uri), dst_path=tmp))
        if (local / "model.json").exists():
            yield local
            return
        if not (local / "MLmodel").exists():
            raise FileNotFoundError(f"{uri}: neither an mmkd checkpoint folder (model.json) nor an MLflow model "
                                    "(MLmodel)")
        yield local / _checkpoint_path(Model.load(str(local / "MLmodel")), str(uri))


def _checkpoint_path(model, where: str) -> str:
    artifacts = (model.flavors.get("python_function") or {}).get("artifacts") or {}
    if "checkpoint" not in artifacts:
        raise ValueError(f"{where}: not an mmkd student model (its pyfunc flavor has no `checkpoint` artifact)")
    return artifacts["checkpoint"]["path"]


def load_student(uri: str | Path, device: str = "cpu", tracking_uri: str | None = None):
    """The student as a torch model (an open_clip CLIP in eval mode) and its checkpoint's metadata."""
    from mmkd.models.factory import load_checkpoint

    with checkpoint_dir(uri, tracking_uri) as folder:  # the weights are in memory before a download is removed
        return load_checkpoint(folder, device)
