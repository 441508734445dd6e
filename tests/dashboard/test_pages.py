"""The dashboard's HTML: what a latent page shows (and hides when blind), hostile corpus text shown as text in a real
browser, the index in headless Chromium, and `saeforge dashboard` as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
import torch

from saeforge import SAEMetadata, create_sae
from saeforge.cli import main
from saeforge.data import pack_contexts
from saeforge.evaluation.latent_examples import LatentExamples, collect_latent_examples
from saeforge.viz.dashboard import latent_page, write_dashboard

SITE = "blocks.1.resid_post"
SRC = Path(__file__).resolve().parents[2] / "src"
HOSTILE_DOCUMENTS = [
    'Old river <script>window.__pwned = 1</script> city market.',
    'See <img src=x onerror="window.__pwned = 2"> and "><svg onload="window.__pwned = 3"> here.',
    "Broken </td></tr></table></div><b>unclosed <i x='y & z <!-- comment",
]
# Whole token strings an ordinary tokenizer could hold as one token.
HOSTILE_TOKENS = ['<script>window.__pwned = 4</script>', '<img src=x onerror="window.__pwned = 5">',
                  "</span></div><b>bold & <!--"]


def _examples(lm, architecture: str = "relu", **options) -> LatentExamples:
    torch.manual_seed(0)
    sae = create_sae(architecture, d_in=64, d_sae=40, **options)
    if architecture == "relu":
        with torch.no_grad():
            sae.b_enc.copy_(-torch.linspace(0, 3, 40))
            sae.b_enc[-2:] = -1e4  # two dead latents
    contexts = torch.stack(list(pack_contexts(HOSTILE_DOCUMENTS * 6, lm.tokenizer, 40)))
    return collect_latent_examples(lm, sae, contexts, site=SITE, top_n=6, batch_size=4, name="sae_xyzzy")


class _Spans(HTMLParser):
    """The title and text of every token span inside the first top example."""

    def __init__(self):
        super().__init__()
        self.spans, self._depth, self._open = [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self._depth == 0 and attrs.get("class") == "toks" and not self.spans:
            self._depth = 1
        elif self._depth and tag == "span":
            self._open = [attrs.get("title"), ""]

    def handle_endtag(self, tag):
        if self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None
        elif self._depth and tag == "span":
            self._depth = 0

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data


def _visible(text: str) -> str:
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5")


def test_latent_page_shows_the_values_and_hides_the_sae_when_blind(tiny_lm):
    ex = _examples(tiny_lm, "gradient_topk", k=4)
    latent = int(ex.firing_counts.argmax())
    page = latent_page(ex, latent)
    parser = _Spans()
    parser.feed(page)
    top = ex.top.slot(latent)[0]
    shown = [(f"{a:.4g}", _visible(ex.token_text(t)))
             for t, a in zip(top["tokens"].tolist(), top["acts"].tolist()) if t >= 0]
    assert parser.spans == shown
    for text in ("sae_xyzzy", f"latent {latent}", "gradient_topk", ex.info["model"], SITE, "Nearest latents",
                 "attribution"):
        assert text in page
    blind = latent_page(ex, latent, blind=True)
    for text in ("sae_xyzzy", f"latent {latent}", "gradient_topk", ex.info["model"], SITE, "Nearest latents",
                 "attribution", ".html"):
        assert text not in blind, text
    assert "Top activations" in blind and "Samples by activation band" in blind
    with pytest.raises(IndexError):
        latent_page(ex, ex.d_sae)


def _open(chrome, path: Path):
    chrome.get(path.as_uri())
    return chrome.get_log("browser")


def test_hostile_text_shows_as_text_and_runs_nothing(tiny_lm, chrome, tmp_path):
    ex = _examples(tiny_lm)
    latent = int(ex.firing_counts.argmax())
    ids = [int(t) for t in ex.top.tokens[latent, 0].tolist() if t >= 0][:3]
    for token, text in zip(ids, HOSTILE_TOKENS):
        ex.token_strings[token] = text
    write_dashboard(ex, tmp_path)
    pages = [tmp_path / "index.html"] + sorted((tmp_path / "latents").glob("*.html"))[:8]
    pages.append(tmp_path / "latents" / f"{latent}.html")
    for page in pages:
        assert _open(chrome, page) == [], page
        assert chrome.execute_script("return window.__pwned") is None, page
        counts = chrome.execute_script(
            "return [document.scripts.length, document.querySelectorAll('img,[onerror],[onload]').length]")
        assert counts == [1 if page.name == "index.html" else 0, 0], page
    body = chrome.find_element("tag name", "body").text
    for text in HOSTILE_TOKENS:
        assert text in body  # the latent page of `latent` shows each injected token as its literal text
    # The byte-level corpus text, too: each example's text is exactly its tokens' text.
    shown = chrome.execute_script("return Array.from(document.querySelectorAll('#top .toks'), e => e.textContent)")
    expected = ["".join(_visible(ex.token_text(t)) for t in e["tokens"].tolist() if t >= 0)
                for e in ex.top.slot(latent)]
    assert shown == expected
    for page in pages:  # the files hold only escaped forms
        html = page.read_text()
        assert not any(raw in html for raw in ("<script>window", "<img", "<svg onload", "<b>bold", "<b>unclosed", "<i x", "<!--")), page
    assert "&lt;script&gt;window.__pwned = 4&lt;/script&gt;" in (tmp_path / "latents" / f"{latent}.html").read_text()


def test_index_opens_in_chromium_lists_latents_and_filters(tiny_lm, chrome, tmp_path):
    ex = _examples(tiny_lm)
    live = [i for i in range(ex.d_sae) if ex.firing_counts[i] > 0]
    index = write_dashboard(ex, tmp_path)
    assert _open(chrome, index) == []
    rows = chrome.find_elements("css selector", "#latents tbody tr")
    assert sorted(int(r.get_attribute("data-latent")) for r in rows) == live
    assert rows[0].is_displayed()
    first = [int(r.get_attribute("data-latent")) for r in rows]
    densities = [ex.firing_counts[i].item() for i in first]
    assert densities == sorted(densities, reverse=True)  # default order: density, highest first
    assert chrome.find_element("css selector", "#dead .dead").text == ", ".join(map(str, ex.dead()))
    shot = tmp_path / "index.png"
    assert chrome.save_screenshot(str(shot))
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800 and pixels[..., :3].std() > 0.05
    # The filter box: a latent number keeps the rows whose number or peak tokens contain it.
    chrome.find_element("id", "filter").send_keys(str(live[-1]))
    visible = [int(r.get_attribute("data-latent")) for r in rows if r.is_displayed()]
    assert live[-1] in visible and len(visible) < len(live)
    assert chrome.find_element("id", "shown").text == str(len(visible))
    chrome.find_element("id", "filter").clear()
    chrome.execute_script("const s = document.getElementById('sort'); s.value = 'latent:1';"
                          "s.dispatchEvent(new Event('change'));")
    order = [int(r.get_attribute("data-latent")) for r in chrome.find_elements("css selector", "#latents tbody tr")
             if r.is_displayed()]
    assert order == live
    # A latent's link opens its page, with its top examples.
    chrome.find_element("link text", str(live[0])).click()
    assert chrome.get_log("browser") == []
    assert chrome.title == f"sae_xyzzy: latent {live[0]}"
    assert len(chrome.find_elements("css selector", "#top .ex")) == len(ex.top.slot(live[0]))


def test_pages_only_for_the_latents_asked(tiny_lm, tmp_path):
    ex = _examples(tiny_lm)
    write_dashboard(ex, tmp_path, latents=[3, 5])
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == ["3.html", "5.html"]
    index = (tmp_path / "index.html").read_text()
    assert 'href="latents/3.html"' in index and 'href="latents/4.html"' not in index


def _saved_sae(directory: Path, model_dir: Path, d_in: int = 64) -> Path:
    torch.manual_seed(0)
    sae = create_sae("relu", d_in=d_in, d_sae=48)
    sae.meta = SAEMetadata(model_name=str(model_dir), site=SITE, context_size=32)
    sae.save(directory)
    return directory


def test_dashboard_cli_writes_the_site_and_the_examples(tmp_path, tiny_model_dir, corpus_txt):
    sae_dir = _saved_sae(tmp_path / "relu_sae", tiny_model_dir)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "saeforge", "dashboard", str(sae_dir), "--out", str(out), "--tokens", "512",
         "--source", str(corpus_txt), "--top-n", "5", "--batch-size", "4", "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dashboard: {out / 'index.html'}" in proc.stdout
    ex = LatentExamples.load(out / "examples")
    assert ex.info["n_contexts"] == 16 and ex.info["sae"]["path"] == str(sae_dir) and ex.info["site"] == SITE
    assert ex.top.context.shape == (48, 5)
    live = {f"{i}.html" for i in range(48) if ex.firing_counts[i] > 0}
    assert {p.name for p in (out / "latents").iterdir()} == live
    assert (out / "index.html").read_text().count("<tr data-latent=") == len(live)
    json.dumps(ex.info)  # plain JSON


def _run(capsys, *argv) -> tuple[int, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_dashboard_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, corpus_txt, capsys):
    code, err = _run(capsys, "dashboard", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().startswith(f"saeforge dashboard: error: {tmp_path / 'missing'} is not a saved SAE")
    assert len(err.strip().splitlines()) == 1
    narrow = _saved_sae(tmp_path / "narrow", tiny_model_dir, d_in=32)
    code, err = _run(capsys, "dashboard", str(narrow), "--out", str(tmp_path / "o"), "--source", str(corpus_txt))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "d_in = 32" in err and "width 64" in err
    code, err = _run(capsys, "dashboard", str(narrow), "--latents", "48", "--out", str(tmp_path / "o"))
    assert code == 2 and "--latents: [48] out of range" in err
    from saeforge.models import tiny_lm

    broken = tiny_lm("gemma3", seed=7)
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    broken.model.save_pretrained(tmp_path / "nan_model")
    broken.tokenizer.save_pretrained(tmp_path / "nan_model")
    capsys.readouterr()
    sae_dir = _saved_sae(tmp_path / "sae", tmp_path / "nan_model")
    code, err = _run(capsys, "dashboard", str(sae_dir), "--out", str(tmp_path / "o"), "--source", str(corpus_txt),
                     "--tokens", "64", "--no-progress")
    assert code == 2 and err.strip().splitlines()[-1].startswith("saeforge dashboard: error: ")
    assert "non-finite activations" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o" / "index.html").exists()
