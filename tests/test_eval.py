"""rlhfkit eval: the judge protocol with scripted judges, the report's fields, the plots, checkpoints
of a ppo run, and the error paths. The aggregation's hand-computed cases are in test_stats.py."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from rlhfkit.judge import judged_outcome, positions
from rlhfkit.rankings import Judgement
from rlhfkit.seeds import row_seed
from rlhfkit.stages.eval_sampling import completion_id
from rlhfkit.stats import mean_std, outcome, rm_accuracy, wilson_interval, win_rate
from rlhfkit.testing import save_tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    {"id": "p1", "prompt": "What color is the sky?"},
    {"id": "p2", "messages": [{"role": "user", "content": "Name a big city."}]},
    {"id": "p3", "prompt": "Tell me a story about a cat."},
]
DEMOS = [
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"text": "The cat sat on the mat."},
]

# the reward model: the number of words (python:FILE:FUNCTION, a scripted reward)
REWARD = "def words(prompts, completions):\n    return [float(len(c.split())) for c in completions]\n"

# a judge that keeps what it was sent and ranks by length in characters (longer is better, equal = tie)
RECORDING_JUDGE = """
import json, sys
seen = open(sys.argv[1], "w")
for line in sys.stdin:
    seen.write(line)
    sample = json.loads(line)
    by_len = {}
    for c in sample["completions"]:
        by_len.setdefault(len(c["text"]), []).append(c["id"])
    ranking = [by_len[n] if len(by_len[n]) > 1 else by_len[n][0] for n in sorted(by_len, reverse=True)]
    print(json.dumps({"prompt_id": sample["prompt_id"], "ranking": ranking, "annotator": "by-length"}))
"""


# --- the judge's outcomes, seeds and ids ------------------------------------------------------


def test_judged_outcomes_from_rankings():
    ranking = Judgement(line=1, prompt_id="p", tiers=(("a",), ("b", "c")), below=("d", "e"))
    ranks = positions(ranking)
    assert judged_outcome(ranks, "a", "b") == 1.0 and judged_outcome(ranks, "c", "a") == 0.0
    assert judged_outcome(ranks, "b", "c") == 0.5  # a tie
    assert judged_outcome(ranks, "c", "d") == 1.0  # best-of-K: the rest is below every tier
    assert judged_outcome(ranks, "d", "e") is None  # ... but unordered among itself
    assert judged_outcome(ranks, "a", "zzz") is None  # not ranked


def test_seeds_are_shared_and_ids_are_blind():
    assert row_seed(0, "p1", 0, scheme="sha63") == row_seed(0, "p1", 0, scheme="sha63") != row_seed(0, "p1", 1, scheme="sha63")
    assert row_seed(0, "p1", 0, scheme="sha63") != row_seed(1, "p1", 0, scheme="sha63")
    a, b = completion_id("p1", "sft", 0, 0), completion_id("p1", "ppo", 0, 0)
    assert a != b and a.startswith("p1-") and "sft" not in a and "ppo" not in b


# --- end to end on tiny models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    other = save_tiny_model(root / "other", arch="llama", seed=1)
    (root / "reward.py").write_text(REWARD)
    (root / "judge.py").write_text(textwrap.dedent(RECORDING_JUDGE))
    return {
        "root": root,
        "sft": tiny_llama_dir,
        "other": other,
        "prompts": write_jsonl(root / "prompts.jsonl", PROMPTS),
        "demos": write_jsonl(root / "demos.jsonl", DEMOS),
        "rm": f"python:{root / 'reward.py'}:words",
        "judge": f"{sys.executable} {root / 'judge.py'} {root / 'judge_input.jsonl'}",
    }


def base_args(s: dict, *extra: str) -> list[str]:
    return ["eval", "--baseline", f"sft={s['sft']}", "--prompts", s["prompts"], "--max-new-tokens", "6", "--seed", "3",
            "--bootstrap", "50", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def report(setup):
    """One full run: two policies (one identical to the baseline), RM, judge, best-of-3, demos."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    s = setup
    out = s["root"] / "out"
    args = base_args(
        s, "--policy", f"same={s['sft']}", "--policy", str(s["other"]), "--rm", s["rm"], "--judge", s["judge"],
        "--best-of", "3", "--n-samples", "2", "--demos", s["demos"], "--out", out,
    )  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), out


