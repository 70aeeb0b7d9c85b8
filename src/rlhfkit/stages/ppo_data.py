"""What a PPO step draws and carries: each a function of (seed, step), so a resumed run is exact.

* `load_prompts` — the prompts (`PromptItem`), each encoded once, up front;
* `step_rows` (phase 1) — the prompts of step s: one endless stream, an independent shuffle per
  epoch, sharded by rank (each rollout's sampling seed is `rlhfkit.seeds.row_seed` of (seed, step, row));
* `Experience` — one step's rollouts and what phases 3-7 compute from them, (B, T) tensors;
  `minibatch_order` and `micro_batches` cut it for phase 8 (a fresh shuffle per PPO epoch);
* `PtxFeed` / `load_ptx` (phase 9) — PPO-ptx batches of demonstrations or text, from a
  checkpointed position in their own endless stream.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.stages.ppo_options import Sizes
from rlhfkit.training import Dist, epoch_order, shard

# --- prompts, and their order --------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: Any  # a string, or the conversation so far (a list of messages)
    ids: tuple[int, ...]  # encoded with chat.encode_prompt and --chat-template (left-truncated to --max-prompt-length)


def load_prompts(config: PPOConfig, tokenizer: Any) -> tuple[list[PromptItem], int]:
    """(prompts, number truncated). Every prompt is encoded once, up front, and checked as every
    sampling stage checks it (`chat.check_prompts`): one longer than ``--max-prompt-length`` keeps
    its last tokens (counted); one that leaves no room for ``--max-new-tokens`` in the policy's
    context is an error at FILE:LINE."""
    from rlhfkit.chat import check_prompts
    from rlhfkit.data import records
    from rlhfkit.models import model_context

    loaded = records.load_kind(config.prompts, "prompts", skip_invalid=config.skip_invalid)
    context = model_context(config.policy, trust_remote_code=config.trust_remote_code)
    encoded, truncated = check_prompts(
        tokenizer, [record.prompt for record in loaded], source="<stdin>" if config.prompts == "-" else config.prompts,
        lines=loaded.lines, mode=config.chat_template, context=context,
        max_new_tokens=config.max_new_tokens, max_prompt_length=config.max_prompt_length,
        hint="--max-prompt-length N keeps the last N tokens of longer prompts",
    )  # fmt: skip
    return [PromptItem(record.id, record.prompt, tuple(ids)) for record, ids in zip(loaded, encoded)], truncated


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """`rlhfkit.training.epoch_order`, cached: every step and every ptx batch looks it up."""
    return tuple(epoch_order(n, seed, epoch))


def step_rows(n_prompts: int, seed: int, step: int, batch_size: int, dist: Dist) -> list[tuple[int, int]]:
    """This rank's rollouts of PPO step ``step`` (0-based): (global row, prompt index) pairs.

    The prompts form one endless stream, an independent shuffle per epoch; step s takes the next
    ``batch_size × world`` of them and rank r every world-th from r. A function of the step alone,
    so a resumed run draws exactly the prompts it would have drawn.
    """
    width = batch_size * dist.world_size
    rows = []
    for j in range(width):
        epoch, k = divmod(step * width + j, n_prompts)
        rows.append((j, _epoch_order(n_prompts, seed, epoch)[k]))
    return shard(rows, dist)


def minibatch_order(seed: int, step: int, epoch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shuffle of PPO epoch ``epoch`` of step ``step``: a permutation of the n rollouts."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + epoch)
    return torch.randperm(n, generator=g).to(device)


# --- a rollout batch -------------------------------------------------------------------------


@dataclass
class Experience:
    """One step's rollouts and everything PPO computes from them; (B, P) and (B, T) tensors."""

    query: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P)
    response: torch.Tensor  # (B, T) right-padded response ids (stop token included)
    response_mask: torch.Tensor  # (B, T) 1 = response token, 0 after its end
    logprobs: torch.Tensor | None = None  # (B, T) policy log-probs at sampling time ("old")
    ref_logprobs: torch.Tensor | None = None  # (B, T) reference log-probs (grpo's KL loss term)
    values: torch.Tensor | None = None  # (B, T) critic values at sampling time ("old")
    advantages: torch.Tensor | None = None  # (B, T) whitened
    returns: torch.Tensor | None = None  # (B, T)

    @functools.cached_property
    def lengths(self) -> tuple[list[int], list[int]]:
        """Prompt and response lengths on the host (one device sync), for trimming micro-batches."""
        return self.query_mask.sum(1).tolist(), self.response_mask.sum(1).tolist()

    def rows(self, idx: torch.Tensor) -> dict[str, Any]:
        """The rollouts ``idx`` with the columns that are padding in all of them cut off.

        Cutting depends only on which rows are taken, so the rollout pass and the first PPO epoch,
        which take the same rows, run on identical tensors.
        """
        q_len, r_len = self.lengths
        rows = idx.tolist()
        P = max(q_len[i] for i in rows)
        T = max(1, max(r_len[i] for i in rows))
        out = {
            "query": self.query[idx, self.query.size(1) - P :],
            "query_mask": self.query_mask[idx, self.query.size(1) - P :],
            "response": self.response[idx, :T],
            "response_mask": self.response_mask[idx, :T],
        }
        for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
            tensor = getattr(self, name)
            if tensor is not None:
                out[name] = tensor[idx, :T]
        return out


