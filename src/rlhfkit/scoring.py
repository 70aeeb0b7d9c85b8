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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.generation import position_ids_from_mask
from rlhfkit.models import base_model

ENSEMBLE_FILE = "ensemble.safetensors"


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


def last_token_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden state at the last real token of each row: (B, H), what the head reads."""
    backbone, _ = classifier_parts(model)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, L, H)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last_index(attention_mask)]  # (B, H)


def last_token_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at the last real token of each row: (B,), or (B, M) for a head with M > 1 outputs
    (the members of an ensemble during training). Only that hidden state goes through the head."""
    _, head = classifier_parts(model)
    return head(last_token_hidden(model, input_ids, attention_mask)).squeeze(-1).float()


@dataclass(frozen=True)
class Ensemble:
    """The members of a reward-model ensemble (``train-rm --ensemble M``), kept beside the model in
    ``ensemble.safetensors``: member m's normalised score is gain_m·(weight_m · h) + bias_m, with h
    the last-token hidden state (`last_token_hidden`). The model's own one-label head is their mean,
    Σ_m gain_m·weight_m / M, so plain transformers reads the ensemble's mean score (up to the bias).

    ``weight`` (M, H), ``gain`` and ``bias`` (M,), all float32.
    """

    weight: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor

    @property
    def members(self) -> int:
        return int(self.weight.size(0))

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden states -> (B, M) normalised member scores."""
        w = self.weight.to(hidden.device, torch.float32)
        return hidden.float() @ w.T * self.gain.to(hidden.device) + self.bias.to(hidden.device)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"weight": self.weight, "gain": self.gain, "bias": self.bias}
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(directory / ENSEMBLE_FILE))


def read_ensemble(directory: str | Path) -> Ensemble | None:
    """The ensemble saved in a reward-model directory, or None for a single reward model."""
    from safetensors.torch import load_file

    path = Path(directory) / ENSEMBLE_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    return Ensemble(tensors["weight"].float(), tensors["gain"].float(), tensors["bias"].float())


def normalization(info: dict[str, Any]) -> tuple[float, float]:
    """(gain, bias) from a reward model's ``rlhfkit.json`` (identity for foreign reward models)."""
    reward = info.get("reward") or {}
    return float(reward.get("gain", 1.0)), float(reward.get("bias", 0.0))
