"""sentence-transformers' modular cross-encoder layout on disk, read strictly and written back.

modules.json lists the modules in order: a Transformer at the root (its settings in sentence_bert_config.json,
its weights beside config.json), then Pooling, Dense and LayerNorm modules, each in its own folder with a
config.json and (Dense, LayerNorm) a weights file. Nothing from the files is imported or run: module types
and activations are matched by name against allow-lists, every config key must be known, and every weight's
name and shape is checked against its module's config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save_file

from flax_ce.activations import SCORE_ACTIVATIONS, activation_from_name
from flax_ce.config import ConfigError, ConfigReader
from flax_ce.conversion.errors import CheckpointError
from flax_ce.conversion.files import WEIGHT_FILES, find_weights, read_weights
from flax_ce.json_file import read_json
from flax_ce.models.modular import POOLING_MODES, DenseSpec, LayerNormSpec, ModularConfig, PoolingSpec

# The class paths sentence-transformers 6 writes; older releases' paths (sentence_transformers.models.Dense)
# name the same classes, so a type is matched by its last component under the sentence_transformers package.
TYPE_PATHS = {
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Dense": "sentence_transformers.base.modules.dense.Dense",
    "LayerNorm": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm",
}
TRANSFORMER_ENTRY = {"idx": 0, "name": "0", "path": "", "type": TYPE_PATHS["Transformer"]}
KINDS = {PoolingSpec: "Pooling", DenseSpec: "Dense", LayerNormSpec: "LayerNorm"}
ENTRY_KEYS = {"idx", "name", "path", "type"}
# The root Transformer of a modular cross-encoder gives token embeddings (its last hidden state).
TRANSFORMER_SETTINGS = {
    "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings",
}
# Keys of sentence_bert_config.json that must stay at their "off" value, and those that change no score
# (unpad_inputs only decides whether the batch is run padded or concatenated).
TRANSFORMER_OFF = ("do_lower_case", "processing_kwargs", "query_length", "document_length", "query_expansion")
TRANSFORMER_KEYS = {*TRANSFORMER_SETTINGS, *TRANSFORMER_OFF, "max_seq_length", "unpad_inputs"}
# Pooling's older boolean flags, in the order sentence-transformers concatenates their modes.
POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_KEYS = {
    "embedding_dimension",
    "word_embedding_dimension",
    "pooling_mode",
    "include_prompt",
    *POOLING_FLAGS,
}
DENSE_KEYS = {
    "in_features",
    "out_features",
    "bias",
    "activation_function",
    "module_input_name",
    "module_output_name",
    "use_residual",
}


def is_modular_cross_encoder(model_dir: str | os.PathLike) -> bool:
    """True for a directory sentence-transformers saved as a CrossEncoder with modules after the Transformer."""
    modules_path = os.path.join(model_dir, "modules.json")
    settings_path = os.path.join(model_dir, "config_sentence_transformers.json")
    if not (os.path.isfile(modules_path) and os.path.isfile(settings_path)):
        return False
    settings = read_json(settings_path, dict, ConfigError)
    return (
        len(read_json(modules_path, list, ConfigError)) > 1 and settings.get("model_type") == "CrossEncoder"
    )


def module_kind(type_path: object) -> str | None:
    """The module kind ("Dense") of a sentence_transformers.*.Dense class path, None for anything else."""
    if not isinstance(type_path, str) or not type_path.startswith("sentence_transformers."):
        return None
    kind = type_path.rsplit(".", 1)[-1]
    return kind if kind in TYPE_PATHS else None


def _entries(model_dir: str) -> list[tuple[str, str]]:
    """(kind, folder) of each modules.json entry; the first must be the Transformer at the root."""
    modules_path = os.path.join(model_dir, "modules.json")
    entries = []
    for position, entry in enumerate(read_json(modules_path, list, ConfigError)):
        where = f"{modules_path}: module {position}"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ConfigError(f"{where}: expected an object with a 'path' string, got {entry!r:.100}")
        folder, type_path = entry["path"], entry.get("type")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where} ({folder!r}): unknown keys {unknown}")
        kind = module_kind(type_path)
        if position == 0 and (kind != "Transformer" or folder not in ("", ".")):
            raise ConfigError(
                f"{where}: must be a Transformer at the root (path ''), got {type_path!r} at {folder!r}"
            )
        if position > 0 and kind not in ("Pooling", "Dense", "LayerNorm"):
            raise ConfigError(
                f"{where} ({folder!r}): type {type_path!r} is not supported after the Transformer "
                "(supported: Pooling, Dense, LayerNorm)"
            )
        parts = folder.replace("\\", "/").split("/")
        if position > 0 and (os.path.isabs(folder) or not folder or ".." in parts or "." in parts):
            raise ConfigError(f"{where}: path {folder!r} must name a folder inside the model directory")
        entries.append((kind, folder))
    return entries


def _check_transformer_settings(model_dir: str) -> None:
    """ConfigError unless sentence_bert_config.json (if any) asks for plain token embeddings."""
    path = os.path.join(model_dir, "sentence_bert_config.json")
    if not os.path.isfile(path):
        return
    raw = read_json(path, dict, ConfigError)
    r = ConfigReader(raw, path)
    r.require(not set(raw) - TRANSFORMER_KEYS, f"unknown keys {sorted(set(raw) - TRANSFORMER_KEYS)}")
    for key, value in TRANSFORMER_SETTINGS.items():
        r.require(
            raw.get(key, value) == value,
            f"{key}={raw.get(key)!r} is not supported: modules after the Transformer read its token "
            f"embeddings ({key}={value!r})",
        )
    for key in TRANSFORMER_OFF:
        r.require(not raw.get(key), f"{key}={raw.get(key)!r} is not supported")
    max_seq_length = r.get("max_seq_length", None, int)
    r.require(
        max_seq_length is None or max_seq_length >= 1, f"max_seq_length must be >= 1, got {max_seq_length}"
    )
    r.get("unpad_inputs", None, bool)
    r.finish()


def _module_reader(model_dir: str, folder: str, known: set[str]) -> ConfigReader:
    """A ConfigReader over `folder`/config.json that has already recorded unknown and null keys."""
    path = os.path.join(model_dir, folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the module's config.json is missing")
    raw = read_json(path, dict, ConfigError)
    r = ConfigReader(raw, path)
    r.require(not set(raw) - known, f"unknown keys {sorted(set(raw) - known)}")
    nulls = sorted(key for key, value in raw.items() if value is None and key != "module_output_name")
    r.require(not nulls, f"keys without a value: {nulls}")
    return r


def _pooling(r: ConfigReader) -> PoolingSpec:
    raw = r.raw
    names = [key for key in ("embedding_dimension", "word_embedding_dimension") if key in raw]
    r.require(len(names) == 1, "needs one of embedding_dimension, word_embedding_dimension")
    dimension = r.get(names[0], kind=int) if names else None
    flags = {key: r.get(key, False, bool) for key in POOLING_FLAGS if key in raw}
    from_flags = tuple(mode for key, mode in POOLING_FLAGS.items() if flags.get(key)) or ("mean",)
    modes = from_flags
    if "pooling_mode" in raw:
        mode = raw["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else ()
        r.require(
            bool(modes) and all(m in POOLING_MODES for m in modes),
            f"pooling_mode={mode!r} is not supported (modes: {', '.join(POOLING_MODES)}, or a list of them)",
        )
        r.require(not flags or modes == from_flags, f"pooling_mode={mode!r} contradicts the flags {flags}")
    include_prompt = r.get("include_prompt", True, bool)
    r.finish()
    return PoolingSpec(dimension, modes, include_prompt)


def _dense(r: ConfigReader) -> DenseSpec:
    sizes = [r.get(key, kind=int) for key in ("in_features", "out_features")]
    r.require(all(size is None or size >= 1 for size in sizes), f"in/out_features must be >= 1, got {sizes}")
    activation = r.get("activation_function", "torch.nn.modules.activation.Tanh", str)  # its default
    try:
        activation_from_name(activation or "")
    except ValueError:
        r.require(
            False,
            f"activation_function={activation!r} is not supported (supported: torch.nn classes "
            f"{', '.join(SCORE_ACTIVATIONS)})",
        )
    input_name = r.get("module_input_name", "sentence_embedding", str)
    output_name = r.get("module_output_name", None, str) or input_name
    r.require(not r.get("use_residual", False, bool), "use_residual=true is not supported")
    bias = r.get("bias", True, bool)
    r.finish()
    return DenseSpec(*sizes, bias, activation, input_name, output_name)


def _layer_norm(r: ConfigReader) -> LayerNormSpec:
    dimension = r.get("dimension", kind=int)
    r.require(dimension is None or dimension >= 1, f"dimension must be >= 1, got {dimension}")
    r.finish()
    return LayerNormSpec(dimension)


PARSERS = {
    "Pooling": (_pooling, POOLING_KEYS),
    "Dense": (_dense, DENSE_KEYS),
    "LayerNorm": (_layer_norm, {"dimension"}),
}


def _reads_and_writes(spec) -> tuple[str, int, str, int]:
    """(feature read, its width, feature written, its width) of one module."""
    if isinstance(spec, PoolingSpec):
        return "token_embeddings", spec.dimension, "sentence_embedding", spec.output_dimension
    if isinstance(spec, DenseSpec):
        return spec.input_name, spec.in_features, spec.output_name, spec.out_features
    return "sentence_embedding", spec.dimension, "sentence_embedding", spec.dimension


def _check_flow(specs, folders, hidden_size: int) -> None:
    """ConfigError unless each module's input exists with its width and the last output is pooled "scores".

    Features are tracked as name -> (width, per token) through the chain, as sentence-transformers passes
    its features dict from module to module.
    """
    features = {"token_embeddings": (hidden_size, True)}
    for spec, folder in zip(specs, folders, strict=True):
        name, width, output, output_width = _reads_and_writes(spec)
        if name not in features or features[name][0] != width:
            have = f"{features[name][0]} wide" if name in features else "not produced by an earlier module"
            raise ConfigError(f"{folder}/config.json: reads {name!r} of width {width}, but it is {have}")
        per_token = features[name][1] and not isinstance(spec, PoolingSpec)
        features[output] = (output_width, per_token)
    if "scores" not in features or features["scores"][1]:
        raise ConfigError(
            f"{folders[-1]}: no module writes pooled 'scores' (a Dense with module_output_name 'scores' "
            "after the Pooling)"
        )


def read_modular_config(model_dir: str | os.PathLike, encoder) -> ModularConfig:
    """The ModularConfig of a modular cross-encoder directory whose Transformer has config `encoder`."""
    model_dir = os.fspath(model_dir)
    entries = _entries(model_dir)
    _check_transformer_settings(model_dir)
    specs, folders = [], []
    for kind, folder in entries[1:]:
        parse, known = PARSERS[kind]
        specs.append(parse(_module_reader(model_dir, folder, known)))
        folders.append(folder)
    _check_flow(specs, folders, encoder.hidden_size)
    return ModularConfig(encoder, tuple(specs), tuple(folders))


def _module_weights(path: str, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The tensors of one module's weights file; CheckpointError listing every unexpected, missing,
    misshapen or non-float key."""
    tensors = read_weights(path)
    problems = [
        f"missing key {key!r} (shape {shape})" for key, shape in expected.items() if key not in tensors
    ]
    for key, array in tensors.items():
        if key not in expected:
            problems.append(
                f"unexpected key {key!r} (shape {tuple(array.shape)}): the module has no such weight"
            )
        elif tuple(array.shape) != expected[key]:
            problems.append(
                f"key {key!r} has shape {tuple(array.shape)}, but the module's config needs {expected[key]}"
            )
        elif not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            problems.append(f"key {key!r} has dtype {array.dtype}, expected a floating-point tensor")
    if problems:
        raise CheckpointError(
            f"{path}: weights do not match the module's config.json:\n  - " + "\n  - ".join(problems)
        )
    return tensors


