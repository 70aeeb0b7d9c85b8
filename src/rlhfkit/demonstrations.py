"""Demonstrations (SPEC §4) as training rows for ``rlhfkit sft``: token ids and labels, truncation,
packing and collation.

Which tokens are trained (``labels[t] != -100``), shape by shape:

* ``{"text": ...}`` — every token, and an EOS appended (continued pretraining: the model also
  learns where a document ends);
* ``{"prompt": ..., "response": ...}`` — the response tokens and the EOS appended after them; the
  prompt is encoded by `rlhfkit.chat.encode_prompt` (a message list is rendered with the chat
  template and the generation prompt, a string one as ``--chat-template`` says) and the response
  by `rlhfkit.chat.encode_completion`, exactly the token sequence that train-rm, ppo and eval score
  for the same pair;
* ``{"messages": [...]}`` — the conversation rendered once with the chat template and tokenized
  once; trained are the tokens of every assistant turn's content and of the template text after it
  up to and including the first special token (the end-of-turn token, ``<|im_end|>`` in ChatML),
  nothing else (not the newline after ``<|im_end|>``, not the ``<|im_start|>assistant`` header).
  Assistant turns are located in character space by rendering the conversation incrementally
  (``messages[:i]`` with the generation prompt, ``messages[:i+1]``) and mapped to tokens through
  the fast tokenizer's offset mapping — never by looking for token ids, since ``<|im_end|>`` is
  EOS, pad and turn separator at once in SmolLM2 and in the test tokenizer.

The first token of every example is never a target (nothing precedes it to predict it); that
keeps packed examples from being trained to predict across their boundary, and makes
``(labels != -100).sum()`` exactly the number of tokens the loss averages over.

Example (test tokenizer, ``--chat-template never``), ``{"prompt": "Hi", "response": "Yo"}``::

    input_ids  [ H   i   Y   o   <|im_end|> ]
    labels     [-100 -100 Y   o   <|im_end|> ]

Labels are aligned with the input ids, as transformers expects; the loss shifts them: the logits at
position t are scored against ``labels[t + 1]`` (`collate` precomputes those positions).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit.chat import encode_completion, encode_prompt, render_messages, render_prompt
from rlhfkit.config import ChatTemplate
from rlhfkit.data.records import Demonstration, Messages, RecordError
from rlhfkit.errors import DataError

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class Example:
    """One training row: token ids and labels of equal length.

    ``lengths`` is the length of each example packed into the row (one entry when unpacked);
    ``truncated`` says that ``--max-length`` cut it.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    lengths: tuple[int, ...] = ()
    truncated: bool = False

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels differ in length")
        if not self.lengths:
            object.__setattr__(self, "lengths", (len(self.input_ids),))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# --- one demonstration -> (input_ids, labels) -----------------------------------------------------


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Every token is trained; EOS is appended (unless the tokenizer already adds one)."""
    ids = list(tokenizer(text)["input_ids"])  # with the tokenizer's BOS, if it adds one
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, _first_untrained(list(ids))


def encode_prompt_response(
    tokenizer: Any, prompt: str | Messages, response: str, chat_template: ChatTemplate = "auto"
) -> tuple[list[int], list[int]]:
    """Only the response and its EOS are trained (a string prompt rendered by ``chat_template``, `rlhfkit.chat`)."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template)
    response_ids = encode_completion(tokenizer, response, stopped=True)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return list(prompt_ids) + list(response_ids), _first_untrained(labels)


