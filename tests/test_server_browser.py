"""The web page of `mlx-sd serve` in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
fill the form, generate, watch the progress bar move and the preview and the image appear, download link with the
PNG's parameters; cancel a long generation and see the server drop it. Writes docs/server.png for the README."""

import base64
import io
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from helpers import running_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = Path(__file__).parent.parent / "docs" / "server.png"
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/setup installs them)"
)


@pytest.fixture(scope="module")
def served(server_models, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    (lora_dir / "watercolor.safetensors").write_bytes(b"x")
    with running_server(models_dir=server_models, lora_dir=lora_dir) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,860",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    # Chromium's renderer does not start with the test run's LD_PRELOAD (OpenBLAS for MLX)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER, env=env), options=options)
    yield driver
    driver.quit()


def fill(browser, **values):
    for name, value in values.items():
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))


def open_page(browser, url):
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "sampler")).options) > 1)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.text == "sd1")


def test_page_generates_with_progress_and_download(served, browser):
    url, _ = served
    open_page(browser, url)
    fill(
        browser,
        prompt="a lighthouse on a cliff at sunset",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=50,
        cfg_scale=6,
        seed=42,
    )
    Select(browser.find_element(By.ID, "sampler")).select_by_visible_text("Euler a")
    assert [o.text for o in Select(browser.find_element(By.ID, "lora")).options] == ["none", "watercolor"]
    browser.find_element(By.ID, "generate").click()
    progress, previews = set(), False
    deadline = time.monotonic() + 120
    while browser.find_element(By.ID, "result").get_attribute("hidden") is not None:
        assert time.monotonic() < deadline, browser.find_element(By.ID, "status").text
        progress.add(float(browser.find_element(By.ID, "progress").get_attribute("value")))
        previews |= (browser.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png")
        time.sleep(0.03)
    moving = sorted(v for v in progress if 0 < v < 1)
    assert len(moving) >= 2 and previews, (moving, previews)
    parameters = browser.find_element(By.ID, "parameters").text
    assert parameters.startswith("a lighthouse on a cliff at sunset\nNegative prompt: blurry\n")
    assert "Steps: 50, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 64x64, Model: sd1" in parameters
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("download") == "mlx-sd-42.png"
    png = Image.open(io.BytesIO(base64.b64decode(link.get_attribute("href").split(",", 1)[1])))
    assert png.size == (64, 64) and png.text["parameters"] == parameters
    assert browser.execute_script("return document.getElementById('result').naturalWidth") == 64
    assert browser.find_element(By.ID, "status").text == "done: seed 42"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    print(f"\nprogress values seen: {len(moving)}; screenshot: {SCREENSHOT}")


def test_cancel_drops_the_job_on_the_server(served, browser):
    url, server = served
    open_page(browser, url)
    fill(browser, width=32, height=32, steps=500, seed=1)
    browser.find_element(By.ID, "generate").click()
    deadline = time.monotonic() + 60
    while (task := server.worker.current) is None or task.steps_done < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    browser.find_element(By.ID, "cancel").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "status").text == "cancelled")
    deadline = time.monotonic() + 30
    while server.worker.current is task:
        assert time.monotonic() < deadline, "the server kept generating for a cancelled page"
        time.sleep(0.02)
    assert task.cancelled.is_set() and task.steps_done < 500
