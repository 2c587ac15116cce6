"""Near-duplicate lookups: the same verdicts as an exhaustive search, and bounded work on crowded pHash buckets."""

from __future__ import annotations

import numpy as np
import pytest

from mmkd.data.index import BUCKET_CAP, CONFIRM_CAP, CurationIndex, layout, probes


def _flip(rng, h: int, k: int) -> int:
    for b in rng.choice(64, size=k, replace=False):
        h ^= 1 << int(b)
    return h


def _exhaustive(hashes, thumbs, phash, thumb, bits, max_diff):
    """The rule itself: the earliest image within `bits` pHash bits whose thumbnail differs by <= max_diff."""
    for i, (h, t) in enumerate(zip(hashes, thumbs)):
        d = float(np.abs(t.astype(np.int16) - thumb.astype(np.int16)).mean())
        if bin(h ^ phash).count("1") <= bits and d <= max_diff:
            return f"r{i}", d
    return None


@pytest.mark.parametrize("bits", [0, 1, 2, 4, 6])
def test_pigeonhole_probes_cover_every_hash_within_the_radius(bits):
    rng = np.random.default_rng(bits)
    bands, n = layout(bits)
    assert sum(w for _, w, _ in bands) == 64 and n == len(probes(0, bits))
    for _ in range(300):
        a = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        b = _flip(rng, a, int(rng.integers(0, bits + 1)))
        stored = set(zip(range(len(bands)), [(b >> lo) & ((1 << w) - 1) for lo, w, _ in bands]))
        mine = {(band, v % (1 << 64)) for band, v in probes(a, bits)}
        assert stored & mine, (hex(a), hex(b))


@pytest.mark.parametrize("bits", [1, 4, 6])
def test_verdicts_equal_an_exhaustive_search(bits):
    """Random hashes with planted near copies (k flipped bits, slightly changed thumbnails) and far misses: every
    lookup's verdict equals the exhaustive rule's, and no cap binds on spread-out hashes."""
    rng = np.random.default_rng(7 + bits)
    index = CurationIndex(bits, 2.5)
    hashes, thumbs = [], []
    try:
        for i in range(600):
            if hashes and rng.random() < 0.4:  # a copy of an earlier image, near or beyond the radius
                j = int(rng.integers(0, len(hashes)))
                h = _flip(rng, hashes[j], int(rng.integers(0, bits + 3)))
                t = np.clip(thumbs[j].astype(np.int16) + rng.integers(-4, 5, thumbs[j].shape), 0, 255).astype(np.uint8)
            else:
                h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
                t = rng.integers(0, 256, (32, 32), dtype=np.uint8)
            want = _exhaustive(hashes, thumbs, h, t, bits, 2.5)
            got = index.near_duplicate(h, t)
            assert (got is None) == (want is None) and (got is None or (got[0] == want[0]
                                                                         and got[1] == pytest.approx(want[1]))), i
            if got is None:
                index.add(f"r{len(hashes)}", "s:0", f"d{i}", h, t, f"g{i}", "train")
                hashes.append(h)
                thumbs.append(t)
            else:  # keep indices aligned with rids: a quarantined record is never added
                pass
        assert index.cap_hits == 0 and index.stats["lookups"] == 600
    finally:
        index.close()


def test_a_crowded_bucket_does_not_grow_the_work_per_lookup(caplog):
    """10,000 distinct images with one pHash (flat or synthetic images): a lookup reads at most probes x (cap + 1)
    bucket rows and compares at most CONFIRM_CAP thumbnails, the cap hits are counted and logged, and a re-encoded
    copy of one of the earliest images is still found."""
    rng = np.random.default_rng(3)
    index = CurationIndex(4, 2.5)
    n_probes = layout(4)[1]
    try:
        rows = [(f"r{i}", "s:0", f"d{i}", 0x0F0F, rng.integers(0, 256, (32, 32), dtype=np.uint8), f"g{i}", "train")
                for i in range(10_000)]
        for r in rows:
            index.add(*r)
        for k in range(5):
            before = dict(index.stats)
            copy = np.clip(rows[k][4].astype(np.int16) + 1, 0, 255).astype(np.uint8)
            assert index.near_duplicate(0x0F0F ^ (1 << 40), copy)[0] == f"r{k}"
            assert index.stats["rows"] - before["rows"] <= n_probes * (BUCKET_CAP + 1)
            assert index.stats["confirmed"] - before["confirmed"] <= CONFIRM_CAP
        assert index.near_duplicate(0x0F0F, rng.integers(0, 256, (32, 32), dtype=np.uint8)) is None
        assert index.cap_hits == 6
    finally:
        import logging
        with caplog.at_level(logging.WARNING, logger="mmkd"):
            index.close()
    assert "bound on 6 of 6 lookups" in caplog.text


def test_disabled_and_bits_zero():
    index = CurationIndex(-1, 2.5)
    t = np.zeros((32, 32), np.uint8)
    try:
        index.add("a", "s:0", "d", 5, t, "g", "train")
        assert index.near_duplicate(5, t) is None
    finally:
        index.close()
    index = CurationIndex(0, 0.0)
    try:
        index.add("a", "s:0", "d", 2**64 - 1, t, "g", "train")
        assert index.near_duplicate(2**64 - 1, t) == ("a", 0.0)
        assert index.near_duplicate(2**64 - 2, t) is None
    finally:
        index.close()
