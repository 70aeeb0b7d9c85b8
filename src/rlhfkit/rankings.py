"""Labelers' rankings in every format of SPEC §4: detection, parsing, and checks against the samples.

A rankings file is read in two steps:

1. a *reader* turns one record into one or more `RawJudgement` (one per annotator), whose
   completions are `Ref`s exactly as the file names them: an id, an index, or a text;
2. `resolve` checks a raw judgement against the samples that ``collect`` wrote and returns a
   `Judgement` over completion ids: the prompt exists, every completion belongs to that prompt,
   none is ranked twice, at least two are ranked.

Formats (``--format``; ``auto`` looks at the first record, or at a ``.csv``/``.tsv`` name):

============== =========================================================================== ==================
format         record                                                                      detected by
============== =========================================================================== ==================
native         ``{"prompt_id", "ranking": [id, [id, id], id], "annotator"?}`` (inner list = tie) key ``ranking``
scores         ``{"prompt_id", "scores": {id: number}}`` (higher is better; equal = tie)  key ``scores``
best-of-k      ``{"prompt_id", "best": id}`` or ``"best": index`` (0-based)               key ``best``
pairwise       ``{"prompt"?, "chosen", "rejected"}``: texts, message lists, or ids;        keys ``chosen`` +
               without ``prompt`` the prompt is the shared prefix of the two transcripts   ``rejected``
label-studio   a Label Studio JSON export: tasks with ``data`` and ``annotations``         keys ``data`` +
               (Ranker and Pairwise results)                                               ``annotations``
argilla        Argilla records with a ranking question (v1 and v2 exports, flattened too)  key ``responses``
                                                                                           or ``*.responses``
csv            a header row, then one of the above per row: columns ``ranking``            ``.csv``/``.tsv``
               (``a > b = c > d``), ``best``, ``chosen``/``rejected``, ``scores`` (JSON)
               or one ``completion_id``,``score`` row per completion
============== =========================================================================== ==================

Every record may name its ``annotator``; records without a ``prompt_id`` are matched to a sample
by their prompt text or by their completion ids.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.config import RankingsFormat, choices
from rlhfkit.data.files import read_records
from rlhfkit.data.records import Completion, Conversation, RecordError, Samples, get_field, split_shared_prefix
from rlhfkit.errors import ConfigError, DataError

FORMATS = tuple(f for f in choices(RankingsFormat) if f != "auto")  # native, scores, best-of-k, ...
PROMPT_FIELDS = ("prompt", "instruction", "input", "question")  # where exports keep the prompt text


# --- what a ranking record says --------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """One completion as a rankings record names it, and the field it came from (for errors).

    ``kind``: ``id`` (a completion id), ``index`` (position in the sample, 0-based), ``text``
    (the completion text or its assistant messages), ``id-or-text`` and ``id-or-index`` (an id if
    the sample has one like it, else the other reading).
    """

    value: Any
    field: str
    kind: str = "id"
    score: float | None = None  # the rating it got (scores format)


@dataclass(frozen=True)
class RawJudgement:
    """One annotator's judgement as read from a record, before it is checked against the samples.

    ``tiers``: best first; a tier of several refs is a tie. ``rest_below``: every completion of the
    prompt not in the tiers ranks below them, in no particular order (best-of-K).
    ``transcripts``: the pairwise implicit-prompt flavour (chosen and rejected are whole
    conversations; the prompt is their shared prefix).
    """

    tiers: tuple[tuple[Ref, ...], ...]
    field: str
    prompt_id: str | None = None
    prompt: Conversation | None = None
    annotator: str | None = None
    rest_below: bool = False
    pairwise: bool = False
    transcripts: tuple[Conversation, Conversation] | None = None


@dataclass(frozen=True)
class Judgement:
    """A checked judgement of one annotator over completions of one prompt (ids, best first)."""

    line: int
    prompt_id: str
    tiers: tuple[tuple[str, ...], ...]
    below: tuple[str, ...] = ()  # best-of-K: the unordered rest, worse than every tier
    annotator: str | None = None
    scores: dict[str, float] | None = None
    pairwise: bool = False

    @property
    def completion_ids(self) -> list[str]:
        return [c for tier in self.tiers for c in tier] + list(self.below)

    def ordered_tiers(self) -> list[list[int]]:
        """The judgement as tiers of indices into `completion_ids` (``below`` as a last tier)."""
        out, i = [], 0
        for tier in [*self.tiers, self.below] if self.below else self.tiers:
            out.append(list(range(i, i + len(tier))))
            i += len(tier)
        return out

    def tied_couples(self) -> list[tuple[str, str]]:
        """Couples the annotator called equal (inside a tier; the unordered best-of-K rest is no tie)."""
        return [(tier[i], tier[j]) for tier in self.tiers for i in range(len(tier)) for j in range(i + 1, len(tier))]


# --- field helpers ------------------------------------------------------------------------------


def _optional_str(record: dict, name: str) -> str | None:
    value = get_field(record, name, (str, int), required=False)
    return None if value is None or value == "" else str(value)


def _id_ref(value: Any, field: str) -> Ref:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(field, f"expected a completion id (a string), got {type(value).__name__}")
    return Ref(str(value), field)


def _text(value: Conversation) -> str:
    """A completion given as messages is the text of its assistant turn(s)."""
    if isinstance(value, list):
        return "".join(m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "assistant")
    return value


def _conversation(value: Any, field: str) -> Conversation:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise RecordError(field, f"expected a string or a list of messages, got {type(value).__name__}")


def parse_ranking_string(text: str, field: str) -> list:
    """``"a > b = c > d"`` (``>`` better than, ``=`` tied), ``"a, b, c"`` (best first) or a JSON list."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(field, f"invalid JSON list: {e.msg}") from None
        except RecursionError:
            raise RecordError(field, "invalid JSON list: nested too deeply") from None
        if not isinstance(value, list):
            raise RecordError(field, "expected a list")
        return value
    separator = ">" if ">" in text else ","
    tiers = []
    for part in text.split(separator):
        ids = [x.strip() for x in part.split("=") if x.strip()]
        if not ids:
            raise RecordError(field, f"empty position in ranking {text!r}")
        tiers.append(ids[0] if len(ids) == 1 else ids)
    return tiers


