"""Ray Data integration: CrossEncoderScorer on numpy, pandas and pyarrow batches, and on 2 Ray actors."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import sample_pairs

from flax_ce import CrossEncoder
from flax_ce.integrations.ray import CrossEncoderScorer


@pytest.fixture(scope="module")
def pairs():
    return sample_pairs(12, seed=7)


def test_numpy_pandas_pyarrow_batches_equal_predict(bert_dir, roberta_dir, pairs):
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    expected = CrossEncoder(bert_dir, max_length=64).predict(pairs)
    scorer = CrossEncoderScorer(bert_dir, max_length=64)
    columns = {"query": np.array([a for a, _ in pairs], dtype=object), "document": [b for _, b in pairs]}
    columns["document"] = np.array(columns["document"], dtype=object)
    out = scorer(dict(columns))
    assert set(out) == {"query", "document", "score"} and out["score"].shape == (12,)
    np.testing.assert_allclose(out["score"], expected, atol=1e-6)
    np.testing.assert_allclose(scorer(pd.DataFrame(columns))["score"].to_numpy(), expected, atol=1e-6)
    table = scorer(pa.table(columns))
    assert table.column_names == ["query", "document", "score"]
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="no column 'query'.*text_columns"):
        scorer({"a": columns["query"], "b": columns["document"]})

    # Other text columns, a 3-label model: "scores" [N, 3]; an empty batch keeps that shape.
    nli = CrossEncoderScorer(roberta_dir, text_columns=("premise", "hypothesis"), max_length=64)
    expected = CrossEncoder(roberta_dir, max_length=64).predict(pairs)
    batch = pa.table({"premise": columns["query"], "hypothesis": columns["document"]})
    assert np.abs(np.array(nli(batch).column("scores").to_pylist()) - expected).max() <= 1e-6
    assert np.stack(nli(pd.DataFrame(batch.to_pandas()))["scores"]).shape == (12, 3)
    assert nli({"premise": np.array([]), "hypothesis": np.array([])})["scores"].shape == (0, 3)


@pytest.mark.slow
def test_ray_data_two_actors_equal_predict(bert_dir, pairs):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    expected = CrossEncoder(bert_dir, max_length=64).predict(pairs)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        rows = [{"id": i, "query": a, "document": b} for i, (a, b) in enumerate(pairs)]
        scored = ray.data.from_items(rows).map_batches(
            CrossEncoderScorer,
            fn_constructor_kwargs={"model_name_or_path": bert_dir, "max_length": 64},
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=1,
            batch_size=4,
        )
        out = sorted(scored.take_all(), key=lambda row: row["id"])
    finally:
        ray.shutdown()
    assert [row["id"] for row in out] == list(range(len(pairs)))
    np.testing.assert_allclose([row["score"] for row in out], expected, atol=1e-6)
