"""The rating page in headless Chromium, end to end: a rater labels latents, reloads, comes back, continues; the
study file then holds exactly the labels given, for exactly the latents the rater was shown."""

from __future__ import annotations

import sqlite3

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from study_helpers import LATENTS


def _shown_item(chrome) -> str:
    """The marker of the dashboard in the frame (the hand-made page names its SAE and latent), after checking that
    the page's script did not run."""
    chrome.switch_to.frame(chrome.find_element(By.ID, "dashboard"))
    try:
        marker = chrome.find_element(By.ID, "marker").text
        assert chrome.find_element(By.TAG_NAME, "body").get_attribute("data-ran") is None
        assert "<b>river</b>" in chrome.find_element(By.TAG_NAME, "body").text  # escaped text shows as text
    finally:
        chrome.switch_to.default_content()
    return marker


def _click(chrome, element) -> None:
    """Click something that loads a new page, and wait until it has."""
    old = chrome.find_element(By.TAG_NAME, "html")
    element.click()
    wait = WebDriverWait(chrome, 10)
    wait.until(expected_conditions.staleness_of(old))
    wait.until(lambda c: c.execute_script("return document.readyState") == "complete")


def _answer(chrome, label: str, explanation: str) -> None:
    box = chrome.find_element(By.ID, "explanation")
    box.clear()
    box.send_keys(explanation)
    _click(chrome, chrome.find_element(By.CSS_SELECTOR, f'button[value="{label}"]'))


def _progress(chrome) -> str:
    return chrome.find_element(By.ID, "progress").text


def test_rating_page_end_to_end(chrome, server_url, study_path):
    chrome.get(server_url + "/")
    chrome.find_element(By.ID, "name").send_keys("alice")
    _click(chrome, chrome.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    assert chrome.current_url == f"{server_url}/rater/alice"
    assert _progress(chrome) == "0 of 6 labelled"

    given = []  # (marker, label, explanation)
    for label, explanation in (("yes", "the word river"), ("maybe", "water, loosely")):
        marker = _shown_item(chrome)
        _answer(chrome, label, explanation)
        given.append((marker, label, explanation))
    assert _progress(chrome) == "2 of 6 labelled"

    # Reload, and come back later from the start page: the same next latent, the same progress.
    marker = _shown_item(chrome)
    chrome.refresh()
    assert _progress(chrome) == "2 of 6 labelled" and _shown_item(chrome) == marker
    chrome.get(server_url + "/rater/alice")
    assert _shown_item(chrome) == marker and chrome.title == "Rating study: latent 3 of 6"

    # Maybe without an explanation is refused with a message; the rater goes back and answers No.
    _answer(chrome, "maybe", "")
    assert "400" in chrome.title and "explanation" in chrome.find_element(By.CLASS_NAME, "error").text
    _click(chrome, chrome.find_element(By.LINK_TEXT, "Back to your current latent"))
    assert _shown_item(chrome) == marker
    _answer(chrome, "no", "")
    given.append((marker, "no", ""))
    assert _progress(chrome) == "3 of 6 labelled" and _shown_item(chrome) != marker

    con = sqlite3.connect(study_path)
    rows = con.execute("SELECT r.name, i.sae_id, i.latent, l.label, l.explanation FROM labels l "
                       "JOIN raters r USING (rater_id) JOIN items i USING (item_id) "
                       "JOIN orders o USING (rater_id, item_id) ORDER BY o.position").fetchall()
    con.close()
    assert [(f"page-{sae}-{latent}", label, explanation) for _, sae, latent, label, explanation in rows] == given
    assert {name for name, *_ in rows} == {"alice"}
    assert all(latent in LATENTS[sae] for _, sae, latent, _, _ in rows)