# --- readers: one per format --------------------------------------------------------------------


def read_native(record: dict) -> list[RawJudgement]:
    ranking = get_field(record, "ranking", (list, str))
    if isinstance(ranking, str):
        ranking = parse_ranking_string(ranking, "ranking")
    tiers = []
    for i, item in enumerate(ranking):
        if isinstance(item, list):
            if not item:
                raise RecordError(f"ranking.{i}", "an empty tie group")
            tiers.append(tuple(_id_ref(v, f"ranking.{i}.{j}") for j, v in enumerate(item)))
        else:
            tiers.append((_id_ref(item, f"ranking.{i}"),))
    return [
        RawJudgement(tuple(tiers), "ranking", _optional_str(record, "prompt_id"), annotator=_optional_str(record, "annotator"))
    ]


def read_scores(record: dict) -> list[RawJudgement]:
    scores = get_field(record, "scores", (dict, str))
    if isinstance(scores, str):
        try:
            scores = json.loads(scores)
        except json.JSONDecodeError as e:
            raise RecordError("scores", f"invalid JSON object: {e.msg}") from None
        except RecursionError:
            raise RecordError("scores", "invalid JSON object: nested too deeply") from None
        if not isinstance(scores, dict):
            raise RecordError("scores", "expected an object of completion id -> score")
    refs = []
    for cid, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"scores.{cid}", f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise RecordError(f"scores.{cid}", f"must be a finite number, got {value}")
        refs.append(Ref(str(cid), f"scores.{cid}", score=float(value)))
    return [_judgement_from_scores(refs, "scores", _optional_str(record, "prompt_id"), _optional_str(record, "annotator"))]


def _judgement_from_scores(refs: list[Ref], field: str, prompt_id: str | None, annotator: str | None) -> RawJudgement:
    """Scores -> tiers: higher is better, equal scores tie."""
    by_score: dict[float, list[Ref]] = {}
    for ref in refs:
        by_score.setdefault(ref.score, []).append(ref)  # type: ignore[arg-type]
    tiers = tuple(tuple(by_score[s]) for s in sorted(by_score, reverse=True))
    return RawJudgement(tiers, field, prompt_id, annotator=annotator)


def read_best_of_k(record: dict) -> list[RawJudgement]:
    best = get_field(record, "best", (str, int))
    if isinstance(best, int):
        ref = Ref(best, "best", "index")
    elif best.strip().isdigit():
        ref = Ref(best.strip(), "best", "id-or-index")  # "3" from a CSV cell: an id if one is called so, else an index
    else:
        ref = Ref(best, "best")
    return [
        RawJudgement(
            ((ref,),), "best", _optional_str(record, "prompt_id"), annotator=_optional_str(record, "annotator"), rest_below=True
        )
    ]


