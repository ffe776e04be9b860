"""`CrossEncoder`: the sentence-transformers CrossEncoder API over a jit-compiled Flax model."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from flax_ce.activations import SCORE_ACTIVATIONS, activation_from_name
from flax_ce.config import ConfigError
from flax_ce.engine import ScoringEngine, make_mesh, use_default_compilation_cache
from flax_ce.export import save_pretrained
from flax_ce.hub import resolve_model_dir
from flax_ce.inputs import check_positive, check_text, normalise_pairs, shorten_long_texts
from flax_ce.json_file import read_json
from flax_ce.loading import load_model, load_tokenizer, read_config
from flax_ce.models.modular import ModularConfig
from flax_ce.planning import DEFAULT_TOKEN_BUDGET, planned_shapes
from flax_ce.preflight import min_pair_length
from flax_ce.windows import DEFAULT_DOCUMENT_OVERLAP, aggregate_windows, build_windows, check_long_documents

logger = logging.getLogger("flax_ce")


def sentence_transformers_settings(model_dir: str, modular: bool = False) -> dict:
    """Settings of a directory saved by sentence-transformers (modules.json present), else {}.

    Only a single Transformer module at the root is a plain cross-encoder; anything else is refused, unless
    `modular` says the modules were read (and checked) as a modular cross-encoder.
    """
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return {}
    modules = read_json(modules_path, list, ConfigError)
    if not modular and not (
        len(modules) == 1
        and isinstance(modules[0], dict)
        and str(modules[0].get("type", "")).endswith("Transformer")
        and modules[0].get("path", "") in ("", ".")
    ):
        raise ConfigError(
            f"{modules_path}: only a single Transformer module at the root is supported, got "
            f"{[m.get('type') if isinstance(m, dict) else m for m in modules]!r}"
        )
    settings = {}
    st_config_path = os.path.join(model_dir, "config_sentence_transformers.json")
    if os.path.isfile(st_config_path):
        st_config = read_json(st_config_path, dict, ConfigError)
        settings["activation_fn"] = (st_config_path, st_config.get("activation_fn"))
        settings["prompts"] = (st_config_path, st_config.get("prompts") or {})
        settings["default_prompt_name"] = st_config.get("default_prompt_name")
    module_config_path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(module_config_path):
        max_seq_length = read_json(module_config_path, dict, ConfigError).get("max_seq_length")
        if max_seq_length is not None:
            settings["max_seq_length"] = max_seq_length
    return settings


def default_activation(st_settings: dict, raw_config: dict, num_labels: int) -> Callable:
    """sentence-transformers' default activation rule; only torch.* class names are honoured."""
    candidates: list[tuple[str, object]] = []
    if "activation_fn" in st_settings:
        candidates.append(st_settings["activation_fn"])
    st_section = raw_config.get("sentence_transformers")
    if isinstance(st_section, dict) and "activation_fn" in st_section:
        candidates.append(("config.json sentence_transformers.activation_fn", st_section["activation_fn"]))
    elif raw_config.get("sbert_ce_default_activation_function") is not None:
        candidates.append(
            (
                "config.json sbert_ce_default_activation_function",
                raw_config["sbert_ce_default_activation_function"],
            )
        )
    for origin, name in candidates:
        if name is None:
            continue
        if isinstance(name, str) and name.startswith("torch."):
            return activation_from_name(name)
        logger.warning(
            "Ignoring activation %r from %s: only torch.nn activation names are honoured", name, origin
        )
    return SCORE_ACTIVATIONS["Sigmoid"] if num_labels == 1 else SCORE_ACTIVATIONS["Identity"]


