"""``rlhfkit label --export``: the samples as tasks for a labeling tool a team already runs, laid
out so that the tool's finished export goes straight back into ``rank-import``.

Label Studio (``--mode rank``: List + Ranker; ``--mode pairwise``: two Texts + Pairwise), writes
OUT (the tasks, to import into a project) and OUT's ``.label_config.xml`` (the labeling interface):

- rank: one task per prompt, ``data = {prompt_id, prompt, messages, items}`` where ``items`` are
  ``{"id": completion id, "title": "Response A", "body": text}`` in a seeded blind order. The
  Ranker's result is the list of item ids in the labeler's order (Label Studio's plain Ranker has
  no ties), so JSON and JSON-MIN exports resolve by id.
- pairwise: one task per couple of completions, ``data = {prompt_id, prompt, messages, items,
  response_a, response_b}``: the Texts show ``response_a``/``response_b``, and ``items`` (the two
  ids, left first) tells rank-import which completion ``"selected": "left"`` means.

Argilla (``--mode rank``), writes OUT (records in the layout of ``rg.Record.from_dict``, which is
also what ``dataset.records.to_json`` exports) and OUT's ``.settings.json`` (``rg.Settings.from_json``):
fields ``prompt`` and ``response_1..K``, metadata ``prompt_id`` and ``response_i_id`` (the completion
id behind each field, so that two identical texts stay two completions), one RankingQuestion
``ranking`` over the options ``response_1..K``. Argilla's options are the same for every record, so
every prompt must have the same number of completions (``--k-max`` evens them out).

Completions are shown in a blind order seeded by (seed, prompt id), and never with their policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from rlhfkit.data import files
from rlhfkit.data.records import Conversation, Samples
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.label import LabelConfig
from rlhfkit.label.tasks import judged_ids, seeded_rng

RANKER_CONFIG = """<View>
  <Header value="Prompt"/>
  <Paragraphs name="prompt" value="$messages" layout="dialogue" nameKey="role" textKey="content"/>
  <Header value={instructions}/>
  <List name="responses" value="$items" title="Responses"/>
  <Ranker name="rank" toName="responses"/>
</View>
"""

PAIRWISE_CONFIG = """<View>
  <Header value="Prompt"/>
  <Paragraphs name="prompt" value="$messages" layout="dialogue" nameKey="role" textKey="content"/>
  <Header value={instructions}/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;"><Header value="Response A"/><Text name="response_a" value="$response_a"/></View>
    <View style="flex: 1;"><Header value="Response B"/><Text name="response_b" value="$response_b"/></View>
  </View>
  <Pairwise name="comparison" toName="response_a,response_b"/>
</View>
"""


def messages(prompt: Conversation) -> list[dict[str, str]]:
    """A prompt as chat turns (a plain prompt is one user turn), for Label Studio's dialogue view."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def prompt_text(prompt: Conversation) -> str:
    """A prompt as one text (chat turns as ``role: content`` paragraphs), for Argilla's text field."""
    return prompt if isinstance(prompt, str) else "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def shown(sample: Samples, k_max: int, seed: int) -> list[str]:
    """The completion ids a tool shows for a prompt: the same --k-max subset as the web app, in a
    blind order seeded by (seed, prompt id) (a tool's task is the same for every labeler)."""
    ids = judged_ids(sample, k_max, seed)
    seeded_rng(seed, "export", sample.prompt_id).shuffle(ids)
    return ids


