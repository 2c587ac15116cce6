#!/usr/bin/env bash
# Team MLflow server on a real host: an existing PostgreSQL database and S3 bucket, both named by environment
# variables (mlflow_server/README.md). Loopback only unless MLFLOW_HOST says otherwise.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set it to the PostgreSQL database, e.g. postgresql://mlflow:PASSWORD@db-host:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set it to the S3 prefix for artifacts, e.g. s3://mmkd/mlflow}"
: "${AWS_ACCESS_KEY_ID:?set it (with AWS_SECRET_ACCESS_KEY) to keys that may write the bucket; only this server needs them}"
: "${AWS_SECRET_ACCESS_KEY:?set it to the secret of AWS_ACCESS_KEY_ID}"
# MLFLOW_S3_ENDPOINT_URL: the S3 endpoint when it is not AWS (SeaweedFS, MinIO, Ceph), e.g. http://s3-host:8333
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
auth=()
if [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then  # basic-auth: users and permissions in the ini's database_uri
  : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it to a long random string, the same on every server of the team}"
  auth=(--app-name basic-auth)
fi
# MLflow's job runner serves GenAI jobs this project has none of
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "MLflow on http://$host:$port (artifacts: $MLFLOW_ARTIFACTS_DESTINATION${auth:+, basic-auth})"
exec mlflow server --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-4}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" "${auth[@]}"
