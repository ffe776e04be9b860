"""flax_ce loads a pytorch_model.bin and scores pairs in a process where `import torch` fails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from checkpoints import resave_as, sample_pairs
from support import TOLERANCE

from flax_ce import CrossEncoder

SCRIPT = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
try:
    import torch
    raise SystemExit("torch is importable")
except ImportError:
    pass
import flax_ce
pairs = json.loads(sys.argv[2])
scores = flax_ce.CrossEncoder(sys.argv[1]).predict(pairs)
assert "torch" not in sys.modules or sys.modules["torch"] is None
print(json.dumps(scores.tolist()))
"""


def test_bin_checkpoint_without_torch(bert_dir, tmp_path):
    model_dir = resave_as(bert_dir, str(tmp_path / "bin"), "bin")
    pairs = sample_pairs(5)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, model_dir, json.dumps(pairs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    expected = CrossEncoder(bert_dir).predict(pairs)
    assert np.abs(scores - expected).max() <= TOLERANCE
