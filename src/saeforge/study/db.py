"""The study database: one SQLite file holding everything a blind rating study needs and produces.

Tables: `meta` (JSON settings: seed, how the pages were made), `saes` (each SAE: its arm, i.e. the side of the
comparison it stands for, its stratum, i.e. the model and site it was trained on, its directory), `items` (one latent
of one SAE: an opaque random token, the latent index, the dashboard page shown for it), `raters`, `orders` (each
rater's order of all items, fixed by the study seed and the rater's name, and when each item was first shown) and
`labels` (a rater's Yes / Maybe / No and explanation for one item, with the time it was given).

Durability: the file is in WAL mode with synchronous=FULL, and every label is one transaction committed before the
server answers, so killing the server (even with SIGKILL) loses nothing already answered. A label is accepted only
for the rater's current item (the first unlabelled one in their order) after it was shown to them: labels cannot
skip, repeat or reach items the rater has not seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from saeforge.errors import UserError
from saeforge.files import atomic_target

FORMAT = "saeforge-rating-study/1"
LABELS = ("no", "maybe", "yes")  # scored 0 / 1 / 2 (paper A §4.3)
RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_EXPLANATION = 4000  # characters

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE saes (
    sae_id INTEGER PRIMARY KEY, arm TEXT NOT NULL, stratum TEXT NOT NULL, path TEXT NOT NULL, info TEXT NOT NULL,
    UNIQUE (arm, stratum));
CREATE TABLE items (
    item_id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE, sae_id INTEGER NOT NULL REFERENCES saes,
    latent INTEGER NOT NULL, page TEXT NOT NULL, UNIQUE (sae_id, latent));
CREATE TABLE raters (rater_id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, added_at TEXT NOT NULL);
CREATE TABLE orders (
    rater_id INTEGER NOT NULL REFERENCES raters, position INTEGER NOT NULL, item_id INTEGER NOT NULL REFERENCES items,
    shown_at TEXT, PRIMARY KEY (rater_id, position), UNIQUE (rater_id, item_id));
CREATE TABLE labels (
    rater_id INTEGER NOT NULL, item_id INTEGER NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('no', 'maybe', 'yes')), explanation TEXT NOT NULL, answered_at TEXT NOT NULL,
    PRIMARY KEY (rater_id, item_id), FOREIGN KEY (rater_id, item_id) REFERENCES orders (rater_id, item_id));
"""


class StudyError(UserError):
    """A study file that cannot be used (missing, not a study, already there)."""


class Refused(UserError):
    """A request the study refuses; `status` is the HTTP status that says why (400, 403, 404, 409)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class StudySAE:
    """One SAE of a study: `arm` names the side of the comparison, `stratum` what pairs are matched on besides the
    rater (model and site); `info` is what the report shows about it once unblinded."""
    arm: str
    stratum: str
    path: str
    info: dict


@dataclasses.dataclass(frozen=True)
class StudyItem:
    sae: int  # index into the study's SAE list
    latent: int
    page: str  # the blind dashboard page (a complete HTML document)


@dataclasses.dataclass(frozen=True)
class Current:
    """What a rater sees now: the item at `position` (0-based) of their order, or item None when they are done."""
    token: Optional[str]
    position: int
    labelled: int
    total: int


@dataclasses.dataclass(frozen=True)
class Rating:
    """One given label, unblinded (for the report)."""
    rater: str
    position: int  # in the rater's order
    arm: str
    stratum: str
    latent: int
    label: str
    explanation: str
    shown_at: str
    answered_at: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_rater_name(name: str) -> str:
    if not isinstance(name, str) or not RATER_NAME.fullmatch(name):
        raise Refused(400, f"rater name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
                           "or digit)")
    return name


def rater_order(seed: int, rater: str, n_items: int) -> list[int]:
    """The rater's order of item indices 0..n_items-1: a uniform random permutation fixed by (seed, rater)."""
    digest = hashlib.sha256(f"{seed}\0{rater}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n_items).tolist()


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: each write below opens its own transaction (BEGIN IMMEDIATE) and commits it at once.
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("PRAGMA synchronous = FULL")
    return con


def create_study(path: Path, saes: list[StudySAE], items: list[StudyItem], *, seed: int, settings: dict,
                 raters: tuple[str, ...] = ()) -> Path:
    """Write a new study file at `path` (which must not exist) with these SAEs, items and raters. The file is built
    under a temporary name and renamed into place, so a failure never leaves a partial study."""
    path = Path(path)
    if path.exists():
        raise StudyError(f"{path} already exists; a study is never overwritten (its labels would be lost): choose "
                         "another path or remove it")
    for name in raters:
        check_rater_name(name)
    if not items:
        raise StudyError("a study needs at least one item")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        con = _connect(tmp)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.executescript(SCHEMA)
            con.execute("BEGIN")
            meta = {"format": FORMAT, "seed": seed, "created_at": now(), "settings": settings}
            con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            con.executemany("INSERT INTO saes VALUES (?, ?, ?, ?, ?)",
                            [(i, s.arm, s.stratum, s.path, json.dumps(s.info)) for i, s in enumerate(saes)])
            tokens = set()
            while len(tokens) < len(items):
                tokens.add(secrets.token_hex(8))
            con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                            [(i, t, it.sae, it.latent, it.page) for i, (t, it) in enumerate(zip(tokens, items))])
            con.execute("COMMIT")
        finally:
            con.close()  # checkpoints the WAL into the file before it is renamed
    with Study(path) as study:
        for name in raters:
            study.add_rater(name)
    return path


