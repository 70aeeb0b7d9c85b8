"""Batched sampling with the KV cache and left padding, and log-probs of given responses.

One decoding loop serves collect, ppo and eval. It is written out (rather than calling
``model.generate``) for three reasons: every row samples from its own random stream (Philox keyed
by the row's seed, `philox_uniforms`) so a completion depends only on its prompt and seed, not on
which other prompts share its batch (stable ids, exact resume); the loop stops at the first stop
token *per row* and builds the response mask from positions, never from ``token == pad_token_id``
(SmolLM2's pad is its EOS); and it returns the tensors PPO needs directly, without re-tokenising text.

Two things keep a step cheap: one draw for the whole batch (inverse-CDF sampling with one uniform per
row, `sample_from_probs`, where ``torch.multinomial`` with a generator per row needs a call per row
and draws V exponentials in each), and one prefill per distinct prompt (the K samples of a prompt,
side by side in collect, eval and the grouped algorithms, share its KV cache).

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
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs

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


class _PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers of a fixed length, written in place: ``DynamicLayer`` concatenates
    a new tensor every step (O(T²) copying over a decoding run). ``keys``/``values`` are views of the
    filled part, so everything that reads a ``DynamicLayer`` reads this one the same way."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = self.length, key_states.size(-2)
        if not self.is_initialized:
            self.is_initialized, self.device = True, key_states.device
            shape = (*key_states.shape[:-2], max(self.capacity, s), key_states.size(-1))
            self.key_buffer = key_states.new_empty(shape)
            self.value_buffer = value_states.new_empty((*shape[:-1], value_states.size(-1)))
        if n + s > self.key_buffer.size(-2):
            raise ValueError(f"KV cache of {self.key_buffer.size(-2)} positions is full")
        self.key_buffer[..., n : n + s, :] = key_states
        self.value_buffer[..., n : n + s, :] = value_states
        self.length = n + s
        self.keys, self.values = self.key_buffer[..., : n + s, :], self.value_buffer[..., : n + s, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]


class _PreallocatedCache(DynamicCache):
    def __init__(self, layers: list[_PreallocatedLayer]) -> None:
        Cache.__init__(self, layers=layers)


def _preallocated_cache(model: Any, capacity: int) -> DynamicCache | None:
    """A KV cache of `_PreallocatedLayer` s of ``capacity`` positions for a model whose layers all use
    full attention; None (the model makes its own) for sliding-window, chunked or recurrent layers."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        return None
    if not layer_types or any(kind != "full_attention" for kind in layer_types):
        return None
    return _PreallocatedCache([_PreallocatedLayer(capacity) for _ in layer_types])