def read_samples(out: Path) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}


def by_policy(sample: dict, policy: str) -> dict[int, dict]:
    return {c["sample"]: c for c in sample["completions"] if c["policy"] == policy}


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_report_fields(report):
    r, out = report
    assert set(r) >= {"prompts", "n_samples", "sampling", "inputs", "interval", "baseline", "policies", "best_of",
                      "checkpoints", "elo", "agreement", "judge", "throughput", "files"}  # fmt: skip
    assert (r["prompts"], r["n_samples"]) == (3, 2)
    assert r["sampling"] == {
        "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 6, "seed": 3, "chat_template": "auto", "kl_temperature": 0.7
    }  # fmt: skip
    assert [p["name"] for p in r["policies"]] == ["same", "other"] and r["baseline"]["name"] == "sft"
    for p in [r["baseline"], *r["policies"], r["best_of"]]:
        assert set(p) >= {"name", "path", "samples", "score", "kl", "length", "stopped", "perplexity"}
        assert p["samples"] == 6 and 0 <= p["length"]["mean"] <= 6 and 0 <= p["stopped"] <= 1
    for p in [r["baseline"], *r["policies"]]:
        assert 1 < p["perplexity"] < 1e6  # a random tiny model: high but finite
    same, other = r["policies"]
    # the same weights with the same seeds: the same completions, KL exactly 0, every match a tie
    assert same["kl"] == {"mean": 0.0, "std": 0.0} and same["score"] == r["baseline"]["score"]
    assert same["perplexity"] == pytest.approx(r["baseline"]["perplexity"])
    for judge in ("rm", "judge"):
        w = same["win_rate"][judge]
        assert (w["rate"], w["wins"], w["ties"], w["losses"], w["n"]) == (0.5, 0, 6, 0, 6)
        assert (w["ci_low"], w["ci_high"]) == pytest.approx(wilson_interval(3, 6))
    assert other["kl"]["mean"] != 0 and math.isfinite(other["kl"]["mean"])
    assert set(other["win_rate"]) == {"rm", "judge"} and set(other["agreement"]) == {"accuracy", "pairs"}
    best = r["best_of"]
    assert best["name"] == "best-of-3" and best["kl_analytic"] == pytest.approx(math.log(3) - 2 / 3)
    assert [c["n"] for c in best["curve"]] == [1, 2, 3] and best["curve"][-1]["score"] == pytest.approx(best["score"]["mean"])
    assert all(a["score"] <= b["score"] for a, b in zip(best["curve"], best["curve"][1:]))  # max over more samples
    assert r["elo"]["rm"]["ratings"]["sft"]["rating"] == pytest.approx(1000.0)  # the baseline is the anchor
    assert set(r["elo"]["judge"]["ratings"]) == {"sft", "same", "other", "best-of-3"}
    assert r["judge"]["prompts_judged"] == 3 and r["checkpoints"] == []
    assert json.loads((out / "report.json").read_text()) == r


def test_rm_win_rate_and_kl_recomputed_from_samples(report):
    r, out = report
    samples = read_samples(out)
    assert len(samples) == 3
    outcomes = []
    for sample in samples.values():
        base, other = by_policy(sample, "sft"), by_policy(sample, "other")
        for j in (0, 1):
            assert base[j]["score"] == len(base[j]["text"].split())  # the scripted reward
            outcomes.append(outcome(other[j]["score"], base[j]["score"]))
        same = by_policy(sample, "same")
        for j in (0, 1):  # the baseline's weights under another name: the same completions
            assert _without(same[j], "id", "policy") == _without(base[j], "id", "policy")
        for j in (0, 1):  # best-of-n's answers carry no log-prob: the base model's is not best-of-n's
            assert by_policy(sample, "best-of-3")[j]["logprob"] is None and isinstance(base[j]["logprob"], float)
    expected = win_rate(outcomes)
    assert r["policies"][1]["win_rate"]["rm"] == expected
    kls = [c["kl"] for s in samples.values() for c in s["completions"] if c["policy"] == "other"]
    assert r["policies"][1]["kl"] == pytest.approx(mean_std(kls))


