"""Benchmark: the feature store's index at 1 M to 10 M (sample, teacher) rows, SQLite rows table against the store's.

Builds real stores through the store's API (register_set, write_shard with dim 1 float16 shards, commit), in
units of `features.unit_records` rows, and next to each the old layout's index (a frozen copy of the SQLite
`rows` table code the store used before, in `legacy.sqlite`, committed from the same shards). Then, each in a
fresh child process (peak RSS = VmHWM of that process, and its growth over the process's RSS just before the
operation, i.e. without the query keys the caller holds anyway):
  commit   time per row entering the index (build), index bytes per row
  open     opening the store and the per-shard check of every shard on first open (sizes, headers, keys against
           the index; sha256 off, it is the shard files' cost, not the index's)
  present  a unit's keys (half of them in the store) -> which have features
  locate   all keys of one teacher (a whole split), random order; and random batches of 128
Usage:  .venv/bin/python bench/index_scaling.py --rows 1000000 3000000 10000000 --work /tmp/hidx/work
"""

from __future__ import annotations

import argparse
import binascii
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mmkd.features.checks import KEY_DTYPE, check_keys
from mmkd.features.store import FeatureStore, write_shard

UNIT = 16384  # features.unit_records' default
BATCH = 128


def keys_of(teacher: int, start: int, n: int, seed: int = 0) -> np.ndarray:
    """n distinct content hashes (S32 hex), the same for every teacher (a sample has a row per teacher)."""
    del teacher
    raw = np.random.default_rng([seed, start]).bytes(16 * n)
    return np.frombuffer(binascii.hexlify(raw), dtype=KEY_DTYPE).copy()


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Legacy:
    """The old index: rows(teacher, version, key -> shard, row) in SQLite, as store.py kept it before."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, timeout=60)
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS rows (teacher TEXT, version TEXT, key BLOB, shard INTEGER, row INTEGER,
                                             PRIMARY KEY (teacher, version, key)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS rows_by_shard ON rows (shard, row);""")

    def commit(self, teacher, version, sid, keys) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO rows VALUES (?,?,?,?,?)",
                                ((teacher, version, bytes.fromhex(k.decode()), sid, i) for i, k in enumerate(keys)))

    def present(self, teacher, version, keys) -> set:
        out = set()
        for i in range(0, len(keys), 900):
            chunk = [bytes.fromhex(k) for k in keys[i : i + 900]]
            q = f"SELECT key FROM rows WHERE teacher=? AND version=? AND key IN ({','.join('?' * len(chunk))})"
            out.update(k.hex() for (k,) in self.db.execute(q, (teacher, version, *chunk)))
        return out

    def locate(self, teacher, version, keys):
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        shard = np.full(len(keys), -1, np.int64)
        row = np.full(len(keys), -1, np.int64)
        cur = self.db.execute("SELECT key, shard, row FROM rows WHERE teacher=? AND version=?", (teacher, version))
        while batch := cur.fetchmany(65536):
            k = np.array([b.hex().encode() for b, _, _ in batch], dtype=KEY_DTYPE)
            pos = np.searchsorted(ordered, k)
            hit = pos < len(ordered)
            hit[hit] = ordered[pos[hit]] == k[hit]
            vals = np.array([(s, r) for _, s, r in batch], dtype=np.int64)
            shard[order[pos[hit]]] = vals[hit, 0]
            row[order[pos[hit]]] = vals[hit, 1]
        return shard, row

    def check(self, sid, path: Path, n: int) -> list:
        return check_keys(path, n, self.db.execute("SELECT key, row FROM rows WHERE shard=?", (sid,)))


def build(root: Path, rows: int, teachers: int, old: bool) -> dict:
    """A store of `rows` rows: teachers x rows/teachers keys, in shards of UNIT rows, committed unit by unit (and
    the same rows into the old layout's index if `old`)."""
    store = FeatureStore(root, create=True)
    legacy = Legacy(root / "legacy.sqlite") if old else None
    per = rows // teachers
    t_write = t_new = t_old = 0.0
    one = np.ones((UNIT, 1), np.float16)
    for t in range(teachers):
        store.register_set(f"t{t}", "v1", 1, "float16")
        for start in range(0, per, UNIT):
            keys = keys_of(t, start, min(UNIT, per - start))
            t0 = time.perf_counter()
            write_shard(root, f"t{t}", "v1", f"{start:09d}", keys, one[: len(keys)], one[: len(keys)], 1, "float16")
            t1 = time.perf_counter()
            store.commit(f"t{t}", "v1", f"{start:09d}")
            t2 = time.perf_counter()
            if legacy is not None:
                sid = store.db.execute("SELECT id FROM shards WHERE teacher=? AND unit=?", (f"t{t}", f"{start:09d}"))
                legacy.commit(f"t{t}", "v1", sid.fetchone()[0], keys)
            t3 = time.perf_counter()
            t_write, t_new, t_old = t_write + t1 - t0, t_new + t2 - t1, t_old + t3 - t2
    store.close()
    out = {"write_s": t_write, "commit_s": {"new": t_new}, "index_bytes": {"new": index_bytes(root)}}
    if legacy is not None:
        legacy.db.close()
        out["commit_s"]["old"], out["index_bytes"]["old"] = t_old, (root / "legacy.sqlite").stat().st_size
    return out


