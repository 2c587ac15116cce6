"""Owns the student as an MLflow pyfunc model: base64 images and/or captions in, unit embeddings out."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema


def encode_image_b64(path_or_array) -> str:
    """A PNG file path or uint8 HxWx3 array as the base64 string the model's `image` column takes."""
    if isinstance(path_or_array, (str, Path)):
        return base64.b64encode(Path(path_or_array).read_bytes()).decode()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(path_or_array, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class StudentEmbedder(mlflow.pyfunc.PythonModel):
    """Rows with `image` (base64 PNG/JPEG) and/or `text`; returns `image_embedding` and `text_embedding`."""

    def load_context(self, context):
        import open_clip

        from mmkd.models.encoder import ClipEncoder
        from mmkd.models.factory import load_checkpoint, resolve_device

        device = resolve_device("auto")
        model, meta = load_checkpoint(Path(context.artifacts["checkpoint"]), device)
        self.encoder = ClipEncoder("student", model, open_clip.get_tokenizer(meta["model"]), device)

    def _decode(self, b64: str) -> np.ndarray:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            size = self.encoder.spec.size
            return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        df = pd.DataFrame(model_input)
        out = pd.DataFrame(index=df.index)
        img_emb: list = [None] * len(df)
        txt_emb: list = [None] * len(df)
        if "image" in df:
            rows = [i for i, v in enumerate(df["image"]) if isinstance(v, str) and v]
            if rows:
                emb = self.encoder.encode_images(np.stack([self._decode(df["image"].iloc[i]) for i in rows]))
                for i, e in zip(rows, emb):
                    img_emb[i] = e.astype(float).tolist()
        if "text" in df:
            rows = [i for i, v in enumerate(df["text"]) if isinstance(v, str) and v]
            if rows:
                emb = self.encoder.encode_texts([df["text"].iloc[i] for i in rows])
                for i, e in zip(rows, emb):
                    txt_emb[i] = e.astype(float).tolist()
        out["image_embedding"] = img_emb
        out["text_embedding"] = txt_emb
        return out


def example_input() -> pd.DataFrame:
    return pd.DataFrame({"image": [encode_image_b64(np.zeros((8, 8, 3), np.uint8))], "text": ["a chest X-ray"]})


def signature() -> ModelSignature:
    """Both inputs optional per row: embed an image, a caption, or both."""
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "text", required=False)])
    outputs = Schema([ColSpec(Array("double"), "image_embedding", required=False),
                      ColSpec(Array("double"), "text_embedding", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)
