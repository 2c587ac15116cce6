#!/usr/bin/env bash
# Real NRRD volumes from pyradiomics 3.1.0's sdist (data/; BSD-3-Clause, as the package): brain1_image.nrrd (MR,
# 256x256x25 int16, gzip, a flipped y direction), breast1_image.nrrd (MR, 45x120x21 int16, gzip) and lung1_image.nrrd
# (CT, 512x512x48 int16 in HU, gzip). Used by tests/test_source_volume.py and bench/volume_slicing.py.
# The sdist's metadata names another version (3.0.1a1) than its file name, which pip refuses for `pyradiomics==3.1.0`:
# the file is named by its PyPI URL instead, pinned by its sha256.
set -euo pipefail
dest=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
url="https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz"
sha=24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4
"$PIP" download --quiet --no-deps "pyradiomics @ $url#sha256=$sha" -d "$tmp"
echo "$sha  $tmp/pyradiomics-3.1.0.tar.gz" | sha256sum -c --quiet
tar -xzf "$tmp/pyradiomics-3.1.0.tar.gz" -C "$tmp" pyradiomics-3.1.0/data/brain1_image.nrrd \
  pyradiomics-3.1.0/data/breast1_image.nrrd pyradiomics-3.1.0/data/lung1_image.nrrd pyradiomics-3.1.0/LICENSE.txt
cp "$tmp"/pyradiomics-3.1.0/data/{brain1_image,breast1_image,lung1_image}.nrrd "$dest/"
cp "$tmp/pyradiomics-3.1.0/LICENSE.txt" "$dest/LICENSE"