def test_judge_protocol(report, setup):
    r, out = report
    sent = [json.loads(line) for line in (setup["root"] / "judge_input.jsonl").read_text().splitlines()]
    assert sorted(s["prompt_id"] for s in sent) == ["p1", "p2", "p3"]
    samples = read_samples(out)
    for s in sent:
        # blind: no model names; all 4 models x 2 samples; the ids are those of samples.jsonl
        assert all("policy" not in c for c in s["completions"]) and len(s["completions"]) == 8
        assert {c["id"] for c in s["completions"]} == {c["id"] for c in samples[s["prompt_id"]]["completions"]}
        assert s["prompt"] == samples[s["prompt_id"]]["prompt"]
    # the judge prefers longer texts: recompute its verdicts and the RM's accuracy on them
    outcomes, pairs = [], []
    for sample in samples.values():
        base, other = by_policy(sample, "sft"), by_policy(sample, "other")
        for j in (0, 1):
            verdict = outcome(len(other[j]["text"]), len(base[j]["text"]))
            outcomes.append(verdict)
            if verdict != 0.5:
                winner, loser = (other[j], base[j]) if verdict == 1.0 else (base[j], other[j])
                pairs.append((winner["score"], loser["score"]))
    assert r["policies"][1]["win_rate"]["judge"] == win_rate(outcomes)
    assert r["policies"][1]["agreement"] == rm_accuracy(pairs)
    # the files are the ordinary formats: rank-import reads the judge's answer against samples.jsonl
    from rlhfkit.data.records import load, parse_samples
    from rlhfkit.rankings import SampleIndex, load_rankings

    loaded = load(out / "samples.jsonl", parse_samples)
    rankings = load_rankings(str(out / "judge_rankings.jsonl"), SampleIndex(loaded, loaded.lines))
    assert len(rankings.judgements) == 3 and rankings.format == "native"


