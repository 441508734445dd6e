"""`saeforge rate serve` as a real subprocess, killed with SIGKILL in the middle of a study: every label it answered
is in the study file, and a new server continues where each rater stopped."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from study_helpers import current_item, post_json, snapshot

SRC = Path(__file__).resolve().parents[2] / "src"


def _serve(study_path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "saeforge", "rate", "serve", str(study_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if m := re.match(r"serving: (http://127\.0\.0\.1:\d+)/", line):
            return proc, m[1]
        assert time.monotonic() < deadline, "the server did not start"
    raise AssertionError(f"the server exited with {proc.wait()} before serving")


def test_sigkill_mid_study_keeps_every_answered_label(study_path):
    proc, url = _serve(study_path)
    answered: list[tuple[str, str]] = []
    refused: list[int] = []

    def rate_until_killed():
        try:
            while True:
                token = current_item(url, "alice")
                if token is None:
                    return
                label = ("yes", "no", "maybe")[len(answered) % 3]
                status, _ = post_json(url, "alice", {"item": token, "label": label, "explanation": f"e{token}"})
                if status != 200:
                    refused.append(status)
                    return
                answered.append((token, label))
        except OSError:  # the server is gone
            return

    try:
        assert post_json(url, "bob", {"item": current_item(url, "bob"), "label": "maybe", "explanation": "b"})[0] \
            == 200
        rater = threading.Thread(target=rate_until_killed)
        rater.start()
        while len(answered) < 2 and rater.is_alive():
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)  # mid-request, most likely
        proc.wait(10)
        rater.join(30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not refused
    assert 2 <= len(answered) < 6, "the kill came too late to be mid-study"

    con = sqlite3.connect(study_path)
    rows = con.execute("SELECT r.name, i.token, l.label, l.explanation FROM labels l JOIN raters r USING (rater_id) "
                       "JOIN items i USING (item_id)").fetchall()
    con.close()
    alice = {(token, label) for name, token, label, _ in rows if name == "alice"}
    assert set(answered) <= alice  # nothing answered is lost ...
    assert len(alice) <= len(answered) + 1  # ... and at most the label in flight was committed unanswered
    assert all(expl == f"e{token}" for name, token, _, expl in rows if name == "alice")
    assert [(name, label) for name, _, label, _ in rows if name == "bob"] == [("bob", "maybe")]

    # A new server picks up where alice stopped: her next item is the first she has not labelled.
    proc, url = _serve(study_path)
    try:
        token = current_item(url, "alice")
        assert token is not None and token not in {t for t, _ in alice}
        assert post_json(url, "alice", {"item": token, "label": "no", "explanation": ""})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert len(snapshot(study_path)[0]) == len(rows) + 1
