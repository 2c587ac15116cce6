"""mmkd: multi-teacher distillation of biomedical CLIP models (MMKD-CLIP), as a pipeline library."""

__version__ = "0.1.0"


def load(uri, device: str = "cpu", tracking_uri: str | None = None):
    """The trained student as a torch model: an open_clip CLIP in eval mode.

    `uri`: any MLflow model URI of a registered student (`models:/mmkd-student@champion`,
    `models:/mmkd-student/3`, `runs:/<run_id>/student`) or a local checkpoint folder (`artifacts/student`).
    MLflow URIs resolve against `tracking_uri`, else MLflow's (MLFLOW_TRACKING_URI, mlflow.set_tracking_uri).
    """
    from mmkd.tracking.pyfunc import load_student

    return load_student(uri, device, tracking_uri)[0]


def load_encoder(uri, device: str = "cpu", tracking_uri: str | None = None):
    """The student with its tokenizer and preprocessing (a ClipEncoder): `encode_images` (uint8 NHWC at
    `.spec.size`), `encode_pil` (any size), `encode_texts`; both return L2-normalised numpy embeddings."""
    import open_clip

    from mmkd.models.encoder import ClipEncoder
    from mmkd.tracking.pyfunc import load_student

    model, meta = load_student(uri, device, tracking_uri)
    return ClipEncoder("student", model, open_clip.get_tokenizer(meta["model"]), device)