def read_pairwise(record: dict) -> list[RawJudgement]:
    chosen = _conversation(get_field(record, "chosen", (str, list)), "chosen")
    rejected = _conversation(get_field(record, "rejected", (str, list)), "rejected")
    prompt = record.get("prompt")
    prompt = _conversation(prompt, "prompt") if prompt not in (None, "") else None
    prompt_id = _optional_str(record, "prompt_id")
    annotator = _optional_str(record, "annotator")
    if prompt is None and not _both_ids_like(chosen, rejected):
        # implicit prompt: whole transcripts; `resolve` finds the sample whose prompt is their prefix
        if type(chosen) is not type(rejected):
            raise RecordError("rejected", "chosen and rejected must both be strings or both message lists")
        return [RawJudgement((), "chosen", prompt_id, annotator=annotator, pairwise=True, transcripts=(chosen, rejected))]
    tiers = ((Ref(chosen, "chosen", "id-or-text"),), (Ref(rejected, "rejected", "id-or-text"),))
    return [RawJudgement(tiers, "chosen", prompt_id, prompt, annotator, pairwise=True)]


def _both_ids_like(chosen: Conversation, rejected: Conversation) -> bool:
    """Short single-token strings are read as completion ids (``{"chosen": "p17-3f9a", ...}``)."""
    return all(isinstance(v, str) and v and len(v) <= 64 and not any(ch.isspace() for ch in v) for v in (chosen, rejected))


def read_label_studio(record: dict) -> list[RawJudgement]:
    """A Label Studio task (JSON export): one judgement per non-cancelled annotation.

    Ranker results: ``value.ranker`` is the list of item ids in the new order, or a mapping
    ``{list or bucket name: [ids]}``; several buckets are tiers in their export order (items in
    one bucket tie), and the ``_`` bucket (items left unsorted) is ignored. The item ids must be
    completion ids (build the task's ``items`` from the samples: ``{"id": completion id, ...}``).
    Pairwise results: ``value.selected`` is ``left`` or ``right``; the two sides are the task's
    ``left``/``right`` data, or the two entries of its ``items``/``completions``, as ids or texts.
    A JSON-MIN export (one flat record per annotation: the task's data fields, then each control's
    results under its name, ``"rank": [{"ranker": ...}]``, and ``annotator``) reads the same way.
    """
    if "annotations" not in record:
        record = _label_studio_from_min(record)
    data = get_field(record, "data", dict)
    annotations = get_field(record, "annotations", list)
    prompt_id = _optional_str(data, "prompt_id")
    prompt = _prompt_text(data)
    out = []
    for a, annotation in enumerate(annotations):
        where = f"annotations.{a}"
        if not isinstance(annotation, dict):
            raise RecordError(where, f"expected an object, got {type(annotation).__name__}")
        if annotation.get("was_cancelled"):
            continue
        annotator = _label_studio_user(annotation.get("completed_by"))
        results = annotation.get("result") or []
        found = False
        for r, result in enumerate(results):
            if not isinstance(result, dict) or result.get("type") not in ("ranker", "pairwise"):
                continue
            found = True
            value = result.get("value")
            field = f"{where}.result.{r}.value"
            if not isinstance(value, dict):
                raise RecordError(field, "expected an object")
            if result["type"] == "ranker":
                tiers = _label_studio_ranker(value.get("ranker"), field + ".ranker")
                out.append(RawJudgement(tiers, field + ".ranker", prompt_id, prompt, annotator))
            else:
                chosen, rejected = _label_studio_pair(data, value, result, field)
                out.append(
                    RawJudgement(((chosen,), (rejected,)), field + ".selected", prompt_id, prompt, annotator, pairwise=True)
                )
        if not found:
            raise RecordError(f"{where}.result", "no Ranker or Pairwise result in this annotation")
    if not out:
        raise RecordError("annotations", "no annotation (all cancelled or none made)")
    return out


def _is_min_results(value: Any) -> bool:
    """A JSON-MIN column of Ranker or Pairwise results: ``[{"ranker": ...}]`` or ``[{"selected": "left"}]``."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, dict) and ("ranker" in v or v.get("selected") in ("left", "right")) for v in value)
    )


def _label_studio_from_min(record: dict) -> dict:
    """A JSON-MIN record as the JSON export's task with one annotation."""
    results = [
        {"type": "ranker" if "ranker" in v else "pairwise", "from_name": k, "value": v}
        for k, values in record.items()
        if _is_min_results(values)
        for v in values
    ]
    data = {k: v for k, v in record.items() if not _is_min_results(v)}
    return {"data": data, "annotations": [{"completed_by": record.get("annotator"), "result": results}]}


