"""`flax-ce parity` and `flax_ce.parity.check`: passes on every family, localises a corrupted layer."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from checkpoints import build_modernbert, build_xlm_roberta, sample_pairs
from support import TOLERANCE

from flax_ce import CrossEncoder
from flax_ce.cli import main
from flax_ce.parity import (
    BF16_RELATIVE_TOLERANCE,
    FP32_TOLERANCE,
    LayerDiff,
    ParityReport,
    builtin_pairs,
    check,
    format_report,
)

REQUIRED_KEYS = {"max_abs_diff", "tolerance", "passed", "n_pairs", "spearman", "per_layer"}


@pytest.fixture(scope="module")
def all_dirs(family_dirs, minilm_dir, deberta_dirs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parity_tool")
    return {
        **family_dirs,
        "minilm": minilm_dir,
        **deberta_dirs,
        "xlm-roberta": build_xlm_roberta(str(root / "xlm-roberta"), positions=130),
        "modernbert": build_modernbert(str(root / "modernbert"), max_length=128),
    }


def run_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["parity", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def corrupted_copy(source: str, path: str, key: str, scale: float = 0.05) -> str:
    """A copy of `source` with Gaussian noise added to one tensor of model.safetensors."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, path)
    tensors = load_file(f"{path}/model.safetensors")
    noise = np.random.RandomState(0).standard_normal(tensors[key].shape).astype(np.float32)
    tensors[key] = tensors[key] + scale * noise
    save_file(tensors, f"{path}/model.safetensors")
    return path


