"""Batched sampling with the KV cache and left padding, and log-probs of given responses.

One decoding loop serves collect, ppo and eval. It is written out (rather than calling
``model.generate``) for three reasons: every row samples from its own ``torch.Generator`` so a
completion depends only on its prompt and seed, not on which other prompts share its batch (stable
ids, exact resume); the loop stops at the first stop token *per row* and builds the response mask
from positions, never from ``token == pad_token_id`` (SmolLM2's pad is its EOS); and it returns the
tensors PPO needs directly, without re-tokenising text.

Layout of a batch (P = longest prompt, T = longest response)::

    query          (B, P)  left-padded prompt ids      [pad pad p0 p1 p2]
    query_mask     (B, P)  1 = real prompt token       [ 0   0  1  1  1]
    response       (B, T)  right-padded sampled ids    [r0 r1 EOS pad pad]
    response_mask  (B, T)  1 = real response token     [ 1  1  1   0   0]   (the stop token counts)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhfkit.losses import entropy_from_logits, logprobs_from_logits, scale_logits


@dataclass
class Rollout:
    query: torch.Tensor  # (B, P)
    query_mask: torch.Tensor  # (B, P)
    response: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    stopped: torch.Tensor  # (B,) bool: ended with a stop token or stop string ("stop"), else "length"
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token under logits / temperature
    stop_text: list[str | None]  # the stop string that ended each row, if any

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def response_ids(self, i: int) -> list[int]:
        return self.response[i, : int(self.response_mask[i].sum())].tolist()

    def completion_text(self, i: int, tokenizer: Any, stop_token_ids: Sequence[int] = ()) -> str:
        """Row i's response as text: without its final stop token, cut before a stop string."""
        ids = self.response_ids(i)
        stops = set(stop_token_ids) or ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        if bool(self.stopped[i]) and ids and ids[-1] in stops and self.stop_text[i] is None:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if self.stop_text[i] is not None:
            text = text[: text.find(self.stop_text[i])] if self.stop_text[i] in text else text
        return text


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, mask), both (B, P), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, mask), both (B, T), padded on the right."""
    width = width if width is not None else max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[:width]
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def join(
    query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, P+T): the left-padded prompt followed by the right-padded response,
    the one sequence that policy, reference, value and reward models all read."""
    return torch.cat([query, response], dim=1), torch.cat([query_mask, response_mask], dim=1)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of (B, V) logits; removed entries become -inf."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _cache_of(out: Any) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    seeds: Sequence[int] | None = None,
) -> Rollout:
    """Sample one response per prompt (repeat a prompt K times for K samples).

    ``temperature == 0`` decodes greedily. ``stop_strings`` need ``tokenizer`` (to read the text).
    ``seeds`` gives each row its own generator; without it rows draw from the global RNG.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    device = next(model.parameters()).device
    batch = len(prompts)
    query, query_mask = left_pad(prompts, pad_token_id, device)
    generators = None
    if seeds is not None:
        generators = [torch.Generator(device=device).manual_seed(int(s) % (2**63)) for s in seeds]
    stops = torch.as_tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    stop_text: list[str | None] = [None] * batch

    attention = query_mask
    positions = position_ids_from_mask(query_mask)
    step_ids = query
    cache = None
    # rows still generating, in the order the model sees them: a row that stops leaves the batch and
    # the KV cache, so short completions stop costing compute (per-row generators keep every row's
    # draws independent of who else is in the batch)
    active = torch.arange(batch, device=device)
    was_training = model.training
    model.eval()
    try:
        for t in range(max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = _cache_of(out)
            logits = out.logits[:, -1, :].float()  # (A, V), A = active rows
            if temperature > 0:
                scaled = logits / temperature
                probs = _filter_logits(scaled, top_k, top_p).softmax(-1)
                if generators is None:
                    next_ids = torch.multinomial(probs, 1).squeeze(-1)
                else:
                    rows = active.tolist()
                    next_ids = torch.cat([torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(rows)])
                token_logprobs = F.log_softmax(scaled, -1).gather(-1, next_ids[:, None]).squeeze(-1)
            else:
                next_ids = logits.argmax(-1)
                token_logprobs = F.log_softmax(logits, -1).gather(-1, next_ids[:, None]).squeeze(-1)
            tokens[active, t] = next_ids
            logprobs[active, t] = token_logprobs
            lengths[active] += 1
            hit = torch.isin(next_ids, stops)  # (A,)
            if stop_strings:
                checked = done.clone()
                checked[active] |= hit
                hit |= _stop_string_hits(tokens, lengths, checked, stop_strings, tokenizer, stop_text)[active]
            stopped[active[hit]] = True
            done[active[hit]] = True
            keep = ~hit
            if not bool(keep.any()):  # a CPU-GPU sync per step; it ends the loop once every row stopped
                break
            if not bool(keep.all()):
                index = keep.nonzero().squeeze(1)
                cache.batch_select_indices(index)  # transformers' DynamicCache: keep these rows only
                active, attention, positions, next_ids = active[index], attention[index], positions[index], next_ids[index]
            attention = torch.cat([attention, torch.ones((attention.size(0), 1), dtype=attention.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = next_ids[:, None]
    finally:
        model.train(was_training)

    width = int(lengths.max()) if batch else 0
    width = max(width, 1)
    response = tokens[:, :width]
    response_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad_token_id))
    return Rollout(
        query=query,
        query_mask=query_mask,
        response=response,
        response_mask=response_mask,
        stopped=stopped,
        logprobs=logprobs[:, :width] * response_mask,
        stop_text=stop_text,
    )


def _stop_string_hits(tokens, lengths, already, stop_strings, tokenizer, stop_text) -> torch.Tensor:
    """Rows whose decoded response now contains a stop string (checked on the tail only)."""
    hits = torch.zeros_like(already)
    tail = max(len(s) for s in stop_strings) + 16  # enough tokens to hold any stop string
    for i in (~already).nonzero().flatten().tolist():
        n = int(lengths[i])
        text = tokenizer.decode(tokens[i, max(0, n - tail) : n].tolist(), skip_special_tokens=False)
        for s in stop_strings:
            if s in text:
                hits[i] = True
                stop_text[i] = s
                break
    return hits


def policy_logprobs(
    policy: Any,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logprobs, entropy, hidden) of ``response`` after ``query``: one forward over prompt +
    response, the output layer only at the T positions that predict response tokens, logits divided
    by the temperature; plus the last hidden states (B, T, H) at those positions for a value head.

    The policy, the reference and the training step all go through this one function, so that
    equal weights give bit-equal log-probs (KL exactly 0, first ratio exactly 1).
    """
    T = response.size(1)
    input_ids, attention = join(query, query_mask, response, response_mask)  # (B, P+T)
    L = input_ids.size(1)
    out = policy(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids_from_mask(attention),
        # the output layer only at the T positions P-1 .. P+T-2 that predict the response tokens
        logits_to_keep=torch.arange(L - T - 1, L - 1, device=input_ids.device), output_hidden_states=with_hidden,
    )  # fmt: skip
    logits = out.logits.float()  # (B, T, V): position P-1+t predicts response[t]
    entropy = None
    if with_entropy and not torch.is_grad_enabled():
        # the rollout pass: one log-softmax gives both (the same ops as `logprobs_from_logits`, so the same bits)
        log_softmax = torch.log_softmax(scale_logits(logits, temperature), dim=-1)  # (B, T, V)
        logprobs = log_softmax.gather(-1, response.unsqueeze(-1)).squeeze(-1) * response_mask
        entropy = -(log_softmax.exp() * log_softmax).sum(-1) * response_mask
    else:
        logprobs = logprobs_from_logits(logits, response, temperature) * response_mask
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(scale_logits(logits, temperature)) * response_mask
    hidden = out.hidden_states[-1][:, -T - 1 : -1] if with_hidden else None  # (B, T, H)
    return logprobs, entropy, hidden
