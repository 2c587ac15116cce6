#!/usr/bin/env bash
# Install time of the project's environment, two ways side by side in one run (docs/benchmarks.md, "Install"):
# torch from this machine's disk by pip (with and without bytecode compilation), then the rest of the project
# by uv (what `make install` does) and by pip (what it did before). Usage: bash bench/install.sh [PIP_LIMIT_S]
set -uo pipefail
cd "$(dirname "$0")/.."
limit="${1:-600}"   # pip's resolver can backtrack for a long time: stop it after this many seconds
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
quiet() { grep -v -e "^WARNING: Location" -e "does not provide the extra" || true; }
secs() { local s=$(date +%s); "$@"; echo $(( $(date +%s) - s )); }

python3.11 -m venv "$tmp/a" && python3.11 -m venv "$tmp/b"
a_torch=$(secs bash -c "$tmp/a/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | tail -0")
b_torch=$(secs bash -c "$tmp/b/bin/pip install -q --disable-pip-version-check --no-compile torch==2.14.1 torchvision==0.29.1 2>&1 | tail -0")
a_rest=$(secs bash -c "$tmp/a/bin/pip install -q --disable-pip-version-check 'uv>=0.5' 2>&1 | tail -0; $tmp/a/bin/uv pip install -q --python $tmp/a/bin/python -e '.[dev]'")
b_rest=$(secs bash -c "timeout $limit $tmp/b/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | tail -0")
echo "torch by pip, compiled: ${a_torch} s; --no-compile: ${b_torch} s"
echo "the rest by uv: ${a_rest} s; by pip: ${b_rest} s (stopped at ${limit} s if it got there)"