def _label_studio_user(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("email") or value.get("username") or value.get("id")
    return None if value is None else str(value)


def _label_studio_ranker(value: Any, field: str) -> tuple[tuple[Ref, ...], ...]:
    if isinstance(value, list):
        return tuple((_id_ref(v, f"{field}.{i}"),) for i, v in enumerate(value))
    if not isinstance(value, dict):
        raise RecordError(field, "expected a list of item ids or an object of buckets")
    buckets = {k: v for k, v in value.items() if k != "_"}
    if not buckets:
        raise RecordError(field, "no ranked items (everything left in the unsorted list)")
    for name, ids in buckets.items():
        if not isinstance(ids, list):
            raise RecordError(f"{field}.{name}", "expected a list of item ids")
    if len(buckets) == 1:  # a plain List + Ranker: the one list is the order
        ((name, ids),) = buckets.items()
        return tuple((_id_ref(v, f"{field}.{name}.{i}"),) for i, v in enumerate(ids))
    return tuple(tuple(_id_ref(v, f"{field}.{name}.{i}") for i, v in enumerate(ids)) for name, ids in buckets.items() if ids)


def _label_studio_pair(data: dict, value: dict, result: dict, field: str) -> tuple[Ref, Ref]:
    selected = value.get("selected")
    if selected not in ("left", "right"):
        raise RecordError(field + ".selected", f"expected 'left' or 'right', got {selected!r}")
    if "left" in data and "right" in data:
        sides = [(data["left"], "data.left"), (data["right"], "data.right")]
    else:
        listed = data.get("items") or data.get("completions")
        names = [n.strip() for n in str(result.get("to_name", "")).split(",") if n.strip()]
        if isinstance(listed, list) and len(listed) == 2:
            key = "items" if data.get("items") else "completions"
            sides = [(listed[0], f"data.{key}.0"), (listed[1], f"data.{key}.1")]
        elif len(names) == 2 and all(n in data for n in names):
            sides = [(data[n], f"data.{n}") for n in names]
        else:
            raise RecordError("data", "cannot tell the two sides of the Pairwise result (give data.left and data.right)")
    refs = []
    for side, where in sides:
        if isinstance(side, dict):
            side = side.get("id", side.get("text", side.get("body")))
        if not isinstance(side, (str, int)) or isinstance(side, bool):
            raise RecordError(where, "expected a completion id or text")
        refs.append(Ref(str(side), where, "id-or-text"))
    left, right = refs
    return (left, right) if selected == "left" else (right, left)


def _prompt_text(fields: dict) -> Conversation | None:
    for name in PROMPT_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) or (isinstance(value, list) and value):
            try:
                return _conversation(value, name)
            except RecordError:
                return None
    return None


def read_argilla(record: dict) -> list[RawJudgement]:
    """An Argilla record with a ranking question, one judgement per submitted response.

    Accepts the v2 layout (``responses: {question: [{"value": [...], "user_id", "status"}]}``),
    the v1 layout (``responses: [{"user_id", "values": {question: {"value": [{"value", "rank"}]}}}]``)
    and the flattened export (``question.responses``, ``question.responses.users``,
    ``question.responses.status`` columns). A ranking value is a list of options best first, or
    of ``{"value", "rank"}`` (equal ranks tie). An option is a completion id, or the name of a
    record field that holds the completion (``response_1`` -> ``fields.response_1``); when the
    metadata names that field's completion id (``response_1_id``, as ``rlhfkit label --export
    argilla`` writes), the id is used, so that two completions with the same text stay two.
    """
    fields = record.get("fields") if isinstance(record.get("fields"), dict) else {}
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    strings = {**record, **metadata}  # the flattened export keeps metadata at the top level
    lookup = {**{k: v for k, v in strings.items() if isinstance(v, str)}, **fields}
    prompt_id = _optional_str(record, "prompt_id") or _optional_str(metadata, "prompt_id") or _optional_str(fields, "prompt_id")
    prompt = _prompt_text(fields) or _prompt_text(record)
    responses = list(_argilla_responses(record))
    if not responses:
        raise RecordError("responses", "no submitted ranking response")
    questions = sorted({q for q, *_ in responses})
    if len(questions) > 1:
        raise RecordError("responses", f"several ranking questions ({', '.join(questions)}); keep one in the export")
    out = []
    for _, user, value, field in responses:
        tiers = _argilla_tiers(value, field, lookup)
        out.append(RawJudgement(tiers, field, prompt_id, prompt, user))
    return out


