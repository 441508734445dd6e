"""Shared by the study tests (rootdir-relative import, like data_helpers): study files made from small hand-written
pages (no language model), and raw HTTP."""

from __future__ import annotations

import http.client
import json
import re
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from saeforge.study.db import StudyItem, StudySAE, create_study

ARMS = ("alpha_arm", "beta_arm")
SAE_DIRS = ("/runs/secret_alpha_dir", "/runs/secret_beta_dir")
STRATUM = "tiny-model @ blocks.0.resid_post"
LATENTS = ((7013, 7024, 7035), (7046, 7057, 7068))
# A hostile page: its script must never run where a rater sees it.
HOSTILE = "<script>document.body.setAttribute('data-ran', 'yes')</script>"


def page(sae: int, latent: int) -> str:
    return (f'<!doctype html><html><body><h1 id="marker">page-{sae}-{latent}</h1><p>top contexts: '
            f"&lt;b&gt;river&lt;/b&gt;</p>{HOSTILE}</body></html>")


def make_study(path: Path, raters=("alice", "bob"), seed: int = 0) -> Path:
    saes = [StudySAE(arm, STRATUM, d, {"name": Path(d).name, "variant": arm}) for arm, d in zip(ARMS, SAE_DIRS)]
    items = [StudyItem(s, latent, page(s, latent)) for s, latents in enumerate(LATENTS) for latent in latents]
    return create_study(path, saes, items, seed=seed, settings={"made_by": "tests"}, raters=raters)


def snapshot(path: Path) -> tuple[list, list]:
    """The labels and orders tables, read straight from the file."""
    con = sqlite3.connect(path)
    try:
        labels = con.execute("SELECT * FROM labels ORDER BY rater_id, item_id").fetchall()
        orders = con.execute("SELECT * FROM orders ORDER BY rater_id, position").fetchall()
    finally:
        con.close()
    return labels, orders


def request(url: str, method: str = "GET", path: str = "/", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, str]:
    """(status, headers, body text) of one raw request (no redirects followed, any headers sent as given)."""
    parts = urlsplit(url)
    con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        con.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            con.putheader(key, value)
        con.endheaders(body)
        resp = con.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        con.close()


def current_item(url: str, rater: str) -> str | None:
    """Open the rater's page (which records the item as shown) and read the item token from its form."""
    status, _, text = request(url, path=f"/rater/{rater}")
    assert status == 200, text
    m = re.search(r'name="item" value="([0-9a-f]+)"', text)
    return m[1] if m else None


def post_json(url: str, rater: str, payload) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    status, _, text = request(url, "POST", f"/rater/{rater}/label", body,
                              {"Content-Type": "application/json", "Content-Length": str(len(body))})
    return status, json.loads(text)