def index_bytes(root: Path) -> int:
    """Bytes of the store's index: index.sqlite and the key index's run files, not the shards."""
    return sum(f.stat().st_size for f in [root / "index.sqlite", *(root / "keyindex").glob("**/*")] if f.is_file())


def child(op: str, layout: str, root: Path, rows: int, teachers: int) -> dict:
    """One operation in this (fresh) process; returns seconds, items, VmHWM and its growth over the start."""
    per = rows // teachers
    rng = np.random.default_rng(1)
    if op == "locate_split":
        query = np.concatenate([keys_of(0, s, min(UNIT, per - s)) for s in range(0, per, UNIT)])
        query = query[rng.permutation(len(query))]
    elif op == "locate_batches":
        units = rng.integers(0, (per + UNIT - 1) // UNIT, 64)
        sizes = [min(UNIT, per - int(u) * UNIT) for u in units]
        query = np.stack([keys_of(0, int(u) * UNIT, n)[rng.choice(n, BATCH, replace=False)]
                          for u, n in zip(units, sizes)])
    elif op == "present":
        # a unit's worth of keys, half of them stored (the first unit's), half new
        query = [k.decode() for k in np.concatenate([keys_of(0, 0, min(UNIT, per))[: UNIT // 2],
                                                     keys_of(0, 10**12, UNIT // 2)])]
    start_kib = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS (Linux >= 4.0)
        fh.write("5")
    t0 = time.perf_counter()
    found = items = 0
    if op == "open":  # sha256 off: hashing is the files' cost per byte, the same in both layouts
        store = FeatureStore(root, hash_on_open=False)
        legacy = Legacy(root / "legacy.sqlite") if layout == "old" else None
        for sid, t, v, u, n in store.db.execute("SELECT id, teacher, version, unit, rows FROM shards").fetchall():
            store.arrays(sid)  # sizes and headers (the old store also compared keys.npy with the index's rows)
            if legacy is not None:
                assert not legacy.check(sid, root / "shards" / t / v / f"{u}.keys.npy", n)
            items += n
        if legacy is None:  # the key index's runs: sizes checked when first searched
            for s in store.sets():
                store.locate(s["teacher"], s["version"], keys_of(0, 0, 1))
    else:
        store = FeatureStore(root, hash_on_open=False) if layout == "new" else Legacy(root / "legacy.sqlite")
        if op == "present":
            t0 = time.perf_counter()
            for _ in range(3):
                found = len(store.present("t0", "v1", query))
            items = 3 * len(query)
            assert found == min(UNIT // 2, per), found
        elif op == "locate_split":
            shard, _ = store.locate("t0", "v1", query)
            items, found = len(query), int((shard >= 0).sum())
            assert found == len(query)
        else:
            stop = time.perf_counter() + 20  # as many batches as 20 s allow (at least 2)
            for b in query:
                found += int((store.locate("t0", "v1", b)[0] >= 0).sum())
                items += len(b)
                if time.perf_counter() > stop and items >= 2 * BATCH:
                    break
            assert found == items
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "items": items, "per_item_us": 1e6 * seconds / items,
            "hwm_kib": rss_kib("VmHWM"), "growth_kib": rss_kib("VmHWM") - start_kib}


def run_child(op: str, layout: str, root: Path, rows: int, teachers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", op, layout, str(root), "--rows", str(rows),
                          "--teachers", str(teachers)], capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{op}/{layout} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown: per operation and size, old and new, their ratio, and each layout's 10x-rows growth."""
    lines = ["| operation | rows | old µs/item | new µs/item | old/new | old RSS growth MiB | new RSS growth MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for op in ("commit", "open", "present", "locate_split", "locate_batches"):
        for r in results:
            if op == "commit":  # measured in the building process, not a child: time only
                c = r["commit_s"]
                lines.append(f"| commit | {r['rows']:,} | {1e6 * c['old'] / r['rows']:.3g} | "
                             f"{1e6 * c['new'] / r['rows']:.3g} | {c['old'] / c['new']:.3g} | - | - |")
                continue
            o, n = r["ops"][op]["old"], r["ops"][op]["new"]
            lines.append(f"| {op} | {r['rows']:,} | {o['per_item_us']:.3g} | {n['per_item_us']:.3g} | "
                         f"{o['per_item_us'] / n['per_item_us']:.3g} | {o['growth_kib'] / 1024:.1f} | "
                         f"{n['growth_kib'] / 1024:.1f} |")
    lines.append("")
    lines.append("| index | rows | old bytes/row | new bytes/row |")
    lines.append("|---|---:|---:|---:|")
    for r in results:
        lines.append(f"| size | {r['rows']:,} | {r['index_bytes']['old'] / r['rows']:.1f} | "
                     f"{r['index_bytes']['new'] / r['rows']:.1f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        lines += ["", f"Ratio {b['rows']:,} rows / {a['rows']:,} rows (flat = 1; the issue's bounds: time 1.5x, "
                  "RSS 1.3x). locate_split's RSS growth is per key located (its input and its [n] outputs grow "
                  "with the split); the others' is absolute (a fixed query):", "",
                  "| operation | old time | new time | old RSS growth | new RSS growth |", "|---|---:|---:|---:|---:|"]
        for op in ("commit", "open", "present", "locate_split", "locate_batches"):
            ra = [b["ops"][op][x]["per_item_us"] / a["ops"][op][x]["per_item_us"] for x in ("old", "new")]
            per = (lambda r, x: r["ops"][op][x]["items"]) if op == "locate_split" else (lambda r, x: 1)
            rr = [max(b["ops"][op][x]["growth_kib"], 1) / per(b, x)
                  / (max(a["ops"][op][x]["growth_kib"], 1) / per(a, x)) for x in ("old", "new")]
            rr_s = ["-", "-"] if op == "commit" else [f"{v:.2f}" for v in rr]
            lines.append(f"| {op} | {ra[0]:.2f} | {ra[1]:.2f} | {rr_s[0]} | {rr_s[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/hidx/work"))
    ap.add_argument("--out", type=Path, default=None, help="append the results (JSON list) here")
    ap.add_argument("--keep", action="store_true", help="keep the stores (default: each removed after its size)")
    ap.add_argument("--old-from", type=Path, default=None, help="take the old layout's numbers from this earlier "
                    "--out file (same sizes) instead of building its index again (at 10 M rows: 20+ minutes)")
    ap.add_argument("--child", nargs=3, metavar=("OP", "LAYOUT", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]), args.rows[0], args.teachers)))
        return
    results = []
    earlier = {r["rows"]: r for r in json.loads(args.old_from.read_text())} if args.old_from else {}
    for rows in args.rows:
        root = args.work / f"store_{rows}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        built = build(root, rows, args.teachers, old=rows not in earlier)
        res = {"rows": rows, "teachers": args.teachers, "unit": UNIT, **built, "ops": {}}
        print(f"{rows:,} rows built in {time.perf_counter() - t0:.0f} s: {json.dumps(built)}", flush=True)
        for op in ("open", "present", "locate_split", "locate_batches"):
            res["ops"][op] = {x: run_child(op, x, root, rows, args.teachers) for x in ("old", "new")
                              if x == "new" or rows not in earlier}
            print(f"  {op}: {json.dumps(res['ops'][op])}", flush=True)
        if rows in earlier:
            res["old_from"] = str(args.old_from)
            res["commit_s"]["old"] = earlier[rows]["commit_s"]["old"]
            res["index_bytes"]["old"] = earlier[rows]["index_bytes"]["old"]
            for op in ("open", "present", "locate_split", "locate_batches"):
                res["ops"][op]["old"] = earlier[rows]["ops"][op]["old"]
        res["ops"]["commit"] = {x: {"per_item_us": 1e6 * res["commit_s"][x] / rows, "growth_kib": 0, "items": rows}
                                for x in ("old", "new")}
        results.append(res)
        if args.out:
            prev = json.loads(args.out.read_text()) if args.out.exists() else []
            args.out.write_text(json.dumps(prev + [res], indent=1))
        if not args.keep:
            shutil.rmtree(root)
    print(table(results))


if __name__ == "__main__":
    main()
