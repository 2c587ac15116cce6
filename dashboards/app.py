"""The mmkd dashboard (Streamlit): the champion against each teacher, its gap to the best teacher per task and
modality, and the history of champions across retrainings, read from MLflow by mmkd.tracking.history.

Start it with `mmkd dashboard`; tables are plain HTML (readable from the page's DOM, e.g. by the browser test).
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the server's log
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an unreachable server: a message soon, not minutes

import pandas as pd
import streamlit as st
from mlflow.exceptions import MlflowException

from mmkd.tracking import history as h


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dashboards/app.py")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--mlflow-ui-url", default=None)
    p.add_argument("--model", default="mmkd-student")
    p.add_argument("--alias", default="champion")
    return p.parse_known_args(sys.argv[1:])[0]


@st.cache_data(ttl=60, show_spinner="Reading the registry ...")
def load_history(uri: str, model: str, alias: str, ui_url: str | None) -> dict:
    try:
        return {"history": h.history(h.client_for(uri), model, alias, ui_url)}
    except h.DashboardEmpty as e:
        return {"error": str(e)}
    except (MlflowException, OSError) as e:
        return {"error": f"cannot read MLflow at {uri}: {e}", "failed": True}


@st.cache_data(ttl=60, show_spinner="Reading the evaluation ...")
def load_version(uri: str, model: str, alias: str, ui_url: str | None, version: str | None) -> dict:
    """The tables of one version's evaluation (the champion's when version is None), or an error message."""
    try:
        mv, ev = h.champion_evaluation(h.client_for(uri), model, alias, version)
    except h.DashboardEmpty as e:
        return {"error": str(e)}
    except (MlflowException, OSError) as e:
        return {"error": f"cannot read MLflow at {uri}: {e}", "failed": True}
    label = "champion" if alias in (mv.aliases or []) else f"v{mv.version}"
    return {"version": str(mv.version), "aliases": sorted(mv.aliases or []), "notes": ev.notes, "label": label,
            "evaluation_id": ev.evaluation_id, "table": h.comparison_table(ev, label=label), "heatmap": h.heatmap(ev),
            "task_means": h.task_means(ev), "evaluate_run": h.run_url(h.ui_base(uri, ui_url), ev.experiment_id,
                                                                       ev.run_id)}


def pick_version(hist: pd.DataFrame | None) -> str | None:
    """The version to show: ?version=N in the URL, else the one chosen in the select box, else the champion."""
    if hist is None:
        return None
    choices = hist["version"].tolist()[::-1]  # newest first
    champ = hist.loc[hist["is_champion"], "version"].tolist()
    wanted = st.query_params.get("version") or (champ[0] if champ else choices[0])
    index = choices.index(wanted) if wanted in choices else 0
    labels = {v: f"v{v}" + (" (champion)" if v in champ else "") for v in choices}
    chosen = st.selectbox("Model version", choices, index=index, format_func=labels.get, key="version")
    if chosen != wanted:
        st.query_params["version"] = chosen
    return chosen if chosen not in champ else None


def _cell(text, url: str | None = None, style: str = "", title: str | None = None) -> str:
    body = html.escape(str(text))
    if url:
        body = f'<a href="{html.escape(url)}" target="_blank">{body}</a>'
    attrs = (f' style="{style}"' if style else "") + (f' title="{html.escape(title)}"' if title else "")
    return f"<td{attrs}>{body}</td>"


def html_table(df: pd.DataFrame, test_id: str, links: dict[str, str] | None = None, styles=None,
               titles: dict[str, str] | None = None) -> str:
    """df as an HTML table; links / titles: column -> the column holding its URL / its tooltip (not shown as
    columns); styles(column, value) -> inline CSS."""
    links, titles = links or {}, titles or {}
    cols = [c for c in df.columns if c not in {*links.values(), *titles.values()}]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for _, row in df.iterrows():
        cells = [_cell(row[c], row[links[c]] if c in links else None, styles(c, row[c]) if styles else "",
                       row[titles[c]] if c in titles else None) for c in cols]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div style="overflow-x:auto"><table class="mmkd-table" data-testid="{test_id}"><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _delta_style(column: str, value) -> str:
    if not column.endswith(" - best teacher") or not isinstance(value, str) or value == "-":
        return ""
    return "color:#1a7f37;font-weight:600" if float(value) >= 0 else "color:#c62828;font-weight:600"


def heatmap_table(grid: pd.DataFrame) -> str:
    """Task x modality, each cell coloured by the champion minus the best teacher (green ahead, red behind)."""
    vals = grid.to_numpy(dtype=float)
    scale = max(0.05, max((abs(v) for v in vals.flat if math.isfinite(v)), default=0.05))
    head = "<th>task \\ modality</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in grid.columns)
    rows = []
    for task, row in grid.iterrows():
        cells = []
        for mod, v in row.items():
            if not math.isfinite(v):
                cells.append(f'<td data-task="{task}" data-modality="{mod}" style="background:#f3f3f3"></td>')
                continue
            rgb = "26,150,65" if v >= 0 else "215,25,28"
            alpha = 0.15 + 0.7 * min(1.0, abs(v) / scale)
            cells.append(f'<td data-task="{task}" data-modality="{mod}" '
                         f'style="background:rgba({rgb},{alpha:.2f});text-align:center">{v:+.3f}</td>')
        rows.append(f"<tr><th>{html.escape(task)}</th>{''.join(cells)}</tr>")
    return (f'<table class="mmkd-table" data-testid="mmkd-heatmap"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


STYLE = """<style>
table.mmkd-table {border-collapse: collapse; font-size: 0.85rem; width: 100%;}
table.mmkd-table th, table.mmkd-table td {border: 1px solid #ddd; padding: 4px 8px; white-space: nowrap;}
table.mmkd-table th {background: #fafafa; text-align: left;}
</style>"""


def main() -> None:
    opts = options()
    st.set_page_config(page_title="mmkd dashboard", layout="wide")
    st.html(STYLE)
    st.title("mmkd: the champion student and its teachers")
    if not opts.tracking_uri:
        st.error("No MLflow tracking URI: start the dashboard with `mmkd dashboard --tracking-uri URI` "
                 "or set MLFLOW_TRACKING_URI.")
        return
    ui = h.ui_base(opts.tracking_uri, opts.mlflow_ui_url)
    model_link = f"[{opts.model}]({h.model_url(ui, opts.model)})" if ui else f"`{opts.model}`"
    st.caption(f"MLflow: `{opts.tracking_uri}` · registered model {model_link} · alias `{opts.alias}`")
    if st.button("Refresh", key="refresh"):
        load_history.clear()
        load_version.clear()
    hist = load_history(opts.tracking_uri, opts.model, opts.alias, opts.mlflow_ui_url)
    shown = pick_version(hist.get("history"))
    data = load_version(opts.tracking_uri, opts.model, opts.alias, opts.mlflow_ui_url, shown)

    with st.container(key="champion-vs-teachers"):
        if "error" in data:
            st.header("Champion vs each teacher")
            (st.error if data.get("failed") else st.info)(data["error"])
        else:
            v = data["version"]
            st.header("Champion vs each teacher" if data["label"] == "champion" else f"v{v} vs each teacher")
            url = h.version_url(ui, opts.model, v)
            name = f"[{opts.model} v{v}]({url})" if url else f"{opts.model} v{v}"
            aliases = ", ".join(f"`@{a}`" for a in data["aliases"]) or "no alias"
            run = f" · [evaluate run]({data['evaluate_run']})" if data["evaluate_run"] else ""
            st.markdown(f"**{name}** ({aliases}), scored on evaluation `{data['evaluation_id'] or '-'}`{run}. "
                        "Headline metric per dataset and task, with 95% CIs.")
            for note in data["notes"]:
                st.warning(note)
            st.html(html_table(data["table"], "mmkd-comparison", styles=_delta_style))

    if "error" not in data:
        with st.container(key="task-means"):
            st.subheader("Mean headline metric per task")
            means = data["task_means"].map(lambda x: h.fmt_value(x)).reset_index()
            st.html(html_table(means.rename(columns={"student": data["label"]}), "mmkd-task-means"))
        with st.container(key="heatmap"):
            st.header(f"{data['label'].capitalize()} minus best teacher, per task and modality")
            st.caption(f"Mean over the datasets (and headline metrics) of each cell of the {data['label']}'s value "
                       f"minus the best teacher's on that dataset; green: the {data['label']} is ahead.")
            st.html(heatmap_table(data["heatmap"]))

    with st.container(key="history"):
        st.header("Champions across retrainings")
        if "error" in hist:
            (st.error if hist.get("failed") else st.info)(hist["error"])
        else:
            df = hist["history"].iloc[::-1].copy()  # newest first
            df["score"] = df["score"].map(lambda x: h.fmt_value(x, digits=4))
            df["champion_score"] = df["champion_score"].map(lambda x: h.fmt_value(x, digits=4))
            df["data version"] = df["data_version"].str[:12]  # the full hash in the cell's tooltip
            df["pipeline run"] = df["pipeline_run_id"].str[:8]
            df["evaluate run"] = df["evaluate_run_id"].str[:8]
            show = df[["version", "version_url", "registered", "data version", "data_version", "profile", "trigger",
                       "decision", "reason", "score", "champion_score", "champion_until", "aliases", "pipeline run",
                       "pipeline_run_url", "evaluate run", "evaluate_run_url"]]
            show = show.rename(columns={"champion_score": "champion's score", "champion_until": "champion until"})
            st.html(html_table(show, "mmkd-history", links={"version": "version_url", "pipeline run":
                                                            "pipeline_run_url", "evaluate run": "evaluate_run_url"},
                               titles={"data version": "data_version"},
                               styles=lambda c, v: "white-space:normal;min-width:16rem" if c == "reason" else ""))
            metrics = ", ".join(sorted(set(df["metric"]) - {""})) or "-"
            st.caption(f"decision and reason: the promotion gate's when the version was registered; score: its "
                       f"gate metric ({metrics}); champion's score: the champion's it was compared with; data "
                       "version: the DVC hash of data/ its pipeline run trained on.")


main()
