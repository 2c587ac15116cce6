#!/usr/bin/env bash
# Real slides from openslide-python 1.4.7's sdist (tests/fixtures; LGPL-2.1-only, as the package): small.svs (an
# Aperio SVS, 16x16, 0.499 um/px), unreadable.svs (opens, its tile data is corrupt), boxes.tiff (a generic
# pyramidal TIFF, 300x250, 4 levels), unopenable.tiff (a TIFF OpenSlide refuses). Used by tests/test_source_wsi.py.
set -euo pipefail
dest=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP" download --quiet --no-deps --no-binary :all: openslide-python==1.4.7 -d "$tmp"
tar -xzf "$tmp/openslide_python-1.4.7.tar.gz" -C "$tmp" openslide_python-1.4.7/tests/fixtures openslide_python-1.4.7/COPYING.LESSER
for f in small.svs unreadable.svs boxes.tiff unopenable.tiff; do
  cp "$tmp/openslide_python-1.4.7/tests/fixtures/$f" "$dest/$f"
done
cp "$tmp/openslide_python-1.4.7/COPYING.LESSER" "$dest/LICENSE"
