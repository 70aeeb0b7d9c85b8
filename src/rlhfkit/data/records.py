"""One schema per record kind of SPEC §4, validated with `FILE:LINE: field 'x': reason` errors.

Each ``parse_*`` function takes a raw dict and returns a frozen dataclass, raising
``RecordError(field, reason)``; `load` attaches the file and line and turns it into a DataError,
or skips and counts the record when the user passed ``--skip-invalid``.

Prompts and conversations are kept as either a plain string or a list of chat messages
(``[{"role": ..., "content": ...}]``); `rlhfkit.models.render_prompt` turns them into text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rlhfkit.data.files import read_records
from rlhfkit.errors import DataError

Messages = list[dict[str, str]]
Conversation = str | Messages  # a prompt, a completion or a transcript: plain text or chat messages
ROLES = ("system", "user", "assistant", "tool")

T = TypeVar("T")


class RecordError(ValueError):
    """A problem inside one record; `load` adds the file and line."""

    def __init__(self, field: str | None, reason: str):
        self.field, self.reason = field, reason
        super().__init__(reason)


# --- field checks -----------------------------------------------------------------------------


def get_field(record: dict, name: str, types: type | tuple[type, ...], *, required: bool = True, prefix: str = "") -> Any:
    """``record[name]`` checked against ``types``; a RecordError naming ``prefix + name`` otherwise
    (None when absent and not required)."""
    if name not in record or record[name] is None:
        if required:
            raise RecordError(prefix + name, "missing (required)")
        return None
    value = record[name]
    # bool is an int in Python; never accept it where a number is meant
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise RecordError(prefix + name, f"expected {_type_names(types)}, got {type(value).__name__} {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN from a parquet column or a lenient JSON writer
        raise RecordError(prefix + name, f"must be a finite number, got {value}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object", bool: "a boolean"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in _as_tuple(types)))


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_messages(value: Any, name: str) -> Messages:
    """A non-empty list of ``{"role", "content"}`` objects with known roles and string content."""
    if not isinstance(value, list) or not value:
        raise RecordError(name, "expected a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        where = f"{name}.{i}."
        if not isinstance(m, dict):
            raise RecordError(f"{name}.{i}", f"expected a message object, got {type(m).__name__}")
        role = get_field(m, "role", str, prefix=where)
        if role not in ROLES:
            raise RecordError(where + "role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = get_field(m, "content", str, prefix=where)
        messages.append({"role": role, "content": content})
    return messages


def parse_conversation(record: dict, name: str, *, required: bool = True) -> Conversation | None:
    """A field that is either a string or a list of chat messages."""
    value = get_field(record, name, (str, list), required=required)
    if isinstance(value, list):
        return parse_messages(value, name)
    return value


def content_id(content: Any, prefix: str = "p") -> str:
    """A stable id for a record without one: a short hash of its canonical JSON."""
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{prefix}-{digest[:10]}"


# --- record kinds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Demonstration:
    """An SFT example. Exactly one shape: ``text``, ``prompt``+``response``, or ``messages``."""

    text: str | None = None
    prompt: Conversation | None = None
    response: str | None = None
    messages: Messages | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "messages" if self.messages is not None else "prompt"


def parse_demonstration(record: dict) -> Demonstration:
    if "messages" in record:
        messages = parse_messages(record["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("messages", "no assistant turn (nothing to train on)")
        return Demonstration(messages=messages)
    if "prompt" in record or "response" in record:
        prompt = parse_conversation(record, "prompt")
        response = get_field(record, "response", str)
        return Demonstration(prompt=prompt, response=response)
    if "text" in record:
        text = get_field(record, "text", str)
        if not text:
            raise RecordError("text", "empty string")
        return Demonstration(text=text)
    raise RecordError(None, "expected one of the fields 'text', 'prompt'+'response' or 'messages'")


@dataclass(frozen=True)
class Prompt:
    """A prompt for collect/ppo/eval: plain text, or the conversation so far (the model speaks next)."""

    id: str
    prompt: Conversation


def parse_prompt(record: dict) -> Prompt:
    if "messages" in record:
        prompt: Conversation = parse_messages(record["messages"], "messages")
    elif "prompt" in record:
        prompt = parse_conversation(record, "prompt")
    else:
        raise RecordError("prompt", "missing (required: 'prompt' or 'messages')")
    pid = get_field(record, "id", (str, int), required=False)
    return Prompt(id=str(pid) if pid is not None else content_id(prompt), prompt=prompt)


@dataclass(frozen=True)
class Completion:
    id: str
    text: str
    policy: str = ""
    finish_reason: str = "stop"  # "stop" (EOS or a stop string) or "length"
    num_tokens: int = 0
    logprob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "policy": self.policy,
            "finish_reason": self.finish_reason,
            "num_tokens": self.num_tokens,
            "logprob": self.logprob,
        }


@dataclass(frozen=True)
class Samples:
    """One line of `collect`'s output: K completions of one prompt."""

    prompt_id: str
    prompt: Conversation
    completions: tuple[Completion, ...]
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "completions": [c.to_dict() for c in self.completions],
            "sampling": dict(self.sampling),
        }


