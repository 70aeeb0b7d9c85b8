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
    layers = overrides.pop("num_hidden_layers", 2)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            attention_dropout=0.1, tie_word_embeddings=True, **ids, **overrides,
        )  # fmt: skip
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=layers, n_head=4, n_positions=512, **ids, **overrides
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


def write_tiny_gguf(path: str | os.PathLike, tokenizer: Any = None, model: Any = None) -> Path:
    """Write a tiny Llama and its tokenizer as an F32 ``.gguf`` file, laid out as llama.cpp's
    converter writes one, so that ``rlhfkit.models.load_model`` reads back the same weights.

    ``model`` (a Llama, by default ``make_model(tokenizer, "llama")``) and ``tokenizer`` (by default
    `make_tokenizer`) are the source; the file holds the llama metadata, the byte-level BPE vocabulary
    and merges, the special token ids and the chat template. Returns the path.
    """
    import json

    import gguf
    import numpy as np

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    model = model if model is not None else make_model(tokenizer, arch="llama")
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"write_tiny_gguf writes Llama models, not {config.model_type!r}")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("rlhfkit tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # the vocabulary in id order: byte-level BPE tokens as the tokenizer spells them
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("write_tiny_gguf needs a tokenizer whose ids are 0..N-1 without gaps")
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        # llama.cpp stores q/k rows with each head's rotary halves interleaved; transformers undoes it
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        tensors = {
            "attn_norm": state[layer + "input_layernorm.weight"],
            "attn_q": permute(state[layer + "self_attn.q_proj.weight"], n_head),
            "attn_k": permute(state[layer + "self_attn.k_proj.weight"], n_kv),
            "attn_v": state[layer + "self_attn.v_proj.weight"],
            "attn_output": state[layer + "self_attn.o_proj.weight"],
            "ffn_norm": state[layer + "post_attention_layernorm.weight"],
            "ffn_gate": state[layer + "mlp.gate_proj.weight"],
            "ffn_up": state[layer + "mlp.up_proj.weight"],
            "ffn_down": state[layer + "mlp.down_proj.weight"],
        }
        for name, value in tensors.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(value))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
