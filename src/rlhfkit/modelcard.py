"""The model card: ``README.md`` with Hugging Face YAML front matter in every model directory.

`models.save_model_dir` calls `finish_model_dir`, so every model rlhfkit writes (sft, train-rm,
ppo, and any later stage) explains itself on the Hub and on disk. Everything in the card comes
from the directory's own ``rlhfkit.json`` (and ``config.json``), so the two never disagree.

Front matter (read by the Hub and by ``huggingface_hub.ModelCard``):

* ``base_model``: the hub model the chain started from, when it is known — the input model when it
  is a hub id (or a hub cache snapshot), else the ``base_model`` of the input directory's own card
  (an rlhfkit directory made from a hub model). A local model with no hub origin gets none: the Hub
  only takes hub ids there.
* ``license``: the input's, from its card or, for a ``.gguf`` file, its ``general.license``.
* ``library_name: transformers``, ``pipeline_tag``, ``tags`` (``rlhfkit``, ``rlhf``, the stage's
  own: ``sft``, ``reward-model``, ``ppo``, ...; ``lora`` when LoRA-trained).
* ``datasets``: the inputs that are hub datasets (``org/name``); local files are listed, with their
  sha256, in the card's text.
* ``model-index``: the final held-out metrics (sft: loss and perplexity; train-rm: pairwise
  accuracy, loss and margin; ppo: the reward-model score and KL of the last PPO step) with the
  exact values of ``rlhfkit.json``.

The text: what made the model (stage, rlhfkit version, command line, every option), its data
(paths, record counts, sha256), every final metric in words, the reward normalisation of a
reward model, and how to load it with plain transformers.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"

STAGES = {
    "sft": ("supervised fine-tuning (SFT) on demonstrations", "text-generation", ["sft"]),
    "train-rm": (
        "a Bradley–Terry reward model trained on pairwise comparisons",
        "text-classification",
        ["reward-model", "reward-modeling"],
    ),
    "ppo": ("RLHF with PPO against a reward model, with a KL penalty to the reference policy", "text-generation", ["ppo"]),
    "dpo": ("direct preference optimisation (DPO) on pairwise comparisons, against the frozen starting policy", "text-generation",
            ["dpo"]),
    "ilql": ("offline RL with implicit language Q-learning (ILQL): a causal LM and Q/V heads that shift its logits",
             "text-generation", ["ilql"]),
}
ALGO_WORDS = {  # ppo --algo: the algorithm the ppo stage ran
    "a2c": "RLHF with A2C (one unclipped actor-critic step per rollout batch) against a reward model, with a KL penalty",
    "rloo": "RLHF with RLOO (REINFORCE, leave-one-out baseline over K samples per prompt) against a reward model, KL-penalised",
    "grpo": "RLHF with GRPO (group-normalised advantages, KL to the reference as a loss term) against a reward model",
}
PARENT_ROLES = ("model", "policy")  # the input the weights started from
DATA_ROLES = ("data", "val_data", "prompts", "ptx_data", "norm_samples", "demos", "comparisons", "samples")

# final metrics in words (the card's table); other keys are shown as they are
WORDS = {
    "loss/train": "training loss (last logged window)",
    "loss/eval": "held-out loss",
    "eval/perplexity": "held-out perplexity",
    "loss/eval_initial": "held-out loss before training",
    "eval/perplexity_initial": "held-out perplexity before training",
    "rm/accuracy": "held-out pairwise accuracy",
    "rm/margin": "held-out mean reward margin (chosen − rejected)",
    "rm/train_accuracy": "training accuracy (last logged window)",
    "rm/train_margin": "training mean reward margin (last logged window)",
    "rm/reward_mean": "mean raw reward of the last training window",
    "rm/reward_std": "standard deviation of the raw reward, last training window",
    "throughput/pairs_per_s": "training throughput, pairs per second",
    "train_pairs": "training pairs",
    "val_pairs": "held-out pairs",
    "steps": "optimizer steps",
    "epoch": "epochs",
    "train/steps": "optimizer steps",
    "train/tokens": "training tokens",
    "train/seconds": "training time, seconds",
    "optim/lr": "final learning rate",
    "optim/grad_norm": "gradient norm (last logged window)",
    "policy/approxkl": "approximate KL between PPO epochs (last PPO step)",
    "policy/clipfrac": "share of tokens with a clipped policy ratio (last PPO step)",
    "loss/policy": "policy loss (last PPO step)",
    "loss/value": "value loss (last PPO step)",
    "val/explained_variance": "explained variance of the value head (last PPO step)",
    "response/stopped": "share of responses that ended with EOS (last PPO step)",
    "objective/score": "mean normalised reward-model score (last PPO step)",
    "objective/rm_score": "mean reward-model score before clipping and penalties (last PPO step)",
    "objective/kl": "KL to the reference, nats per response (last PPO step)",
    "objective/rlhf_reward": "score − β·KL (last PPO step)",
    "objective/entropy": "policy entropy, nats per response (last PPO step)",
    "response/length": "mean response length in tokens (last PPO step)",
    "throughput/tokens_per_s": "training throughput, tokens per second",
}

# model-index entries: stage -> (task type, task name, [(metric key, metric type, metric name)])
RESULTS = {
    "sft": ("text-generation", "Supervised fine-tuning", [
        ("loss/eval", "loss", "Held-out loss (nats per token)"),
        ("eval/perplexity", "perplexity", "Held-out perplexity"),
    ]),
    "train-rm": ("text-classification", "Reward modeling", [
        ("rm/accuracy", "accuracy", "Held-out pairwise accuracy"),
        ("loss/eval", "loss", "Held-out Bradley–Terry loss"),
        ("rm/margin", "margin", "Held-out mean reward margin"),
    ]),
    "ppo": ("text-generation", "RLHF (PPO)", [
        ("objective/score", "reward", "Mean normalised reward-model score, last PPO step"),
        ("objective/kl", "kl", "KL to the reference (nats per response), last PPO step"),
    ]),
    "dpo": ("text-generation", "Direct preference optimisation", [
        ("eval/accuracy", "accuracy", "Held-out preference accuracy of the implicit reward"),
        ("loss/eval", "loss", "Held-out DPO loss"),
    ]),
}  # fmt: skip
EVAL_DATA_ROLES = {"sft": ("val_data", "data"), "train-rm": ("val_data", "data"), "ppo": ("prompts",),
                   "dpo": ("val_data", "data")}  # fmt: skip


def finish_model_dir(new: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """What `models.save_model_dir` adds to a model directory ``new`` it is assembling for
    ``run_dir``: the model card, ``curves.png`` of the run's ``metrics.jsonl`` (a training run),
    and the end of the run's trackers (`rlhfkit.tracking`), which get the curves and the card."""
    from rlhfkit import plot, tracking

    new = Path(new)
    card = write_model_card(new, final=Path(run_dir))
    curves = plot.write_curves(run_dir, new / plot.CURVES_FILE)
    tracking.finish(run_dir, [p for p in (curves, card, new / "rlhfkit.json") if p is not None])


