"""Owns split assignment: by group (patient, study, article), so one group never straddles train and evaluation.

Group values (patient ids, ...) are identifiers. The manifest stores only a keyed token of them (HMAC-SHA256
under a per-workspace secret): short ids cannot be brute-forced back from it without the secret. The split is
drawn from an unkeyed hash of the group instead, so a clone with another secret (or none) gets the same splits.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from mmkd.atomic import fsync_dir, temp_path

log = logging.getLogger("mmkd")
SPLITS = ("train", "probe", "test")
KEY_ENV = "MMKD_GROUP_KEY"           # hex; a team sharing one key sets it on every machine
SECRET_FILE = Path(".mmkd") / "secret"
KEY_BYTES = 32
KEY_ID_FILE = "group_key.id"         # in the curated store: which key its tokens are under (not the key)


class GroupToken(str):
    """The keyed token, as stored; `.draw` is the unkeyed hash the split is drawn from (never stored)."""

    draw: str

    def __new__(cls, token: str, draw: str) -> "GroupToken":
        obj = super().__new__(cls, token)
        obj.draw = draw
        return obj

    def __reduce__(self):  # pickles with its draw (str's own reduction would drop it)
        return GroupToken, (str(self), self.draw)


def group_token(source: str, group: str | None, record_key: str, key: bytes | None = None) -> GroupToken:
    """A non-identifying token for the record's group; a record without a group is a group of its own.

    key: the workspace secret (workspace_key); without one the token is the unkeyed hash (libraries' and tests'
    default; the curate step always passes the key)."""
    value = (f"{source}\x00{group}" if group else f"{source}\x00record\x00{record_key}").encode()
    draw = hashlib.blake2b(value, digest_size=10).hexdigest()
    token = hmac.new(key, value, hashlib.sha256).hexdigest()[:20] if key else draw
    return GroupToken(token, draw)


def keyed_token(key: bytes) -> Callable[[str], str]:
    """Any identifying string -> a keyed token (equal values, equal tokens), for what leaves the machine."""
    return lambda value: "tok-" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


def key_id(key: bytes | None) -> str:
    """Which key tokenised a store, without revealing it: a store made under another key is re-tokenised."""
    return hmac.new(key, b"mmkd group key id", hashlib.sha256).hexdigest()[:16] if key else "unkeyed"


def rekey_needed(curated: Path, key: bytes | None) -> bool:
    """True when the curated store's tokens were made under another key (or before keys): reusing its manifest
    lines would mix two tokens for one group, so curation must run from scratch."""
    stored = Path(curated) / KEY_ID_FILE
    if not (Path(curated) / "manifest.jsonl").exists():
        return False
    return not stored.exists() or stored.read_text().strip() != key_id(key)


def workspace_key(root: Path) -> bytes:
    """The workspace's group-token secret: $MMKD_GROUP_KEY (hex) if set, else <root>/.mmkd/secret, created once
    (secrets.token_bytes, mode 0600, outside git and DVC outputs). Concurrent first runs agree on one key."""
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = bytes.fromhex(env.strip())
        except ValueError:
            raise ValueError(f"{KEY_ENV} must be hex (e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
        if len(key) < 16:
            raise ValueError(f"{KEY_ENV} is {len(key)} bytes; at least 16 are needed")
        return key
    path = Path(root) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another run created it first: both then read that one, whole
            fsync_dir(path.parent)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): set to 0600", path, mode)
        os.chmod(path, 0o600)
    key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path} holds {len(key)} bytes, not a key: remove it to create a new one "
                         "(group tokens of the curated store change)")
    return key


def hashed_split(token: str, fractions: dict[str, float]) -> str:
    """A split drawn from the token's unkeyed hash alone: stable across runs, machines and secrets."""
    token = getattr(token, "draw", token)
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