def label_studio_tasks(samples: Sequence[Samples], mode: str, k_max: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    tasks = []
    for sample in samples:
        ids = shown(sample, k_max, seed)
        if len(ids) < 2:
            continue
        text = {c.id: c.text for c in sample.completions}
        data = {"prompt_id": sample.prompt_id, "prompt": sample.prompt, "messages": messages(sample.prompt)}
        if mode == "rank":
            items = [{"id": cid, "title": f"Response {chr(ord('A') + i)}", "body": text[cid]} for i, cid in enumerate(ids)]
            tasks.append({"data": {**data, "items": items}})
        else:
            for a, b in combinations(ids, 2):
                items = [{"id": a, "body": text[a]}, {"id": b, "body": text[b]}]
                tasks.append({"data": {**data, "items": items, "response_a": text[a], "response_b": text[b]}})
    return tasks


def label_studio_config(mode: str) -> str:
    if mode == "rank":
        return RANKER_CONFIG.format(instructions=quoteattr("Drag the responses into order, best first"))
    return PAIRWISE_CONFIG.format(instructions=quoteattr("Pick the better response"))


def argilla_records(samples: Sequence[Samples], k_max: int = 0, seed: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The records and K, the number of completions every record shows."""
    records: list[dict[str, Any]] = []
    k = 0
    for sample in samples:
        ids = shown(sample, k_max, seed)
        if len(ids) < 2:
            continue
        if k and len(ids) != k:
            raise ConfigError(
                f"--export argilla: prompt {sample.prompt_id!r} has {len(ids)} completions, earlier prompts {k}; "
                "an Argilla ranking question has the same options for every record (even them out with --k-max)"
            )
        k = len(ids)
        text = {c.id: c.text for c in sample.completions}
        fields = {"prompt": prompt_text(sample.prompt), **{f"response_{i + 1}": text[cid] for i, cid in enumerate(ids)}}
        metadata = {"prompt_id": sample.prompt_id, **{f"response_{i + 1}_id": cid for i, cid in enumerate(ids)}}
        records.append({"id": sample.prompt_id, "fields": fields, "metadata": metadata})
    return records, k


def argilla_settings(k: int, guidelines: str) -> dict[str, Any]:
    """Settings in the layout ``rg.Settings.from_json`` reads (Argilla 2.x)."""

    def text_field(name: str, title: str) -> dict[str, Any]:
        return {"name": name, "title": title, "required": True, "settings": {"type": "text", "use_markdown": False}}

    options = [{"value": f"response_{i + 1}", "text": f"Response {i + 1}"} for i in range(k)]
    return {
        "guidelines": guidelines or "Rank the responses from best to worst.",
        "allow_extra_metadata": True,  # prompt_id and response_i_id ride along without being shown
        "fields": [text_field("prompt", "Prompt")] + [text_field(f"response_{i + 1}", f"Response {i + 1}") for i in range(k)],
        "questions": [
            {
                "name": "ranking",
                "title": "Rank the responses, best first",
                "required": True,
                "settings": {"type": "ranking", "options": options},
            }
        ],
        "metadata": [],
        "vectors": [],
    }


def sibling(out: str, suffix: str) -> str:
    """``tasks.json`` -> ``tasks<suffix>``."""
    path = Path(out)
    return str(path.with_name(path.stem + suffix) if path.suffix == ".json" else path.with_name(path.name + suffix))


def write(config: LabelConfig, samples: Sequence[Samples]) -> dict[str, Any]:
    """Write OUT and its sibling configuration file; nothing is written if anything is wrong."""
    if config.export == "label-studio":
        tasks = label_studio_tasks(samples, config.mode, config.k_max, config.seed)
        extra, key, content = sibling(config.out, ".label_config.xml"), "label_config", label_studio_config(config.mode)
    else:
        tasks, k = argilla_records(samples, config.k_max, config.seed)
        guidelines = ""
        if config.guidelines:
            try:
                guidelines = Path(config.guidelines).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(config.guidelines, None, None, f"cannot read the guidelines ({e.__class__.__name__})") from None
        extra, key, content = (
            sibling(config.out, ".settings.json"),
            "settings",
            json.dumps(argilla_settings(k, guidelines), indent=2),
        )
    if not tasks:
        raise ConfigError("nothing to export: no prompt in the samples file has 2 or more completions")
    with files.atomic_open(extra) as f:
        f.write(content + ("" if content.endswith("\n") else "\n"))
    files.write_json(config.out, tasks)
    return {"export": config.export, "mode": config.mode, "out": config.out, key: extra, "tasks": len(tasks)}