def write_model_card(model_dir: str | os.PathLike, final: str | os.PathLike | None = None) -> Path | None:
    """``MODEL_DIR/README.md`` from its ``rlhfkit.json``; None when there is no ``rlhfkit.json``.
    ``final``: where the directory will be (it is assembled under a temporary name), for its name
    and the path in the usage example."""
    from rlhfkit.data.files import atomic_open

    model_dir = Path(model_dir)
    info_path = model_dir / "rlhfkit.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    path = model_dir / CARD_FILE
    with atomic_open(path) as f:
        f.write(model_card(info, model_dir, Path(final) if final is not None else model_dir))
    return path


# --- the front matter ------------------------------------------------------------------------------


def _looks_like_hub_id(spec: str) -> bool:
    head = spec.split(":", 1)[0]
    data_file = head.endswith((".jsonl", ".json", ".gz", ".parquet", ".gguf"))
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", head)) and not data_file


def _inputs(info: dict[str, Any], role: str) -> list[dict[str, Any]]:
    value = (info.get("inputs") or {}).get(role) or []
    return [v for v in value if isinstance(v, dict) and v.get("path")]


def hub_origin(entry: dict[str, Any]) -> str | None:
    """The hub id an input model comes from: a hub id itself, or a hub cache snapshot directory."""
    spec = str(entry["path"])
    if entry.get("sha256") is None and not Path(spec).exists() and _looks_like_hub_id(spec):
        return spec.split(":", 1)[0]
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]", str(Path(spec).resolve()) + os.sep)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _parent_card(spec: str) -> dict[str, Any]:
    """The front matter of an input model's own card (a directory), or {}."""
    readme = Path(spec) / CARD_FILE
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub.repocard import metadata_load

        return metadata_load(readme) or {}
    except Exception:  # a README without valid front matter
        return {}


