"""ILQL's Q and V heads on a causal LM, the file they are saved in beside it, and the
advantage-shifted policy that ``collect`` and ``eval`` sample from (Snell et al. 2022).

* `Head` — a two-layer MLP on the LM's last hidden state (the output layer's input, after the final
  norm), Snell et al.'s head shape (their hidden width is 2·H; H here, to halve a vocabulary-sized
  head). The output layer starts at zero, so a fresh Q and V are 0 everywhere and the shifted policy
  starts as the LM itself. Q maps a state to one value per token, (…, H) → (…, V); V to one value,
  (…, H) → (…,).
* `save_heads` / `load_heads` — ``ilql_heads.safetensors`` in the model directory: the target Q̂
  and V (what sampling needs), with β and the sizes as metadata. The rest of the directory is a plain
  causal LM (π_β, trained by behaviour cloning), loadable without rlhfkit.
* `AdvantageShiftedLM` — stands in for the causal LM wherever rlhfkit samples or scores a policy
  (`rlhfkit.generation.sample`, `policy_logprobs`): its forward runs the LM and replaces the logits
  at the kept positions by log π_β + β·(Q̂ − V) (`losses.advantage_shifted_logits`). Every row is
  still computed from its own tokens alone, so a completion depends only on its prompt and seed.
* `for_sampling` — a loaded LM, wrapped when its directory holds ILQL heads (collect, eval).

The target Q̂ (Polyak-averaged) shifts the logits, as in trlx's ILQL: it is the smoothed estimate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.losses import advantage_shifted_logits

HEADS_FILE = "ilql_heads.safetensors"
FORMAT = "rlhfkit-ilql-heads-1"


class Head(nn.Module):
    """Linear(H, H) → ReLU → Linear(H, out), float32 whatever the LM's dtype; the output layer
    starts at zero. ``out == 1`` gives V with the last dim squeezed: (…, H) → (…,)."""

    def __init__(self, hidden_size: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.net(hidden.float())
        return out.squeeze(-1) if out.size(-1) == 1 else out


def lm_sizes(model: Any) -> tuple[int, int]:
    """(hidden size, vocabulary size) of a causal LM: the output layer's input and output widths."""
    from rlhfkit.models import base_model

    head = base_model(model).get_output_embeddings()
    vocab, hidden = head.weight.shape
    return int(hidden), int(vocab)


def make_heads(model: Any, seed: int) -> tuple[Head, Head]:
    """Fresh (Q, V) heads for ``model``, initialised from ``seed`` (the hidden layers; outputs are 0)."""
    hidden, vocab = lm_sizes(model)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Head(hidden, vocab).to(device), Head(hidden, 1).to(device)


def has_heads(path: str | os.PathLike) -> bool:
    return (Path(path) / HEADS_FILE).is_file()


def save_heads(directory: str | os.PathLike, target_q: Head, v: Head, beta: float) -> Path:
    """Write ``directory/ilql_heads.safetensors`` (the target Q̂ and V; β in the metadata)."""
    from safetensors.torch import save_file

    weights = {f"target_q.{k}": t.detach().contiguous().cpu() for k, t in target_q.state_dict().items()}
    weights |= {f"v.{k}": t.detach().contiguous().cpu() for k, t in v.state_dict().items()}
    hidden, vocab = target_q.net[0].in_features, target_q.net[2].out_features
    metadata = {"format": FORMAT, "beta": repr(float(beta)), "hidden_size": str(hidden), "vocab_size": str(vocab)}
    path = Path(directory) / HEADS_FILE
    save_file(weights, str(path), metadata=metadata)
    return path


def load_heads(directory: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Head, Head, float]:
    """(target Q̂, V, β) from ``directory/ilql_heads.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / HEADS_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise RlhfkitError(f"{path}: not an rlhfkit ILQL heads file (format {meta.get('format')!r})")
    hidden, vocab, beta = int(meta["hidden_size"]), int(meta["vocab_size"]), float(meta["beta"])
    weights = load_file(str(path))
    target_q, v = Head(hidden, vocab), Head(hidden, 1)
    for prefix, head in (("target_q.", target_q), ("v.", v)):
        head.load_state_dict({k[len(prefix) :]: t for k, t in weights.items() if k.startswith(prefix)})
    return target_q.to(device).eval(), v.to(device).eval(), beta


class AdvantageShiftedLM(nn.Module):
    """A causal LM whose logits are ILQL's: log π_β + β·(Q̂ − V), computed at the positions whose
    logits the caller keeps (``logits_to_keep``: an int for the last n, or a tensor of positions).
    Everything else of the LM's output (the KV cache, hidden states if asked) is the LM's own."""

    def __init__(self, lm: nn.Module, target_q: Head, v: Head, beta: float):
        super().__init__()
        self.lm, self.target_q, self.v, self.beta = lm, target_q, v, float(beta)

    @property
    def config(self) -> Any:
        return self.lm.config

    @property
    def generation_config(self) -> Any:
        return getattr(self.lm, "generation_config", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        keep = kwargs.get("logits_to_keep", 0)
        asked_hidden = bool(kwargs.get("output_hidden_states"))
        out = self.lm(*args, **{**kwargs, "output_hidden_states": True})
        hidden = out.hidden_states[-1]  # (B, L, H): the output layer's input
        if isinstance(keep, torch.Tensor):
            hidden = hidden[:, keep]
        elif keep:
            hidden = hidden[:, -keep:]
        out.logits = advantage_shifted_logits(out.logits, self.target_q(hidden), self.v(hidden), self.beta)  # (B, k, V)
        if not asked_hidden:
            out.hidden_states = None
        return out


def for_sampling(model: Any, path: str | os.PathLike) -> Any:
    """``model`` (loaded from ``path``), wrapped in `AdvantageShiftedLM` when ``path`` is a model
    directory with ILQL heads; else ``model`` itself."""
    if not Path(path).is_dir() or not has_heads(path):
        return model
    device = next(model.parameters()).device
    target_q, v, beta = load_heads(path, device)
    if lm_sizes(model) != (target_q.net[0].in_features, target_q.net[2].out_features):
        raise RlhfkitError(f"{Path(path) / HEADS_FILE}: heads of another model's sizes than {path}'s")
    return AdvantageShiftedLM(model, target_q, v, beta).eval()
