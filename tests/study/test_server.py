"""The rating server over real HTTP (a server thread on 127.0.0.1): the pages, the policies that keep a dashboard's
text inert, blindness, and the 4xx answers that change nothing."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from saeforge.study.db import Study

from study_helpers import ARMS, LATENTS, SAE_DIRS, current_item, page, post_json, request, snapshot


def _order(study_path, rater: str) -> list[str]:
    con = sqlite3.connect(study_path)
    try:
        return [r[0] for r in con.execute(
            "SELECT i.token FROM orders o JOIN items i USING (item_id) JOIN raters r USING (rater_id) "
            "WHERE r.name = ? ORDER BY o.position", (rater,))]
    finally:
        con.close()


def test_a_rater_labels_through_the_form_and_sees_progress(server_url, study_path):
    status, headers, text = request(server_url, path="/rater/alice")
    assert status == 200 and "0 of 6 labelled" in text
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in headers[
        "Content-Security-Policy"]
    token = re.search(r'name="item" value="([0-9a-f]+)"', text)[1]
    assert token == _order(study_path, "alice")[0]
    assert f'src="/item/{token}?rater=alice"' in text

    status, headers, item = request(server_url, path=f"/item/{token}?rater=alice")
    assert status == 200 and "sandbox" in headers["Content-Security-Policy"]
    with Study(study_path) as study:
        sae, latent = study.con.execute("SELECT sae_id, latent FROM items WHERE token = ?", (token,)).fetchone()
    assert item == page(sae, latent)

    body = b"item=" + token.encode() + b"&label=maybe&explanation=rivers+and+%3Cb%3Ebridges%3C%2Fb%3E"
    status, headers, _ = request(server_url, "POST", "/rater/alice/label", body, {
        "Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(len(body))})
    assert status == 303 and headers["Location"] == "/rater/alice"
    status, _, text = request(server_url, path="/rater/alice")
    assert "1 of 6 labelled" in text and "Latent 2 of 6" in text
    labels, _ = snapshot(study_path)
    assert [(row[2], row[3]) for row in labels] == [("maybe", "rivers and <b>bridges</b>")]

    # Through JSON to the end; then the rater's page says so.
    for n in range(2, 7):
        status, answer = post_json(server_url, "alice", {"item": current_item(server_url, "alice"), "label": "no",
                                                         "explanation": ""})
        assert status == 200 and answer["labelled"] == n and answer["total"] == 6
    assert answer["next"] is None
    status, _, text = request(server_url, path="/rater/alice")
    assert status == 200 and "All 6 latents labelled" in text and current_item(server_url, "alice") is None


def test_pages_do_not_identify_the_sae_or_the_latent(server_url, study_path):
    """The server's own pages and headers name neither the SAE (arm, directory) nor the latent's index; the item
    page is the stored dashboard, byte for byte (what that holds is the dashboard's business: blind=True)."""
    seen = []
    for _ in range(6):
        token = current_item(server_url, "bob")
        status, headers, text = request(server_url, path="/rater/bob")
        item_headers = request(server_url, path=f"/item/{token}?rater=bob")[1]
        seen += [text, headers["Content-Security-Policy"], item_headers["Content-Security-Policy"]]
        assert post_json(server_url, "bob", {"item": token, "label": "yes", "explanation": "x"})[0] == 200
    seen.append(request(server_url, path="/rater/bob")[2])
    text = "\n".join(seen)
    forbidden = [*ARMS, *SAE_DIRS, *(d.rsplit("/", 1)[1] for d in SAE_DIRS)] + [str(l) for ls in LATENTS for l in ls]
    assert not [f for f in forbidden if re.search(rf"\b{re.escape(f)}\b", text)]


def test_items_are_served_only_to_raters_who_were_shown_them(server_url, study_path):
    alice = _order(study_path, "alice")
    current_item(server_url, "alice")
    assert request(server_url, path=f"/item/{alice[0]}?rater=alice")[0] == 200
    assert request(server_url, path=f"/item/{alice[1]}?rater=alice")[0] == 404  # not shown yet
    assert request(server_url, path=f"/item/{alice[0]}?rater=bob")[0] == 404  # bob has not seen anything
    assert request(server_url, path=f"/item/{alice[0]}?rater=carol")[0] == 404
    assert request(server_url, path=f"/item/{alice[0]}")[0] == 400
    assert request(server_url, path="/rater/carol")[0] == 404
    assert request(server_url, path="/rater/..%2Fx")[0] == 400
    assert request(server_url, path="/nowhere")[0] == 404
    status, headers, _ = request(server_url, path="/rater?name=bob")
    assert status == 303 and headers["Location"] == "/rater/bob"


def _form(**fields) -> bytes:
    return "&".join(f"{k}={v}" for k, v in fields.items()).encode()


BAD_REQUESTS = {
    # name: (path, content type, body or a function of the current token, expected status)
    "bad JSON": ("/rater/alice/label", "application/json", lambda t: b'{"item": "' + t.encode(), 400),
    "JSON not an object": ("/rater/alice/label", "application/json", lambda t: b'["yes"]', 400),
    "label not a string": ("/rater/alice/label", "application/json",
                           lambda t: json.dumps({"item": t, "label": 2, "explanation": "x"}).encode(), 400),
    "missing field": ("/rater/alice/label", "application/json",
                      lambda t: json.dumps({"item": t, "label": "yes"}).encode(), 400),
    "unknown field": ("/rater/alice/label", "application/json",
                      lambda t: json.dumps({"item": t, "label": "no", "explanation": "", "sae": "a"}).encode(), 400),
    "wrong label": ("/rater/alice/label", "application/json",
                    lambda t: json.dumps({"item": t, "label": "perhaps", "explanation": "x"}).encode(), 400),
    "repeated form field": ("/rater/alice/label", "application/x-www-form-urlencoded",
                            lambda t: _form(item=t, label="yes", explanation="x") + b"&label=no", 400),
    "bad UTF-8": ("/rater/alice/label", "application/x-www-form-urlencoded",
                  lambda t: _form(item=t, label="no") + b"&explanation=\xff\xfe", 400),
    "not form encoding": ("/rater/alice/label", "application/x-www-form-urlencoded", lambda t: b"yes please", 400),
    "other content type": ("/rater/alice/label", "text/plain", lambda t: b"yes", 415),
    "unknown rater": ("/rater/carol/label", "application/json",
                      lambda t: json.dumps({"item": t, "label": "yes", "explanation": "x"}).encode(), 404),
    "bad rater name": ("/rater/a%20b/label", "application/json",
                       lambda t: json.dumps({"item": t, "label": "yes", "explanation": "x"}).encode(), 400),
    "not in the order": ("/rater/alice/label", "application/json",
                         lambda t: json.dumps({"item": "0123456789abcdef", "label": "yes",
                                               "explanation": "x"}).encode(), 403),
    "nowhere to post": ("/rater/alice", "application/json", lambda t: b"{}", 404),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_malformed_requests_get_4xx_and_change_nothing(server_url, study_path, name):
    path, content_type, body, expected = BAD_REQUESTS[name]
    token = current_item(server_url, "alice")
    before = snapshot(study_path)
    data = body(token)
    status, _, text = request(server_url, "POST", path, data,
                              {"Content-Type": content_type, "Content-Length": str(len(data))})
    assert status == expected, text
    assert snapshot(study_path) == before
    # The rater can still label the item afterwards.
    assert post_json(server_url, "alice", {"item": token, "label": "no", "explanation": ""})[0] == 200


def test_missing_length_oversized_body_and_other_methods_are_refused(server_url, study_path):
    token = current_item(server_url, "alice")
    before = snapshot(study_path)
    body = json.dumps({"item": token, "label": "yes", "explanation": "x"}).encode()
    assert request(server_url, "POST", "/rater/alice/label", body, {"Content-Type": "application/json"})[0] == 411
    assert request(server_url, "POST", "/rater/alice/label", body, {
        "Content-Type": "application/json", "Content-Length": str(10**6)})[0] == 413
    assert request(server_url, "PUT", "/rater/alice/label", body, {
        "Content-Type": "application/json", "Content-Length": str(len(body))})[0] == 405
    assert snapshot(study_path) == before


def test_repeated_and_unshown_labels_are_refused(server_url, study_path):
    token = current_item(server_url, "alice")
    label = {"item": token, "label": "yes", "explanation": "rivers"}
    assert post_json(server_url, "alice", label)[0] == 200
    after_first = snapshot(study_path)
    status, answer = post_json(server_url, "alice", label)
    assert status == 409 and "already labelled" in answer["error"]
    # The next item of alice's order exists but her page has not shown it yet.
    status, answer = post_json(server_url, "alice", {**label, "item": _order(study_path, "alice")[1]})
    assert status == 409 and "not the item" in answer["error"]
    # An item of alice's order that bob has not been shown.
    bob = _order(study_path, "bob")
    status, _ = post_json(server_url, "bob", {**label, "item": bob[1]})
    assert status == 409
    assert snapshot(study_path) == after_first


def test_rate_serve_errors_are_one_line(tmp_path, study_path, capsys):
    import socket

    from saeforge.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [
        (["rate", "serve", str(tmp_path / "missing.sqlite")], "no such study file"),
        (["rate", "serve", str(study_path), "--rater", "../x"], "rater name"),
        (["rate", "serve", str(study_path), "--port", str(taken.getsockname()[1])], "cannot listen"),
        (["rate", "report", str(tmp_path / "missing.sqlite")], "no such study file"),
        (["rate", "new", str(tmp_path / "new.sqlite")], "--sae A_DIR --sae B_DIR"),
    ]
    try:
        for argv, message in cases:
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            err = capsys.readouterr().err.strip()
            assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    finally:
        taken.close()
    assert not (tmp_path / "missing.sqlite").exists() and not (tmp_path / "new.sqlite").exists()