def _argilla_responses(record: dict) -> Iterator[tuple[str, str | None, Any, str]]:
    """(question, user, value, field) for every submitted response that holds a ranking."""
    responses = record.get("responses")
    if isinstance(responses, dict):  # v2
        for question, items in responses.items():
            for i, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict) and _submitted(item) and _is_ranking(item.get("value")):
                    yield question, _user(item), item["value"], f"responses.{question}.{i}.value"
    elif isinstance(responses, list):  # v1
        for i, item in enumerate(responses):
            if not isinstance(item, dict) or not _submitted(item):
                continue
            for question, answer in (item.get("values") or {}).items():
                value = answer.get("value") if isinstance(answer, dict) else None
                if _is_ranking(value):
                    yield question, _user(item), value, f"responses.{i}.values.{question}.value"
    for key, values in record.items():  # flattened: "ranking.responses": [[...], ...]
        if not key.endswith(".responses") or not isinstance(values, list):
            continue
        question = key[: -len(".responses")]
        users = record.get(f"{key}.users") or [None] * len(values)
        status = record.get(f"{key}.status") or ["submitted"] * len(values)
        for i, value in enumerate(values):
            if i < len(status) and status[i] != "submitted":
                continue
            if _is_ranking(value):
                yield question, None if i >= len(users) or users[i] is None else str(users[i]), value, f"{key}.{i}"


def _submitted(item: dict) -> bool:
    return item.get("status", "submitted") == "submitted"


def _user(item: dict) -> str | None:
    user = item.get("user_id", item.get("user"))
    return None if user is None else str(user)


def _is_ranking(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (str, dict)) for v in value)


def _argilla_tiers(value: list, field: str, lookup: dict) -> tuple[tuple[Ref, ...], ...]:
    def ref(option: Any, where: str) -> Ref:
        if not isinstance(option, (str, int)) or isinstance(option, bool):
            raise RecordError(where, f"expected an option value, got {type(option).__name__}")
        option = str(option)
        if isinstance(lookup.get(f"{option}_id"), str) and isinstance(lookup.get(option), str):
            return Ref(lookup[f"{option}_id"], where)  # the field's completion id, kept in the metadata
        text = lookup.get(option)
        # an option that names a record field stands for that field's text (or id)
        return Ref(text, where, "id-or-text") if isinstance(text, str) else Ref(option, where)

    if all(isinstance(v, str) for v in value):
        return tuple((ref(v, f"{field}.{i}"),) for i, v in enumerate(value))
    by_rank: dict[float, list[Ref]] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "value" not in item or not isinstance(item.get("rank"), (int, float)):
            raise RecordError(f"{field}.{i}", 'expected {"value": option, "rank": number}')
        by_rank.setdefault(float(item["rank"]), []).append(ref(item["value"], f"{field}.{i}.value"))
    return tuple(tuple(by_rank[r]) for r in sorted(by_rank))


READERS: dict[str, Callable[[dict], list[RawJudgement]]] = {
    "native": read_native,
    "scores": read_scores,
    "best-of-k": read_best_of_k,
    "pairwise": read_pairwise,
    "label-studio": read_label_studio,
    "argilla": read_argilla,
}


# --- detection ----------------------------------------------------------------------------------


def is_abstention(record: dict) -> bool:
    """A record in which the annotator declined to judge (``rlhfkit label``'s "can't judge"):
    ``{"prompt_id", "ranking": [], "flag": reason, ...}``. Counted, never an error, no pairs."""
    flag = record.get("flag")
    return record.get("ranking") == [] and isinstance(flag, str) and bool(flag.strip())


def detect_format(record: dict) -> str | None:
    """The format of one JSON record (or CSV row), from its keys; None if it is none of them."""
    keys = {k for k, v in record.items() if v not in (None, "")}
    if ("data" in keys and "annotations" in keys) or any(_is_min_results(v) for v in record.values()):
        return "label-studio"  # the JSON export, or JSON-MIN
    if ("responses" in keys and isinstance(record["responses"], (dict, list))) or any(k.endswith(".responses") for k in keys):
        return "argilla"
    if "ranking" in keys:
        return "native"
    if "scores" in keys or {"completion_id", "score"} <= keys:
        return "scores"
    if "best" in keys:
        return "best-of-k"
    if {"chosen", "rejected"} <= keys:
        return "pairwise"
    return None


def is_csv_source(source: str) -> bool:
    name = source.lower()
    return name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz"))


# --- CSV ----------------------------------------------------------------------------------------


