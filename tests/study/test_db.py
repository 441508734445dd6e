"""The study file: orders fixed per rater, labels only for the current shown item, nothing lost or half-written."""

from __future__ import annotations

import sqlite3

import pytest

from saeforge.study.db import Refused, Study, StudyError, rater_order

from study_helpers import LATENTS, make_study, snapshot


def test_each_rater_has_a_fixed_random_order_of_all_items(tmp_path):
    a = make_study(tmp_path / "a.sqlite", raters=("alice", "bob"), seed=3)
    b = make_study(tmp_path / "b.sqlite", raters=("bob", "alice"), seed=3)
    with Study(a) as sa, Study(b) as sb:
        def order(study, rater):
            rows = study.con.execute("SELECT i.sae_id, i.latent FROM orders o JOIN raters r USING (rater_id) JOIN "
                                     "items i USING (item_id) WHERE r.name = ? ORDER BY o.position", (rater,))
            return rows.fetchall()

        # The same (seed, rater) gives the same order whoever registered first; items are every latent once.
        assert order(sa, "alice") == order(sb, "alice") and order(sa, "bob") == order(sb, "bob")
        assert sorted(order(sa, "alice")) == sorted((s, l) for s, ls in enumerate(LATENTS) for l in ls)
        assert order(sa, "alice") != order(sa, "bob")
        assert sa.add_rater("alice") is False  # already there: the order is kept
    assert rater_order(0, "x", 6) != rater_order(1, "x", 6) and sorted(rater_order(0, "x", 6)) == list(range(6))


def test_labels_follow_the_order_and_are_given_once(study_path):
    with Study(study_path) as study:
        first = study.show_current("alice")
        assert (first.position, first.labelled, first.total) == (0, 0, 6)
        assert study.show_current("alice") == first  # reloading shows the same item
        after = study.submit("alice", first.token, "yes", "  rivers ")
        assert (after.position, after.labelled) == (1, 1)
        with pytest.raises(Refused) as e:
            study.submit("alice", first.token, "yes", "rivers")
        assert e.value.status == 409
        # The next item has not been shown yet: refused until the rater's page shows it.
        with pytest.raises(Refused) as e:
            study.submit("alice", after.token, "no", "")
        assert e.value.status == 409
        assert study.show_current("alice").token == after.token
        study.submit("alice", after.token, "no", "")
        ratings = study.ratings()
    assert [(r.rater, r.position, r.label, r.explanation) for r in ratings] == [
        ("alice", 0, "yes", "  rivers "), ("alice", 1, "no", "")]


@pytest.mark.parametrize("rater, which, label, explanation, status", [
    ("alice", "later", "yes", "x", 409),     # an item further down the rater's order
    ("alice", "bogus", "yes", "x", 403),     # no such item
    ("carol", "current", "yes", "x", 404),   # an unregistered rater
    ("alice", "current", "YES", "x", 400),   # not a label
    ("alice", "current", "maybe", " ", 400),  # Yes and Maybe need an explanation
    ("alice", "current", "no", "x" * 4001, 400),
    ("bob", "current", "yes", "x", 409),     # alice's current item has not been shown to bob
])
def test_refused_labels_change_nothing(study_path, rater, which, label, explanation, status):
    with Study(study_path) as study:
        current = study.show_current("alice")
        tokens = [r[0] for r in study.con.execute(
            "SELECT i.token FROM orders o JOIN items i USING (item_id) JOIN raters r USING (rater_id) "
            "WHERE r.name = 'alice' ORDER BY o.position")]
        bob_first = study.con.execute(
            "SELECT i.token FROM orders o JOIN items i USING (item_id) JOIN raters r USING (rater_id) "
            "WHERE r.name = 'bob' AND o.position = 0").fetchone()[0]
        token = {"current": current.token, "later": tokens[2], "bogus": "00ff00ff00ff00ff"}[which]
        if rater == "bob" and token == bob_first:
            token = tokens[1]  # bob's own first item would be allowed once shown; use another of alice's
        before = snapshot(study_path)
        with pytest.raises(Refused) as e:
            study.submit(rater, token, label, explanation)
        assert e.value.status == status
        assert snapshot(study_path) == before


def test_a_study_is_never_overwritten_and_foreign_files_are_refused(tmp_path, study_path):
    with pytest.raises(StudyError, match="already exists"):
        make_study(study_path)
    with Study(study_path) as study:
        assert study.n_items() == 6
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StudyError, match="not a study"):
        Study(other)
    (tmp_path / "text.sqlite").write_text("hello")
    with pytest.raises(StudyError, match="not a study"):
        Study(tmp_path / "text.sqlite")
    with pytest.raises(StudyError, match="no such study"):
        Study(tmp_path / "missing.sqlite")
    with pytest.raises(Refused, match="rater name"):
        make_study(tmp_path / "bad.sqlite", raters=("../etc",))
    assert not (tmp_path / "bad.sqlite").exists()  # nothing half-made is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite", "study.sqlite", "text.sqlite"]
