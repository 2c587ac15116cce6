"""The dashboard in a real browser: `mmkd dashboard` on the session's MLflow server (filled by the smoke run), read by
headless Chromium (Debian's, driven by Playwright): the numbers on the page are reports/metrics.json's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from playwright.sync_api import sync_playwright

from dashboards.screenshots import full_screenshot, launch_chromium, open_dashboard, serve
from mmkd.evaluation.report import HEADLINES
from tests.servers import free_port

BIN = Path(sys.executable).parent  # mmkd is a console script of this environment

# every cell of a table: text, link and tooltip (the history's data version holds the full hash in its title)
READ_TABLE = """t => [...t.rows].map(r => [...r.cells].map(c => ({text: c.innerText.trim(),
    href: c.querySelector('a') ? c.querySelector('a').getAttribute('href') : null, title: c.getAttribute('title'),
    task: c.dataset.task || null, modality: c.dataset.modality || null})))"""


@pytest.fixture(scope="module")
def dashboard_url(smoke_run, tracking_server, tmp_path_factory):
    """`mmkd dashboard` against the session's tracking server, on a free port of 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mmkd"), "dashboard", "--tracking-uri", tracking_server["uri"], "--port", str(port)]
    with serve(cmd, url + "/_stcore/health", tmp / "dashboard.log", cwd=str(tmp), env=tracking_server["env"]):
        yield url


def _table(page, test_id: str) -> tuple[list[str], list[list[dict]]]:
    rows = page.eval_on_selector(f"table[data-testid={test_id}]", READ_TABLE)
    return [c["text"] for c in rows[0]], rows[1:]


def _fmt(m: dict, metric: str) -> str:
    if f"{metric}_ci_low" in m:
        return f"{m[metric]:.3f} [{m[metric + '_ci_low']:.3f}, {m[metric + '_ci_high']:.3f}]"
    return f"{m[metric]:.3f}"


def test_the_page_shows_metrics_json_and_the_registered_version(dashboard_url, smoke_run, tracking_server, tmp_path):
    reports = smoke_run["root"] / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    plan = json.loads((reports / "evaluation.json").read_text())["plan"]
    reg = smoke_run["result"]["registration"]
    teachers = [m["name"] for m in plan["models"] if m["kind"] == "teacher"]

    with sync_playwright() as pw:
        browser = launch_chromium(pw)  # fails naming the missing /usr/bin/chromium, never downloads a browser
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # this run's version, whatever later registrations of the session did to the champion alias
            open_dashboard(page, f"{dashboard_url}/?version={reg['version']}")
            head, rows = _table(page, "mmkd-comparison")
            means_head, means = _table(page, "mmkd-task-means")
            heat = page.eval_on_selector("table[data-testid=mmkd-heatmap]", READ_TABLE)
            hist_head, hist = _table(page, "mmkd-history")
            shot = full_screenshot(page, tmp_path / "dashboard.png")
        finally:
            browser.close()

    # champion vs each teacher: one row per (dataset, task, headline metric), every value as metrics.json's
    student = head[4]
    assert student in ("champion", f"v{reg['version']}") and head[5:5 + len(teachers)] == teachers
    shown = {(r[0]["text"], r[2]["text"], r[3]["text"]): {h: c["text"] for h, c in zip(head, r)} for r in rows}
    expected, deltas = set(), {}
    for d in plan["datasets"]:
        for task in d["tasks"]:
            for alts in HEADLINES[task]:
                metric = next((a for a in alts if a in metrics["student"].get(d["name"], {})), None)
                if metric is None:
                    continue
                expected.add((d["name"], task, metric))
                cells = shown[(d["name"], task, metric)]
                assert cells["modality"] == d["modality"]
                assert cells[student] == _fmt(metrics["student"][d["name"]], metric)
                for t in teachers:
                    assert cells[t] == _fmt(metrics[t][d["name"]], metric), (d["name"], metric, t)
                best = max(metrics[t][d["name"]][metric] for t in teachers)
                deltas.setdefault((task, d["modality"]), []).append(metrics["student"][d["name"]][metric] - best)
    assert set(shown) == expected

    # mean per task: the champion's test zero-shot mean, student.mean.zeroshot_acc1 (the gate scores on val)
    zeroshot = next(dict(zip(means_head, (c["text"] for c in r))) for r in means if r[0]["text"] == "zeroshot")
    assert zeroshot[student] == f"{metrics['student']['mean']['zeroshot_acc1']:.3f}"

    # heatmap: champion minus the best teacher, mean per (task, modality)
    cells = {(c["task"], c["modality"]): c["text"] for r in heat[1:] for c in r if c["task"] and c["text"]}
    assert cells == {k: f"{sum(v) / len(v):+.3f}" for k, v in deltas.items()}

    # history: the registered version, its data version, the gate's decision, links into the MLflow UI
    row = next(dict(zip(hist_head, r)) for r in hist if r[0]["text"] == str(reg["version"]))
    assert row["version"]["href"] == f"{tracking_server['uri']}/#/models/mmkd-student/versions/{reg['version']}"
    data_version = reg.get("data_version") or MlflowClient(tracking_server["uri"]).get_run(
        smoke_run["result"]["parent_run_id"]).data.tags["mmkd.data_hash"]
    assert row["data version"]["title"] == data_version and data_version.startswith(row["data version"]["text"])
    assert row["decision"]["text"] == ("promoted" if reg["promoted"] else "held")
    assert row["reason"]["text"] == reg["reason"]
    assert row["score"]["text"] == f"{reg['challenger_score']:.4f}"
    assert row["pipeline run"]["href"].endswith(f"/runs/{smoke_run['result']['parent_run_id']}")

    assert shot.stat().st_size > 50_000  # a drawn page, not a blank one