def read_csv_rows(source: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, row)`` of a CSV/TSV file with a header (``-`` = stdin); empty cells are dropped."""
    name = "<stdin>" if source == "-" else source
    try:
        if source == "-":
            text = sys.stdin.read()
        elif source.endswith(".gz"):
            import gzip

            text = gzip.decompress(Path(source).read_bytes()).decode("utf-8")
        else:
            text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(source, None, None, "no such file or directory") from None
    except UnicodeDecodeError as e:
        raise DataError(name, None, None, f"not valid UTF-8 (byte {e.start})") from None
    except (OSError, EOFError, zlib.error) as e:  # a directory; a .gz that is not gzip, or is cut short
        raise DataError(name, None, None, f"cannot read it ({e})") from None
    delimiter = "\t" if source.lower().endswith((".tsv", ".tsv.gz")) else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(name, None, None, "no header row (the file is empty)")
    count = 0
    try:
        for row in reader:
            cells = {k.strip(): v.strip() for k, v in row.items() if k is not None and v is not None and v.strip()}
            if cells:
                count += 1
                yield reader.line_num, cells
    except csv.Error as e:
        raise DataError(name, reader.line_num, None, f"invalid CSV: {e}") from None
    if count == 0:
        raise DataError(name, None, None, "no records (only a header)")


def group_score_rows(rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Long-form CSV scores (one ``prompt_id, completion_id, score[, annotator]`` row per completion)
    -> one ``scores`` record per (prompt, annotator), at the line of its first row."""
    grouped: dict[tuple[str | None, str | None], tuple[int, dict]] = {}
    for line, row in rows:
        if "completion_id" not in row:
            raise _RowError(line, "completion_id", "missing (required in the long scores form)")
        try:
            score = float(row.get("score", ""))
        except ValueError:
            raise _RowError(line, "score", f"expected a number, got {row.get('score', '')!r}") from None
        if not math.isfinite(score):
            raise _RowError(line, "score", f"must be a finite number, got {row.get('score')!r}")
        key = (row.get("prompt_id"), row.get("annotator"))
        first_line, record = grouped.setdefault(
            key, (line, {"scores": {}, **{k: v for k, v in zip(("prompt_id", "annotator"), key) if v}})
        )
        if row["completion_id"] in record["scores"]:
            raise _RowError(line, "completion_id", f"completion {row['completion_id']!r} scored twice (also line {first_line})")
        record["scores"][row["completion_id"]] = score
    return list(grouped.values())


class _RowError(RecordError):
    """A RecordError that already knows its line (CSV rows grouped into one record)."""

    def __init__(self, line: int, field: str | None, reason: str):
        super().__init__(field, reason)
        self.line = line


# --- checking against the samples ---------------------------------------------------------------


def _prompt_key(prompt: Conversation) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class SampleIndex:
    """The samples file, indexed by prompt id, completion id and prompt content."""

    def __init__(self, samples: Sequence[Samples], lines: Sequence[int] | None = None, source: str = "samples"):
        self.samples: dict[str, Samples] = {}
        self.prompt_of: dict[str, str] = {}
        self.by_prompt: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for i, sample in enumerate(samples):
            line = lines[i] if lines is not None else i + 1
            if sample.prompt_id in self.samples:
                raise DataError(
                    source,
                    line,
                    "prompt_id",
                    f"duplicate prompt id {sample.prompt_id!r} (also line {first_line[sample.prompt_id]})",
                )
            first_line[sample.prompt_id] = line
            self.samples[sample.prompt_id] = sample
            self.by_prompt.setdefault(_prompt_key(sample.prompt), sample.prompt_id)
            for c in sample.completions:
                if c.id in self.prompt_of:
                    raise DataError(
                        source, line, "completions", f"completion id {c.id!r} also belongs to prompt {self.prompt_of[c.id]!r}"
                    )
                self.prompt_of[c.id] = sample.prompt_id
        self.prompt_lengths = sorted({len(s.prompt) for s in self.samples.values() if isinstance(s.prompt, str)}, reverse=True)

    def completion(self, prompt_id: str, completion_id: str) -> Completion:
        return next(c for c in self.samples[prompt_id].completions if c.id == completion_id)

    def find_prompt(self, prompt: Conversation) -> str | None:
        return self.by_prompt.get(_prompt_key(prompt))

    def split_transcripts(
        self, chosen: Conversation, rejected: Conversation, prompt_id: str | None = None
    ) -> tuple[str, str, str] | None:
        """Implicit prompt: (prompt id, chosen text, rejected text) for the sample whose prompt
        begins both transcripts (the given one, else the one with the longest such prompt)."""
        if isinstance(chosen, list) and isinstance(rejected, list):
            if prompt_id is not None:
                prompt = self.samples[prompt_id].prompt
                n = len(prompt) if isinstance(prompt, list) else -1
                ok = n > 0 and chosen[:n] == prompt and rejected[:n] == prompt
                return (prompt_id, _text(chosen[n:]), _text(rejected[n:])) if ok else None
            prompt, chosen_rest, rejected_rest = split_shared_prefix(chosen, rejected)
            pid = self.find_prompt(prompt)
            return (pid, _text(chosen_rest), _text(rejected_rest)) if pid is not None else None
        if isinstance(chosen, str) and isinstance(rejected, str):
            if prompt_id is not None:
                prompt = self.samples[prompt_id].prompt
                ok = isinstance(prompt, str) and chosen.startswith(prompt) and rejected.startswith(prompt)
                return (prompt_id, chosen[len(prompt) :], rejected[len(prompt) :]) if ok else None
            for n in self.prompt_lengths:  # longest first
                if n <= min(len(chosen), len(rejected)) and chosen[:n] == rejected[:n]:
                    pid = self.by_prompt.get(_prompt_key(chosen[:n]))
                    if pid is not None:
                        return pid, chosen[n:], rejected[n:]
        return None


