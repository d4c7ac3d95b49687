"""The quickstart in a real browser: JupyterLab on 127.0.0.1 with a random
token, headless Debian Chromium driven by Playwright, run all cells, press Run
in the panel, see both ranks draw, move the lr slider, see the change marked on
the loss curve; no console errors; server and browser ended by their pids and
nothing left behind.

Needs the Debian package `chromium` (install.sh installs it); Playwright's own
browser download is never used.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import port_is_free

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# The panel's dashboard as plotly draws it: its traces, read in the page.
PANEL_PLOT = "document.querySelector('.ddlkit-dashboard .js-plotly-plot')"
BOTH_RANKS_DRAWN = f"""() => {{
    const plot = {PANEL_PLOT};
    if (!plot || !plot.data) return false;
    const drawn = name => plot.data.filter(t => t.name === name && t.x && t.x.length > 5).length > 0;
    return drawn('rank 0') && drawn('rank 1');
}}"""
LR_MARKED = f"""() => {{
    const plot = {PANEL_PLOT};
    if (!plot) return false;
    const labels = [...plot.querySelectorAll('.textpoint text')].map(t => t.textContent);
    return labels.some(label => label.startsWith('lr='));
}}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_under(folder: Path) -> list[int]:
    """Processes whose working directory or command line is inside ``folder``:
    the server, its kernel, the kernel's workers, the browser (its profile)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in cmdline:
            found.append(int(entry.name))
    return found


def end(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pid`` leads, SIGKILL what is left after ``grace``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab serving a copy of the quickstart, isolated settings; yields
    (url, token, root) and ends the server by its pid."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "00_quickstart.ipynb", root)
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.port_retries=0",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, f"jupyterlab exited: {(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
            assert time.time() < deadline, "jupyterlab did not answer within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as reply:
                    json.load(reply)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token, root
    finally:
        end(server.pid)
        server.wait(10)
        log.close()
        deadline = time.time() + 20  # the kernel's workers end when it does
        while processes_under(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert processes_under(tmp_path) == [], "processes of the server, kernel, workers or browser left"
        assert port_is_free(port)


def test_quickstart_in_a_real_browser(jupyterlab, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install the Debian package with `apt-get install -y chromium` "
            "(./install.sh does it); this test never downloads a browser"
        )
    from playwright.sync_api import sync_playwright

    url, token, root = jupyterlab
    profile = tmp_path / "chromium-profile"
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        browser_pids = [pid for pid in processes_under(profile)]
        assert browser_pids, "no chromium process found with this test's profile"
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{url}/lab/tree/00_quickstart.ipynb?reset&token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            accept_dialog(page, "Select Kernel")  # JupyterLab may ask which kernel, preselecting Python 3
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)

            page.click(".lm-MenuBar-itemLabel:text-is('Run')")
            page.click("[data-command='runmenu:run-all']")
            page.wait_for_selector(
                ".jp-OutputArea-output:has-text('mean loss over the first 10 steps')", timeout=180_000
            )  # the last cell printed its result
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0

            steps = page.locator(".ddlkit-steps input")
            steps.fill("1000000")  # long enough to steer; Stop ends it
            steps.press("Enter")
            page.click("button.ddlkit-run")
            page.wait_for_function(BOTH_RANKS_DRAWN, timeout=90_000)

            readout = page.locator(".ddlkit-lr .widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("0.01")
            page.keyboard.press("Enter")
            page.wait_for_function(LR_MARKED, timeout=30_000)

            close_news_popup(page)
            page.locator(".ddlkit-dashboard").scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "dashboard.png"))
            page.click("button.ddlkit-stop")
            page.wait_for_selector(".ddlkit-status:has-text('stopped')", timeout=30_000)
            assert errors == [], f"browser console errors: {errors}"
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))  # what the page showed, for whoever debugs it
            raise
        finally:
            browser.close()
    for pid in browser_pids:  # Playwright closed it; make sure, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while processes_under(profile) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_under(profile) == [], "chromium processes left"
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def accept_dialog(page, title: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(f".jp-Dialog:has-text('{title}') button.jp-mod-accept").click(timeout=15_000)
    except PlaywrightTimeout:  # not asked this time
        pass


def close_news_popup(page) -> None:
    """JupyterLab asks, in a toast, whether to fetch Jupyter news: say no (it
    would cover the chart)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    question = page.get_by_text("official Jupyter news")
    try:
        question.wait_for(timeout=5000)
    except PlaywrightTimeout:  # not asked this time
        return
    page.get_by_role("button", name="No", exact=True).click()
    question.wait_for(state="hidden", timeout=5000)
