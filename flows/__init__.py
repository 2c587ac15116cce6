"""Prefect flows: retrain (the pipeline), evaluate (re-score the models) and inbox (retrain when new data arrives).

Importing the package sets offline-safe defaults for what the flows start (a variable already set wins): no
telemetry attempts from Prefect's server or MLflow on a machine without internet (each would log an ERROR),
the platform's `mmkd` log lines captured into the Prefect UI, and more than Prefect's 20 s for its temporary
server to start on a busy 2-core machine.
"""

import os

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "mmkd",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_key, _value)
