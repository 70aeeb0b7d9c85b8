"""Check the model card of every model directory of a demo run: ``python examples/check_cards.py RUN``.

Each directory with an ``rlhfkit.json`` must have a ``README.md`` that huggingface_hub's ``ModelCard``
parses, whose ``model-index`` numbers equal the final metrics of ``rlhfkit.json``, and a
``curves.png`` when it is a training run. Prints one line per directory; exits 1 on the first
mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from huggingface_hub import ModelCard

from rlhfkit.modelcard import RESULTS


def check(model_dir: Path) -> str:
    info = json.loads((model_dir / "rlhfkit.json").read_text())
    card = ModelCard.load(model_dir / "README.md")
    stage = info["stage"]
    assert card.data.library_name == "transformers" and "rlhfkit" in card.data.tags, f"{model_dir}: {card.data}"
    wanted = {metric_type: info["metrics"][key] for key, metric_type, _ in RESULTS.get(stage, ("", "", []))[2] if key in info["metrics"]}
    got = {r.metric_type: r.metric_value for r in card.data.eval_results or []}
    assert got == wanted, f"{model_dir}: model-index {got} != rlhfkit.json {wanted}"
    if (model_dir / "metrics.jsonl").is_file():
        assert (model_dir / "curves.png").is_file(), f"{model_dir}: no curves.png"
    return f"{model_dir}: {stage} card ok ({', '.join(f'{k} {v:.4g}' for k, v in got.items())})"


def main() -> None:
    run = Path(sys.argv[1])
    dirs = sorted(p.parent for p in run.glob("*/rlhfkit.json"))
    if not dirs:
        sys.exit(f"{run}: no model directory (no */rlhfkit.json)")
    for model_dir in dirs:
        try:
            print(check(model_dir))
        except (AssertionError, FileNotFoundError, KeyError) as e:
            sys.exit(f"model card check failed: {e}")


if __name__ == "__main__":
    main()
