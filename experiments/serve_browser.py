"""Driving `sam-jax serve` in a real browser: a live server in a subprocess, Debian's headless
Chromium through selenium and /usr/bin/chromedriver (no browser downloads: .ci/run installs the
`chromium` and `chromium-driver` packages). Used by experiments/benchmark_serve.py and
tests/test_serve_browser.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No first-run, sync, update or background connections: this machine's network is closed.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


class LiveServer:
    """`sam-jax serve --port 0` in a subprocess; `url` once it has printed it."""

    def __init__(self, checkpoint: Path, images: Optional[Path] = None, timeout: float = 300) -> None:
        command = [sys.executable, "-m", "sam_jax.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
        if images is not None:
            command += ["--images", str(images)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            match = re.search(r"serving on (http://\S+/)", line)
            if match:
                self.url = match.group(1)
                return
        self.stop()
        raise RuntimeError("sam-jax serve did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_browser(user_data_dir: Path, width: int = 1280, height: int = 900):
    """Headless Chromium with a fresh profile, or a RuntimeError saying what to install."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                           "(.ci/run does it on a fresh machine)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    return driver


def wait_for(driver, script: str, timeout: float = 120, what: str = ""):
    """Polls the JavaScript expression `script` until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.02)
    state = driver.execute_script("return [document.body.dataset.state, document.getElementById('message').textContent]")
    raise TimeoutError(f"waited {timeout} s for {what or script}; page state {state}")


def open_image(driver, path: Path) -> dict:
    """Uploads `path` through the page's file input; returns the embed response the page holds."""
    driver.execute_script("window.samJax.state.image = null; document.body.dataset.state = 'empty';")
    driver.find_element("id", "file").send_keys(str(Path(path).resolve()))
    wait_for(driver, "document.body.dataset.state === 'ready' || document.body.dataset.state === 'error'",
             what="the embedding")
    return driver.execute_script("return window.samJax.state.image;")


def canvas_alpha(driver, canvas_id: str = "mask") -> np.ndarray:
    """(H, W) bool: where the canvas is drawn (alpha > 0), read back as a PNG."""
    url = driver.execute_script(f"return document.getElementById('{canvas_id}').toDataURL('image/png');")
    return png_data_url(url)[..., 3] > 0


def png_data_url(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def page_offset(driver, x: float, y: float) -> tuple[int, int]:
    """Offsets from the prompt canvas's centre (selenium's origin) of image pixel (x, y)."""
    rect = driver.execute_script(
        "const c = document.getElementById('prompts'), r = c.getBoundingClientRect();"
        "return [r.width, r.height, c.width, c.height];")
    css_w, css_h, w, h = rect
    return round(x * css_w / w - css_w / 2), round(y * css_h / h - css_h / 2)


def click_at(driver, x: float, y: float, background: bool = False) -> None:
    """A click (shift-click with `background`) at image pixel (x, y) of the prompt canvas."""
    from selenium.webdriver import ActionChains, Keys

    canvas = driver.find_element("id", "prompts")
    dx, dy = page_offset(driver, x, y)
    actions = ActionChains(driver).move_to_element_with_offset(canvas, dx, dy)
    if background:
        actions = actions.key_down(Keys.SHIFT).click().key_up(Keys.SHIFT)
    else:
        actions = actions.click()
    actions.perform()


def drag(driver, start: tuple[float, float], end: tuple[float, float]) -> None:
    from selenium.webdriver import ActionChains

    canvas = driver.find_element("id", "prompts")
    (x0, y0), (x1, y1) = page_offset(driver, *start), page_offset(driver, *end)
    (ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold()
     .move_by_offset((x1 - x0) // 2, (y1 - y0) // 2).move_by_offset(x1 - x0 - (x1 - x0) // 2,
                                                                    y1 - y0 - (y1 - y0) // 2)
     .release().perform())


def wait_for_prediction(driver, previous_id: Optional[str]) -> dict:
    """The prediction the page drew after `previous_id` (with the prompt it sent)."""
    wait_for(driver, f"document.getElementById('mask').dataset.predictionId && "
                     f"document.getElementById('mask').dataset.predictionId !== {json.dumps(previous_id)} && "
                     "document.body.dataset.state === 'ready'", what="a new prediction")
    return driver.execute_script("return window.samJax.state.prediction;")