class Study:
    """An open study file. Every method runs on its own connection's transaction; make one Study per thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StudyError(f"{self.path}: no such study file (make one with saeforge rate new)")
        try:
            self.con = _connect(self.path)
        except sqlite3.DatabaseError as e:
            raise StudyError(f"{self.path}: not a study database ({e})") from e
        try:
            fmt = self._meta("format")
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise StudyError(f"{self.path}: not a study database ({e})") from e
        if fmt != FORMAT:
            self.con.close()
            raise StudyError(f"{self.path}: not a study database of format {FORMAT} (found {fmt!r})")
        self.seed = int(self._meta("seed"))

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Study":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _meta(self, key: str):
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before any read it depends on (so two requests cannot both pass a check)."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # ------------------------------------------------------------------ what the study holds
    @property
    def settings(self) -> dict:
        return self._meta("settings")

    def saes(self) -> list[StudySAE]:
        rows = self.con.execute("SELECT arm, stratum, path, info FROM saes ORDER BY sae_id").fetchall()
        return [StudySAE(arm, stratum, path, json.loads(info)) for arm, stratum, path, info in rows]

    def n_items(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def raters(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT name FROM raters ORDER BY rater_id")]

    def add_rater(self, name: str) -> bool:
        """Register a rater and fix their order; False if they were already there (their order is kept)."""
        check_rater_name(name)
        with self._write() as con:
            if con.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone():
                return False
            rater_id = con.execute("INSERT INTO raters (name, added_at) VALUES (?, ?)", (name, now())).lastrowid
            item_ids = [r[0] for r in con.execute("SELECT item_id FROM items ORDER BY item_id")]
            order = rater_order(self.seed, name, len(item_ids))
            con.executemany("INSERT INTO orders (rater_id, position, item_id) VALUES (?, ?, ?)",
                            [(rater_id, pos, item_ids[i]) for pos, i in enumerate(order)])
        return True

    def _rater_id(self, name: str) -> int:
        row = self.con.execute("SELECT rater_id FROM raters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise Refused(404, f"unknown rater {name!r}")
        return row[0]

    def _current(self, rater_id: int) -> Current:
        total = self.con.execute("SELECT COUNT(*) FROM orders WHERE rater_id = ?", (rater_id,)).fetchone()[0]
        labelled = self.con.execute("SELECT COUNT(*) FROM labels WHERE rater_id = ?", (rater_id,)).fetchone()[0]
        row = self.con.execute(
            "SELECT o.position, i.token FROM orders o JOIN items i USING (item_id) WHERE o.rater_id = ? AND NOT "
            "EXISTS (SELECT 1 FROM labels l WHERE l.rater_id = o.rater_id AND l.item_id = o.item_id) "
            "ORDER BY o.position LIMIT 1", (rater_id,)).fetchone()
        if row is None:
            return Current(None, total, labelled, total)
        return Current(row[1], row[0], labelled, total)

    def show_current(self, rater: str) -> Current:
        """The rater's current item, recorded as shown (the first time only)."""
        with self._write() as con:
            rater_id = self._rater_id(rater)
            current = self._current(rater_id)
            if current.token is not None:
                con.execute("UPDATE orders SET shown_at = ? WHERE rater_id = ? AND position = ? AND shown_at IS NULL",
                            (now(), rater_id, current.position))
        return current

    def page(self, rater: str, token: str) -> str:
        """The dashboard page of an item the rater has been shown (their current one or one they labelled)."""
        row = self.con.execute(
            "SELECT i.page FROM items i JOIN orders o USING (item_id) WHERE i.token = ? AND o.shown_at IS NOT NULL "
            "AND o.rater_id = ?", (token, self._rater_id(rater))).fetchone()
        if row is None:
            raise Refused(404, f"no item {token!r} has been shown to rater {rater!r}")
        return row[0]

    def submit(self, rater: str, token: str, label: str, explanation: str) -> Current:
        """Record the rater's label for their current item, in one committed transaction; return what comes next.
        Refused (and nothing changes) unless `token` is the rater's current item and was shown to them."""
        if label not in LABELS:
            raise Refused(400, f"label must be one of {', '.join(LABELS)}; got {label!r}")
        if len(explanation) > MAX_EXPLANATION:
            raise Refused(400, f"the explanation is {len(explanation)} characters; at most {MAX_EXPLANATION}")
        if label != "no" and not explanation.strip():
            raise Refused(400, "write an explanation of what the latent responds to (needed for Yes and Maybe)")
        with self._write() as con:
            rater_id = self._rater_id(rater)
            row = con.execute("SELECT o.item_id, o.shown_at, EXISTS (SELECT 1 FROM labels l WHERE l.rater_id = "
                              "o.rater_id AND l.item_id = o.item_id) FROM orders o JOIN items i USING (item_id) "
                              "WHERE o.rater_id = ? AND i.token = ?", (rater_id, token)).fetchone()
            if row is None:
                raise Refused(403, f"item {token!r} is not in rater {rater!r}'s list")
            item_id, shown_at, labelled = row
            if labelled:
                raise Refused(409, f"rater {rater!r} has already labelled item {token!r}; a label is given once")
            current = self._current(rater_id)
            if token != current.token or shown_at is None:
                raise Refused(409, f"item {token!r} is not the item rater {rater!r} is being shown now")
            con.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?)", (rater_id, item_id, label, explanation, now()))
            return self._current(rater_id)

    def ratings(self) -> list[Rating]:
        """Every label given, unblinded, by rater and position in their order."""
        rows = self.con.execute(
            "SELECT r.name, o.position, s.arm, s.stratum, i.latent, l.label, l.explanation, o.shown_at, "
            "l.answered_at FROM labels l JOIN raters r USING (rater_id) JOIN orders o USING (rater_id, item_id) "
            "JOIN items i USING (item_id) JOIN saes s USING (sae_id) ORDER BY r.rater_id, o.position").fetchall()
        return [Rating(*row) for row in rows]
