"""flax_ce: sentence-transformers cross-encoders (BERT, RoBERTa, ELECTRA, DeBERTa) in JAX/Flax NNX."""

from flax_ce.config import ConfigError
from flax_ce.conversion.errors import CheckpointError
from flax_ce.cross_encoder import CrossEncoder
from flax_ce.loading import load, score

__all__ = ["CheckpointError", "ConfigError", "CrossEncoder", "load", "score"]
__version__ = "0.1.0"
