"""Owns `mmkd data report`: what the curated store holds, per source, modality and split, and why records were refused."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mmkd.data.manifest import read_manifest


def curation_report(curated_dir: Path) -> str:
    curated_dir = Path(curated_dir)
    summary_path = curated_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{curated_dir}: no curated store yet; run `mmkd stage curate`")
    summary = json.loads(summary_path.read_text())
    records = read_manifest(curated_dir / "manifest.jsonl")
    quarantine = read_manifest(curated_dir / "quarantine.jsonl")
    lines = [f"curated store {curated_dir}: {summary['kept']} kept, {summary['quarantined']} quarantined of "
             f"{summary['input_records']} records; {summary['shards']} shards"]

    def table(title: str, counts: Counter) -> None:
        lines.append(f"\n{title}")
        width = max([len(str(k)) for k in counts] + [4])
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            lines.append(f"  {str(key):<{width}}  {n:>8}")
        if not counts:
            lines.append("  (none)")

    table("per source", Counter(f"{r['source']} kept" for r in records)
          + Counter(f"{q.get('source')} quarantined" for q in quarantine))
    table("per modality", Counter(r["modality"] for r in records))
    table("modality resolved from", Counter(r["modality_from"] for r in records))
    table("per split", Counter(r["split"] for r in records))
    table("split assigned by", Counter(r["split_from"].split(" ")[0] for r in records))
    table("quarantine reasons", Counter(q["category"] for q in quarantine))
    table("identifiers scrubbed from captions", Counter(summary.get("scrubbed_identifiers", {})))
    return "\n".join(lines)
