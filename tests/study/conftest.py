"""The study tests' fixtures: a study file, and a server on it in a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from study_helpers import make_study

from saeforge.study.server import StudyServer


@pytest.fixture
def study_path(tmp_path) -> Path:
    return make_study(tmp_path / "study.sqlite")


@pytest.fixture
def server_url(study_path):
    server = StudyServer(study_path, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(5)
