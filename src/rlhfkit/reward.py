"""The reward function of ppo and eval: a reward model, any one-label classifier, or a script.

`load_reward(spec, tokenizer, device, dtype)` accepts

* a reward-model directory written by ``rlhfkit train-rm``: an ``AutoModelForSequenceClassification``
  with one label, whose ``rlhfkit.json`` records the normalisation ``{"reward": {"gain": g, "bias": b}}``
  (normalised = g·raw + b, mean 0 and std 1 on the reference completions);
* any other one-label sequence classifier (a directory, a hub id or a ``.gguf`` file): used raw
  (gain 1, bias 0);
* ``python:MODULE:FUNCTION`` or ``python:path/to/file.py:FUNCTION``: a scripted reward
  ``f(prompts, completions) -> list[float]`` (rule-based or verifiable rewards, and fast tests).
  ``prompts`` are the prompts as the data gave them (a string, or the list of chat messages),
  ``completions`` the completion texts (without the final EOS, cut before a stop string).

`Reward.score` returns the normalised score of each (prompt, completion), a ``(B,)`` float32
tensor on the reward's device. A model reward reads its score at the last real token of
prompt + completion (by position, never by comparing ids with the pad id; see `scoring`). When the
reward model shares the policy's vocabulary it scores the policy's token ids as sampled, with
the final EOS of a completion that stopped, exactly as train-rm scored its training pairs
(`chat.encode_completion`); otherwise the texts are re-encoded with the reward model's tokenizer.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit.chat import encode_completion, encode_prompt
from rlhfkit.config import ChatTemplate, is_script, parse_script_spec
from rlhfkit.data.records import Conversation
from rlhfkit.errors import ConfigError, RlhfkitError


class Reward:
    """A normalised reward. Subclasses implement `raw_scores`; `score` applies gain and bias."""

    name: str = ""
    gain: float = 1.0
    bias: float = 0.0
    device: torch.device = torch.device("cpu")

    def raw_scores(
        self, prompts, completions, query=None, query_mask=None, response=None, response_mask=None, stopped=None
    ) -> torch.Tensor:
        """Scores before gain and bias, (B,) float32; the arguments are `score`'s."""
        raise NotImplementedError

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Conversation],
        completions: Sequence[str],
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        response: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        stopped: torch.Tensor | Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Normalised scores (B,), float32: gain · raw + bias.

        ``query``/``query_mask`` (B, P, left-padded) and ``response``/``response_mask`` (B, T,
        right-padded) are the policy's token ids; a model reward that shares the policy's
        vocabulary scores them directly, otherwise (or when they are not given) it encodes
        ``prompts`` and ``completions`` itself. ``stopped`` says which completions ended with a
        stop token (they get the EOS appended when re-encoded; default: all).
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        raw = self.raw_scores(prompts, completions, query, query_mask, response, response_mask, stopped)
        return raw * self.gain + self.bias

    @torch.no_grad()
    def member_scores(
        self, prompts, completions, query=None, query_mask=None, response=None, response_mask=None, stopped=None
    ) -> torch.Tensor:
        """Normalised scores of every ensemble member, (B, M) float32; (B, 1) for a single reward.

        Same arguments as `score`. Their spread is the ensemble's uncertainty
        (`losses.conservative_score`); their mean is `score` for an ensemble from train-rm.
        """
        return self.score(prompts, completions, query, query_mask, response, response_mask, stopped)[:, None]

    @property
    def members(self) -> int:
        return 1

    def info(self) -> dict[str, Any]:
        """What to record in a run's provenance."""
        return {"spec": self.name, "gain": self.gain, "bias": self.bias}


# --- reward models ------------------------------------------------------------------------------


