"""mmkd: multi-teacher distillation of biomedical CLIP models (MMKD-CLIP), as a pipeline library."""

__version__ = "0.1.0"
