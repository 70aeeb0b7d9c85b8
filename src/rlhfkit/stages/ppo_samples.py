"""``OUT/samples.jsonl`` and the sample table on stderr: what the policy writes, every ``--sample-every`` steps.

Each row holds the prompt, the response, its score and its KL to the reference (summed over the
response), whether it stopped and its length. On resume, rows after the checkpoint are dropped
(as in metrics.jsonl), so a resumed run's file equals an uninterrupted one's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.stages.ppo_data import PromptItem
from rlhfkit.training import Dist

SAMPLES_FILE = "samples.jsonl"


class SamplesLog:
    """``OUT/samples.jsonl`` and the table on stderr: a few prompt/response/score/KL rows every
    ``--sample-every`` steps. On resume, rows after the checkpoint are dropped (as in metrics.jsonl)."""

    def __init__(self, path: Path, dist: Dist, resume_step: int | None, enabled: bool = True):
        from rlhfkit.data.files import atomic_open

        self.path, self.enabled = path, dist.is_main and enabled
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
        with atomic_open(path) as f:
            f.writelines(line + "\n" for line in kept)

    def write(self, step: int, items: Sequence[PromptItem], result: dict[str, Any], n: int) -> None:
        from rich.table import Table

        from rlhfkit.console import console
        from rlhfkit.data.files import dumps

        n = min(n, len(items))
        kl = result["kl"].sum(1)[:n].tolist()
        scores = result["scores"][:n].tolist()
        stopped = result["rollout"].stopped[:n].tolist()
        lengths = result["experience"].response_mask.sum(1)[:n].tolist()
        rows = [
            {"step": step, "prompt_id": items[i].id, "prompt": items[i].prompt, "response": result["texts"][i],
             "score": scores[i], "kl": kl[i], "stopped": bool(stopped[i]), "num_tokens": int(lengths[i])}
            for i in range(n)
        ]  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(dumps(r) + "\n" for r in rows)
        table = Table(title=f"ppo samples, step {step}", show_lines=True)
        for column, justify in (("prompt", "left"), ("response", "left"), ("score", "right"), ("kl", "right")):
            table.add_column(column, justify=justify, overflow="fold")
        for r in rows:
            table.add_row(
                _short(_prompt_text(r["prompt"]), 120), _short(r["response"], 240), f"{r['score']:.3f}", f"{r['kl']:.3f}"
            )
        console.print(table)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return prompt[-1]["content"] if prompt else ""


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
