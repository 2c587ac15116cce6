#!/usr/bin/env bash
# Starts the MLflow UI/tracking server on the project's SQLite store. Loopback only unless MLFLOW_HOST says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
mkdir -p "$root/mlflow_server/artifacts"
echo "MLflow UI on http://$host:$port (store: $root/mlflow_server/mlflow.db)"
exec mlflow server \
  --host "$host" --port "$port" \
  --backend-store-uri "sqlite:///$root/mlflow_server/mlflow.db" \
  --artifacts-destination "$root/mlflow_server/artifacts"
