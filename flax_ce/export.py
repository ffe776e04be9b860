"""Save a CrossEncoder as a transformers / sentence-transformers checkpoint directory."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from flax_ce.activations import torch_name
from flax_ce.conversion.convert import torch_state_dict
from flax_ce.conversion.files import WEIGHT_PATTERNS
from flax_ce.models import family_of
from flax_ce.models.modular import ModularConfig
from flax_ce.st_modules import TRANSFORMER_ENTRY, TRANSFORMER_SETTINGS, modules_json, write_modules

# Written fresh below, or stale once the weights are ours (fp32) and the activation is recorded.
REPLACED_KEYS = ("architectures", "id2label", "label2id", "num_labels", "torch_dtype", "dtype")
STALE_KEYS = ("sbert_ce_default_activation_function", "_name_or_path")
# Files a directory may already hold that would shadow or contradict what save_pretrained writes: other
# weights (a loader could pick them, or they just waste space) and sentence-transformers' own settings
# files, which it reads before config.json (a stale activation_fn or max_seq_length there would win).
STALE_FILES = (
    *(pattern for pattern in WEIGHT_PATTERNS if pattern != "model.safetensors"),
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)


def export_config(ce) -> dict:
    """config.json for `ce`: its checkpoint's settings, our labels, fp32, and the score activation."""
    activation = torch_name(ce.activation_fn)
    if activation is None:
        raise ValueError(
            f"cannot save activation {ce.activation_fn!r}: sentence-transformers can only load torch.nn "
            "activations; set ce.activation_fn to one from flax_ce.activations.SCORE_ACTIVATIONS first"
        )
    config = {k: v for k, v in ce.raw_config.items() if k not in REPLACED_KEYS + STALE_KEYS}
    st_section = config.get("sentence_transformers")
    st_section = st_section if isinstance(st_section, dict) else {}
    config.update(
        architectures=[family_of(ce.config).architecture],
        dtype="float32",
        sentence_transformers={**st_section, "activation_fn": activation},
    )
    # A modular model's labels are its modules', not its encoder's (whose config.json this is).
    if not isinstance(ce.config, ModularConfig):
        labels = ce.config.labels
        config.update(
            num_labels=len(labels),
            id2label={str(i): label for i, label in enumerate(labels)},
            label2id={label: i for i, label in enumerate(labels)},
        )
    return config


def remove_stale_files(path: str) -> list[str]:
    """Delete the STALE_FILES in directory `path` (not below it); returns the names removed."""
    removed = []
    for pattern in STALE_FILES:
        for name in sorted(glob.glob(glob.escape(path) + os.sep + pattern)):
            if os.path.isfile(name) or os.path.islink(name):
                os.remove(name)
                removed.append(os.path.basename(name))
    return removed


def sentence_transformers_files(ce, activation: str) -> dict[str, object]:
    """sentence-transformers' own settings files (as its 6.x save_pretrained writes them), which are the
    only place it reads prompts from: a single Transformer module at the root, scoring with logits, or a
    modular cross-encoder's Transformer giving token embeddings to the modules after it."""
    if isinstance(ce.config, ModularConfig):
        modules, transformer = modules_json(ce.config), TRANSFORMER_SETTINGS
    else:
        modules = [dict(TRANSFORMER_ENTRY)]
        transformer = {
            "transformer_task": "sequence-classification",
            "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
            "module_output_name": "scores",
        }
    return {
        "modules.json": modules,
        "sentence_bert_config.json": transformer,
        "config_sentence_transformers.json": {
            "model_type": "CrossEncoder",
            "activation_fn": activation,
            "prompts": ce.prompts,
            "default_prompt_name": ce.default_prompt_name,
        },
    }


def save_pretrained(ce, path: str | os.PathLike) -> None:
    """Write config.json, tokenizer files and model.safetensors (PyTorch layout) for `ce` into `path`.

    A model with prompts also gets sentence-transformers' settings files (modules.json and its companions,
    the format of sentence-transformers 6), the only place it reads prompts from; without prompts the
    directory is a plain transformers checkpoint that any sentence-transformers version loads. A modular
    cross-encoder is always saved in its layout: the encoder at the root, each module in its folder.
    Saving into a directory that already holds a checkpoint (e.g. the one `ce` was loaded from) replaces
    it: other weight files and sentence-transformers settings files there are removed, so every loader
    reads exactly what was saved.
    """
    config = export_config(ce)  # first, so a refused activation leaves no half-written directory
    params = {
        tuple(p): np.asarray(var.get_value()) for p, var in nnx.to_flat_state(nnx.state(ce.model, nnx.Param))
    }
    tensors = torch_state_dict(params, family_of(ce.config).key_table)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    remove_stale_files(path)
    modular = isinstance(ce.config, ModularConfig)
    if modular:
        tensors = write_modules(path, ce.config, tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    files = {"config.json": config}
    if modular or ce.prompts or ce.default_prompt_name is not None:
        files.update(sentence_transformers_files(ce, config["sentence_transformers"]["activation_fn"]))
    for name, content in files.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
    ce.tokenizer.save_pretrained(path)
