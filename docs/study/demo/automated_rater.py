"""The automated rater of the demo study (docs/study/demo/README.md): it drives the rating pages of a running
`saeforge rate serve` in headless Chromium as a person would (reads the dashboard in the frame, types an explanation,
clicks Yes / Maybe / No, reloads halfway) and labels by one fixed rule, so the run is reproducible. It is not a
person: its labels test the machinery, not the SAEs' interpretability.

Rule: take the peak token of each top-activating context; if one token is the peak in at least `yes` of them the
latent is Yes, in at least `maybe` Maybe, else No. The explanation names that token and its share.

    python docs/study/demo/automated_rater.py URL RATER N_LABELS YES MAYBE [SCREENSHOT.png]
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def judge(chrome, yes: float, maybe: float) -> tuple[str, str]:
    chrome.switch_to.frame(chrome.find_element(By.ID, "dashboard"))
    try:
        peaks = [e.get_attribute("textContent") for e in chrome.find_elements(By.CSS_SELECTOR, "#top .toks .pk")]
    finally:
        chrome.switch_to.default_content()
    if not peaks:
        return "no", "no top examples shown"
    token, n = Counter(peaks).most_common(1)[0]
    share = n / len(peaks)
    label = "yes" if share >= yes else "maybe" if share >= maybe else "no"
    return label, f"peak token {token!r} in {n} of {len(peaks)} top contexts"


def click_and_wait(chrome, element) -> None:
    old = chrome.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(chrome, 30).until(expected_conditions.staleness_of(old))


def main(url: str, rater: str, n_labels: int, yes: float, maybe: float, screenshot: str | None = None) -> None:
    chrome = browser()
    try:
        chrome.get(f"{url}/rater/{rater}")
        for k in range(n_labels):
            if k == n_labels // 2:
                chrome.refresh()  # stop and come back: the same latent, the same progress
            progress = chrome.find_element(By.ID, "progress").text
            if progress.startswith("All"):
                break
            if screenshot and k == 0:
                chrome.save_screenshot(screenshot)
            label, explanation = judge(chrome, yes, maybe)
            chrome.find_element(By.ID, "explanation").send_keys(explanation)
            click_and_wait(chrome, chrome.find_element(By.CSS_SELECTOR, f'button[value="{label}"]'))
            print(f"{rater} [{progress}]: {label} ({explanation})")
        print(f"{rater}: {chrome.find_element(By.ID, 'progress').text}")
    finally:
        chrome.quit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]),
         sys.argv[6] if len(sys.argv) > 6 else None)
