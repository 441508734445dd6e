"""Shared fixtures: tiny randomly initialised language models (no download, about a second to build), one saved
to disk with a small text corpus (for the commands, which load them by path like a user would), and a headless
Chromium for the HTML pages."""

from __future__ import annotations

import random
import shutil

import pytest

from saeforge.models import tiny_lm as _tiny_lm


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny Gemma 3 model with a byte-level tokenizer, shared by the session (it is frozen; do not mutate it)."""
    return _tiny_lm("gemma3", seed=0)


@pytest.fixture(scope="session")
def tiny_lm_factory():
    """tiny_lm_factory(family, seed=0) -> a tiny model of that family, built once per (family, seed)."""
    built = {}

    def make(family: str = "gemma3", seed: int = 0):
        if (family, seed) not in built:
            built[family, seed] = _tiny_lm(family, seed)
        return built[family, seed]

    return make


@pytest.fixture(autouse=True)
def _fp32_when_auto(monkeypatch, tmp_path_factory):
    """`dtype = "auto"` resolves to float32 in every test, whatever this CPU's bf16 speed, so results do not depend
    on the machine; the per-machine probe cache is a temporary file. Tests of the choice inject their own probe."""
    from saeforge.models import precision

    cache = tmp_path_factory.mktemp("precision") / "precision.json"
    monkeypatch.setattr(precision, "_cache_file", lambda: cache)
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a, **k: 0.0)


WORDS = ("the river city north old music early school small people light paper green stone king market house "
         "water field winter island language train bridge").split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_model")
    lm = _tiny_lm("gemma3", seed=0)
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory):
    """600 short paragraphs (documents); the data package holds a fixed ~5% of them out for evaluation."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def chrome(tmp_path_factory):
    """Headless Chromium driven by selenium (Debian's chromium and chromium-driver; `make test` installs them),
    shared by the session. Its console messages: `chrome.get_log("browser")` (each read returns those since the
    last one). A missing browser fails the test rather than skipping it, so CI cannot pass without running it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("headless Chromium is missing: `make test` installs it, or apt-get install chromium "
                    "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=Service(driver))
    yield session
    session.quit()