def parse_samples(record: dict) -> Samples:
    prompt_id = str(get_field(record, "prompt_id", (str, int)))
    prompt = parse_conversation(record, "prompt")
    raw = get_field(record, "completions", list)
    completions, seen = [], set()
    for i, c in enumerate(raw):
        where = f"completions.{i}."
        if not isinstance(c, dict):
            raise RecordError(f"completions.{i}", f"expected an object, got {type(c).__name__}")
        cid = str(get_field(c, "id", (str, int), prefix=where))
        if cid in seen:
            raise RecordError(where + "id", f"duplicate completion id {cid!r}")
        seen.add(cid)
        finish = get_field(c, "finish_reason", str, required=False) or "stop"
        if finish not in ("stop", "length"):
            raise RecordError(where + "finish_reason", f"expected 'stop' or 'length', got {finish!r}")
        completions.append(
            Completion(
                id=cid,
                text=get_field(c, "text", str, prefix=where),
                policy=get_field(c, "policy", str, required=False, prefix=where) or "",
                finish_reason=finish,
                num_tokens=get_field(c, "num_tokens", int, required=False, prefix=where) or 0,
                logprob=get_field(c, "logprob", (int, float), required=False, prefix=where),
            )
        )
    sampling = get_field(record, "sampling", dict, required=False) or {}
    return Samples(prompt_id=prompt_id, prompt=prompt, completions=tuple(completions), sampling=sampling)