def merge_prompts(
    st_settings: dict, prompts: dict[str, str] | None, default_prompt_name: str | None
) -> tuple[dict[str, str], str | None]:
    """(prompts, default_prompt_name) as sentence-transformers merges them: the caller's first, then the
    saved ones for names the caller did not give."""
    if prompts is not None and not isinstance(prompts, dict):
        raise TypeError(f"prompts must be a dict of name -> prompt text, got {type(prompts).__name__}")
    merged = dict(prompts or {})
    source, saved = st_settings.get("prompts", ("", {}))
    if not isinstance(saved, dict):
        raise ConfigError(f"{source}: 'prompts' must map names to strings, got {saved!r}")
    for name, text in saved.items():
        merged.setdefault(name, text)
    for name, text in merged.items():
        if text is not None:
            check_text(text, f"prompt {name!r}")
    merged = {name: text or "" for name, text in merged.items()}
    if default_prompt_name is None:
        default_prompt_name = st_settings.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in merged:
        raise ValueError(
            f"default_prompt_name {default_prompt_name!r} is not one of the prompts {sorted(merged)}"
        )
    return merged, default_prompt_name


# Families whose scoring packs by default, per call, when packing costs >= 5% less (engine.plan).
# Measured on CPU (benchmarks/results/packing.md: fresh process per variant, alternated, 2 shared cores):
# the BERT encoder (real MiniLM-L6) scored 300 MS MARCO-like pairs (mean 121 tokens, 8% fewer padded
# tokens packed) 1.08x faster (median of 9 rounds, 0.92-1.18) and 1,000 short pairs (mean 54 tokens, 19%
# fewer) 1.15x (0.95-1.30); 300 short pairs (9% fewer) were neither faster nor slower (1.01x). RoBERTa,
# XLM-R and ELECTRA run the same encoder. A DeBERTa-v3-xsmall shape showed no clear gain (6 layers: 1.05x
# by round, 0.98x by median rates, 1.00x timed in one process; 12 layers: 0.78x by median round, the same
# process CPU time: its relative attention costs more in longer rows); ModernBERT and accelerators are
# not measured. Packing stays off for those unless asked.
AUTO_PACKING_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


def choose_packing(config, packing: bool | None) -> bool | None:
    """The engine's packing setting: the user's, or for None, None (the engine packs a call when that pads
    less) where packing measured faster, else False. Modular cross-encoders do not pack: their Pooling
    modules read whole rows."""
    if isinstance(config, ModularConfig):
        if packing:
            raise ValueError(
                "packing=True: sentence-transformers modular cross-encoders (modules.json with Pooling/"
                "Dense modules) cannot score packed rows yet; leave packing at None or False"
            )
        return False
    if packing is not None:
        return bool(packing)
    measured = config.model_type in AUTO_PACKING_TYPES and jax.default_backend() == "cpu"
    return None if measured else False