class ModelReward(Reward):
    """A one-label sequence classifier, frozen, scored at the last real token."""

    def __init__(
        self, spec: str, model: Any, tokenizer: Any, same_vocab: bool, gain: float, bias: float, batch_size: int = 16,
        ensemble: Any = None, chat_template: ChatTemplate = "auto",
    ):  # fmt: skip
        self.name, self.model, self.tokenizer, self.same_vocab = spec, model, tokenizer, same_vocab
        self.gain, self.bias, self.batch_size = gain, bias, max(1, batch_size)
        self.ensemble = ensemble  # scoring.Ensemble, or None
        self.chat_template = chat_template  # how string prompts are rendered when the texts are re-encoded
        self.device = next(model.parameters()).device

    @property
    def members(self) -> int:
        return 1 if self.ensemble is None else self.ensemble.members

    def raw_scores(
        self, prompts, completions, query=None, query_mask=None, response=None, response_mask=None, stopped=None
    ) -> torch.Tensor:
        from rlhfkit.scoring import head_scores

        return head_scores(self.model, self._hidden(prompts, completions, query, query_mask, response, response_mask, stopped))

    @torch.no_grad()
    def member_scores(
        self, prompts, completions, query=None, query_mask=None, response=None, response_mask=None, stopped=None
    ) -> torch.Tensor:
        if self.ensemble is None:
            return super().member_scores(prompts, completions, query, query_mask, response, response_mask, stopped)
        return self.ensemble.scores(self._hidden(prompts, completions, query, query_mask, response, response_mask, stopped))

    def _hidden(self, prompts, completions, query, query_mask, response, response_mask, stopped) -> torch.Tensor:
        """(B, H) pooled hidden states of prompt + completion (`scoring.pooled_hidden`: (B, 2H) for a
        ``last+mean`` model), in chunks of ``batch_size``."""
        from rlhfkit.generation import join, right_pad
        from rlhfkit.scoring import extra_width, mean_head, pooled_hidden

        if self.same_vocab and query is not None and response is not None:
            ids, mask = (x.to(self.device) for x in join(query, query_mask, response, response_mask))  # (B, P+T)
            starts = torch.full((ids.size(0),), query.size(1), device=self.device)  # the response follows the query
        else:
            stops = [True] * len(prompts) if stopped is None else [bool(s) for s in stopped]
            heads = [encode_prompt(self.tokenizer, p, self.chat_template) for p in prompts]
            seqs = [h + encode_completion(self.tokenizer, c, stopped=s) for h, c, s in zip(heads, completions, stops)]
            ids, mask = right_pad(seqs, self.tokenizer.pad_token_id, self.device)
            starts = torch.tensor([len(h) for h in heads], device=self.device)
        out = []
        for start in range(0, ids.size(0), self.batch_size):
            rows = slice(start, start + self.batch_size)
            first, last = _used_columns(mask[rows])
            out.append(pooled_hidden(self.model, ids[rows, first:last], mask[rows, first:last], starts[rows] - first))
        width = self.model.config.hidden_size + (extra_width(self.model) if mean_head(self.model) is not None else 0)
        return torch.cat(out) if out else torch.zeros(0, width, device=self.device)


def _used_columns(mask: torch.Tensor) -> tuple[int, int]:
    """[first, last) columns that hold a real token in some row: a chunk without its shared padding."""
    used = (mask != 0).any(0).nonzero().flatten()
    if used.numel() == 0:
        return 0, mask.size(1)
    return int(used[0]), int(used[-1]) + 1


def _same_vocab(a: Any, b: Any) -> bool:
    return a is b or (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.bos_token_id == b.bos_token_id)