def _gguf_license(spec: str) -> str | None:
    if not spec.endswith(".gguf") or not Path(spec).is_file():
        return None
    try:
        from gguf import GGUFReader

        field = GGUFReader(spec).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # an unreadable GGUF: no license to inherit
        return None


def front_matter(info: dict[str, Any], model_dir: Path, name: str | None = None) -> dict[str, Any]:
    """The card's metadata, in the order the Hub shows it (``model-index`` last)."""
    stage = str(info.get("stage", ""))
    config = info.get("config") or {}
    _, pipeline, stage_tags = STAGES.get(stage, ("", _pipeline_from_config(model_dir), [stage] if stage else []))
    meta: dict[str, Any] = {}
    parent = next((e for role in PARENT_ROLES for e in _inputs(info, role)), None)
    if parent is not None:
        card = _parent_card(str(parent["path"]))
        base = hub_origin(parent) or card.get("base_model")
        if isinstance(base, list):
            base = base[0] if len(base) == 1 else None
        if isinstance(base, str) and base:
            meta["base_model"] = base
        license_ = card.get("license") or _gguf_license(str(parent["path"]))
        if license_:
            meta["license"] = license_
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = pipeline
    tags = ["rlhfkit", "rlhf", *stage_tags]
    if config.get("lora"):
        tags.append("lora")
    meta["tags"] = list(dict.fromkeys(tags))
    datasets = [
        str(e["path"]).split(":", 1)[0]
        for role in DATA_ROLES
        for e in _inputs(info, role)
        if e.get("sha256") is None and _looks_like_hub_id(str(e["path"]))
    ]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    index = model_index(info, name or model_dir.name)
    if index:
        meta["model-index"] = index
    return meta