class CrossEncoder:
    """Scores text pairs with a BERT/RoBERTa/ELECTRA/DeBERTa/ModernBERT cross-encoder (or a sentence-transformers
    modular one over such an encoder), like sentence_transformers.CrossEncoder."""

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        max_length: int | None = None,
        activation_fn: Callable | str | None = None,
        dtype=jnp.float32,
        cache_dir: str | None = None,
        revision: str | None = None,
        num_labels: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        mesh: Mesh | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        cache_folder: str | None = None,
        compilation_cache: bool = True,
        packing: bool | None = None,
    ):
        if compilation_cache:  # before anything compiles, so every program of this model is cached
            use_default_compilation_cache()
        if cache_folder is not None:  # sentence-transformers' name for it
            if cache_dir is not None:
                raise TypeError(
                    "pass either 'cache_dir' or its sentence-transformers name 'cache_folder', not both"
                )
            cache_dir = cache_folder
        self.model_dir = resolve_model_dir(
            model_name_or_path, cache_dir, revision, token=token, local_files_only=local_files_only
        )
        self.raw_config, self.config, fresh_head = read_config(self.model_dir, num_labels)
        self.dtype = dtype
        # The model first: its check against the weights' inventory needs no transformers import (seconds).
        self.model = load_model(
            self.model_dir, self.config, dtype=dtype, allow_missing=("head.",) if fresh_head else ()
        )
        self.tokenizer = load_tokenizer(self.model_dir, self.config)
        # A fast tokenizer keeps its truncation settings in shared state that every call rewrites, so
        # threads sharing this instance take turns tokenizing (scoring still runs concurrently).
        self._tokenizer_lock = threading.Lock()
        # A fresh head on an encoder (e.g. a sentence-transformers bi-encoder) ignores that stack's settings.
        st_settings = (
            {}
            if fresh_head
            else sentence_transformers_settings(self.model_dir, isinstance(self.config, ModularConfig))
        )
        self.max_length = self._resolve_max_length(
            max_length if max_length is not None else st_settings.get("max_seq_length")
        )
        self.tokenizer.model_max_length = self.max_length
        if isinstance(activation_fn, str):
            activation_fn = activation_from_name(activation_fn)
        self.activation_fn = activation_fn or default_activation(
            st_settings, self.raw_config, self.num_labels
        )
        self.prompts, self.default_prompt_name = merge_prompts(st_settings, prompts, default_prompt_name)
        check_positive("token_budget", token_budget)
        self.token_budget = token_budget
        self.engine = ScoringEngine(
            pad_id=self.tokenizer.pad_token_id or 0,
            max_length=self.max_length,
            mesh=mesh if mesh is not None else make_mesh(devices),
            dtype=dtype,
            packing=choose_packing(self.config, packing),
        )

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def _resolve_max_length(self, max_length: int | None) -> int:
        limit = self.config.position_limit
        if max_length is None:
            # sentence-transformers caps the tokenizer's limit at max_position_embeddings.
            max_length = min(self.tokenizer.model_max_length, self.config.max_position_embeddings)
            if limit is not None:
                max_length = min(max_length, limit)
        check_positive("max_length", max_length)
        minimum = min_pair_length(self.tokenizer)
        if max_length < minimum:
            raise ValueError(
                f"max_length={max_length} is too short for a pair: the tokenizer adds {minimum - 2} special "
                f"tokens, so the minimum is {minimum} (one token of each text)"
            )
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds what this model's positions allow ({limit})")
        return int(max_length)

    def tokenize(self, pairs: Sequence[tuple[str, str]]) -> dict[str, list[list[int]]]:
        """Token ids (unpadded) for pairs, truncated longest-first to max_length as sentence-transformers does."""
        if not pairs:
            return {"input_ids": [], "token_type_ids": []}
        with self._tokenizer_lock:
            pairs = shorten_long_texts(self.tokenizer, pairs, self.max_length)
            encoded = self.tokenizer(
                [a for a, _ in pairs],
                [b for _, b in pairs],
                truncation="longest_first",
                max_length=self.max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=True,
            )
        return {"input_ids": encoded["input_ids"], "token_type_ids": encoded.get("token_type_ids")}

    def logits(
        self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, show_progress_bar=None
    ) -> np.ndarray:
        """Raw logits [N, num_labels] (fp32) for pairs, in the caller's order."""
        pairs, _ = normalise_pairs(pairs)
        return self._scores(pairs, SCORE_ACTIVATIONS["Identity"], batch_size, show_progress_bar)

    def _scores(
        self, pairs, activation_fn: Callable, batch_size: int | None, show_progress_bar
    ) -> np.ndarray:
        """activation(logits) [N, num_labels] for validated pairs, in the caller's order."""
        check_positive("batch_size", batch_size, allow_none=True)
        tokens = self.tokenize(pairs)
        return self._run_tokens(
            tokens["input_ids"], tokens["token_type_ids"], activation_fn, batch_size, show_progress_bar
        )

    def _run_tokens(
        self, ids, types, activation_fn: Callable, batch_size: int | None, show_progress_bar, owner=None
    ) -> np.ndarray:
        """activation(logits) [N, num_labels] for token id lists; `owner[i]` is the pair row i is from."""
        self._check_token_ranges(ids, types, owner)
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() in (logging.INFO, logging.DEBUG)
        return self.engine.run(
            self.model,
            ids,
            types,
            self.num_labels,
            activation_fn=activation_fn,
            batch_size=batch_size,
            token_budget=self.token_budget,
            progress=lambda plan: tqdm(plan, desc="Batches", disable=not show_progress_bar),
        )

    def warmup(self, batch_size: int | None = None, activation_fn: Callable | str | None = None) -> int:
        """Compile every shape predict() can use with this batch_size (None: the token budget) and the
        activation's operations; returns how many scoring programs were compiled now (one per shape, two
        when packing=None may pack a call or not). With the persistent cache enabled, later processes
        load them."""
        if isinstance(activation_fn, str):
            activation_fn = activation_from_name(activation_fn)
        before = self.engine.compile_count
        programs = self.engine.programs(self.planned_shapes(batch_size), batch_size)
        self.engine.warmup(self.model, programs, self.num_labels, activation_fn or self.activation_fn)
        return self.engine.compile_count - before

    def planned_shapes(self, batch_size: int | None = None) -> set[tuple[int, int]]:
        """All [rows, length] shapes predict() may compile for this batch_size (None: the token budget);
        packed batches have the same shapes, with a fixed number of pairs a row for each length."""
        return planned_shapes(
            self.max_length,
            batch_size=batch_size,
            token_budget=self.token_budget,
            multiple=self.engine.multiple,
            budget_caps_batch_size=self.engine.budget_caps_batch_size,
        )

    def _scores_for_mode(
        self, pairs, activation_fn: Callable, batch_size, show_progress_bar, mode: str, overlap: int
    ) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
        """(scores [N, num_labels], character span of each pair's chosen window, None for "truncate")."""
        if mode == "truncate":
            return self._scores(pairs, activation_fn, batch_size, show_progress_bar), None
        with self._tokenizer_lock:  # the fast tokenizer's truncation state is shared, as in tokenize()
            windows = build_windows(self.tokenizer, pairs, self.max_length, overlap)
        logits = self._run_tokens(
            windows.input_ids,
            windows.token_type_ids,
            SCORE_ACTIVATIONS["Identity"],
            batch_size,
            show_progress_bar,
            owner=windows.owner,
        )
        scores, chosen = aggregate_windows(logits, windows.owner, len(pairs), mode, activation_fn)
        return scores, [windows.spans[w] for w in chosen]

    def _check_token_ranges(self, ids, types, owner=None) -> None:
        vocab = self.config.vocab_size
        type_vocab = getattr(self.config, "type_vocab_size", 0)
        for row, seq in enumerate(ids):
            i = row if owner is None else int(owner[row])
            if seq and max(seq) >= vocab:
                raise ValueError(f"pair {i}: token id {max(seq)} is outside the model's vocabulary ({vocab})")
            if types is not None and type_vocab > 0 and types[row] and max(types[row]) >= type_vocab:
                raise ValueError(
                    f"pair {i}: token type {max(types[row])} is outside the model's type_vocab_size ({type_vocab})"
                )

    def predict(
        self,
        inputs=None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        activation_fn: Callable | str | None = None,
        apply_softmax: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        long_documents: str = "truncate",
        document_overlap: int = DEFAULT_DOCUMENT_OVERLAP,
        **legacy,
    ):
        """Scores for one pair or a list of pairs: [N] for 1-label models, [N, C] otherwise.

        `prompt` (or the text of `prompts[prompt_name]`, or of the default prompt) is put in front of
        each pair's first text, as sentence-transformers does. `long_documents` "max", "first" or "mean"
        scores second texts longer than max_length as overlapping windows (flax_ce.windows); "truncate"
        cuts them as sentence-transformers does.
        """
        inputs = _legacy_argument(legacy, "sentences", "inputs", inputs)
        activation_fn = _legacy_argument(legacy, "activation_fct", "activation_fn", activation_fn)
        if legacy:
            raise TypeError(f"predict() got unexpected keyword arguments: {', '.join(sorted(legacy))}")
        pairs, single = normalise_pairs(inputs)
        scores, _ = self._predict_pairs(
            pairs,
            batch_size,
            show_progress_bar,
            activation_fn,
            prompt_name,
            prompt,
            mode=long_documents,
            overlap=document_overlap,
        )
        if pairs:
            if self.num_labels == 1:
                scores = scores[:, 0]
            elif apply_softmax:
                shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
                scores = shifted / shifted.sum(axis=1, keepdims=True)
        if convert_to_tensor:
            result = jnp.asarray(scores)
        elif convert_to_numpy:
            result = scores
        else:
            result = list(scores)
        return result[0] if single else result

    def _predict_pairs(
        self, pairs, batch_size, show_progress_bar, activation_fn, prompt_name, prompt, *, mode, overlap
    ) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
        """(scores [N, num_labels], chosen window spans or None) for validated pairs, prompt applied."""
        check_long_documents(mode, overlap)
        prompt = self.resolve_prompt(prompt, prompt_name)
        if prompt and isinstance(self.config, ModularConfig) and not self.config.pools_prompt:
            raise ValueError(
                "this model's Pooling leaves the prompt's tokens out (include_prompt=false), which flax_ce "
                "does not implement; score without a prompt"
            )
        if prompt:
            pairs = [(prompt + a, b) for a, b in pairs]
        check_positive("batch_size", batch_size, allow_none=True)
        if isinstance(activation_fn, str):
            activation_fn = activation_from_name(activation_fn)
        activation_fn = activation_fn or self.activation_fn
        if not pairs:
            return np.zeros((0,), dtype=np.float32), None
        return self._scores_for_mode(pairs, activation_fn, batch_size, show_progress_bar, mode, overlap)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        activation_fn: Callable | str | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        long_documents: str = "truncate",
        document_overlap: int = DEFAULT_DOCUMENT_OVERLAP,
    ) -> list[dict]:
        """Documents sorted by score for `query`: [{"corpus_id", "score"(, "text"(, "window"))}], best first.

        A prompt goes in front of the query, and long documents are scored, as in predict(). With
        long_documents "max" or "first", "window" is the [start, end) character span of the window
        that gave the score."""
        if self.num_labels != 1:
            raise ValueError(
                f"rank() needs a model with num_labels=1; this one has {self.num_labels} "
                f"({', '.join(self.config.labels)}). Use predict() with pairs instead."
            )
        query = check_text(query, "query")
        if isinstance(documents, str) or not isinstance(documents, (Sequence, np.ndarray)):
            raise TypeError(f"documents must be a list of strings, got {type(documents).__name__}")
        check_positive("top_k", top_k, allow_none=True)
        for i, doc in enumerate(documents):
            check_text(doc, f"document {i}")
        scores, spans = self._predict_pairs(
            [(query, doc) for doc in documents],
            batch_size,
            show_progress_bar,
            activation_fn,
            prompt_name,
            prompt,
            mode=long_documents,
            overlap=document_overlap,
        )
        results = [{"corpus_id": i, "score": float(s)} for i, s in enumerate(scores.reshape(-1))]
        if return_documents:
            for r in results:
                r["text"] = documents[r["corpus_id"]]
                if spans is not None and long_documents != "mean":
                    r["window"] = list(spans[r["corpus_id"]])
        results.sort(key=lambda r: r["score"], reverse=True)
        return results[:top_k]

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The prompt text to use: `prompt`, else `prompts[prompt_name]`, else the default prompt's, else None."""
        if prompt is not None:
            if prompt_name is not None:  # sentence-transformers' rule, and its warning
                logger.warning("Both prompt and prompt_name given: using prompt, ignoring prompt_name")
            return check_text(prompt, "prompt")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(
                    f"prompt_name {prompt_name!r} is not one of the prompts {sorted(self.prompts)}"
                )
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts[self.default_prompt_name]
        return None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save as a transformers checkpoint that sentence-transformers, transformers and flax_ce load."""
        save_pretrained(self, path)


def _legacy_argument(legacy: dict, old: str, new: str, value):
    if old in legacy:
        if value is not None:
            raise TypeError(f"pass either {new!r} or its legacy name {old!r}, not both")
        return legacy.pop(old)
    return value