def micro_batches(order: torch.Tensor, sz: Sizes) -> list[list[torch.Tensor]]:
    """Mini-batches of micro-batches (row indices) for one PPO epoch's ``order``."""
    return [list(order[m : m + sz.mini_batch].split(sz.micro_batch)) for m in range(0, sz.batch, sz.mini_batch)]


# --- PPO-ptx -------------------------------------------------------------------------------------


class PtxFeed:
    """PPO-ptx batches: demonstrations or text, drawn in a deterministic order from a position.

    The examples form one endless stream, reshuffled every epoch; rank r of w takes stream items
    r, r + w, ... so that the ranks see different examples."""

    def __init__(self, examples: Sequence[Any], batch_size: int, seed: int, pad_token_id: int, dist: Dist = Dist()):
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.pad_token_id, self.dist = pad_token_id, dist
        self.position = 0  # examples consumed so far by each rank (checkpointed)

    def next(self, device: torch.device) -> Any:
        from rlhfkit.demonstrations import collate

        n = len(self.examples)
        picked = []
        for p in range(self.position, self.position + self.batch_size):
            epoch, k = divmod(p * self.dist.world_size + self.dist.rank, n)
            picked.append(self.examples[_epoch_order(n, self.seed + 1, epoch)[k]])
        self.position += self.batch_size
        return collate(picked, self.pad_token_id).to(device)


def load_ptx(config: PPOConfig, tokenizer: Any, micro_batch: int, dist: Dist = Dist()) -> tuple[PtxFeed | None, dict[str, Any]]:
    """The feed of ``--ptx-data`` (``--ptx-batch-size`` examples per micro-batch, default one
    micro-batch's worth) and its encoding statistics; (None, {}) when γ = 0 or there is no data."""
    if config.ptx_coef == 0 or not config.ptx_data:
        return None, {}  # γ = 0: no ptx forward at all, so the update is exactly PPO
    from rlhfkit.data import records
    from rlhfkit.demonstrations import encode_dataset

    loaded = records.load_kind(config.ptx_data, "demonstrations", skip_invalid=config.skip_invalid)
    examples, stats = encode_dataset(
        tokenizer, loaded, loaded.lines, source=config.ptx_data, max_length=config.ptx_max_length,
        skip_invalid=config.skip_invalid, skipped=loaded.skipped, chat_template=config.chat_template,
    )  # fmt: skip
    feed = PtxFeed(examples, config.ptx_batch_size or micro_batch, config.seed, tokenizer.pad_token_id, dist)
    return feed, stats.as_dict()
