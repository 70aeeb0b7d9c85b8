"""Reading scalar scores out of a one-label sequence classifier (reward and value models).

Hugging Face's own pooling finds "the last non-pad token" by comparing ids with ``pad_token_id``.
When pad == EOS (SmolLM2 and many chat models) that silently reads the token *before* a final EOS,
or stops at the first ``<|im_end|>`` inside the prompt. rlhfkit never does that: the position is
taken from the attention mask (the highest index holding a real token), so left-padded prompts,
right-padded responses and EOS tokens inside the text are all handled.

The saved reward model is an ordinary ``AutoModelForSequenceClassification``; ``rlhfkit.json``
records its normalisation ``{"reward": {"gain": g, "bias": b}}`` with
``normalised = gain · raw + bias`` (mean 0, std 1 on the reference completions).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit.generation import position_ids_from_mask
from rlhfkit.models import base_model


def classifier_parts(model: Any) -> tuple[Any, torch.nn.Module]:
    """(backbone, head) of a sequence classifier, through a peft wrapper (not a DDP one: unwrap first)."""
    model = base_model(model)
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no 'score' or 'classifier' head")
    return model.base_model, head


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask -> (B,) index of the last position holding a real token."""
    positions = torch.arange(mask.size(1), device=mask.device)
    return (positions[None, :] * (mask != 0)).argmax(-1)


def last_token_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at the last real token of each row: (B,). Only that hidden state goes through the head."""
    backbone, head = classifier_parts(model)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_index(attention_mask)]  # (B, H)
    return head(last).squeeze(-1).float()


def normalization(info: dict[str, Any]) -> tuple[float, float]:
    """(gain, bias) from a reward model's ``rlhfkit.json`` (identity for foreign reward models)."""
    reward = info.get("reward") or {}
    return float(reward.get("gain", 1.0)), float(reward.get("bias", 0.0))