def _load_model_reward(
    spec: str, tokenizer: Any, device: torch.device, dtype: torch.dtype, trust_remote_code: bool, batch_size: int,
    chat_template: ChatTemplate = "auto",
) -> ModelReward:
    from rlhfkit import models
    from rlhfkit.provenance import read_run_info
    from rlhfkit.scoring import load_mean_head, normalization, read_ensemble

    model = models.load_model(spec, kind="reward", dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    architectures = getattr(model.config, "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RlhfkitError(
            f"{spec}: not a reward model ({architectures[0]}); "
            "give a one-label sequence classifier (rlhfkit train-rm) or python:MODULE:FUNCTION"
        )
    if int(getattr(model.config, "num_labels", 1)) != 1:
        raise RlhfkitError(f"{spec}: a reward model has one label, this classifier has {model.config.num_labels}")
    if Path(spec).is_dir():
        load_mean_head(model, spec)  # a last+mean reward model (train-rm --pooling)
    models.disable_dropout(model)
    model.eval().requires_grad_(False)
    try:
        rm_tokenizer = models.load_tokenizer(spec, trust_remote_code=trust_remote_code)
    except RlhfkitError:
        if tokenizer is None:
            raise
        rm_tokenizer = tokenizer  # a reward-model directory saved without its tokenizer
    same = tokenizer is not None and _same_vocab(tokenizer, rm_tokenizer)
    gain, bias = normalization(read_run_info(spec)) if Path(spec).is_dir() else (1.0, 0.0)
    ensemble = read_ensemble(spec) if Path(spec).is_dir() else None
    return ModelReward(spec, model, rm_tokenizer, same, gain, bias, batch_size, ensemble, chat_template)


# --- scripted rewards ---------------------------------------------------------------------------


class ScriptedReward(Reward):
    """``python:MODULE:FUNCTION``: ``f(prompts, completions) -> list[float]``, used as is."""

    def __init__(self, spec: str, fn: Callable[..., Any], device: torch.device):
        self.name, self.fn, self.device = spec, fn, device

    def raw_scores(
        self, prompts, completions, query=None, query_mask=None, response=None, response_mask=None, stopped=None
    ) -> torch.Tensor:
        try:
            values = self.fn(list(prompts), list(completions))
        except (Exception, SystemExit) as e:  # the user's code: report it as a one-line error naming the function
            raise RlhfkitError(f"{self.name}: {_raised(e)} while scoring") from e
        checked = script_scores(self.name, values, len(completions))
        scores = torch.tensor(checked, dtype=torch.float32, device=self.device)
        if not bool(torch.isfinite(scores).all()):
            i = int((~torch.isfinite(scores)).nonzero()[0])
            raise RlhfkitError(f"{self.name}: returned a score too large for float32 ({checked[i]:g}) at position {i}")
        return scores


def script_scores(name: str, values: Any, n: int) -> list[float]:
    """A scripted reward's answer, checked: a sequence (list, tuple, iterator, 1-D array or tensor)
    of ``n`` finite real numbers (bools count as 0 and 1); anything else is one line naming the
    reward and the offending score."""
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:  # a numpy array or a torch tensor
        values = values.tolist()
    elif isinstance(values, Iterator):
        values = list(values)
    if not isinstance(values, (list, tuple)):
        raise RlhfkitError(f"{name}: must return a list of numbers (one per completion), got {type(values).__name__}")
    if len(values) != n:
        raise RlhfkitError(f"{name}: returned {len(values)} scores for {n} completions")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise RlhfkitError(f"{name}: score {i} is a {type(v).__name__} ({v!r:.40}), not a number")
        if not math.isfinite(v):
            raise RlhfkitError(f"{name}: returned a non-finite score ({v}) at position {i}")
        out.append(float(v))
    return out


def _raised(e: BaseException) -> str:
    """What the user's code did, in a few words: ``raised ValueError: ...`` or ``called sys.exit(3)``."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})"
    return f"raised {type(e).__name__}: {e}"


def load_script(spec: str) -> Callable[..., Any]:
    """Import the function of a ``python:`` spec (the current directory is importable, as with ``python -m``)."""
    target, function = parse_script_spec(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"{spec}: no such file {target}")
        name = f"rlhfkit_reward_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except (Exception, SystemExit) as e:  # the user's module failed to import (or exited)
            raise ConfigError(f"{spec}: importing {target} {_raised(e)}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{spec}: cannot import module '{target}' ({e})") from None
        except (Exception, SystemExit) as e:
            raise ConfigError(f"{spec}: importing {target} {_raised(e)}") from e
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"{spec}: module '{target}' has no function '{function}'")
    return fn


# --- entry point --------------------------------------------------------------------------------


def load_reward(
    spec: str,
    tokenizer: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    trust_remote_code: bool = False,
    batch_size: int = 16,
    chat_template: ChatTemplate = "auto",
) -> Reward:
    """The reward named by ``spec`` (see the module docstring). ``tokenizer`` is the policy's:
    a reward model with the same vocabulary scores the policy's token ids directly.
    ``batch_size`` caps how many sequences one reward-model forward pass takes; ``chat_template``
    (``--chat-template``) renders string prompts when the reward model re-encodes the texts, as the
    policy's prompts were rendered (`rlhfkit.chat`)."""
    device = torch.device(device)
    if is_script(spec):
        return ScriptedReward(spec, load_script(spec), device)
    return _load_model_reward(spec, tokenizer, device, dtype, trust_remote_code, batch_size, chat_template)
