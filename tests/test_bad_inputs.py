"""Bad input wherever a user can reach (predict, rank, CLI, loading): the documented result or one clear error."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil

import numpy as np
import pytest
from checkpoints import corpus, resave_as
from support import TOLERANCE

from flax_ce import CheckpointError, CrossEncoder, load
from flax_ce.cli import main
from flax_ce.inputs import shorten_long_texts


@pytest.fixture(scope="module")
def ce(bert_dir) -> CrossEncoder:
    return CrossEncoder(bert_dir, max_length=64)


@pytest.fixture(scope="module")
def reference(bert_dir):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    return STCrossEncoder(bert_dir, device="cpu", max_length=64)


@pytest.fixture(scope="module")
def ce_multi(roberta_dir) -> CrossEncoder:
    return CrossEncoder(roberta_dir, max_length=64)


# (name, inputs, exception type, regex the message must match: it names the item and the problem)
INVALID_INPUTS = [
    ("None", None, TypeError, "got None"),
    ("a single string", "query document", TypeError, "got a single string"),
    ("an int", 5, TypeError, "got int"),
    ("a dict", {"query": "document"}, TypeError, "got dict"),
    ("a set", {("a", "b")}, TypeError, "got set"),
    ("bytes", b"ab", TypeError, "got bytes"),
    ("int member", [("a", "b"), ("c", 3)], TypeError, r"pair 1, text 1: expected str, got int"),
    ("None member", [("a", "b"), (None, "d")], TypeError, r"pair 1, text 0: expected str, got NoneType"),
    ("bytes member", [(b"a", "b")], TypeError, r"pair 0, text 0: expected str, got bytes"),
    ("NaN member", [("a", float("nan"))], TypeError, r"pair 0, text 1: expected str, got float \(nan\)"),
    ("1-item pair", [("a", "b"), ("c",)], ValueError, r"pair 1 must have exactly 2 texts, got 1"),
    ("3-item pair", [("a", "b", "c")], ValueError, r"pair 0 must have exactly 2 texts, got 3"),
    ("empty pair", [("a", "b"), ()], ValueError, r"pair 1 must have exactly 2 texts, got 0"),
    (
        "documents as one list",
        ["query", "document 1", "document 2"],
        ValueError,
        r"the pair must have exactly 2 texts, got 3 \(a list whose first item is a string is read as one pair",
    ),
    ("ragged: a string among pairs", [("a", "b"), "c"], TypeError, r"pair 1 must be a list or tuple"),
    (
        "ragged: pairs after a string",
        ["a", ("b", "c")],
        TypeError,
        r"the pair, text 1: expected str, got tuple .*read as one pair",
    ),
    (
        "nested a level too deep",
        [[("a", "b"), ("c", "d")]],
        TypeError,
        r"pair 0, text 0: expected str, got tuple",
    ),
    ("a list as a text", [("a", "b"), (["c"], "d")], TypeError, r"pair 1, text 0: expected str, got list"),
    ("numpy bytes array", np.array([[b"a", b"b"]]), TypeError, r"must hold strings, got dtype \|S1"),
    ("numpy float array", np.zeros((2, 2)), TypeError, r"must hold strings, got dtype float64"),
    ("numpy 3-d array", np.array([[["a", "b"]]]), ValueError, r"shape \[N, 2\], got \(1, 1, 2\)"),
    ("numpy 3 columns", np.array([["a", "b", "c"]]), ValueError, r"pair 0 must have exactly 2 texts, got 3"),
    (
        "numpy object array holding None",
        np.array([["a", "b"], ["c", None]], dtype=object),
        TypeError,
        r"pair 1, text 1: expected str, got NoneType",
    ),
    (
        "lone surrogate",
        [("fine", "text"), ("bad \ud800 text", "b")],
        ValueError,
        r"pair 1, text 0: not valid Unicode text \(surrogates not allowed '\\ud800' at character 4\)",
    ),
]


@pytest.mark.parametrize(
    "inputs, error, message",
    [pytest.param(inputs, error, message, id=name) for name, inputs, error, message in INVALID_INPUTS],
)
def test_predict_rejects_bad_inputs(ce, inputs, error, message):
    with pytest.raises(error, match=message):
        ce.predict(inputs)


def test_generator_is_rejected(ce):
    with pytest.raises(TypeError, match="got generator"):
        ce.predict(pair for pair in [("a", "b")])


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_batch_size_must_be_positive(ce, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {batch_size!r}"):
        ce.predict([("a", "b")], batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ce.rank("q", ["a", "b"], batch_size=batch_size)


@pytest.mark.parametrize("top_k", [0, -3, 1.5, True])
def test_top_k_must_be_positive(ce, top_k):
    with pytest.raises(ValueError, match=rf"top_k must be a positive integer, got {top_k!r}"):
        ce.rank("q", ["a", "b"], top_k=top_k)


@pytest.mark.parametrize(
    "query, documents, error, message",
    [
        (None, ["a"], TypeError, r"query: expected str, got NoneType"),
        (("q",), ["a"], TypeError, r"query: expected str, got tuple"),
        ("q\udfff", ["a"], ValueError, r"query: not valid Unicode text"),
        ("q", None, TypeError, r"documents must be a list of strings, got NoneType"),
        ("q", "one document", TypeError, r"documents must be a list of strings, got str"),
        ("q", ["a", 3], TypeError, r"document 1: expected str, got int"),
        ("q", ["a", "b", ["c"]], TypeError, r"document 2: expected str, got list"),
        ("q", ["a", "\ud83d"], ValueError, r"document 1: not valid Unicode text"),
    ],
)
def test_rank_rejects_bad_inputs(ce, query, documents, error, message):
    with pytest.raises(error, match=message):
        ce.rank(query, documents)


def test_rank_on_multi_label_model(ce_multi):
    with pytest.raises(
        ValueError, match=r"num_labels=1; this one has 3 \(contradiction, entailment, neutral\)"
    ):
        ce_multi.rank("q", ["a", "b"])


def test_empty_inputs_give_empty_results(ce, ce_multi, reference):
    for empty in ([], (), np.array([], dtype=str), np.zeros((0, 2), dtype=str)):
        for model in (ce, ce_multi):
            scores = model.predict(empty)
            assert scores.shape == (0,) and scores.dtype == np.float32
    assert reference.predict([]).shape == (0,)
    assert ce.rank("q", []) == [] == reference.rank("q", [])


def test_numpy_string_arrays_are_pairs(ce):
    pairs = [("a question", "an answer"), ("naïve", "東京")]
    expected = ce.predict(pairs)
    assert np.abs(ce.predict(np.array(pairs)) - expected).max() <= 1e-6
    assert np.abs(ce.predict(np.array(pairs, dtype=object)) - expected).max() <= 1e-6
    assert np.abs(ce.predict([np.array(p) for p in pairs]) - expected).max() <= 1e-6
    single = ce.predict(np.array(pairs[1]))
    assert np.ndim(single) == 0 and abs(float(single) - expected[1]) <= 1e-6
    ranked = ce.rank("a question", np.array(["an answer", "東京"]))
    assert sorted(r["corpus_id"] for r in ranked) == [0, 1]


def test_unusual_text_scores_like_sentence_transformers(ce, reference):
    """Empty, unicode, emoji, control characters and very long strings: finite scores equal to the reference."""
    long_text = "word " * 50_000
    pairs = [
        ("", ""),
        ("", "a document"),
        ("a query", ""),
        ("naïve café — 東京 🙂 ünïcödé", "emoji only: 🙂🙃😀👍🏽🇯🇵"),
        ("\x00\x01\x07\x1b[31m", "\u200b\ufeff\u202e right-to-left \u2028 line separator"),
        ("tab\tnew\nline\r\n", " " * 100),
        (long_text, "short"),
        ("short", long_text),
    ]
    scores = ce.predict(pairs, batch_size=4)
    assert np.isfinite(scores).all()
    assert np.abs(scores - reference.predict(pairs, batch_size=4)).max() <= TOLERANCE
    # Truncation makes a very long text score like its first tokens.
    assert abs(scores[7] - ce.predict(("short", "word " * 100))) <= 1e-5


def test_two_very_long_texts_are_cut_to_the_same_truncation(ce, ce_multi, reference):
    """Truncating a pair pairs up every overflow window of both texts, so the tokenizer's memory grows with
    the product of their lengths (sentence-transformers runs out of memory on the pairs below); flax_ce
    first cuts such texts to prefixes that truncate to exactly the same tokens."""
    sentences = corpus()
    rng = np.random.RandomState(0)
    moderate = [
        (" ".join(rng.choice(sentences, 60)), " ".join(rng.choice(sentences, 50))),
        (" ".join(rng.choice(sentences, 40)), " ".join(rng.choice(sentences, 70))),
        ("same " + sentences[0] * 40, "same " + sentences[0] * 40),
    ]
    for model in (ce, ce_multi):
        cut = shorten_long_texts(model.tokenizer, moderate, model.max_length)
        assert all(
            len(c[0]) < len(p[0]) and len(c[1]) < len(p[1]) for c, p in zip(cut, moderate, strict=True)
        )
        direct = model.tokenizer(
            [a for a, _ in moderate], [b for _, b in moderate], truncation="longest_first", max_length=64
        )
        assert model.tokenize(moderate)["input_ids"] == direct["input_ids"]
    huge = [("word " * 50_000, "text " * 60_000), ("same " * 80_000, "same " * 80_000)]
    scores = ce.predict(huge, batch_size=2)
    assert np.isfinite(scores).all()
    cut = shorten_long_texts(ce.tokenizer, huge, ce.max_length)
    assert max(len(text) for pair in cut for text in pair) < 2_000
    assert np.abs(scores - reference.predict(cut, batch_size=2)).max() <= TOLERANCE


def test_apply_softmax_is_ignored_for_one_label(ce, reference):
    """sentence-transformers applies softmax only over several labels; a 1-label score is unchanged."""
    pairs = [("a query", "a document"), ("another", "text")]
    plain = ce.predict(pairs)
    softmaxed = ce.predict(pairs, apply_softmax=True)
    assert softmaxed.shape == (2,)
    np.testing.assert_array_equal(softmaxed, plain)
    assert np.abs(softmaxed - reference.predict(pairs, apply_softmax=True)).max() <= TOLERANCE


def test_top_k_beyond_documents_returns_all(ce, reference):
    ranked = ce.rank("q", ["a", "b", "c"], top_k=10)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in reference.rank("q", ["a", "b", "c"])]


# Loading


def test_model_argument_types(tmp_path):
    for constructor in (CrossEncoder, load):
        with pytest.raises(TypeError, match="must be a path or hub id, got NoneType"):
            constructor(None)
        with pytest.raises(TypeError, match="got int"):
            constructor(3)
        for empty in ("", "  "):
            with pytest.raises(ValueError, match="model_name_or_path is empty; pass a model directory"):
                constructor(empty)
        with pytest.raises(FileNotFoundError, match="neither a local directory nor a valid hub id"):
            constructor("not a hub id!")
        with pytest.raises(FileNotFoundError, match="no such model directory"):
            constructor(str(tmp_path / "missing" / "model"))
        with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
            constructor(str(tmp_path))


def test_model_directory_that_is_a_file(bert_dir):
    path = os.path.join(bert_dir, "config.json")
    for constructor in (CrossEncoder, load):
        with pytest.raises(NotADirectoryError, match=rf"{path}: is a file; pass the model directory"):
            constructor(path)


@pytest.mark.parametrize("max_length", [0, -8])
def test_max_length_must_be_positive(bert_dir, max_length):
    with pytest.raises(ValueError, match=rf"max_length must be a positive integer, got {max_length}"):
        CrossEncoder(bert_dir, max_length=max_length)


@pytest.fixture()
def model_copy(bert_dir, tmp_path) -> str:
    path = str(tmp_path / "model")
    shutil.copytree(bert_dir, path)
    return path


def deny_reading(monkeypatch, path: str) -> None:
    """Make `open(path)` fail as an unreadable file does (tests run as root, where chmod cannot)."""
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == os.path.abspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


@pytest.mark.parametrize(
    "name, message",
    [("config.json", "Permission denied"), ("model.safetensors", "cannot read the weights file")],
)
def test_unreadable_file_simulated(model_copy, monkeypatch, name, message):
    path = os.path.join(model_copy, name)
    deny_reading(monkeypatch, path)
    with pytest.raises(PermissionError, match=message) as info:
        CrossEncoder(model_copy)
    assert path in str(info.value)


def test_unreadable_file_real_permissions(model_copy):
    path = os.path.join(model_copy, "model.safetensors")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip(
                "chmod 000 does not stop reads here (running as root); see test_unreadable_file_simulated"
            )
        with pytest.raises(PermissionError, match="cannot read the weights file") as info:
            CrossEncoder(model_copy)
        assert path in str(info.value)
    finally:
        os.chmod(path, 0o644)


@pytest.fixture(scope="module")
def sharded_dir(bert_dir, tmp_path_factory) -> str:
    return resave_as(bert_dir, str(tmp_path_factory.mktemp("bad_inputs") / "sharded"), "sharded-safetensors")


@pytest.mark.parametrize(
    "shard",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "../model-00001-of-00002.safetensors",
        "sub/model.safetensors",
        "",
        7,
    ],
)
def test_sharded_index_naming_files_outside_its_directory(sharded_dir, tmp_path, shard):
    model_dir = str(tmp_path / "model")
    shutil.copytree(sharded_dir, model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(CheckpointError, match=rf"shard {shard!r} is not a plain file name") as info:
        CrossEncoder(model_dir)
    assert index in str(info.value)


# The command line: every error is one line on stderr and exit status 2, never a traceback.


def test_cli_bad_inputs_exit_2(bert_dir, roberta_dir, tmp_path, capsys):
    def fails(*argv: str, message: str) -> None:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err

    fails(
        "predict", bert_dir, "--pair", "a", "b", "--batch-size", "0", message="batch_size must be a positive"
    )
    fails(
        "rank",
        bert_dir,
        "--query",
        "q",
        "--documents",
        "a",
        "--top-k",
        "0",
        message="top_k must be a positive",
    )
    fails("rank", roberta_dir, "--query", "q", "--documents", "a", message="needs a model with num_labels=1")
    fails("predict", f"{bert_dir}/config.json", "--pair", "a", "b", message="is a file")
    fails("predict", bert_dir, message="no pairs given")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('["a", "b"]\n\n["a", "b", "c"]\n')
    fails(
        "predict", bert_dir, "--pairs", str(rows), message=f"{rows}, line 3 must have exactly 2 texts, got 3"
    )
    rows.write_text('["a", 3]\n')
    fails("predict", bert_dir, "--pairs", str(rows), message=f"{rows}, line 1, text 1: expected str, got int")
    rows.write_text('["a", "b"]\n{"query": "a", "document": null}\n')
    fails(
        "predict",
        bert_dir,
        "--pairs",
        str(rows),
        message=f"{rows}, line 2, text 1: expected str, got NoneType",
    )
    rows.write_text('"just one text"\n')
    fails("predict", bert_dir, "--pairs", str(rows), message=f"{rows}, line 1 must be a list or tuple")
    rows.write_text('{"question": "a", "answer": "b"}\n')
    fails(
        "predict", bert_dir, "--pairs", str(rows), message=f"{rows}, line 1: an object needs query/document"
    )
    rows.write_text('"a"\n42\n')
    fails(
        "rank",
        bert_dir,
        "--query",
        "q",
        "--documents-file",
        str(rows),
        message=f"{rows}, line 2: expected a string",
    )
