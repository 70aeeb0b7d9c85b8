"""The critic and the one module PPO trains: policy + value, in a single forward pass.

Two critics (SPEC §5 ppo):

* a separate value model, a one-label sequence classifier initialised from the reward model
  (InstructGPT; lm-human-preferences): `scoring`'s head applied at every position;
* ``--value-head policy``: a linear head on the policy's last hidden state, zero-initialised as in
  lm-human-preferences (values start at 0), sharing the policy's backbone.

The value of response token t is read at the position that *predicts* it (the state before the
token is emitted), the same position whose logits give log π(response_t):

    input    p0 p1 p2 | r0 r1 r2
    position  0  1  2 |  3  4  5
    logits for r_t and V_t come from position P-1+t   (P = prompt width, here 3)

`ActorCritic.forward` returns log-probs, values and (optionally) entropies for a batch, plus the
PPO-ptx language-model loss when given pretraining tokens, all in one call, so that DDP sees one
forward per backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhfkit.generation import join, policy_logprobs, position_ids_from_mask
from rlhfkit.losses import lm_loss
from rlhfkit.scoring import classifier_parts


class ValueHead(nn.Module):
    """V(s) = w·h + b on the policy's last hidden state; zero-initialised (lm-human-preferences)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)  # (B, T, H) -> (B, T), float32


def hidden_size(model: Any) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    if size is None:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")
    return int(size)


def response_values(
    value_model: Any, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Values (B, T) of a separate value model at the positions that predict each response token;
    0 at masked positions. Only those T hidden states go through the head."""
    backbone, head = classifier_parts(value_model)
    T = response.size(1)
    input_ids, attention = join(query, query_mask, response, response_mask)  # (B, P+T)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids_from_mask(attention)
    ).last_hidden_state
    values = head(hidden[:, -T - 1 : -1]).squeeze(-1).float()  # (B, T)
    return values * response_mask


class ActorCritic(nn.Module):
    """The policy and its critic (a value model, or a head on the policy), trained together; or the
    policy alone (critic-free algorithms, ``ppo --algo rloo|grpo``: no values)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, value_head: ValueHead | None = None):
        super().__init__()
        if value_model is not None and value_head is not None:
            raise ValueError("give at most one of value_model and value_head")
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head

    @property
    def critic(self) -> nn.Module | None:
        return self.value_model if self.value_model is not None else self.value_head

    def forward(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        response: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        with_values: bool = True,
        with_entropy: bool = False,
        ptx: Any = None,
    ) -> dict[str, torch.Tensor]:
        """logprobs (B, T) under logits / temperature, values (B, T), entropy (B, T) if asked
        (of the temperature-scaled distribution), ptx_loss (0-d) if ``ptx``; 0 at masked positions.
        Without a critic there are no values."""
        with_values = with_values and self.critic is not None
        logprobs, entropy, hidden = policy_logprobs(
            self.policy, query, query_mask, response, response_mask, temperature,
            with_entropy=with_entropy, with_hidden=with_values and self.value_head is not None,
        )  # fmt: skip
        out = {"logprobs": logprobs}
        if entropy is not None:
            out["entropy"] = entropy
        if with_values:
            if self.value_head is not None:
                out["values"] = self.value_head(hidden) * response_mask
            else:
                out["values"] = response_values(self.value_model, query, query_mask, response, response_mask)
        if ptx is not None:
            out["ptx_loss"] = ptx_loss(self.policy, ptx)
        return out


def ptx_loss(policy: Any, batch: Any) -> torch.Tensor:
    """PPO-ptx: the mean next-token negative log-likelihood over the trained tokens of a batch of
    demonstrations or text (a `rlhfkit.demonstrations.Batch`: right-padded, labels -100 where
    untrained), the objective's γ·E[log π(x)] term of InstructGPT (eq. 2)."""
    out = policy(input_ids=batch.input_ids, position_ids=batch.position_ids)
    return lm_loss(out.logits, batch.labels)[0]