_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the key schedule's increments (golden ratio, sqrt(3) - 1)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a·b for a < 2³² and int64 b < 2³², in int64 without overflow
    (a is split into 16-bit halves, so no partial product reaches 2⁴⁹)."""
    p0 = b * (a & 0xFFFF)  # < 2^48
    p1 = b * (a >> 16)  # < 2^48
    t = p0 + ((p1 & 0xFFFF) << 16)  # the low 48 bits of a·b, and a carry
    return ((p1 >> 16) + (t >> 32)) & _M32, t & _M32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; Random123),
    the counter-based generator cuRAND and PyTorch's CUDA RNG use: four 32-bit words out of a
    four-word counter and a two-word key, elementwise over tensors, so a whole batch of independent
    streams is one call.

    Each round: (hi₀, lo₀) = M₀·c₀, (hi₁, lo₁) = M₁·c₂, c ← (hi₁ ⊕ c₁ ⊕ k₀, lo₁, hi₀ ⊕ c₃ ⊕ k₁, lo₀);
    the key grows by (W₀, W₁) between rounds.

    Shapes: four counter and two key int64 tensors of one shape, values in [0, 2³²) → four of that
    shape. Example (Random123's known answer): counter 0, key 0 → 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniforms(seeds: Sequence[int], steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, steps) float32 uniforms in [0, 1): u[i, t] comes from Philox4x32-10 with key = seed i
    (its low and high 32 bits) and counter (t, 0, 0, 0), its first word's top 24 bits / 2²⁴.

    Row i depends on seeds[i] and t only (the rows are independent streams, whatever the batch);
    one call for every row and step of a decoding run.
    """
    seed = torch.as_tensor([int(s) % (2**63) for s in seeds], dtype=torch.long, device=device)[:, None]  # (B, 1)
    t = torch.arange(steps, dtype=torch.long, device=device)[None, :]  # (1, steps)
    k0, k1 = (seed & _M32).expand(-1, steps), (seed >> 32).expand(-1, steps)
    zero = torch.zeros_like(k0)
    word = philox4x32((t.expand_as(k0), zero, zero, zero), (k0, k1))[0]
    return (word >> 8).float() * 2.0**-24


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: the first v with cdf[v] > u·cdf[V−1], where
    cdf = cumsum(probs) (unnormalised rows work too). A token of probability 0 is never drawn
    (its cdf step has width 0; u·total rounding up to the total falls back to the last token of
    positive probability).

    Shapes: probs (B, V) ≥ 0, u (B,) in [0, 1) → (B,) int64. Example: probs [0.2, 0, 0.5, 0.3]:
    cdf [0.2, 0.2, 0.7, 1.0]; u = 0.1 → 0, u = 0.2 → 2, u = 0.7 → 3.
    """
    cdf = probs.cumsum(-1)  # (B, V)
    total = cdf[:, -1:].contiguous()  # (B, 1)
    drawn = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True)  # (B, 1)
    last = torch.searchsorted(cdf, total, right=False)  # (B, 1): the last token of positive probability
    return torch.minimum(drawn, last).squeeze(-1)


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
    """Sample one response per prompt (repeat a prompt K times for K samples: equal prompts are
    prefilled once and share their KV cache).

    ``temperature == 0`` decodes greedily. ``stop_strings`` need ``tokenizer`` (to read the text).
    ``seeds`` gives each row its own random stream (`philox_uniforms`); without it rows draw from
    the global RNG.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    device = next(model.parameters()).device
    batch = len(prompts)
    query, query_mask = left_pad(prompts, pad_token_id, device)
    uniforms = philox_uniforms(seeds, max_new_tokens, device) if seeds is not None and temperature > 0 else None  # (B, N)
    # one prefill per distinct prompt, on its first row (`firsts`); `expand` maps each row to its prompt's row of the prefill
    distinct: dict[tuple[int, ...], int] = {}
    firsts_list: list[int] = []
    for i, p in enumerate(prompts):
        if distinct.setdefault(tuple(p), len(distinct)) == len(firsts_list):
            firsts_list.append(i)
    expand = firsts = None
    if len(distinct) < batch:
        expand = torch.as_tensor([distinct[tuple(p)] for p in prompts], dtype=torch.long, device=device)  # (B,)
        firsts = torch.as_tensor(firsts_list, dtype=torch.long, device=device)  # (U,)
    stops = torch.as_tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    stop_text: list[str | None] = [None] * batch

    attention = query_mask
    positions = position_ids_from_mask(query_mask)
    step_ids, prefill_mask, prefill_positions = query, attention, positions
    if expand is not None:
        step_ids, prefill_mask, prefill_positions = query[firsts], attention[firsts], positions[firsts]  # (U, P)
    cache = _preallocated_cache(model, query.size(1) + max_new_tokens)
    # the rows in the batch, in the order the model sees them (`active`), and which of them are still
    # generating (`alive`): a row that stops stays in the batch, its draws ignored, until an eighth of the
    # batch has stopped; then the stopped rows leave the batch and the KV cache together (a copy of the
    # whole cache per such eighth rather than per stop: on SmolLM2, batch 64, 64 tokens, bf16, one thread,
    # 281 tokens/s copying at every stop, 320-335 at an eighth, 320 at a quarter or a half).
    # Per-row random streams keep every row's draws independent of who else is in the batch.
    active = torch.arange(batch, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        for t in range(max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attention if t else prefill_mask,
                position_ids=positions if t else prefill_positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = _cache_of(out)
            logits = out.logits[:, -1, :].float()  # (A, V), A = rows in the batch
            if t == 0 and expand is not None:
                cache.batch_select_indices(expand)  # (U, ...) -> (B, ...): every row gets its prompt's cache
                logits = logits[expand]
            if temperature > 0:
                scaled = scale_logits(logits, temperature)  # (A, V)
                filtered = _filter_logits(scaled, top_k, top_p)  # `scaled` itself without top-k / top-p
                top = scaled.amax(-1, keepdim=True)  # (A, 1); the filters always keep the most likely token
                weights = (filtered - top).exp_()  # (A, V) probabilities up to a factor, 0 where filtered out
                u = torch.rand(active.size(0), device=device) if uniforms is None else uniforms[active, t]  # (A,)
                next_ids = sample_from_probs(weights, u)
                # log-prob under the unfiltered logits / T: z_y − max − log Σ exp(z − max), from the weights when unfiltered
                mass = weights.sum(-1) if filtered is scaled else (scaled - top).exp().sum(-1)  # (A,)
                token_logprobs = scaled.gather(-1, next_ids[:, None]).squeeze(-1) - top.squeeze(-1) - mass.log()
            else:
                next_ids = logits.argmax(-1)
                token_logprobs = F.log_softmax(logits, -1).gather(-1, next_ids[:, None]).squeeze(-1)
            rows = active[alive]  # (R,) the rows that drew a token this step
            tokens[rows, t] = next_ids[alive]
            logprobs[rows, t] = token_logprobs[alive]
            lengths[rows] += 1
            hit = torch.isin(next_ids, stops) & alive  # (A,)
            if stop_strings:
                checked = done.clone()
                checked[active] |= hit
                # rows that stopped earlier are `done`, so `checked`: only live rows can hit
                hit |= _stop_string_hits(tokens, lengths, checked, stop_strings, tokenizer, stop_text)[active]
            stopped[active[hit]] = True
            done[active[hit]] = True
            alive &= ~hit
            live = int(alive.sum())  # a CPU-GPU sync per step; it ends the loop once every row stopped
            if live == 0:
                break
            if 8 * live <= 7 * alive.numel():
                index = alive.nonzero().squeeze(1)
                cache.batch_select_indices(index)  # keep these rows only (`_PreallocatedLayer`, transformers' DynamicLayer)
                active, alive, next_ids = active[index], alive[index], next_ids[index]
                attention, positions = attention[index], positions[index]
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


# the output layer runs on at most this many logits at a time (64 MB in float32; SmolLM2's 49,152-token
# vocabulary: 341 positions): a PPO micro-batch's (B, T, V) logits never exist in full
LOGITS_CHUNK = 2**24
# architectures whose logits are exactly output_layer(last hidden state): no soft-capping or scaling after it
PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def output_layer(model: Any) -> torch.nn.Linear | None:
    """The model's output layer when its logits are exactly ``layer(hidden_states[-1])`` (a plain
    ``nn.Linear`` of a `PLAIN_HEAD_TYPES` model, through a LoRA wrapper too), else None: a model
    that post-processes its logits (soft-capping, scaling, ILQL's advantage shift) is called whole."""
    get = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get is None or getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = get()
    return head if type(head) is torch.nn.Linear else None


def _chunk_logprobs(
    hidden: torch.Tensor, tokens: torch.Tensor, head: torch.nn.Module, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, H) hidden states, (n,) tokens -> (n,) log-probs and (n,) entropies (or None), through
    one (n, V) tensor of logits; entropies never carry a gradient."""
    logits = head(hidden).float()  # (n, V)
    if torch.is_grad_enabled() and logits.requires_grad:
        logprobs = logprobs_from_logits(logits, tokens, temperature)  # the lean backward of `losses`
        if not with_entropy:
            return logprobs, None
        with torch.no_grad():
            log_softmax = torch.log_softmax(scale_logits(logits, temperature), dim=-1)
            return logprobs, -(log_softmax.exp() * log_softmax).sum(-1)
    # the same ops as `logprobs_from_logits` without autograd, so the same bits; the entropy from the same log-softmax
    log_softmax = torch.log_softmax(scale_logits(logits, temperature), dim=-1)  # (n, V)
    logprobs = log_softmax.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logprobs, -(log_softmax.exp() * log_softmax).sum(-1) if with_entropy else None


def token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t) = log_softmax(head(h_t) / τ)[y_t] and, if asked, the entropy of that distribution
    (without gradient), with the output layer and the log-softmax run over ``chunk`` positions at a
    time (default: `LOGITS_CHUNK` logits), so the (B, T, V) logits are never held in full.

    With autograd each chunk is checkpointed (`torch.utils.checkpoint`): its logits are computed
    again in the backward instead of being kept, one more output-layer matmul for O(chunk · V)
    memory instead of O(B · T · V). The values (and gradients) equal the unchunked computation's up
    to the matmul's rounding; a batch that fits one chunk runs exactly the unchunked ops.

    Shapes: hidden (B, T, H), tokens (B, T) int64 → (B, T) log-probs, (B, T) entropies or None.
    """
    B, T, H = hidden.shape
    flat, ys = hidden.reshape(B * T, H), tokens.reshape(B * T)
    chunk = chunk or max(1, LOGITS_CHUNK // head.weight.size(0))
    if B * T <= chunk:
        logprobs, entropy = _chunk_logprobs(flat, ys, head, temperature, with_entropy)
    else:
        from torch.utils.checkpoint import checkpoint

        grad = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in head.parameters()))
        parts = []
        for s in range(0, B * T, chunk):
            args = (flat[s : s + chunk], ys[s : s + chunk], head, temperature, with_entropy)
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
        logprobs = torch.cat([lp for lp, _ in parts])
        entropy = torch.cat([e for _, e in parts]) if with_entropy else None
    return logprobs.view(B, T), entropy.view(B, T) if entropy is not None else None


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
    equal weights give bit-equal log-probs (KL exactly 0, first ratio exactly 1). A model with a
    plain output layer (`output_layer`) runs it in chunks (`token_logprobs`): the (B, T, V) logits
    are never held in full.
    """
    T = response.size(1)
    input_ids, attention = join(query, query_mask, response, response_mask)  # (B, P+T)
    L = input_ids.size(1)
    head = output_layer(policy)
    if head is not None:
        out = policy(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids_from_mask(attention),
            logits_to_keep=torch.arange(0, device=input_ids.device), output_hidden_states=True,  # no logits: the head runs below
        )  # fmt: skip
        last = out.hidden_states[-1][:, -T - 1 : -1]  # (B, T, H): position P-1+t predicts response[t]
        logprobs, entropy = token_logprobs(last, head, response, temperature, with_entropy=with_entropy)
        return logprobs * response_mask, entropy * response_mask if entropy is not None else None, last if with_hidden else None
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
