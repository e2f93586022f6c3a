"""Local data of chatforge's lm-eval tasks: the public files in ``shared/data`` beside the repository.

The folder is ``$CHATFORGE_SHARED_DATA`` when set (``chatforge eval --data-dir`` sets it), else
``../shared/data`` relative to the repository. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

DATA_ENV = "CHATFORGE_SHARED_DATA"
DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"  # <repo>/../shared/data


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def _file(rel: str) -> Path:
    f = data_dir() / rel
    if not f.is_file():
        raise FileNotFoundError(f"{f}: data file of a chatforge lm-eval task not found; point {DATA_ENV} "
                                f"(or chatforge eval --data-dir) at the folder that holds {rel}")
    return f


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def sst2(file: str = "sentiment/sst2_glue_dev.tsv", **metadata):
    """GLUE SST-2 dev: a TSV of ``sentence<TAB>label`` (1 = positive) with a header row -> validation split."""
    f = _file(file)
    rows = []
    with open(f, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:2] != ["sentence", "label"]:
            raise ValueError(f"{f}:1: expected the header 'sentence<TAB>label', got {header!r}")
        for n, rec in enumerate(reader, start=2):
            if len(rec) != 2 or rec[1] not in ("0", "1"):
                raise ValueError(f"{f}:{n}: expected 'sentence<TAB>0|1', got {rec!r}")
            rows.append({"sentence": rec[0].strip(), "label": int(rec[1])})
    return _dataset("validation", rows)


ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # " = Robert Boulter = " starts an article; " = = x = = " a section


def wikitext_documents(text: str) -> list[str]:
    """WikiText's one-line-per-paragraph text cut into articles (each starts at its level-1 title line)."""
    docs: list[list[str]] = []
    for line in text.splitlines():
        if ARTICLE_TITLE.match(line) or not docs:
            docs.append([])
        docs[-1].append(line)
    return [d for d in ("\n".join(x).strip() for x in docs) if d]


def wikitext2(file: str = "pretrain/wikitext2_test.txt", **metadata):
    """WikiText-2 test (tokenized version, as distributed with pytorch/examples) -> one row per article."""
    f = _file(file)
    return _dataset("test", [{"page": p} for p in wikitext_documents(f.read_text(encoding="utf-8"))])


def perplexity_results(doc: dict, results: list) -> dict:
    """Per-document (log-likelihood, words) and (log-likelihood, bytes) for lm-eval's perplexity metrics."""
    (loglikelihood,) = results
    words = len(doc["page"].split())
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