def test_plots_and_report_md(report):
    import matplotlib.image

    r, out = report
    assert set(r["files"]["plots"]) == {"reward_vs_kl", "winrate", "elo"}
    for name in ("reward_vs_kl.png", "winrate.png", "elo.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    md = (out / "report.md").read_text()
    for text in ("| same |", "| other |", "| best-of-3 |", "![winrate](winrate.png)", "Elo (judged by judge)", "Best-of-n"):
        assert text in md


def test_without_out_prints_json_only(setup, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(*base_args(setup, "--policy", str(setup["other"]), "--max-prompts", "1"))
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["prompts"] == 1 and "files" not in r and list(tmp_path.iterdir()) == []
    assert r["baseline"]["score"] is None and r["policies"][0]["win_rate"] == {} and r["elo"] == {}


def test_reward_model_directory(setup, cli, tokenizer, tmp_path):
    """A one-label sequence classifier as the judge, with its recorded normalisation applied."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(setup["sft"], num_labels=1))
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    args = base_args(setup, "--policy", f"same={setup['sft']}", "--rm", tmp_path / "rm", "--max-prompts", "2")
    raw = json.loads(cli(*args).stdout)
    (tmp_path / "rm" / "rlhfkit.json").write_text(json.dumps({"reward": {"gain": 2.0, "bias": 1.0}}))
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["baseline"]["score"]["mean"] == pytest.approx(2 * raw["baseline"]["score"]["mean"] + 1, abs=1e-5)
    assert r["baseline"]["score"]["std"] == pytest.approx(2 * raw["baseline"]["score"]["std"], abs=1e-5)
    assert r["policies"][0]["score"] == r["baseline"]["score"] and r["policies"][0]["win_rate"]["rm"]["ties"] == 2


# --- --checkpoints: a ppo run's checkpoints -----------------------------------------------------


def fake_ppo_run(run: Path, policy_dir: Path, model: torch.nn.Module, step: int, config: dict) -> None:
    from rlhfkit.training import save_checkpoint

    state = {"config": {"policy": str(policy_dir), **config}}
    save_checkpoint(run, step, modules={"policy": model}, optimizers={}, schedulers={}, state=state, keep=10)


def test_checkpoints_full_and_lora(setup, cli, tmp_path):
    from rlhfkit.models import apply_lora, load_model
    from rlhfkit.stages.eval_sampling import load_checkpoint_policy

    run = tmp_path / "run"
    base = load_model(str(setup["sft"]))
    fake_ppo_run(run, setup["sft"], base, 1, {})  # step 1: the base weights themselves
    lora = apply_lora(load_model(str(setup["sft"])), r=4, alpha=8)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(0))
    fake_ppo_run(run, setup["sft"], lora, 2, {"lora": True, "lora_r": 4, "lora_alpha": 8})  # only the adapters

    merged, _ = load_checkpoint_policy(
        str(run), run / "checkpoints" / "step-000002", device="cpu", dtype=torch.float32, trust_remote_code=False
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(merged(input_ids=ids).logits, lora.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    result = cli(
        *base_args(setup, "--policy", str(setup["other"]), "--rm", setup["rm"], "--checkpoints", run, "--out", tmp_path / "out")
    )
    assert result.exit_code == 0, result.stderr
    checkpoints = json.loads(result.stdout)["checkpoints"]
    assert [c["step"] for c in checkpoints] == [1, 2]
    assert checkpoints[0]["kl"] == {"mean": 0.0, "std": 0.0}  # the base weights: identical samples
    assert checkpoints[1]["kl"]["mean"] != 0.0 and checkpoints[1]["score"] is not None
    assert (tmp_path / "out" / "reward_vs_kl.png").read_bytes()[:8] == PNG_SIGNATURE


# --- errors: one line, exit 1 -------------------------------------------------------------------


def test_failing_judge_is_one_line(setup, cli, tmp_path):
    script = tmp_path / "bad_judge.py"
    script.write_text("import sys\nsys.stdin.read()\nprint('the judge is out to lunch', file=sys.stderr)\nsys.exit(3)\n")
    result = cli(
        *base_args(setup, "--policy", str(setup["other"]), "--judge", f"{sys.executable} {script}", "--max-prompts", "1")
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert "exited with status 3: the judge is out to lunch" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert not any("out to lunch" in line for line in result.stderr.strip().splitlines()[:-1])  # not repeated above
    slow = tmp_path / "slow_judge.py"
    slow.write_text("import sys, time\nsys.stdin.read()\ntime.sleep(30)\n")
    judge = ("--judge", f"{sys.executable} {slow}", "--judge-timeout", "0.5")
    result = cli(*base_args(setup, "--policy", str(setup["other"]), *judge, "--max-prompts", "1"))
    assert result.exit_code == 1 and "no answer within 0.5 s" in result.stderr


def test_malformed_judge_output_is_one_line(setup, cli, tmp_path):
    script = tmp_path / "wrong_ids.py"
    script.write_text(
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    s = json.loads(line)\n"
        "    print(json.dumps({'prompt_id': s['prompt_id'], 'ranking': ['made-up', s['completions'][0]['id']]}))\n"
    )
    result = cli(
        *base_args(setup, "--policy", str(setup["other"]), "--judge", f"{sys.executable} {script}", "--max-prompts", "1")
    )
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "invalid rankings" in line and "field 'ranking.0'" in line and "unknown completion id 'made-up'" in line
    script.write_text("import sys\nsys.stdin.read()\nprint('not json')\n")
    result = cli(
        *base_args(setup, "--policy", str(setup["other"]), "--judge", f"{sys.executable} {script}", "--max-prompts", "1")
    )
    assert result.exit_code == 1 and "invalid JSON" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy", "x", "--judge", "no-such-judge-program --flag"], "program 'no-such-judge-program' not found"),
        (["--policy", "x", "--best-of", "4"], "--best-of: needs --rm"),
        (["--policy", "sft=elsewhere"], "two models are called 'sft'"),
        (["--rm", "python:m:f"], "--policy: at least one policy"),
        (["--policy", "x", "--interval", "bootstrap", "--bootstrap", "0"], "--bootstrap"),
        (["--policy", "ppo=./no/such/dir"], "--policy ppo=./no/such/dir: no such model directory"),
    ],
)
def test_option_errors_before_any_model_is_loaded(setup, cli, extra, message):
    result = cli(*base_args(setup, *extra))
    assert result.exit_code == 1 and message in result.stderr, result.stderr
