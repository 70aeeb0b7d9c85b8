"""train-rm's score head: what it reads, what it starts from, what else trains with it, and how an
ensemble is kept.

Four choices decide how well a reward model trained on a few hundred comparisons ranks the
answers to prompts it has never seen (README, "the hard example", measures each):

0. **What the head reads** (``--pooling``): the last token's hidden state (``last``, the
   interchange format), or that and the mean hidden state over the completion (``last+mean``:
   a second, bias-free "mean head", `scoring.pooled_hidden`).
   *From which layer* (``--depth``): a reward model cut to its bottom d decoder blocks (`truncate`;
   the final norm and the head stay, and the saved model loads as a d-layer classifier). The top
   blocks of a causal LM specialise in predicting the next token; features that rank whole answers
   are often as good or better lower down (Skean et al. 2025, "Layer by Layer"), and a cut model
   scores faster in ppo and eval. ``auto`` fits the probe at every depth from one forward pass
   (`depth_features`) and keeps the depth with the lowest cross-validated loss over the rankings
   (`choose_depth`): chosen on the training comparisons, never on held-out ones.
1. **Probe initialisation** (``--head-init probe``, LP-FT, Kumar et al. 2022): the head is fitted
   on the frozen backbone's features by Bradley–Terry logistic regression
   (`rlhfkit.probe`) before any weight of the backbone moves. ``--head-init random`` keeps
   transformers' fresh random head.
2. **What trains** (``--trainable-layers N``): the top N decoder layers, the final norm and the
   head; the rest is frozen. ``0`` keeps the linear probe alone (no fine-tuning of the features);
   ``-1`` (default) trains every layer. ``--head-lr`` gives the heads a learning rate of their own.
3. **An ensemble** (``--ensemble M``): M heads on one backbone, the InstructGPT batching unchanged
   (one forward per completion serves all heads). Member m trains on a bootstrap resample of the
   rankings (`probe.bootstrap_weights`: a ranking drawn twice weighs twice) from its own probe
   fit, so the members agree where the data is dense and drift apart where it is thin — the
   spread of their normalised scores is the reward's uncertainty (Lakshminarayanan et al. 2017;
   Coste et al. 2023). The saved model keeps the interchange format — a one-label classifier
   whose head is the mean of the normalised members — and the members go to
   ``ensemble.safetensors`` (`scoring.Ensemble`), which ppo (``--conservative-coef``) and
   collect (``--select-by``) read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from rlhfkit import rm_data
from rlhfkit.generation import position_ids_from_mask, right_pad
from rlhfkit.models import base_model
from rlhfkit.probe import L2_GRID, PairFeatures, choose_l2, fit_probe, pair_accuracy
from rlhfkit.scoring import (
    FEATURE_LAYERS,
    Ensemble,
    add_mean_head,
    classifier_parts,
    final_norm,
    layer_state,
    mean_head,
    pool,
    pooled_hidden,
)
from rlhfkit.training import trainable_state_dict


def _distinct(elements: Sequence[rm_data.Element]) -> tuple[list[tuple[int, ...]], list[int], PairFeatures]:
    """(distinct sequences, their completion starts, their pairs with placeholder features): a pair's
    group is the index of its element (one ranking), so folds and bootstrap resamples keep the
    correlated pairs of a ranking together."""
    sequences: dict[tuple[int, ...], int] = {}
    starts: dict[tuple[int, ...], int] = {}
    winners, losers, ties, groups = [], [], [], []
    for g, element in enumerate(elements):
        rows = [sequences.setdefault(seq, len(sequences)) for seq in element.sequences]
        starts.update(zip(element.sequences, element.starts))
        winners += [rows[i] for i in element.winners]
        losers += [rows[i] for i in element.losers]
        ties += list(element.ties or [False] * element.num_pairs)
        groups += [g] * element.num_pairs
    ordered = list(sequences)
    pairs = PairFeatures(torch.empty(0), torch.tensor(winners), torch.tensor(losers), torch.tensor(ties), torch.tensor(groups))
    return ordered, [starts.get(seq, 0) for seq in ordered], pairs


@torch.no_grad()
def _read_all(
    read: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    sequences: list[tuple[int, ...]],
    starts: list[int],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """``read(ids, mask, starts)`` of every sequence, batched by length (little padding), in float32 on the CPU."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    features: torch.Tensor | None = None
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        ids, mask = right_pad([sequences[r] for r in rows], pad_token_id, device)
        first = torch.tensor([starts[r] for r in rows], device=device)
        with autocast():
            values = read(ids, mask, first).float().cpu()
        if features is None:
            features = torch.empty(len(sequences), *values.shape[1:])
        features[rows] = values
    assert features is not None
    return features


