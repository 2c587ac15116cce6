"""Owns the README's screenshots: the dashboard and the MLflow UI's registered-model pages, captured from a running
dashboard and MLflow server in headless Chromium (Debian's `chromium`, driven by Playwright; nothing downloaded).

    mmkd dashboard --screenshots docs/images        # or: python -m dashboards.screenshots --tracking-uri URI --out DIR

A tracking URI that is not a server (sqlite:///...) gets a temporary `mlflow server` on it for the MLflow pages.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dashboards import streamlit_command
from mmkd.tracking.servers import free_port, stop, wait_http

CHROMIUM = os.environ.get("MMKD_CHROMIUM", "/usr/bin/chromium")
# headless and quiet: no sandbox (containers, CI), no GPU, and none of Chromium's own calls home
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
READY = "table[data-testid=mmkd-history], [data-testid=stAlert]"  # the dashboard has drawn its last section


def launch_chromium(playwright):
    """Headless Chromium from CHROMIUM (Debian's package), never a browser Playwright would download."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`) "
                                "or point MMKD_CHROMIUM at a Chromium binary")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@contextmanager
def serve(cmd: list[str], health: str, log: Path, timeout: float = 120.0, cwd: str | None = None,
          env: dict | None = None) -> Iterator[None]:
    """Run a server until the block ends; wait until `health` answers 200 (fail with its log if it exits)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **env} if env else None)
    try:
        wait_http(health, proc, log, timeout)
        yield
    finally:
        stop(proc)


def open_dashboard(page, url: str, timeout_ms: int = 90_000) -> None:
    """Load the dashboard and wait until it has drawn everything (Streamlit draws after the page's load event)."""
    page.goto(url)
    page.wait_for_selector(READY, timeout=timeout_ms)
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=timeout_ms)


def full_screenshot(page, path: Path) -> Path:
    """The whole page: Streamlit scrolls inside its own container, so the viewport grows to its content first."""
    height = page.evaluate("""() => { const m = document.querySelector('[data-testid=stMain]');
                                      return Math.max(m ? m.scrollHeight : 0, document.body.scrollHeight); }""")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": int(height) + 40})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
    return path


def mlflow_page(page, url: str, text: str, path: Path, timeout_ms: int = 90_000) -> Path:
    """An MLflow UI page once `text` shows, the assistant panel closed (it covers a third of the page)."""
    page.goto(url)
    page.get_by_text(text, exact=False).first.wait_for(timeout=timeout_ms)
    close = page.locator("button[aria-label=Close]")
    if close.count():
        close.first.click()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(path))
    return path


def capture(tracking_uri: str, out: Path, mlflow_ui_url: str | None = None, model: str = "mmkd-student",
            alias: str = "champion", width: int = 1600) -> list[Path]:
    """dashboard.png, mlflow-model.png (the registered model's versions) and mlflow-champion.png (the champion's
    version page) in `out`."""
    from playwright.sync_api import sync_playwright

    from mmkd.tracking.history import champion, client_for

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmkd-shots-")))
        ui = mlflow_ui_url or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else None)
        if ui is None:  # a file store: a temporary MLflow UI on it, for the MLflow pages and the dashboard's links
            port = free_port()
            ui = f"http://127.0.0.1:{port}"
            stack.enter_context(serve([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                       "--backend-store-uri", tracking_uri], ui + "/health", tmp / "mlflow.log",
                                      cwd=str(tmp)))
        port = free_port()
        dash = f"http://127.0.0.1:{port}"
        stack.enter_context(serve(streamlit_command(tracking_uri, port, mlflow_ui_url=ui, model_name=model,
                                                    champion_alias=alias), dash + "/_stcore/health",
                                  tmp / "dashboard.log"))
        champ = champion(client_for(tracking_uri), model, alias)
        pw = stack.enter_context(sync_playwright())
        browser = launch_chromium(pw)
        stack.callback(browser.close)
        page = browser.new_page(viewport={"width": width, "height": 900})
        # the MLflow UI opens its assistant panel on a first visit; a returning visitor's setting keeps it shut
        page.add_init_script("try { localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                             " localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true'); }"
                             " catch (e) {}")
        open_dashboard(page, dash)
        shots = [full_screenshot(page, out / "dashboard.png")]
        page.set_viewport_size({"width": width, "height": 900})
        shots.append(mlflow_page(page, f"{ui}/#/models/{model}", "Version", out / "mlflow-model.png"))
        if champ is not None:
            shots.append(mlflow_page(page, f"{ui}/#/models/{model}/versions/{champ.version}", "Source Run",
                                     out / "mlflow-champion.png"))
    return shots


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), required=False)
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--mlflow-ui-url", default=None)
    p.add_argument("--model", default="mmkd-student")
    p.add_argument("--alias", default="champion")
    a = p.parse_args(argv)
    if not a.tracking_uri:
        p.error("--tracking-uri (or MLFLOW_TRACKING_URI) is required")
    for path in capture(a.tracking_uri, a.out, a.mlflow_ui_url, a.model, a.alias):
        print(path)


if __name__ == "__main__":
    main()
