"""`softmask explore` end to end: the real command serves the page, a headless Chromium uses it.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make setup`` installs them). Without them the
test fails and says so; set SOFTMASK_SKIP_BROWSER_TESTS=1 to skip it on a machine that cannot have them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.data.text import save_vocab
from softmask.models.vlp import create_model

from helpers import tiny_model_config

pytestmark = pytest.mark.slow  # a browser and a server

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "is", "of", "left", "right", "above", "below",
         "red", "green", "blue", "yellow", "square", "circle", "triangle", "##s"]
TIMEOUT = 300  # only bounds waits: a loaded machine answers late, a broken page never


def browser_or_reason() -> None:
    if CHROMIUM and DRIVER:
        return
    if os.environ.get("SOFTMASK_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SOFTMASK_SKIP_BROWSER_TESTS=1 and no chromium/chromedriver on PATH")
    pytest.fail("the browser test needs chromium and chromedriver on PATH: run `make setup` (it installs Debian's "
                "chromium and chromium-driver), or set SOFTMASK_SKIP_BROWSER_TESTS=1 to skip it")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[str]:
    """Two tiny saved models (different seeds) with a small vocabulary of the world's words."""
    browser_or_reason()
    root = tmp_path_factory.mktemp("explore_models")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = root / f"model_{seed}"
        create_model(tiny_model_config(f"text.vocab_size={len(WORDS)}")).save_pretrained(folder)
        save_vocab(vocab, folder)
        paths.append(str(folder))
    return paths


@pytest.fixture(scope="module")
def server(tiny_models, task_world):
    """`softmask explore` on a free loopback port with the two models and the world; yields (url, process)."""
    paths = tiny_models
    process = subprocess.Popen(
        [sys.executable, "-m", "softmask", "-q", "explore", "--checkpoint", paths[0], "--compare", paths[1],
         "--images", str(task_world), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stdout.readline()  # "softmask explore: http://127.0.0.1:PORT/  (Ctrl-C to stop)"
    if "http://" not in line:
        process.kill()
        pytest.fail(f"softmask explore did not start: {line!r} {process.stderr.read()[-2000:]}")
    url = line.split()[2]
    yield url, process
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def test_pick_type_see_overlays_edit_a_word_retrieve_and_upload_a_bad_file(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    wait = WebDriverWait(browser, TIMEOUT)
    browser.get(url)
    thumbs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.thumb"))
    assert len(thumbs) == 6  # the world's test split
    thumbs[2].click()
    name = thumbs[2].get_attribute("data-name")
    browser.find_element(By.ID, "caption").send_keys("A red square left of the blue circles")
    browser.find_element(By.ID, "analyse").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1")

    words = ["a", "red", "square", "left", "of", "the", "blue", "circles"]
    columns = browser.find_elements(By.CSS_SELECTOR, "#results .model")
    assert len(columns) == 2
    expected = post(url, "/api/analyse", {"image": name, "caption": "a red square left of the blue circles"})
    for column, result in zip(columns, expected["results"], strict=True):
        panels = column.find_elements(By.CSS_SELECTOR, ".word-panel")
        assert [p.find_element(By.CSS_SELECTOR, ".word").text for p in panels] == words
        assert all(p.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") == "224" for p in panels)
        itm = float(column.find_element(By.CSS_SELECTOR, ".itm b").text)
        itc = float(column.find_element(By.CSS_SELECTOR, ".itc b").text)
        assert itm == pytest.approx(result["itm_prob"], abs=5e-4) and 0.0 <= itm <= 1.0
        assert itc == pytest.approx(result["itc_sim"], abs=5e-4)
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#retrieval .hit"))
    assert len(hits) == 10  # top 5 of each model

    # Edit one word: "red" -> "green"; the scores move, each with the previous value beside it.
    word = browser.find_elements(By.CSS_SELECTOR, "#words .word-input")[1]
    word.clear()
    word.send_keys("green", Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "2")
    assert browser.find_element(By.ID, "caption").get_attribute("value") == "a green square left of the blue circles"
    deltas = [d.text for d in browser.find_elements(By.CSS_SELECTOR, "#results .itm .delta")]
    assert len(deltas) == 2 and all(d.startswith("(was ") for d in deltas)
    edited = post(url, "/api/analyse", {"image": name, "caption": "a green square left of the blue circles"})
    shown = [float(b.text) for b in browser.find_elements(By.CSS_SELECTOR, "#results .itm b")]
    assert shown == pytest.approx([r["itm_prob"] for r in edited["results"]], abs=5e-4)

    # The layer selector re-draws with another fusion layer.
    browser.find_element(By.CSS_SELECTOR, "#layer option[value='1']").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "3")
    assert "fusion layer 1" in browser.find_element(By.CSS_SELECTOR, "#results .model h3").text

    screenshot = tmp_path / "explore.png"
    browser.save_screenshot(str(screenshot))
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[0] > 600 and pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # overlays, not flat colour

    # A corrupt upload: a message on the page, the server keeps serving.
    bad = tmp_path / "corrupt.png"
    # Fixed bytes: random ones after the PNG signature sometimes pass Pillow's identification and fail in
    # the decoder instead ("cannot decode ..."), a different message.
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    browser.find_element(By.ID, "upload").send_keys(str(bad))
    error = wait.until(lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").text else None)
    assert "corrupt.png: not an image" in error.text and "upload a PNG or JPEG image" in error.text
    # A good upload of another size is analysed at once (the caption is still there).
    good = tmp_path / "wide.jpg"
    Image.new("RGB", (333, 120), (30, 60, 220)).save(good)
    browser.find_element(By.ID, "upload").send_keys(str(good))
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "4")
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .word-panel")) == 2 * len(words)


def test_ctrl_c_stops_the_server_cleanly(server):
    _, process = server
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("softmask explore did not stop within 30 s of Ctrl-C")
    err = process.stderr.read()
    assert code == 0 and "softmask explore: stopped" in err and "Traceback" not in err, err[-2000:]


def test_a_taken_port_is_a_one_line_error(tiny_models):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, "-m", "softmask", "-q", "explore", "--checkpoint", tiny_models[0],
                                 "--port", str(port)], capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"softmask: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                     "pass --port 0 for a free port")