def pair_features(
    model: Any,
    elements: Sequence[rm_data.Element],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> PairFeatures:
    """Frozen features of every distinct sequence of ``elements`` (what the heads read:
    `scoring.pooled_hidden`, (N, H) or (N, 2H)) and their pairs."""
    sequences, starts, pairs = _distinct(elements)
    features = _read_all(
        lambda ids, mask, first: pooled_hidden(model, ids, mask, first),
        sequences, starts, batch_size=batch_size, pad_token_id=pad_token_id, device=device, autocast=autocast,
    )  # fmt: skip
    return dataclasses.replace(pairs, features=features)


def depth_features(
    model: Any,
    elements: Sequence[rm_data.Element],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    mean: bool,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[PairFeatures]:
    """`pair_features` of the model cut to each depth d = 1..L (`truncate`), from one forward pass:
    the hidden state after block d through the final norm is what the cut model's head reads.
    Returns L PairFeatures sharing their pairs."""
    backbone, _ = classifier_parts(model)
    norm, depth = final_norm(model), len(decoder_layers(model))

    def read(ids: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), output_hidden_states=True)
        states = [layer_state(out, d, norm) for d in range(1, depth)] + [out.last_hidden_state]
        return torch.stack([pool(h, mask, first, mean=mean) for h in states], 1)  # (b, L, H or 2H)

    sequences, starts, pairs = _distinct(elements)
    features = _read_all(
        read, sequences, starts, batch_size=batch_size, pad_token_id=pad_token_id, device=device, autocast=autocast
    )
    return [dataclasses.replace(pairs, features=features[:, d].contiguous()) for d in range(depth)]


def choose_depth(by_depth: Sequence[PairFeatures], *, l2: float | None, seed: int) -> tuple[int, float, dict[int, float]]:
    """The depth (1-based) whose probe has the lowest cross-validated loss (`probe.choose_l2`; with
    ``l2`` given, that λ's), ties going to the deeper model. Returns (depth, its λ, {depth: loss})."""
    losses: dict[int, float] = {}
    chosen_l2: dict[int, float] = {}
    for d, pairs in enumerate(by_depth, start=1):
        best, cv = choose_l2(pairs, seed=seed, grid=(l2,) if l2 is not None else L2_GRID)
        chosen_l2[d] = best
        losses[d] = cv.get(best, float("nan"))
    if any(math.isnan(v) for v in losses.values()):  # nothing to hold out: keep every layer
        return len(by_depth), chosen_l2[len(by_depth)], losses
    depth = min(losses, key=lambda d: (losses[d], -d))
    return depth, chosen_l2[depth], losses


def read_layers(model: Any, count: int) -> tuple[int, ...]:
    """Make ``model`` read ``count`` layers' features (`scoring.pooled_hidden`): the last one and
    ``count`` − 1 lower ones, evenly spaced (30 layers, 5: 6, 12, 18, 24 and 30); recorded in its
    config, so the saved model reads them too. Returns the lower layers."""
    layers = len(decoder_layers(model))
    if not 1 <= count <= layers:
        raise ValueError(f"{count} feature layers: the model has {layers} decoder layers")
    lower = tuple(sorted({round(layers * i / count) for i in range(1, count)} - {0, layers}))
    if lower:
        setattr(base_model(model).config, FEATURE_LAYERS, list(lower))
    return lower


def truncate(model: Any, depth: int) -> None:
    """Keep the bottom ``depth`` decoder blocks of ``model`` in place (the final norm and the heads
    stay); the config follows, so the saved model loads as a ``depth``-layer model."""
    layers = decoder_layers(model)
    if not 1 <= depth <= len(layers):
        raise ValueError(f"depth {depth}: the model has {len(layers)} decoder layers")
    if depth == len(layers):
        return
    setattr(classifier_parts(model)[0], _layers_attribute(model), torch.nn.ModuleList(list(layers)[:depth]))
    config = base_model(model).config
    config.num_hidden_layers = depth
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:depth]


