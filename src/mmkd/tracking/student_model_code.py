"""MLflow models-from-code entry: the logged student is rebuilt from this file, not unpickled."""

import mlflow

from mmkd.tracking.pyfunc import StudentEmbedder

mlflow.models.set_model(StudentEmbedder())
