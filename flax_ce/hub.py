"""Resolve a model name to a local directory: a directory as is, a hub id through huggingface_hub."""

from __future__ import annotations

import os

from flax_ce.conversion.files import WEIGHT_PATTERNS

# Only what a cross-encoder needs: the repos also hold large onnx/ and openvino/ exports.
ALLOW_PATTERNS = [
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",
    "sentencepiece.bpe.model",
    *WEIGHT_PATTERNS,
    # A modular cross-encoder's modules, in the folders sentence-transformers names "1_Pooling", "2_Dense", ...
    "[0-9]*_*/config.json",
    "[0-9]*_*/model.safetensors",
    "[0-9]*_*/pytorch_model.bin",
]
IGNORE_PATTERNS = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*"]


def resolve_model_dir(
    model_name_or_path: str | os.PathLike,
    cache_dir: str | None = None,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> str:
    """Local directory holding the model's files; downloads (or reads the hub cache) for a hub id.

    `token` (for private or gated repositories) and `local_files_only` (use the cache, never the
    network) mean what they mean to huggingface_hub.
    """
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"model_name_or_path must be a path or hub id, got {type(model_name_or_path).__name__}"
        )
    path = os.fspath(model_name_or_path)
    if not path.strip():
        raise ValueError("model_name_or_path is empty; pass a model directory or a hub id")
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{path}: is a file; pass the model directory that holds config.json")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{path}: no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(
            repo_id=path,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except HFValidationError as e:
        raise FileNotFoundError(f"{path}: neither a local directory nor a valid hub id ({e})") from e
    except Exception as e:  # noqa: BLE001 - any hub/network failure gets the same actionable message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if offline or local_files_only:
            switch = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            reason = f"{switch} and it is not in the cache"
        else:
            reason = "the Hugging Face hub is unreachable or refused it"
        detail = " ".join(str(e).split())  # huggingface_hub's messages span lines; keep ours on one
        raise OSError(
            f"could not fetch {path!r} from the Hugging Face hub ({reason}: {type(e).__name__}: {detail}). "
            "Download the model elsewhere (config.json, tokenizer files and model.safetensors or "
            "pytorch_model.bin) and pass its local directory instead, e.g. CrossEncoder('/path/to/model')."
        ) from e