def init_heads_by_probe(
    model: Any, pairs: PairFeatures, element_weights: torch.Tensor, *, l2: float | None, seed: int
) -> dict[str, Any]:
    """Set each head row m to the probe fitted on member m's resample; returns what was chosen.
    A ``last+mean`` model's probe is 2H wide: its first half goes to the score head, its second to
    the mean head (`scoring.pooled_hidden`).

    ``element_weights`` (M, E): member m's weight of element (ranking) e. λ is ``l2``, or chosen by
    cross-validation over the rankings (`probe.choose_l2`) when None.
    """
    _, head = classifier_parts(model)
    cv: dict[float, float] = {}
    if l2 is None:
        l2, cv = choose_l2(pairs, seed=seed)
    weights = element_weights[:, pairs.groups]  # (M, P)
    rows = [fit_probe(pairs, l2=l2, weights=None if bool((w == 1).all()) else w) for w in weights]
    fitted = torch.stack(rows)  # (M, H) or (M, 2H)
    extra = mean_head(model)
    with torch.no_grad():
        size = head.weight.size(1)
        head.weight.copy_(fitted[:, :size].to(head.weight))
        if extra is not None:
            extra.weight.copy_(fitted[:, size:].to(extra.weight))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()  # an offset cancels in every pair; the normalisation sets it later
    return {"l2": l2, "cv_loss": cv, "train_accuracy": pair_accuracy(rows[0], pairs) if len(rows) == 1 else None}


def _layers_attribute(model: Any) -> str:
    """The backbone's attribute holding its transformer blocks (Llama-style ``layers``, GPT-2 ``h``)."""
    backbone, _ = classifier_parts(model)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(backbone, name, None), torch.nn.ModuleList):
            return name
    raise TypeError(f"{type(backbone).__name__}: cannot find its decoder layers for --trainable-layers")


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a Hugging Face model."""
    return getattr(classifier_parts(model)[0], _layers_attribute(model))


def freeze_lower_layers(model: Any, trainable_layers: int) -> int:
    """Freeze everything but the top ``trainable_layers`` blocks, the final norm and the head.

    Returns the number of parameters left trainable. ``-1`` leaves the model as it is.
    """
    if trainable_layers < 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    _, head = classifier_parts(model)
    layers = decoder_layers(model)
    keep = set(map(id, head.parameters())) | set(map(id, mean_head(model).parameters() if mean_head(model) else ()))
    for layer in list(layers)[len(layers) - trainable_layers :] if trainable_layers else []:
        keep |= set(map(id, layer.parameters()))
    norm = final_norm(model)
    if norm is not None:
        keep |= set(map(id, norm.parameters()))
    for p in base_model(model).parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pair_weights(element_weights: torch.Tensor, chunk: Sequence[int], elements: Sequence[rm_data.Element]) -> torch.Tensor:
    """(M, P) weights of the pairs of a micro-batch (in `rm_data.collate`'s order: element by element)."""
    index = torch.repeat_interleave(torch.tensor(list(chunk)), torch.tensor([e.num_pairs for e in elements]))
    return element_weights[:, index]


def save_weights(model: Any, path: Path) -> None:
    """The trainable weights (`training.trainable_state_dict`) as safetensors, written atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_weights(model: Any, path: Path) -> None:
    """Load what `save_weights` wrote back into ``model`` (the frozen rest is unchanged)."""
    from safetensors.torch import load_file

    missing_ok = model.load_state_dict(load_file(str(path)), strict=False)
    if missing_ok.unexpected_keys:
        raise RuntimeError(f"{path}: unexpected weights {missing_ok.unexpected_keys[:3]}")


def single_head(model: Any, gains: torch.Tensor, biases: torch.Tensor) -> tuple[Ensemble, float]:
    """Turn an M-head classifier into the one-label interchange model in place.

    The new head is Σ_m gain_m·w_m / M; with bias mean_m(bias_m) its normalised score is the mean
    of the members' normalised scores (a mean head likewise: Σ_m gain_m·u_m / M). Returns the
    members (`scoring.Ensemble`, weight_m = w_m, or [w_m ⊕ u_m] for ``last+mean``) and that bias.
    """
    _, head = classifier_parts(model)
    extra = mean_head(model)
    parts = [head.weight.detach().float().cpu().clone()]  # (M, H)
    if extra is not None:
        parts.append(extra.weight.detach().float().cpu().clone())
    weight = torch.cat(parts, 1)  # (M, H) or (M, 2H)
    average = (gains[:, None].float() * weight).mean(0, keepdim=True)  # (1, H) or (1, 2H)
    plain = base_model(model)
    size = head.weight.size(1)
    new = torch.nn.Linear(size, 1, bias=False).to(head.weight)
    with torch.no_grad():
        new.weight.copy_(average[:, :size].to(new.weight))
    attr = "score" if getattr(plain, "score", None) is not None else "classifier"
    setattr(plain, attr, new)
    if extra is not None:
        add_mean_head(plain, average[:, size:])
    plain.config.num_labels = 1
    plain.num_labels = 1
    return Ensemble(weight, gains.float(), biases.float()), float(biases.float().mean())
