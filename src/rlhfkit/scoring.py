"""Reading scalar scores out of a one-label sequence classifier (reward and value models).

Hugging Face's own pooling finds "the last non-pad token" by comparing ids with ``pad_token_id``.
When pad == EOS (SmolLM2 and many chat models) that silently reads the token *before* a final EOS,
or stops at the first ``<|im_end|>`` inside the prompt. rlhfkit never does that: the position is
taken from the attention mask (the highest index holding a real token), so left-padded prompts,
right-padded responses and EOS tokens inside the text are all handled.

The saved reward model is an ordinary ``AutoModelForSequenceClassification``; ``rlhfkit.json``
records its normalisation ``{"reward": {"gain": g, "bias": b}}`` with
``normalised = gain · raw + bias`` (mean 0, std 1 on the reference completions).

**Pooling** (``train-rm --pooling``). ``last`` (the interchange format): the head reads the hidden
state at the last real token. ``last+mean``: the head also reads the mean hidden state over the
completion's tokens (from its first token to the last real one, the final EOS included), through a
second linear map kept beside the model in ``mean_head.safetensors``::

    raw = w · h_last + u · mean_{t ≥ start} h_t                 (u: the "mean head", no bias)

The last token sees the whole text only through attention; a preference spread over the whole
answer (tone, readability, repetition) is easier to read off the average of every token's state
(README, "the hard example": 0.67 → 0.78 agreement on unseen topics for a probe on frozen
features). Plain transformers reads such a model's ``w · h_last`` part only; rlhfkit's `reward`
reads both. ``start`` is the index of the completion's first token in each row: callers know it
(the prompt's length in right-padded rows, the query's width in ppo's joined rows).

**Several layers** (``train-rm --feature-layers K``): a ``last+mean`` model may also read [last ⊕
mean] of K − 1 lower decoder layers, each through the final norm (what the model cut to that layer
would read), listed in its ``config.json`` as ``rlhfkit_feature_layers``; the mean head then reads
everything past the last layer's last token::

    raw = w · h_last + u · [mean h ⊕ last h⁽ˡ¹⁾ ⊕ mean h⁽ˡ¹⁾ ⊕ …]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.generation import position_ids_from_mask
from rlhfkit.models import base_model

ENSEMBLE_FILE = "ensemble.safetensors"
MEAN_HEAD_FILE = "mean_head.safetensors"
MEAN_HEAD = "mean_score"  # the attribute holding the mean head on the classifier, while rlhfkit holds the model
FEATURE_LAYERS = "rlhfkit_feature_layers"  # config.json: the lower layers a multi-layer reward model reads


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


def mean_head(model: Any) -> torch.nn.Linear | None:
    """The mean head of a ``last+mean`` reward model (through a peft wrapper), or None."""
    return getattr(base_model(model), MEAN_HEAD, None)


def add_mean_head(model: Any, weight: torch.Tensor | None = None) -> torch.nn.Linear:
    """Give ``model`` (unwrapped or peft) a mean head: ``weight``, or zeros as wide as the features
    beyond the score head's (`extra_width`)."""
    _, head = classifier_parts(model)
    out_features = head.weight.size(0)
    in_features = extra_width(model) if weight is None else weight.size(1)
    layer = torch.nn.Linear(in_features, out_features, bias=False).to(head.weight)
    with torch.no_grad():
        layer.weight.copy_(torch.zeros_like(layer.weight) if weight is None else weight.to(layer.weight))
    setattr(base_model(model), MEAN_HEAD, layer)
    return layer


def extra_width(model: Any) -> int:
    """Width of what the mean head reads: the last layer's completion mean (H), and [last ⊕ mean]
    of each lower layer a multi-layer model reads (2H each)."""
    _, head = classifier_parts(model)
    return head.weight.size(1) * (1 + 2 * len(feature_layers(model)))


def pop_mean_head(model: Any) -> torch.Tensor | None:
    """Detach the mean head from ``model`` (before ``save_pretrained``); returns its weight, or None."""
    plain = base_model(model)
    layer = getattr(plain, MEAN_HEAD, None)
    if layer is None:
        return None
    delattr(plain, MEAN_HEAD)
    return layer.weight.detach().float().cpu()


