"""Attention for training short sequences in bfloat16 on a CPU.

PyTorch's CPU flash-attention kernel (what transformers' ``"sdpa"`` runs there) has a backward pass
that, in bfloat16 or float16, pays a fixed cost for every block of 32–64 query rows, whatever the
sequence length. On the short sequences RLHF trains on, that cost dominates: measured on one thread
of a Xeon with AMX (torch 2.13, SmolLM2's 9 query / 3 key-value heads of 64, causal), forward plus
backward of 4 sequences of 100 tokens took 11.1 ms per layer in bfloat16 and 4.5 ms with the same
kernel in float32 (casts included); float32 stayed 1.6–2× faster up to 160 tokens, was even at
192–224 and slower from 256 on (by 6–24%, batches of 2 and 8). In a whole SmolLM2 training step
(4 × 100 tokens, bf16 autocast) that backward took 22% of the time.

`use_float32_short_attention` switches a model from ``"sdpa"`` to ``"rlhfkit_sdpa"``: transformers'
own SDPA function and mask, except that a training forward (autograd recording) on a CPU with
bfloat16/float16 attention (bf16 weights, or CPU autocast) on at most `SHORT_SEQUENCE` query
positions runs the kernel in float32 and returns its output in the dtype SDPA would have returned.
Decoding, no-grad passes (reference, reward, evaluation), GPUs, float32 and longer sequences run
exactly as before. The name is not saved: transformers keeps the attention implementation out of
``config.json``.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "rlhfkit_sdpa"
SHORT_SEQUENCE = 224  # query positions up to which float32 is no slower (measured above)
_REDUCED = (torch.bfloat16, torch.float16)


def sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """transformers' ``sdpa_attention_forward`` with ``query`` (B, heads, T, D), ``key``/``value``
    (B, kv heads, S, D) and ``attention_mask`` (bool, additive float, or None) promoted to float32
    when `in_float32` says so."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not in_float32(query, key, value):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = kernel_dtype(query)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # CPU autocast would cast SDPA's inputs back to bf16
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(dtype), weights


def kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes in: CPU autocast's (it casts SDPA's inputs; under it the queries are
    often float32, promoted by the rotary embedding) or the queries' own."""
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return query.dtype


def in_float32(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """A CPU training forward (autograd recording) whose SDPA would compute in bfloat16/float16 on
    at most `SHORT_SEQUENCE` query positions."""
    return (
        query.device.type == "cpu"
        and kernel_dtype(query) in _REDUCED
        and query.shape[-2] <= SHORT_SEQUENCE
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    )


def register() -> None:
    """Make ``"rlhfkit_sdpa"`` a transformers attention implementation (idempotent), with SDPA's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_float32_short_attention(model: torch.nn.Module) -> int:
    """Switch every transformers model in ``model`` that uses ``"sdpa"`` to ``"rlhfkit_sdpa"``, in
    place; models on another implementation (eager, flash-attention, ...) are left as they are.
    Returns how many models were switched."""
    from transformers import PreTrainedModel

    switched = 0
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and getattr(m.config, "_attn_implementation", None) == "sdpa":
            register()
            m.set_attn_implementation(NAME)
            switched += 1
    return switched
