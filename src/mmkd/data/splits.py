"""Owns split assignment: by group (patient, study, article), so one group never straddles train and evaluation."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "probe", "test")


def group_token(source: str, group: str | None, record_key: str) -> str:
    """A non-identifying token for the record's group; a record without a group is a group of its own.

    Group values (patient ids, ...) are identifiers: only a hash of them is stored in the curated manifest.
    """
    value = f"{source}\x00{group}" if group else f"{source}\x00record\x00{record_key}"
    return hashlib.blake2b(value.encode(), digest_size=10).hexdigest()


def hashed_split(token: str, fractions: dict[str, float]) -> str:
    """A split drawn from the token alone: stable across runs and machines, independent of record order."""
    u = int(hashlib.blake2b(f"split\x00{token}".encode(), digest_size=8).hexdigest(), 16) / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += fractions.get(split, 0.0)
        if u < edge:
            return split
    return next(s for s in reversed(SPLITS) if fractions.get(s, 0.0) > 0)


def assign_split(declared: str | None, group_split: str | None, token: str,
                 fractions: dict[str, float]) -> tuple[str, str]:
    """(split, how). A group already placed keeps its split; else the declared split; else a hashed one."""
    if group_split is not None:
        return group_split, ("group" if declared in (None, group_split) else f"group (declared {declared})")
    if declared is not None:
        return declared, "declared"
    return hashed_split(token, fractions), "hashed"