def _pipeline_from_config(model_dir: Path) -> str:
    architectures = _config(model_dir).get("architectures") or []
    return "text-classification" if any("SequenceClassification" in a for a in architectures) else "text-generation"


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_index(info: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """``model-index`` with the stage's final held-out metrics (the values of ``rlhfkit.json``)."""
    stage = str(info.get("stage", ""))
    if stage not in RESULTS:
        return []
    task_type, task_name, wanted = RESULTS[stage]
    metrics = info.get("metrics") or {}
    values = [{"type": t, "value": metrics[k], "name": n} for k, t, n in wanted if _finite(metrics.get(k))]
    if not values:
        return []
    entry = next((e for role in EVAL_DATA_ROLES[stage] for e in _inputs(info, role)), None)
    path = str(entry["path"]) if entry else "unknown"
    hub = entry is not None and entry.get("sha256") is None and _looks_like_hub_id(path)
    held_out = stage != "ppo" and not _inputs(info, "val_data")
    description = Path(path).name + (" (training prompts)" if stage == "ppo" else " (held-out split)" if held_out else "")
    dataset = {"type": path.split(":", 1)[0] if hub else Path(path).name, "name": description}
    return [{"name": name, "results": [{"task": {"type": task_type, "name": task_name}, "dataset": dataset, "metrics": values}]}]


# --- the text -----------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _command(argv: list[str]) -> str:
    import shlex

    return shlex.join(["rlhfkit", *argv[1:]]) if argv else ""


def _record_counts(info: dict[str, Any]) -> dict[str, str]:
    """Record counts by input role, from what the stage recorded (sft's data report, train-rm's pairs)."""
    counts: dict[str, str] = {}
    data = info.get("data") or {}
    for split, role in (("train", "data"), ("val", "val_data")):
        stats = data.get(split) or {}
        if isinstance(stats.get("examples"), int):
            counts[role] = f"{stats['examples']:,} {'training' if split == 'train' else 'held-out'} examples"
    metrics = info.get("metrics") or {}
    for key, role in (("train_pairs", "data"), ("val_pairs", "val_data")):
        if isinstance(metrics.get(key), int) and metrics[key] > 0:
            counts.setdefault(role, f"{metrics[key]:,} {'training' if role == 'data' else 'held-out'} pairs")
    return counts


def model_card(info: dict[str, Any], model_dir: Path, final: Path | None = None) -> str:
    """The whole ``README.md``: YAML front matter, then Markdown. ``model_dir`` holds the files
    (config.json, the tokenizer); ``final`` is the directory's name and path for people."""
    import yaml

    final = final or model_dir
    stage = str(info.get("stage", "")) or "rlhfkit"
    name = final.name
    meta = front_matter(info, model_dir, final.name)
    what = STAGES.get(stage, (f"the `{stage}` stage", "", []))[0]
    what = ALGO_WORDS.get(str((info.get("config") or {}).get("algo", "")), what) if stage == "ppo" else what
    versions = info.get("versions") or {}
    parent = next((e for role in PARENT_ROLES for e in _inputs(info, role)), None)
    lines = [f"# {name}", ""]
    start = f"Made with rlhfkit `{stage}`: {what}"
    lines += [start + (f", starting from `{parent['path']}`." if parent else "."), ""]

    # results
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {WORDS.get(k, k)} | {_number(v)} |" for k, v in metrics.items()]
        lines.append("")
    reward = info.get("reward")
    if isinstance(reward, dict) and "gain" in reward:
        lines += ["### Reward normalisation", "",
                  "The score head's raw output r is normalised as **gain · r + bias**, which has mean 0 and standard deviation 1 "
                  f"on the reference completions ({_number(reward.get('n', '?'))} of them, from `{reward.get('source', '?')}`): "
                  "this is the score that `rlhfkit ppo` and `rlhfkit eval` use.", "",
                  "| | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {_number(reward[k])} |" for k in ("gain", "bias", "raw_mean", "raw_std", "n") if k in reward]
        lines.append("")
    ppo = info.get("ppo")
    if isinstance(ppo, dict):
        rows = [("PPO steps", ppo.get("steps")), ("final β (KL coefficient)", ppo.get("kl_coef"))]
        r = ppo.get("reward") or {}
        rows += [("reward", r.get("spec")), ("reward gain", r.get("gain")), ("reward bias", r.get("bias"))]
        lines += (
            ["### PPO", "", "| | value |", "|---|---|"]
            + [f"| {k} | {_cell(_number(v))} |" for k, v in rows if v is not None]
            + [""]
        )

    ilql = info.get("ilql")
    if isinstance(ilql, dict):
        lines += ["### ILQL heads", "",
                  f"`{ilql.get('heads')}` holds the target Q and the V head. `rlhfkit collect` and `rlhfkit eval` sample this "
                  f"directory from **log_softmax(logits) + β·(Q − V)** with β = {_number(ilql.get('beta'))}; plain transformers "
                  "loads the behaviour-cloned language model π_β alone, without the shift.", ""]  # fmt: skip

    # data
    inputs = {role: entries for role, entries in (info.get("inputs") or {}).items() if entries}
    if inputs:
        counts = _record_counts(info)
        lines += ["## Inputs", "", "| role | path | records | sha256 |", "|---|---|---|---|"]
        for role, entries in inputs.items():
            for e in entries:
                lines.append(
                    f"| {role} | `{_cell(e.get('path'))}` | {counts.get(role, '')} | {e.get('sha256') or '(not a local file)'} |"
                )
        val = ((info.get("data") or {}).get("val") or {}).get("examples")
        if "val_data" not in inputs and isinstance(val, int):
            lines.append(f"| val (held out from data) | | {val:,} held-out examples | |")
        lines.append("")

    # how it was made
    lines += ["## Training", ""]
    lines.append(f"- stage: `{stage}`, rlhfkit {versions.get('rlhfkit', '?')}, torch {versions.get('torch', '?')}, "
                 f"transformers {versions.get('transformers', '?')}, Python {versions.get('python', '?')}")  # fmt: skip
    if info.get("started"):
        lines.append(f"- started {info['started']}, finished {info.get('finished', '?')}")
    command = _command(list(info.get("argv") or []))
    if command:
        lines += ["- command:", "", "```bash", command, "```"]
    config = info.get("config") or {}
    if config:
        lines += [
            "",
            "<details><summary>Every option (rlhfkit.json has them too)</summary>",
            "",
            "| option | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | `{_cell(v)}` |" for k, v in config.items()]
        lines += ["", "</details>"]
    lines.append("")

    lines += ["## Usage", "", "A plain transformers directory (safetensors); rlhfkit is not needed to load it.", ""]
    lines += _usage(info, model_dir, final)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n" + "\n".join(lines).rstrip() + "\n"


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    path = model_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("chat_template")) if path.is_file() else False
    except json.JSONDecodeError:
        return False


