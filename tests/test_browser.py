"""Notebook 00's point picker as a user meets it: a JupyterLab server on localhost, Debian's chromium driven by
Selenium (nothing downloaded at run time), the notebook run from the page with the tiny model, a click on the
source image, and the match and its similarity map read back from the page.

Needs chromium and chromedriver on PATH (`.ci/run` installs Debian's `chromium` and `chromium-driver`) and
selenium; skips without them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
# .ci/run sets SDM_REQUIRE_BROWSER=1: there a missing browser fails the test instead of skipping it
MISSING = not (BROWSER and DRIVER) and not os.environ.get("SDM_REQUIRE_BROWSER")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]
SIZE = 64  # the tiny model's input: the picker's pixels
QUICK = {"model": "tiny", "device": "cpu", "image_size": SIZE, "ensemble": 1, "n_points": 3, "interactive": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _jupyterlab(root: Path) -> Iterator[str]:
    """A JupyterLab server on a free localhost port serving `root`; yields its base URL with the token; stopped
    (with its kernels) on exit."""
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           *(["--allow-root"] if os.geteuid() == 0 else [])]  # fmt: skip
    log = (root / "jupyterlab.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(root / 'jupyterlab.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield f"{url}/lab/tree/picker.ipynb?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _browser():  # -> selenium.webdriver.Chrome
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2400"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _notebook(root: Path) -> None:
    """Notebook 00 with the quick parameters in place of its parameters cell (not run: the browser runs it)."""
    nb = json.loads((REPO / "notebooks" / "00_quickstart.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = {**{k: v for k, v in (ln.split(" = ", 1) for ln in "".join(cell["source"]).splitlines() if " = " in ln)}}
    lines.update({k: repr(v) for k, v in {**QUICK, "figures_dir": str(root / "figures"), "results_dir": str(root / "results")}.items()})
    cell["source"] = [f"{k} = {v.split('  #')[0].strip()}\n" for k, v in lines.items()]
    (root / "picker.ipynb").write_text(json.dumps(nb))


PICKED = re.compile(r"picked \((\d+), (\d+)\) -> match \(([\d.]+), ([\d.]+)\)")


def _text(driver) -> str:  # the page's text as shown (the source escapes "->")
    return driver.execute_script("return document.body.innerText")


def _figure(driver) -> str:
    """The src of the picker's figure: the image in the output widget inside the picker's box."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, ".widget-vbox .jp-RenderedImage img")
    return found[-1].get_attribute("src") if found else ""


def _png_size(src: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size


def test_point_picker_answers_a_click_in_jupyterlab(tmp_path: Path) -> None:
    assert BROWSER and DRIVER, "chromium and chromedriver are not on PATH (apt-get install chromium chromium-driver)"
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _notebook(tmp_path)
    with _jupyterlab(tmp_path) as url:
        driver = _browser()
        try:
            driver.get(url)
            wait = WebDriverWait(driver, SUBPROCESS_TIMEOUT, poll_frequency=0.5)
            wait.until(lambda d: d.execute_script(
                "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel);"))  # fmt: skip
            driver.execute_script(
                "const w = window.jupyterapp.shell.currentWidget;"
                "w.sessionContext.ready.then(() => window.jupyterapp.commands.execute('notebook:run-all-cells'));")  # fmt: skip
            picture = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea img.widget-image") or None)[0]
            first = wait.until(lambda d: PICKED.search(_text(d)))
            wait.until(lambda d: picture.get_attribute("naturalWidth") not in (None, "0"))
            # a click at 3/4 of the width, 1/4 of the height of the shown source: pixel (48, 16) of the 64 x 64 input
            before = _figure(driver)
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", picture)
            width, height = picture.size["width"], picture.size["height"]
            ActionChains(driver).move_to_element_with_offset(picture, int(width * 0.25), int(-height * 0.25)).click().perform()
            picked = WebDriverWait(driver, 300, poll_frequency=0.5).until(
                lambda d: (m := PICKED.search(_text(d))) and m.group(0) != first.group(0) and m)  # fmt: skip
            x, y, mx, my = (float(v) for v in picked.groups())
            assert abs(x - 48) <= 1 and abs(y - 16) <= 1, picked.group(0)
            assert 0 <= mx < SIZE and 0 <= my < SIZE
            # the redrawn figure (source with the picked point, target with its match and similarity map) is on the page
            after = WebDriverWait(driver, 300, poll_frequency=0.5).until(lambda d: (f := _figure(d)) != before and f)
            assert after.startswith("data:image/png;base64,") and min(_png_size(after)) >= 100
        finally:
            driver.quit()