def modular_tensors(
    model_dir: str | os.PathLike, config: ModularConfig, root: Mapping[str, np.ndarray], root_path: str
) -> dict:
    """The root (encoder) tensors and every module's, module i's keyed "i.<key>" as in
    sentence-transformers' state dict."""
    clash = [key for key in root if key.split(".", 1)[0].isdigit()]
    if clash:
        raise CheckpointError(
            f"{root_path}: keys {clash[:5]} are not the Transformer's (they look like a module's)"
        )
    tensors = dict(root)
    for index, (spec, folder) in enumerate(zip(config.modules, config.folders, strict=True), start=1):
        folder_path = os.path.join(model_dir, folder)
        expected = spec.weight_shapes() if not isinstance(spec, PoolingSpec) else {}
        if not expected and not any(os.path.isfile(os.path.join(folder_path, name)) for name in WEIGHT_FILES):
            continue
        found = _module_weights(find_weights(folder_path), expected)
        tensors.update({f"{index}.{key}": value for key, value in found.items()})
    return tensors


def module_config(spec) -> dict:
    """A module's config.json as sentence-transformers 6 writes it."""
    if isinstance(spec, PoolingSpec):
        mode = spec.modes[0] if len(spec.modes) == 1 else list(spec.modes)
        return {
            "embedding_dimension": spec.dimension,
            "pooling_mode": mode,
            "include_prompt": spec.include_prompt,
        }
    if isinstance(spec, DenseSpec):
        return {
            "in_features": spec.in_features,
            "out_features": spec.out_features,
            "bias": spec.bias,
            "activation_function": spec.activation,
            "module_input_name": spec.input_name,
            "module_output_name": spec.output_name,
        }
    return {"dimension": spec.dimension}


def modules_json(config: ModularConfig) -> list[dict]:
    """modules.json for `config`, its modules in folders named as sentence-transformers names them."""
    entries = [dict(TRANSFORMER_ENTRY)]
    for index, spec in enumerate(config.modules, start=1):
        kind = KINDS[type(spec)]
        entries.append(
            {"idx": index, "name": str(index), "path": f"{index}_{kind}", "type": TYPE_PATHS[kind]}
        )
    return entries


def write_modules(
    path: str, config: ModularConfig, tensors: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Write each module's folder (config.json, model.safetensors if it has weights) under `path` from the
    "i.<key>"-keyed `tensors`; returns the rest, the Transformer's tensors."""
    root = {key: value for key, value in tensors.items() if not key.split(".", 1)[0].isdigit()}
    for entry, spec in zip(modules_json(config)[1:], config.modules, strict=True):
        folder = os.path.join(path, entry["path"])
        os.makedirs(folder, exist_ok=True)
        for name in WEIGHT_FILES:  # an older save's weights would shadow or contradict these
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        prefix = f"{entry['idx']}."
        own = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
        if own:
            save_file(own, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(module_config(spec), f, indent=2)
            f.write("\n")
    return root