def encode_messages(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]]:
    """Only the assistant turns are trained: their content and their end-of-turn token."""
    if not getattr(tokenizer, "is_fast", False):
        raise RecordError("messages", "training on chat messages needs a fast tokenizer (character offsets)")
    text = _render(tokenizer, messages, generation_prompt=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template holds its specials
    ids: list[int] = list(encoding["input_ids"])
    starts = [start for start, _ in encoding["offset_mapping"]]
    special = special_token_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for content_start, content_end, turn_end in assistant_spans(tokenizer, messages, text):
        # tokens are ordered by offset: train the content, then the template text after it up to
        # and including its first special token (the end-of-turn marker); with no special token
        # in the rest of the turn, all of it (a template whose separator is plain text)
        first = bisect.bisect_left(starts, content_start)
        last = bisect.bisect_left(starts, turn_end)
        for t in range(first, last):
            labels[t] = ids[t]
            if starts[t] >= content_end and ids[t] in special:
                break
    return ids, _first_untrained(labels)


def assistant_spans(tokenizer: Any, messages: Messages, text: str) -> list[tuple[int, int, int]]:
    """``(content_start, content_end, turn_end)`` character offsets in ``text`` of every assistant turn.

    ``text[:content_start]`` is the conversation rendered up to the assistant's turn with the
    generation prompt; ``text[:turn_end]`` is the conversation rendered through this turn. A
    template that does not render a conversation as the extension of its prefixes (one that
    rewrites earlier turns) cannot be masked this way, and is reported rather than guessed at.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        if not text.startswith(before):  # a template whose generation prompt is not the turn header
            before = _render(tokenizer, messages[:i], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise RecordError(
                f"messages.{i}",
                "the chat template does not render the conversation turn by turn; cannot locate this assistant turn",
            )
        turn = text[len(before) : len(through)]
        content = message["content"]
        offset = 0 if turn.startswith(content) else turn.find(content)
        if offset < 0 and content.strip():
            content = content.strip()  # templates that trim the content
            offset = turn.find(content)
        if offset < 0:
            raise RecordError(
                f"messages.{i}.content",
                "the chat template changes this assistant turn's text; cannot locate it for the loss mask",
            )
        start = len(before) + offset
        spans.append((start, start + len(content), len(through)))
    return spans


def _render(tokenizer: Any, messages: Messages, *, generation_prompt: bool) -> str:
    try:
        return render_prompt(tokenizer, messages) if generation_prompt else render_messages(tokenizer, messages)
    except Exception as e:  # jinja2 raises TemplateError (e.g. "roles must alternate") and others
        raise RecordError(
            "messages", f"the chat template refused it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def special_token_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _first_untrained(labels: list[int]) -> list[int]:
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def encode_demonstration(tokenizer: Any, demo: Demonstration, max_length: int, chat_template: ChatTemplate = "auto") -> Example:
    """Token ids and labels of one demonstration, cut to ``max_length`` tokens (the start is kept)."""
    if demo.kind == "text":
        ids, labels = encode_text(tokenizer, demo.text or "")
    elif demo.kind == "prompt":
        ids, labels = encode_prompt_response(tokenizer, demo.prompt or "", demo.response or "", chat_template)
    else:
        ids, labels = encode_messages(tokenizer, demo.messages or [])
    truncated = len(ids) > max_length
    return Example(tuple(ids[:max_length]), tuple(labels[:max_length]), truncated=truncated)


# --- a data set -----------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What happened to the demonstrations on their way to training rows (reported, never silent)."""

    examples: int = 0  # rows kept (before packing)
    skipped_invalid: int = 0  # invalid records skipped with --skip-invalid
    truncated: int = 0  # cut at --max-length (kept)
    dropped_no_target: int = 0  # nothing left to train after truncation (e.g. a prompt longer than --max-length)
    tokens: int = 0
    label_tokens: int = 0
    rows: int = 0  # after packing (== examples when unpacked)
    kinds: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def encode_dataset(
    tokenizer: Any,
    demos: Sequence[Demonstration],
    lines: Sequence[int],
    *,
    source: str,
    max_length: int,
    skip_invalid: bool = False,
    skipped: int = 0,
    chat_template: ChatTemplate = "auto",
) -> tuple[list[Example], DataStats]:
    """Encode every demonstration; a conversation the chat template cannot mask is an error at
    ``source:line`` (or skipped and counted with ``skip_invalid``)."""
    stats = DataStats(skipped_invalid=skipped)
    examples = []
    for demo, line in zip(demos, lines):
        try:
            example = encode_demonstration(tokenizer, demo, max_length, chat_template)
        except RecordError as e:
            if not skip_invalid:
                raise DataError(source, line, e.field, e.reason) from None
            stats.skipped_invalid += 1
            continue
        stats.truncated += example.truncated
        if example.num_label_tokens == 0:
            stats.dropped_no_target += 1
            continue
        examples.append(example)
        stats.kinds[demo.kind] = stats.kinds.get(demo.kind, 0) + 1
        stats.tokens += len(example)
        stats.label_tokens += example.num_label_tokens
    stats.examples = stats.rows = len(examples)
    if not examples:
        raise DataError(
            source,
            None,
            None,
            f"no example left to train on ({stats.dropped_no_target} had no target token within --max-length {max_length})",
        )
    return examples, stats


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Pack short examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each example keeps its own tokens, labels and EOS; the row records the examples' lengths, so
    the collator restarts the position ids at every example. With position ids that restart and
    no attention mask, transformers builds a block-diagonal causal mask (``find_packed_sequence_indices``),
    so an example attends only to itself — the same logits as unpacked, with less padding. The
    order of the rows is deterministic (a function of the lengths and the input order).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # stable: ties keep input order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        need = len(examples[i])
        k = bisect.bisect_left(free, (need, -1))  # the fullest row that still has room
        if k < len(free):
            space, row = free.pop(k)
            rows[row].append(i)
        else:
            space, row = max_length, len(rows)
            rows.append([i])
        bisect.insort(free, (space - need, row))
    packed = []
    for members in rows:
        ids = tuple(t for i in members for t in examples[i].input_ids)
        labels = tuple(t for i in members for t in examples[i].labels)
        lengths = tuple(len(examples[i]) for i in members)
        packed.append(Example(ids, labels, lengths, truncated=any(examples[i].truncated for i in members)))
    return packed


# --- collation ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A right-padded batch. ``position_ids`` is None unless a row holds several packed examples.

    No attention mask: with right padding and causal attention a real token never attends to the
    padding after it, and the padding's outputs carry no label. Leaving the mask out lets the
    attention kernel take its plain causal path.
    """

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where nothing is trained
    position_ids: torch.Tensor | None  # (B, T), restarting at 0 for every packed example and the padding
    num_tokens: int  # real (non-pad) tokens
    num_label_tokens: int
    target_index: torch.Tensor  # (N,) flat positions b*T + t whose next token is trained (N = num_label_tokens)
    targets: torch.Tensor  # (N,) the token each of those positions must predict, labels[b, t + 1]

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), self.num_tokens, self.num_label_tokens,
                     move(self.target_index), move(self.targets))  # fmt: skip


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad rows to the longest one; labels padded with -100.

    Example: rows ``[5, 6, 7]`` (labels ``[-100, 6, 7]``) and ``[8, 9]`` (``[-100, 9]``), pad 2::

        input_ids     [[5, 6, 7], [8, 9, 2]]
        labels        [[-100, 6, 7], [-100, 9, -100]]
        target_index  [0, 1, 3]      (flat positions b*T + t that predict a trained token)
        targets       [6, 7, 9]

    A packed row of lengths (2, 3) padded to 6 has position ids ``[0, 1, 0, 1, 2, 0]``.
    """
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    packed = any(len(e.lengths) > 1 for e in examples)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for row, e in enumerate(examples):
        input_ids[row, : len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, : len(e)] = torch.tensor(e.labels, dtype=torch.long)
        if position_ids is not None:
            position_ids[row] = torch.cat([torch.arange(n) for n in (*e.lengths, width - len(e))])
    # the shifted view, computed here on the host so the device never has to count: position t predicts t + 1
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B*T,)
    target_index = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        num_tokens=sum(len(e) for e in examples),
        num_label_tokens=sum(e.num_label_tokens for e in examples),
        target_index=target_index,
        targets=next_labels[target_index],
    )
