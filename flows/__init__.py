"""Prefect flows: retrain (the pipeline), evaluate (re-score the models) and inbox (retrain when new data arrives).

Importing the package sets offline-safe defaults for what the flows start (a variable already set wins): no
telemetry attempts from Prefect's server or MLflow on a machine without internet (each would log an ERROR),
the platform's `mmkd` log lines captured into the Prefect UI, and more than Prefect's 20 s for its temporary
server to start on a busy 2-core machine.
"""

import os
import sys

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",           # the server's telemetry: an ERROR line offline
    "MLFLOW_DISABLE_TELEMETRY": "true",                    # MLflow's usage telemetry
    "PREFECT_LOGGING_EXTRA_LOGGERS": "mmkd",               # mmkd's log lines in the Prefect UI ...
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # ... and no warning for them outside a flow run
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server on a busy 2-core machine
}
if not sys.stderr.isatty():  # MLflow's artifact bars: carriage-return noise in a log file
    OFFLINE_DEFAULTS["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
for _key, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