FAMILIES = ["bert", "roberta", "electra", "minilm", "deberta-v1", "deberta-v3", "xlm-roberta", "modernbert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_passes_on_every_family(family, all_dirs, capsys):
    code, report = run_json(capsys, all_dirs[family], "--layers", "--n", "16", "--batch-size", "16")
    print(
        f"{family}: max_abs_diff {report['max_abs_diff']:.2e}, "
        f"max_abs_logit_diff {report['max_abs_logit_diff']:.2e}, "
        f"worst layer {max(layer['max_abs_diff'] for layer in report['per_layer']):.2e}"
    )
    assert code == 0
    assert REQUIRED_KEYS <= set(report)
    assert report["passed"] is True and report["first_divergence"] is None
    assert report["tolerance"] == FP32_TOLERANCE
    assert report["max_abs_diff"] <= TOLERANCE and report["max_abs_logit_diff"] <= TOLERANCE
    assert report["n_pairs"] == 16
    assert report["spearman"] > 0.9999 and report["kendall"] > 0.999
    agreement = report["top1_agreement"] if report["num_labels"] == 1 else report["label_agreement"]
    assert agreement == 1.0
    names = [layer["name"] for layer in report["per_layer"]]
    assert names[0] == "embeddings" and names[-1] == "head" and names[1] == "layer 1"
    for layer in report["per_layer"]:
        assert layer["max_abs_diff"] <= layer["tolerance"]
        if layer["name"].startswith("layer"):
            assert layer["attention_max_abs_diff"] <= TOLERANCE
            assert layer["feed_forward_max_abs_diff"] <= TOLERANCE


@pytest.mark.parametrize(
    "key, expected",
    [
        ("bert.embeddings.word_embeddings.weight", "embeddings"),
        ("bert.encoder.layer.1.attention.self.query.weight", "layer 2 (attention)"),
        ("bert.encoder.layer.0.output.dense.weight", "layer 1 (feed-forward)"),
        ("classifier.weight", "head"),
    ],
)
def test_corrupted_weight_names_first_diverging_stage(key, expected, bert_dir, tmp_path):
    bad = corrupted_copy(bert_dir, str(tmp_path / "bad"), key)
    # Our side only: the reference still loads the intact checkpoint.
    report = check(bert_dir, n=8, layers=True, flax_model=CrossEncoder(bad))
    assert isinstance(report, ParityReport)
    assert report.passed is False
    assert report.max_abs_logit_diff > report.tolerance
    assert report.first_divergence == expected
    stage = expected.split(" (")[0]
    before = [layer.name for layer in report.per_layer].index(stage)
    assert all(layer.max_abs_diff <= layer.tolerance for layer in report.per_layer[:before])
    assert f"first diverging stage: {expected}" in format_report(report)


def test_cli_exits_1_and_names_layer_for_corrupted_deberta(deberta_dirs, tmp_path, capsys):
    source = deberta_dirs["deberta-v3"]
    bad = corrupted_copy(
        source, str(tmp_path / "bad"), "deberta.encoder.layer.1.attention.self.value_proj.weight"
    )
    code, report = run_json(capsys, source, "--flax-model", bad, "--layers", "--n", "8")
    assert code == 1
    assert report["passed"] is False
    assert report["first_divergence"] == "layer 2 (attention)"
    assert main(["parity", source, "--flax-model", bad, "--n", "8"]) == 1
    assert "rerun with --layers" in capsys.readouterr().out


def test_corrupted_modernbert_names_the_layer_and_block(all_dirs, tmp_path):
    source = all_dirs["modernbert"]
    bad = corrupted_copy(source, str(tmp_path / "bad"), "model.layers.2.mlp.Wo.weight")
    report = check(source, n=8, layers=True, flax_model=CrossEncoder(bad))
    assert report.passed is False
    assert report.first_divergence == "layer 3 (feed-forward)"


def test_check_function(roberta_dir):
    pairs = sample_pairs(10)
    report = check(roberta_dir, pairs, n=7)
    assert report.passed and report.n_pairs == 7 and report.num_labels == 3
    assert report.label_agreement == 1.0 and report.top1_agreement is None
    assert report.per_layer is None
    assert report.max_abs_diff <= TOLERANCE
    json.dumps(report.to_dict())
    assert "PASSED" in format_report(report)


def test_bf16_within_documented_tolerance(bert_dir, capsys):
    code, report = run_json(capsys, bert_dir, "--dtype", "bfloat16", "--n", "16", "--layers")
    assert code == 0 and report["passed"] is True
    assert report["dtype"] == "bfloat16"
    assert report["tolerance"] >= BF16_RELATIVE_TOLERANCE
    # It really ran in bf16: differences well above fp32's, yet the ranking holds.
    assert FP32_TOLERANCE < report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["spearman"] > 0.9


def test_pairs_file_and_human_report(bert_dir, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [list(p) for p in sample_pairs(4)] + [{"query": "what is a list", "document": "a sequence"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["parity", bert_dir, "--pairs", str(path), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "5 pairs" in out and "PASSED" in out and "layer 2" in out and "spearman" in out


def test_usage_and_load_errors_exit_2(bert_dir, tmp_path, capsys, monkeypatch):
    assert main(["parity", str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["parity", f"{bert_dir}/config.json"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["parity", bert_dir, "--n", "0"]) == 2
    assert "n must be a positive integer" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["a", "b"]\n["a", "b", "c"]\n')
    assert main(["parity", bert_dir, "--pairs", str(bad)]) == 2
    assert "bad.jsonl, line 2 must have exactly 2 texts, got 3" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["parity", bert_dir, "--pairs", str(empty)]) == 2
    assert "no pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["parity", bert_dir, "--dtype", "float16"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    # Without the PyTorch reference installed: a clear message and exit 2.
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    assert main(["parity", bert_dir, "--n", "2"]) == 2
    assert "pip install torch sentence-transformers" in capsys.readouterr().err


def test_builtin_pairs():
    pairs = builtin_pairs(191)
    assert len(set(pairs)) == 191 and builtin_pairs(5) == pairs[:5]
    assert any(len(a) > 3000 for a, _ in pairs)
    first = builtin_pairs(32)
    assert all(sum(q == a for a, _ in first) == 4 for q, _ in first)  # 8 rankings of 4 documents
    assert any(a == "" or b == "" for a, b in pairs) and any("🙂" in a for a, _ in pairs)
    with pytest.raises(ValueError, match="built-in set has 191 pairs"):
        builtin_pairs(192)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        builtin_pairs(0)


def test_human_report_flags_only_the_diverging_stage():
    names = ["embeddings", *(f"layer {i}" for i in range(1, 13)), "head"]
    per_layer = [LayerDiff(name, 1.0 if name == "layer 12" else 1e-7, 1e-8, 1e-5) for name in names]
    report = ParityReport(
        "m", "bert", "float32", 4, 1, 512, 512, 1e-5, 1.0, 0.5, 1.0, 0.1, 0.1, 0.5, None, False,
        per_layer=per_layer, first_divergence="layer 12 (attention)",
    )  # fmt: skip
    flagged = [line.split()[:2] for line in format_report(report).splitlines() if "> tolerance" in line]
    assert flagged == [["layer", "12"]]  # not "layer 1", whose name is a prefix of it
