"""The flax-ce command line: predict and rank, JSON out, exit code 2 on bad input."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from checkpoints import sample_pairs
from support import TOLERANCE

from flax_ce import CrossEncoder
from flax_ce.cli import commands, main


def test_predict_from_jsonl(bert_dir, tmp_path, capsys):
    pairs = sample_pairs(5)
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(json.dumps(p) for p in pairs[:3])
        + "\n"
        + json.dumps({"query": pairs[3][0], "document": pairs[3][1]})
    )
    assert main(["predict", bert_dir, "--pairs", str(path), "--pair", *pairs[4]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = CrossEncoder(bert_dir).predict([pairs[4], *pairs[:4]])
    assert np.abs(np.array([r["score"] for r in rows]) - expected).max() <= TOLERANCE


def test_predict_multilabel_has_label_names(roberta_dir, capsys):
    assert main(["predict", roberta_dir, "--pair", "a cat sits", "an animal sits", "--softmax"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["scores"]) == {"contradiction", "entailment", "neutral"}
    assert abs(sum(row["scores"].values()) - 1) < 1e-5


def test_rank(bert_dir, capsys):
    docs = [b for _, b in sample_pairs(4)]
    assert main(["rank", bert_dir, "--query", "what is a list", "--documents", *docs, "--top-k", "2"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    expected = CrossEncoder(bert_dir).rank("what is a list", docs, top_k=2)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in expected]


def test_errors_exit_2(bert_dir, roberta_dir, tmp_path, capsys):
    assert main(["predict", bert_dir]) == 2
    assert "no pairs" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["a", "b"]\n{oops\n')
    assert main(["predict", bert_dir, "--pairs", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["rank", roberta_dir, "--query", "q", "--documents", "d"]) == 2
    assert "num_labels=1" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing" / "x" / "y"), "--pair", "a", "b"]) == 2


def test_batch_size_is_not_forced_by_default():
    """Without --batch-size, predict, rank and parity let flax_ce plan batches by its token budget."""
    for name, argv in (("predict", ["m"]), ("rank", ["m", "--query", "q"]), ("parity", ["m"])):
        parser = argparse.ArgumentParser()
        commands()[name][0](parser)
        assert parser.parse_args(argv).batch_size is None
        assert parser.parse_args([*argv, "--batch-size", "32"]).batch_size == 32


def test_long_documents(bert_dir, roberta_dir, capsys):
    docs = [b for _, b in sample_pairs(8, long_every=2)][::2]
    args = ["--max-length", "32", "--long-documents", "max", "--document-overlap", "4"]
    assert main(["rank", bert_dir, "--query", "what is a list", "--documents", *docs, *args]) == 0
    ranked = json.loads(capsys.readouterr().out)
    expected = CrossEncoder(bert_dir, max_length=32).rank(
        "what is a list", docs, return_documents=True, long_documents="max", document_overlap=4
    )
    assert [(r["corpus_id"], r["window"]) for r in ranked] == [
        (r["corpus_id"], r["window"]) for r in expected
    ]
    assert (
        main(
            ["predict", roberta_dir, "--pair", "a cat", " ".join(docs), *args[:2], "--long-documents", "mean"]
        )
        == 2
    )
    assert "document_overlap=64 must be smaller than the room" in capsys.readouterr().err
    assert main(["predict", roberta_dir, "--pair", "a cat", "a dog", "--document-overlap", "-1"]) == 2
    assert "document_overlap must be an integer >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", bert_dir, "--pair", "a", "b", "--long-documents", "maxp"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'maxp'" in err and all(
        repr(m) in err for m in ("truncate", "max", "first", "mean")
    )
