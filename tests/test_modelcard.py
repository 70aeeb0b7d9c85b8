"""The model card every model directory gets: ``README.md`` whose front matter huggingface_hub's
``ModelCard`` parses, with the numbers of ``rlhfkit.json``, and a usage example that runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex

import pytest
import torch
from huggingface_hub import ModelCard

from rlhfkit import modelcard
from rlhfkit.testing import corpus


def usage_code(card: ModelCard) -> str:
    return re.search(r"```python\n(.*?)```", card.text, re.S).group(1)


def run_usage(card: ModelCard) -> str:
    """Run the card's Python example; return what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(usage_code(card), "README.md", "exec"), {})
    return printed.getvalue()


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    lines = corpus(200, seed=5)
    path = tmp_path_factory.mktemp("data") / "demos.jsonl"
    path.write_text("".join(json.dumps({"prompt": lines[2 * i], "response": lines[2 * i + 1]}) + "\n" for i in range(50)))
    return path


def test_sft_directory_card_parses_and_matches_rlhfkit_json(cli, tiny_llama_dir, demos, tmp_path):
    out = tmp_path / "sft"
    result = cli("sft", "--model", tiny_llama_dir, "--data", demos, "--out", out, "--epochs", 1, "--batch-size", 8,
                 "--max-length", 48, "--val-fraction", 0.2, "--lr", 3e-3)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    info = json.loads((out / "rlhfkit.json").read_text())
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["rlhfkit", "rlhf", "sft"]
    assert data.base_model is None and data.datasets is None  # a local tiny model, local data: no hub ids
    assert data.model_name == "sft"
    results = {r.metric_type: r for r in data.eval_results}
    assert results["loss"].metric_value == info["metrics"]["loss/eval"]
    assert results["perplexity"].metric_value == info["metrics"]["eval/perplexity"]
    assert results["loss"].task_type == "text-generation" and results["loss"].dataset_name == "demos.jsonl (held-out split)"
    # the text: stage and versions, the command, the inputs with record counts and hashes, the metrics
    text = card.text
    assert f"rlhfkit {info['versions']['rlhfkit']}, torch {info['versions']['torch']}" in text
    assert f"```bash\n{shlex.join(['rlhfkit', *info['argv'][1:]])}\n```" in text  # argv as rlhfkit.json has it (here: pytest's)
    assert f"| data | `{demos}` | 40 training examples | {info['inputs']['data'][0]['sha256']} |" in text
    assert "| val (held out from data) | | 10 held-out examples | |" in text
    assert f"| held-out perplexity | {info['metrics']['eval/perplexity']:.6g} |" in text
    assert "| lr | `0.003` |" in text
    # the usage example runs with plain transformers (from the directory the card names)
    assert repr(str(out)) in usage_code(card)
    torch.manual_seed(0)
    assert isinstance(run_usage(card), str)
    # and the run's curves are in the directory too
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "curves.png")).shape[2] in (3, 4)


def test_reward_model_card_example_gives_rlhfkits_normalised_score(tiny_llama_dir, tmp_path):
    from rlhfkit.chat import encode_completion, encode_prompt
    from rlhfkit.config import TrainRMConfig
    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward import load_reward
    from rlhfkit.stages import train_rm

    rows = []
    for i, line in enumerate(corpus(40, seed=2)):
        rows.append({"prompt": f"Question {i}?", "chosen": line + " thanks.", "rejected": line})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    train_rm.run(
        TrainRMConfig(
            model=str(tiny_llama_dir), data=str(data), out=str(out), device="cpu", lr=3e-3, batch_size=8, val_fraction=0.25
        )
    )
    info = json.loads((out / "rlhfkit.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.tags == ["rlhfkit", "rlhf", "reward-model", "reward-modeling"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {
        "accuracy": info["metrics"]["rm/accuracy"],
        "loss": info["metrics"]["loss/eval"],
        "margin": info["metrics"]["rm/margin"],
    }
    assert f"| gain | {info['reward']['gain']:.6g} |" in card.text and "| data | " in card.text and "training pairs" in card.text

    # the card's example: prompt + " Paris." + EOS with plain transformers, normalised with the card's gain and bias
    printed = float(run_usage(card))
    tokenizer = load_tokenizer(str(out))
    reward = load_reward(str(out), tokenizer, "cpu", torch.float32)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    assert encode_prompt(tokenizer, prompt) + encode_completion(tokenizer, " Paris.", stopped=True)  # what both score
    expected = reward.score([prompt], [" Paris."], stopped=[True])[0].item()
    assert printed == pytest.approx(expected, abs=1e-5)


def test_front_matter_from_hub_inputs_and_inherited_base_model(tmp_path):
    """Hub ids become base_model and datasets; a local model made from a hub model passes its
    base_model and license on; model-index holds PPO's score and KL."""
    parent = tmp_path / "sft"
    parent.mkdir()
    (parent / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0\n---\n# sft\n")
    info = {
        "stage": "ppo",
        "config": {"lora": True},
        "inputs": {
            "policy": [{"path": str(parent), "sha256": "ab" * 32}],
            "prompts": [{"path": "org/prompts:train", "sha256": None}],
        },
        "metrics": {"objective/score": 0.125, "objective/kl": 1.5, "loss/policy": float("nan")},
        "ppo": {"steps": 3, "kl_coef": 0.05, "reward": {"spec": "rm", "gain": 2.0, "bias": -1.0}},
        "argv": ["/x/bin/rlhfkit", "ppo", "--policy", str(parent), "--lora"],
        "versions": {"rlhfkit": "0.1.0"},
    }
    out = tmp_path / "ppo"
    out.mkdir()
    (out / "rlhfkit.json").write_text(json.dumps(info))
    card = ModelCard.load(modelcard.write_model_card(out))
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.datasets == ["org/prompts"] and data.tags == ["rlhfkit", "rlhf", "ppo", "lora"]
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in data.eval_results] == [
        ("reward", 0.125, "org/prompts"),
        ("kl", 1.5, "org/prompts"),
    ]
    assert "rlhfkit ppo --policy" in card.text and "| final β (KL coefficient) | 0.05 |" in card.text
    # a hub id and a hub cache snapshot name their hub model
    assert modelcard.hub_origin({"path": "HuggingFaceTB/SmolLM2-135M", "sha256": None}) == "HuggingFaceTB/SmolLM2-135M"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert modelcard.hub_origin({"path": str(snapshot), "sha256": "cd" * 32}) == "org/name"
    assert modelcard.hub_origin({"path": str(parent), "sha256": "ab" * 32}) is None


def test_no_card_without_rlhfkit_json(tmp_path):
    assert modelcard.write_model_card(tmp_path) is None and not (tmp_path / "README.md").exists()
