"""Take the README's screenshot of `softmask explore` (docs/explore.png) on the demo's two models.

    python docs/explore_screenshot.py [--demo runs/demo] [--image N] [--out docs/explore.png]

Runs ``softmask explore --checkpoint DEMO/softmask --compare DEMO/albef --images DEMO/world`` on a free
port, opens it in headless Chromium (Debian's ``chromium`` and ``chromedriver``, as the tests do), picks
the ``--image``-th test image, types that image's first caption, waits for the overlays and the top-5
images, edits the first colour word to the next colour of the world's list, waits again, and saves the full page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from softmask.world.vocab import COLOURS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo")
    parser.add_argument("--image", type=int, default=3)
    parser.add_argument("--out", default="docs/explore.png")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    demo = Path(args.demo)
    test = json.loads((demo / "world" / "annotations" / "retrieval_test.json").read_text())
    record = test[args.image]
    caption = record["caption"][0]
    command = [sys.executable, "-m", "softmask", "-q", "explore", "--checkpoint", str(demo / "softmask"),
               "--compare", str(demo / "albef"), "--images", str(demo / "world"), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        url = server.stdout.readline().split()[2]
        wait = WebDriverWait(driver, 120)
        driver.get(url)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.thumb")) > args.image)
        driver.find_element(By.CSS_SELECTOR, f"#gallery img.thumb[data-name='{record['image']}']").click()
        driver.find_element(By.ID, "caption").send_keys(caption)
        driver.find_element(By.ID, "analyse").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#retrieval .hit"))
        boxes = driver.find_elements(By.CSS_SELECTOR, "#words .word-input")
        colour = next((b for b in boxes if b.get_attribute("value") in COLOURS), None)
        if colour is not None:
            names = list(COLOURS)
            other = names[(names.index(colour.get_attribute("value")) + 1) % len(names)]
            colour.clear()
            colour.send_keys(other, Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "2")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#retrieval .hit"))
        for _ in range(2):  # the window's chrome takes some height: measure again after the first resize
            height = driver.execute_script("return document.documentElement.scrollHeight")
            inner = driver.execute_script("return window.innerHeight")
            driver.set_window_size(1400, driver.get_window_size()["height"] + height - inner)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out} ({caption!r} -> {driver.find_element(By.ID, 'caption').get_attribute('value')!r})")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