def _usage(info: dict[str, Any], model_dir: Path, final: Path) -> list[str]:
    """Runnable code: generate with a policy, or score one completion with a reward model."""
    path = str(final)
    from rlhfkit.chat import CHATML_TEMPLATE

    template = _has_chat_template(model_dir)
    chatml = f"CHATML = {CHATML_TEMPLATE!r}  # the tokenizer has no chat template: rlhfkit renders chats as ChatML"
    chat = "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True"
    chat += ")" if template else ", chat_template=CHATML)"
    reward = info.get("reward") if isinstance(info.get("reward"), dict) else None
    is_rm = reward is not None or _pipeline_from_config(model_dir) == "text-classification"
    code = ["```python", "import torch"]
    if is_rm:
        gain, bias = (reward or {}).get("gain", 1.0), (reward or {}).get("bias", 0.0)
        code += [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f"path = {path!r}",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForSequenceClassification.from_pretrained(path).eval()",
            *([] if template else [chatml]),
            'messages = [{"role": "user", "content": "What is the capital of France?"}]',
            "prompt = " + chat,
            "# prompt + completion + EOS, the ids rlhfkit scores; one sequence, unpadded: the score is read at its last token",
            'ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]'
            ' + tokenizer(" Paris.", add_special_tokens=False)["input_ids"]',
            "ids = ids + [tokenizer.eos_token_id]",
            "with torch.no_grad():",
            "    raw = model(torch.tensor([ids])).logits[0, 0].item()",
            f"score = {gain!r} * raw {'-' if bias < 0 else '+'} {abs(bias)!r}"
            "  # normalised (see above): what rlhfkit ppo and eval use",
            "print(score)",
        ]
    else:
        code += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"path = {path!r}",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForCausalLM.from_pretrained(path).eval()",
            *([] if template else [chatml]),
            'messages = [{"role": "user", "content": "What is the capital of France?"}]',
            "prompt = " + chat,
            'inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")',
            "with torch.no_grad():",
            "    output = model.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.7)",
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    code.append("```")
    where = "Once the directory is on the Hub (`hf upload NAME " + path + "`), `path` can be its hub id."
    return code + ["", where]
