"""Owns launching the dashboard: where its Streamlit app is and the `streamlit run` command line that serves it."""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def streamlit_command(tracking_uri: str, port: int = 8501, host: str = "127.0.0.1", mlflow_ui_url: str | None = None,
                      model_name: str = "mmkd-student", champion_alias: str = "champion",
                      python: str = sys.executable) -> list[str]:
    """`streamlit run` on the app, headless (no browser opened), no usage statistics sent (offline machines log
    no failed attempt), no file watcher (nothing to reload in an installed app); the app's own options after `--`."""
    cmd = [python, "-m", "streamlit", "run", str(APP),
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.address", host, "--server.port", str(port), "--server.fileWatcherType", "none",
           "--theme.base", "light", "--client.toolbarMode", "viewer",
           "--", "--tracking-uri", tracking_uri, "--model", model_name, "--alias", champion_alias]
    return cmd + (["--mlflow-ui-url", mlflow_ui_url] if mlflow_ui_url else [])
