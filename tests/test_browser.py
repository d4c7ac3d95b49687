"""The quickstart in a real browser: JupyterLab on 127.0.0.1 with a random
token, headless Debian Chromium driven by Playwright, run all cells, press Run
in the panel, see both ranks draw, move the lr slider, see the change marked on
the loss curve, change the world size 2 -> 1 on the default panel (no
checkpoints asked for) and see the same run go on with one rank, with no error
left on the page; then the pipeline timeline of notebook 02. The figures fill
the output's width, the checkpoint box is wide enough to read. Screenshots of
both go to the test's folder (and to $DDLKIT_SHOTS, if set). No console
errors; server and browser ended by their pids and nothing left behind.

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
# The world size went 2 -> 1: the panel shows the new layout's batch (the global batch kept: 1 x 64),
# rank 1's curve stops where the old layout stopped, and rank 0 draws steps past it.
ONE_RANK_GOES_ON = f"""() => {{
    const plot = {PANEL_PLOT};
    const batch = document.querySelector('.ddlkit-batch_size input');
    if (!plot || !plot.data || !batch || batch.value !== '64') return false;
    const last = name => Math.max(...plot.data.filter(t => t.name === name && t.x).map(t => Math.max(...t.x)));
    return last('rank 0') > last('rank 1') + 5;
}}"""
# Width of every plotly figure's drawing and of the output it is in.
FIGURE_WIDTHS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(plot => [
    plot.querySelector('svg.main-svg').getBoundingClientRect().width,
    plot.closest('.jp-OutputArea-output').getBoundingClientRect().width])"""
# The typed lr arrives as typed: the log slider's grid is fine enough (its old 0.05 in log10 made 0.002 0.001995).
LR_MARKED = f"""() => {{
    const plot = {PANEL_PLOT};
    if (!plot) return false;
    const labels = [...plot.querySelectorAll('.textpoint text')].map(t => t.textContent);
    return labels.some(label => label === 'lr=0.002');
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


def timeline_notebook(folder: Path) -> None:
    """Notebook 02's cells up to its pipeline timeline (the rest takes minutes and shows no figure of its own)."""
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / "02_model_parallel.ipynb", as_version=4)
    last = next(i for i, cell in enumerate(notebook.cells) if "timeline.figure(gpipe)" in cell.source)
    notebook.cells = notebook.cells[: last + 1]
    nbformat.write(notebook, folder / "02_timeline.ipynb")


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab serving a copy of the quickstart and of 02's timeline,
    isolated settings; yields (url, token, root) and ends the server by its pid."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "00_quickstart.ipynb", root)
    timeline_notebook(root)
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


@pytest.mark.timeout(900)  # ~2 min alone on 2 cores; several times that when the machine is shared
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
            run_all(page, f"{url}/lab/tree/00_quickstart.ipynb?reset&token={token}")
            page.wait_for_selector(
                ".jp-OutputArea-output:has-text('mean loss over the first 10 steps')", timeout=180_000
            )  # the last cell printed its result
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
            checkpoint_box = page.locator(".ddlkit-checkpoint_every input").bounding_box()
            assert checkpoint_box is not None and checkpoint_box["width"] >= 60  # its value can be seen and typed

            steps = page.locator(".ddlkit-steps input")
            steps.fill("1000000")  # long enough to steer; Stop ends it
            steps.press("Enter")
            page.click("button.ddlkit-run")
            page.wait_for_function(BOTH_RANKS_DRAWN, timeout=90_000)

            readout = page.locator(".ddlkit-lr .widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("0.002")
            page.keyboard.press("Enter")
            page.wait_for_function(LR_MARKED, timeout=60_000)

            world_size = page.locator(".ddlkit-world_size input")  # a default panel: no checkpoint_every
            world_size.fill("1")
            world_size.press("Enter")
            page.wait_for_function(ONE_RANK_GOES_ON, timeout=120_000)
            error = page.locator(".ddlkit-error")
            assert not error.is_visible() and error.inner_text().strip() == ""  # no error text left
            for drawn, output in page.evaluate(FIGURE_WIDTHS):
                assert drawn >= 0.95 * output  # every figure fills its output's width

            close_news_popup(page)
            page.locator(".ddlkit-dashboard").scroll_into_view_if_needed()
            shoot(page, tmp_path / "quickstart.png")
            page.click("button.ddlkit-stop")
            # Stop acts in well under a second alone; on 2 cores shared with other runs the kernel's refresh lags.
            page.wait_for_selector(".ddlkit-status:has-text('stopped')", timeout=90_000)
            page.wait_for_function(
                "() => document.querySelector('.ddlkit-dashboard .gtitle').textContent.endsWith('(stopped)')",
                timeout=10_000,
            )

            run_all(page, f"{url}/lab/tree/02_timeline.ipynb?reset&token={token}")  # reset: only this tab
            timeline = page.locator(".jp-RenderedPlotly.js-plotly-plot").last  # a figure output (not a widget)
            timeline.wait_for(timeout=240_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            rows = [t.text_content() for t in timeline.locator(".yaxislayer-above .ytick text").all()]
            assert rows == ["stage 0rank 0", "stage 1rank 1"]  # every stage named (two lines each)
            legend, drawing = timeline.locator(".legend").bounding_box(), timeline.bounding_box()
            assert legend and drawing and legend["x"] + legend["width"] <= drawing["x"] + drawing["width"]
            timeline.scroll_into_view_if_needed()
            shoot(page, tmp_path / "timeline_02.png", timeline)
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
    for shot in ("quickstart.png", "timeline_02.png"):
        assert (tmp_path / shot).stat().st_size > 10_000


def run_all(page, address: str) -> None:
    """Open a notebook and run all its cells."""
    page.goto(address)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    accept_dialog(page, "Select Kernel")  # JupyterLab may ask which kernel, preselecting Python 3
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click("[data-command='runmenu:run-all']")


def shoot(page, path: Path, element=None) -> None:
    """A screenshot into the test's folder, copied to $DDLKIT_SHOTS if set (for people to look at)."""
    (element or page).screenshot(path=str(path))
    if os.environ.get("DDLKIT_SHOTS"):
        Path(os.environ["DDLKIT_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["DDLKIT_SHOTS"]) / path.name)


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