def save_mean_head(weight: torch.Tensor, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": weight.detach().float().contiguous().cpu()}, str(Path(directory) / MEAN_HEAD_FILE))


def load_mean_head(model: Any, directory: str | Path) -> bool:
    """Attach the mean head saved in a reward-model directory, if there is one; True if attached."""
    from safetensors.torch import load_file

    path = Path(directory) / MEAN_HEAD_FILE
    if not path.is_file():
        return False
    weight = load_file(str(path))["weight"]
    _, head = classifier_parts(model)
    expected = (head.weight.size(0), extra_width(model))
    if tuple(weight.shape) != expected:
        raise ValueError(f"{path}: weight of shape {tuple(weight.shape)}, the model's features need {expected}")
    add_mean_head(model, weight)
    return True


def pooled_hidden(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """What the heads read: (B, H) last-token hidden states, or (B, 2H) [last ⊕ completion mean] for
    a ``last+mean`` model (then ``starts`` (B,), each row's first completion position, is required),
    followed for a multi-layer model (`feature_layers`) by [last ⊕ mean] of each lower layer read,
    through the final norm: (B, 2H·K) for K layers.

    A row whose completion holds no real token (an empty completion cut off at once) uses its last
    token as the mean.
    """
    backbone, _ = classifier_parts(model)
    lower = feature_layers(model)
    out = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=bool(lower),
    )  # fmt: skip
    mean = mean_head(model) is not None
    parts = [pool(out.last_hidden_state, attention_mask, starts, mean=mean)]  # (B, H) or (B, 2H)
    norm = final_norm(model) if lower else None
    parts += [pool(layer_state(out, layer, norm), attention_mask, starts, mean=True) for layer in lower]
    return torch.cat(parts, -1) if lower else parts[0]


def layer_state(out: Any, layer: int, norm: torch.nn.Module | None) -> torch.Tensor:
    """(B, L, H) hidden state after block ``layer`` (1-based; ``out.hidden_states[0]`` holds the
    embeddings) through the final ``norm``: what the model cut to ``layer`` blocks reads."""
    hidden = out.hidden_states[layer]
    return norm(hidden) if norm is not None else hidden


def feature_layers(model: Any) -> tuple[int, ...]:
    """The lower decoder layers (1-based, below the last) whose features a multi-layer reward model
    reads besides the last (`train-rm --feature-layers`; recorded in its config), or ()."""
    return tuple(int(x) for x in getattr(base_model(model).config, FEATURE_LAYERS, None) or ())


def final_norm(model: Any) -> torch.nn.Module | None:
    """The norm after the last decoder block (Llama ``norm``, GPT-2 ``ln_f``), or None."""
    backbone, _ = classifier_parts(model)
    for name in ("norm", "ln_f", "final_layer_norm"):
        norm = getattr(backbone, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm
    return None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor | None, *, mean: bool) -> torch.Tensor:
    """(B, L, H) hidden states -> (B, H) at each row's last real token, or (B, 2H) [last ⊕ the mean
    over the completion's real tokens] when ``mean`` (then ``starts`` (B,) is required)."""
    last_pos = last_index(attention_mask)  # (B,)
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_pos]  # (B, H)
    if not mean:
        return last
    if starts is None:
        raise ValueError("a last+mean reward model needs each row's completion start")
    positions = torch.arange(hidden.size(1), device=hidden.device)[None, :]  # (1, L)
    completion = (positions >= starts.to(hidden.device)[:, None]) & (attention_mask != 0)  # (B, L)
    weights = completion.to(hidden.dtype)
    count = weights.sum(1, keepdim=True)  # (B, 1)
    average = (hidden * weights[..., None]).sum(1) / count.clamp_min(1)  # (B, H)
    average = torch.where(count > 0, average, last)
    return torch.cat([last, average], -1)  # (B, 2H)


def head_scores(model: Any, features: torch.Tensor) -> torch.Tensor:
    """`pooled_hidden` features -> scores (B,), or (B, M) for a head with M > 1 outputs."""
    _, head = classifier_parts(model)
    extra = mean_head(model)
    if extra is None:
        return head(features).squeeze(-1).float()
    size = head.weight.size(1)
    return (head(features[:, :size]) + extra(features[:, size:])).squeeze(-1).float()


def last_token_scores(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """The reward model's scores: (B,), or (B, M) for a head with M > 1 outputs (the members of an
    ensemble during training). Only the pooled hidden states go through the head."""
    return head_scores(model, pooled_hidden(model, input_ids, attention_mask, starts))


@dataclass(frozen=True)
class Ensemble:
    """The members of a reward-model ensemble (``train-rm --ensemble M``), kept beside the model in
    ``ensemble.safetensors``: member m's normalised score is gain_m·(weight_m · h) + bias_m, with h
    the pooled features (`pooled_hidden`: H wide, or 2H for ``last+mean``, weight_m = [w_m ⊕ u_m]).
    The model's own one-label head is their mean, Σ_m gain_m·weight_m / M, so plain transformers
    reads the ensemble's mean score (up to the bias; for ``last+mean``, its last-token part).

    ``weight`` (M, H) or (M, 2H), ``gain`` and ``bias`` (M,), all float32.
    """

    weight: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor

    @property
    def members(self) -> int:
        return int(self.weight.size(0))

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) or (B, 2H) pooled features -> (B, M) normalised member scores."""
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
