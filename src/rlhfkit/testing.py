"""Tiny models and tokenizers built in-process, with no download: for tests, benchmarks and
``make demo-tiny``.

`make_tokenizer` trains a byte-level BPE on a small built-in corpus and sets up SmolLM2's
conventions on purpose (``<|im_end|>`` is EOS *and* pad, ChatML chat template), so every test
exercises the case where the pad id also appears inside real prompts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhfkit.chat import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an and or but if then so because when while of to in on at for with from by about into over "
    "is are was were be been being have has had do does did will would can could should may might must "
    "i you he she it we they me him her us them my your his its our their this that these those "
    "what which who whom whose where why how yes no not very more most less least good bad great small "
    "large long short new old first last next other same different right wrong true false happy sad "
    "cat dog bird fish tree river sea sky sun moon star city house road car book word story song game "
    "time day night year week hour minute people man woman child friend team work school water food "
    "say tell ask answer write read speak think know see look find give take make go come run walk "
    "please thank thanks hello hi help question answer explain list name describe summarize translate "
    "one two three four five six seven eight nine ten zero number plus minus times equals sum "
    "red blue green yellow black white color shape circle square triangle "
    "assistant user system helpful honest harmless polite short brief clear"
).split()


def corpus(n_sentences: int = 600, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English sentences covering the vocabulary above."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "!", "?", "."]))
    return lines


def make_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (handles any text) with ChatML special tokens; pad == EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + list(_WORDS), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_model(tokenizer: Any, arch: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised causal LM of a few hundred thousand parameters, dropout on
    (as real checkpoints ship it) so that tests see rlhfkit switching it off."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            attention_dropout=0.1, tie_word_embeddings=True, **ids, **overrides,
        )  # fmt: skip
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids, **overrides
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (llama or gpt2)")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(out: str | os.PathLike, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model and its tokenizer as a plain Hugging Face directory; return the path."""
    out = Path(out)
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, arch=arch, seed=seed, **overrides)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