def resolve(raw: RawJudgement, index: SampleIndex, line: int) -> Judgement:
    """Check a raw judgement against the samples; raise RecordError(field, reason) if it is wrong."""
    tiers = raw.tiers
    prompt_id = raw.prompt_id
    if prompt_id is not None and prompt_id not in index.samples:
        raise RecordError("prompt_id", f"unknown prompt {prompt_id!r} (not in the samples file)")
    if raw.transcripts is not None:
        found = index.split_transcripts(*raw.transcripts, prompt_id=prompt_id)
        if found is None:
            raise RecordError(
                "chosen", "no sample's prompt is the shared beginning of chosen and rejected (and no 'prompt' field)"
            )
        prompt_id, chosen_text, rejected_text = found
        tiers = ((Ref(chosen_text, "chosen", "text"),), (Ref(rejected_text, "rejected", "text"),))
    if prompt_id is None and raw.prompt is not None:
        prompt_id = index.find_prompt(raw.prompt)
        if prompt_id is None:
            raise RecordError("prompt", "no sample has this prompt")
    if prompt_id is None:
        first = next((r for tier in tiers for r in tier if r.kind in ("id", "id-or-text", "id-or-index")), None)
        if first is None or str(first.value) not in index.prompt_of:
            raise RecordError("prompt_id", "missing, and the completions do not tell which prompt this is")
        prompt_id = index.prompt_of[str(first.value)]
    sample = index.samples[prompt_id]

    seen: dict[str, str] = {}
    resolved_tiers = []
    scores: dict[str, float] = {}
    for tier in tiers:
        ids = []
        for ref in tier:
            cid = _resolve_ref(ref, sample, index)
            if cid in seen:
                raise RecordError(ref.field, f"completion {cid!r} ranked twice (also at '{seen[cid]}')")
            seen[cid] = ref.field
            ids.append(cid)
            if ref.score is not None:
                scores[cid] = ref.score
        resolved_tiers.append(tuple(ids))
    below = tuple(c.id for c in sample.completions if c.id not in seen) if raw.rest_below else ()
    if len(seen) + len(below) < 2:
        raise RecordError(raw.field, f"fewer than 2 completions ranked ({len(seen) + len(below)}); a ranking needs at least 2")
    return Judgement(line, prompt_id, tuple(resolved_tiers), below, raw.annotator, scores or None, raw.pairwise)


def _resolve_ref(ref: Ref, sample: Samples, index: SampleIndex) -> str:
    ids = {c.id for c in sample.completions}
    value = ref.value
    if ref.kind in ("id", "id-or-text", "id-or-index") and isinstance(value, str) and value in ids:
        return value
    if ref.kind in ("index", "id-or-index"):
        i = int(value)
        if not 0 <= i < len(sample.completions):
            raise RecordError(
                ref.field,
                f"index {i} out of range: prompt {sample.prompt_id!r} has {len(sample.completions)} completions (0-based)",
            )
        return sample.completions[i].id
    if ref.kind in ("text", "id-or-text"):
        text = _text(value)
        match = next((c.id for c in sample.completions if c.text == text), None)
        if match is not None:
            return match
        if ref.kind == "text" or not (isinstance(value, str) and value in index.prompt_of):
            raise RecordError(
                ref.field, f"matches no completion of prompt {sample.prompt_id!r} (neither an id nor a text in the samples)"
            )
    other = index.prompt_of.get(str(value))
    if other is not None:
        raise RecordError(ref.field, f"completion {value!r} belongs to prompt {other!r}, not {sample.prompt_id!r}")
    raise RecordError(ref.field, f"unknown completion id {value!r} (not in the samples file)")


# --- loading a whole rankings file --------------------------------------------------------------


@dataclass
class LoadedRankings:
    format: str  # what the file is: one of FORMATS
    row_format: str  # what each record is (differs from `format` for csv only)
    detected: bool  # chosen by --format auto
    judgements: list[Judgement]
    records: int
    skipped: int
    abstained: int = 0  # records of an annotator who could not judge (`is_abstention`)


@dataclass
class RankingRows:
    """The raw records of a rankings file and the format they are in (not yet checked)."""

    source: str
    rows: list[tuple[int, dict[str, Any]]]
    format: str  # what the file is: one of FORMATS
    row_format: str  # what each record is (differs from `format` for csv only)
    detected: bool  # chosen by --format auto