@dataclass(frozen=True)
class Comparison:
    """One preference pair (``rank-import`` output, ``train-rm`` input).

    ``chosen``/``rejected`` are completions when ``prompt`` is given. In the implicit-prompt
    flavour of public data sets (no ``prompt`` field) they are whole transcripts; `parse_comparison`
    splits off their shared prefix as the prompt.
    """

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    group: str | None = None
    margin: float | None = None
    annotator: str | None = None
    chosen_policy: str | None = None
    rejected_policy: str | None = None
    # "stop" or "length" (collect's finish_reason, copied by rank-import): a completion that was cut
    # off is scored without the EOS, as ppo scores it; None (public data) = it ended
    chosen_finish_reason: str | None = None
    rejected_finish_reason: str | None = None

    @property
    def chosen_stopped(self) -> bool:
        return self.chosen_finish_reason != "length"

    @property
    def rejected_stopped(self) -> bool:
        return self.rejected_finish_reason != "length"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        for name in ("group", "margin", "annotator", "chosen_policy", "rejected_policy", "chosen_finish_reason",
                     "rejected_finish_reason"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def split_shared_prefix(chosen: Conversation, rejected: Conversation) -> tuple[Conversation, Conversation, Conversation]:
    """Implicit prompt: the longest common prefix of two transcripts (whole messages for chats)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        return chosen[:n], chosen[n:], rejected[n:]
    raise RecordError("rejected", "chosen and rejected must both be strings or both message lists")


def parse_comparison(record: dict) -> Comparison:
    chosen = parse_conversation(record, "chosen")
    rejected = parse_conversation(record, "rejected")
    prompt = parse_conversation(record, "prompt", required=False)
    if prompt is None:
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    if isinstance(chosen, list) and isinstance(prompt, str):
        raise RecordError("chosen", "a message list needs a message-list prompt")
    if chosen == rejected:
        raise RecordError("rejected", "the same as 'chosen' (a comparison needs two different completions)")
    margin = get_field(record, "margin", (int, float), required=False)
    if margin is not None and margin < 0:
        raise RecordError("margin", f"must be >= 0 (how much better 'chosen' is), got {margin}")
    optional = {
        k: get_field(record, k, (str, int), required=False) for k in ("group", "annotator", "chosen_policy", "rejected_policy")
    }
    for name in ("chosen_finish_reason", "rejected_finish_reason"):
        finish = get_field(record, name, str, required=False)
        if finish is not None and finish not in ("stop", "length"):
            raise RecordError(name, f"expected 'stop' or 'length', got {finish!r}")
        optional[name] = finish
    return Comparison(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        margin=float(margin) if margin is not None else None,
        **{k: str(v) if v is not None else None for k, v in optional.items()},
    )


# --- loading ----------------------------------------------------------------------------------


class Loaded(list):
    """The valid records of a source, in order, with the lines they came from and the skip count."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []
        self.skipped = 0


def iter_parsed(
    source: str | os.PathLike,
    parse: Callable[[dict], T],
    *,
    skip_invalid: bool = False,
    counter: list[int] | None = None,
    check: Callable[[T, int], None] | None = None,
) -> Iterator[tuple[int, T]]:
    """Parse every record of `source`; an invalid one raises DataError(file, line, field, reason).

    ``check(item, line)`` sees every parsed record in order and raises RecordError for what only
    the whole file can tell (a prompt id used twice). With ``skip_invalid`` the bad record is
    dropped and counted in ``counter[0]`` instead.
    """
    for line, record in read_records(source):
        # a null field is an absent field (columnar sources have a null for every missing value)
        record = {k: v for k, v in record.items() if v is not None}
        try:
            item = parse(record)
            if check is not None:
                check(item, line)
            yield line, item
        except RecordError as e:
            if not skip_invalid:
                raise DataError("<stdin>" if str(source) == "-" else source, line, e.field, e.reason) from None
            if counter is not None:
                counter[0] += 1


def load(
    source: str | os.PathLike,
    parse: Callable[[dict], T],
    *,
    skip_invalid: bool = False,
    check: Callable[[T, int], None] | None = None,
) -> Loaded:
    """All valid records of `source` (see `iter_parsed`). Raises DataError if none is valid."""
    counter = [0]
    out = Loaded()
    for line, item in iter_parsed(source, parse, skip_invalid=skip_invalid, counter=counter, check=check):
        out.append(item)
        out.lines.append(line)
    out.skipped = counter[0]
    if not out:
        raise DataError(source, None, None, f"no valid records ({out.skipped} invalid skipped)")
    return out


# --- one validator per data kind ------------------------------------------------------------------


def unique_prompt_ids() -> Callable[[Prompt, int], None]:
    """A prompts file names each prompt once (collect, ppo and eval key their outputs by prompt id)."""
    first: dict[str, int] = {}

    def check(prompt: Prompt, line: int) -> None:
        if prompt.id in first:
            raise RecordError("id", f"duplicate prompt id {prompt.id!r} (also line {first[prompt.id]})")
        first[prompt.id] = line

    return check


def unique_sample_ids() -> Callable[[Samples, int], None]:
    """A samples file holds each prompt once, and each completion id under one prompt only (a
    ranking names completions by id)."""
    first: dict[str, int] = {}
    prompt_of: dict[str, str] = {}

    def check(sample: Samples, line: int) -> None:
        if sample.prompt_id in first:
            raise RecordError("prompt_id", f"duplicate prompt id {sample.prompt_id!r} (also line {first[sample.prompt_id]})")
        for i, c in enumerate(sample.completions):
            if prompt_of.get(c.id, sample.prompt_id) != sample.prompt_id:
                raise RecordError(f"completions.{i}.id", f"completion id {c.id!r} also belongs to prompt {prompt_of[c.id]!r}")
        first[sample.prompt_id] = line
        prompt_of.update((c.id, sample.prompt_id) for c in sample.completions)

    return check


# kind -> (record parser, factory of the whole-file check or None)
KINDS: dict[str, tuple[Callable[[dict], Any], Callable[[], Callable[[Any, int], None]] | None]] = {
    "demonstrations": (parse_demonstration, None),
    "prompts": (parse_prompt, unique_prompt_ids),
    "samples": (parse_samples, unique_sample_ids),
    "comparisons": (parse_comparison, None),
}


def load_kind(source: str | os.PathLike, kind: str, *, skip_invalid: bool = False) -> Loaded:
    """The one validator of a data kind (``demonstrations``, ``prompts``, ``samples``,
    ``comparisons``): every record parsed, then the whole-file checks. ``rlhfkit validate --kind
    KIND`` and every stage that reads KIND call this, so what one rejects the other rejects."""
    parse, make_check = KINDS[kind]
    return load(source, parse, skip_invalid=skip_invalid, check=make_check() if make_check is not None else None)