def read_rankings(source: str, fmt: str = "auto") -> RankingRows:
    """Read every record of a rankings file (``-`` = stdin) and settle its format.

    Reading is separate from checking so that a pipe can be read to its end before the samples
    file is opened (``collect --out - | tee samples.jsonl | judge | rank-import - --samples samples.jsonl``).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"--format: expected auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    name = "<stdin>" if source == "-" else source
    is_csv = fmt == "csv" or is_csv_source(source)
    rows = list(read_csv_rows(source) if is_csv else read_records(source))
    first_line, first = next(((line, r) for line, r in rows if not is_abstention(r)), rows[0])
    row_format = fmt if fmt not in ("auto", "csv") else detect_format(first)
    if row_format is None:
        keys = ", ".join(sorted(first)[:8])
        raise DataError(name, first_line, None, f"cannot tell the rankings format from the keys ({keys}); name it with --format")
    if is_csv and row_format == "scores" and "scores" not in rows[0][1]:
        try:
            rows = group_score_rows(rows)
        except _RowError as e:
            raise DataError(name, e.line, e.field, e.reason) from None
    return RankingRows(name, rows, "csv" if is_csv else row_format, row_format, fmt == "auto")


def check_rankings(read: RankingRows, index: SampleIndex, *, skip_invalid: bool = False) -> LoadedRankings:
    """Parse and check every record against the samples.

    An invalid record raises DataError(FILE, LINE, field, reason); with ``skip_invalid`` it is
    dropped and counted. Also an error: two rankings of one prompt by one annotator, and one
    annotator judging the same couple twice in pairwise data.
    """
    name, row_format, rows = read.source, read.row_format, read.rows
    judgements: list[Judgement] = []
    skipped = abstained = 0
    seen_rankings: dict[tuple, int] = {}
    for line, record in rows:
        if is_abstention(record):
            abstained += 1
            continue
        try:
            raws = READERS[row_format](record)
            resolved = [resolve(raw, index, line) for raw in raws]
            for judgement in resolved:
                _check_duplicate(judgement, seen_rankings)
        except RecordError as e:
            if not skip_invalid:
                raise DataError(name, line, e.field, e.reason) from None
            skipped += 1
            continue
        judgements.extend(resolved)
    if not judgements:
        also = f", {abstained} abstentions" if abstained else ""
        raise DataError(name, None, None, f"no valid rankings ({skipped} invalid skipped{also})")
    return LoadedRankings(read.format, row_format, read.detected, judgements, len(rows), skipped, abstained)


def load_rankings(source: str, index: SampleIndex, fmt: str = "auto", *, skip_invalid: bool = False) -> LoadedRankings:
    """`read_rankings` then `check_rankings`."""
    return check_rankings(read_rankings(source, fmt), index, skip_invalid=skip_invalid)


def _check_duplicate(judgement: Judgement, seen: dict[tuple, int]) -> None:
    """One ranking per (prompt, annotator); in pairwise data one judgement per (couple, annotator)."""
    who = f"annotator {judgement.annotator!r}" if judgement.annotator is not None else "an anonymous annotator"
    if judgement.pairwise:
        key: tuple = (judgement.prompt_id, judgement.annotator, frozenset(judgement.completion_ids))
        what = f"this pair of prompt {judgement.prompt_id!r} was already judged by {who}"
    else:
        key = (judgement.prompt_id, judgement.annotator, None)
        what = f"prompt {judgement.prompt_id!r} was already ranked by {who}"
    if key in seen:
        field = "annotator" if judgement.annotator is not None else "prompt_id"
        hint = "" if judgement.annotator is not None else " (name each ranking's 'annotator')"
        raise RecordError(field, f"{what} at line {seen[key]}{hint}")
    seen[key] = judgement.line


def load_checked(
    source: str, samples: str, fmt: str = "auto", *, skip_invalid: bool = False
) -> tuple[LoadedRankings, SampleIndex, Any]:
    """The one validator of a rankings file, used by ``rank-import`` and ``rlhfkit validate --kind
    rankings``: the rankings read to the end (a pipe first: the samples file may still be being
    written), then the samples (`records.load_kind`), then every ranking checked against them.
    Returns (rankings, the samples' index, the loaded samples)."""
    from rlhfkit.data.records import load_kind

    rows = read_rankings(source, fmt)
    loaded_samples = load_kind(samples, "samples", skip_invalid=skip_invalid)
    index = SampleIndex(loaded_samples, loaded_samples.lines, "<stdin>" if samples == "-" else samples)
    return check_rankings(rows, index, skip_invalid=skip_invalid), index, loaded_samples
