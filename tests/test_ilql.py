"""ilql: Q and V heads on the policy, rewards from comparisons or scored samples, the saved directory
(a plain causal LM + ilql_heads.safetensors), collect and eval sampling from the advantage-shifted
logits, an end-to-end run whose shifted policy says the preferred word more often, LoRA, exact
resume, torchrun and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_same_weights, measured_metrics, sigkill_and_resume, stop_and_resume, subprocess_env, write_jsonl
from preference_rows import WORD, comparisons, scored_samples
from rlhfkit import ilql_heads
from rlhfkit.training import read_metrics

POLITENESS = f"python:{REPO / 'examples' / 'scripted_rewards.py'}:politeness"  # 1 for a completion with "please"
EVAL_PROMPTS = [{"id": f"e{i}", "prompt": f"Tell me about the {w}."} for i, w in enumerate(("river", "dog", "book", "city"))]


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "cmp.jsonl", comparisons(24))


@pytest.fixture()
def eval_prompts(tmp_path):
    return write_jsonl(tmp_path / "eval_prompts.jsonl", EVAL_PROMPTS)


def ilql(cli, *args):
    result = cli("ilql", *args, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def word_rate(cli, policy: Path, prompts: Path, out: Path, *extra: str, k: int = 128) -> int:
    """How many of 4 × k sampled completions say WORD (collect, fixed seeds)."""
    result = cli("collect", "--policy", policy, "--prompts", prompts, "--k", str(k), "--max-new-tokens", "12", "--out", out,
                 "--device", "cpu", *extra)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return sum(WORD in c["text"] for line in out.read_text().splitlines() for c in json.loads(line)["completions"])


# --- the heads and the shifted policy ------------------------------------------------------------------


def test_fresh_heads_leave_the_policy_as_it_is_and_trained_heads_shift_it_by_beta_times_the_advantage(tiny_llama):
    torch.manual_seed(0)
    q, v = ilql_heads.make_heads(tiny_llama, seed=0)
    shifted = ilql_heads.AdvantageShiftedLM(tiny_llama.eval(), q, v, beta=2.0).eval()
    ids = torch.randint(0, 400, (2, 6))
    with torch.no_grad():
        plain = tiny_llama(input_ids=ids).logits
        assert torch.allclose(shifted(input_ids=ids).logits.softmax(-1), plain.softmax(-1), atol=1e-6)  # Q = V = 0
        for head in (q, v):
            torch.nn.init.normal_(head.net[2].weight, std=0.5)
        out = shifted(input_ids=ids, logits_to_keep=2)
        hidden = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -2:]
        expected = torch.log_softmax(plain[:, -2:], -1) + 2.0 * (q(hidden) - v(hidden).unsqueeze(-1))
    assert out.logits.shape == (2, 2, plain.size(-1)) and out.hidden_states is None
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(out.logits.softmax(-1), plain[:, -2:].softmax(-1), atol=1e-3)


def test_comparisons_become_rewards_by_their_outcomes_and_scored_samples_keep_theirs(tokenizer, tmp_path):
    from rlhfkit.config import ILQLConfig
    from rlhfkit.stages import ilql as ilql_stage

    cmp = write_jsonl(tmp_path / "cmp.jsonl", comparisons(3, k=4) + [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    config = ILQLConfig(policy="x", data=str(cmp), out="o", val_fraction=0)
    train, _, stats, _, _ = ilql_stage.load_data(config, tokenizer)
    assert stats.source == "comparisons" and stats.sequences == 3 * 4 + 2
    assert sorted(r for *_, r in train) == [-1.0] * 7 + [1.0] * 7  # a ranking of 2 good over 2 bad, and a pair
    samples = write_jsonl(tmp_path / "scored.jsonl", scored_samples(3, k=4, field="reward"))
    train, _, stats, _, _ = ilql_stage.load_data(ILQLConfig(policy="x", data=str(samples), out="o", val_fraction=0), tokenizer)
    assert stats.source == "samples" and [r for *_, r in train] == [1.0, 0.0] * 6
    batch, rewards = ilql_stage.collate(train[:2], tokenizer.pad_token_id)
    lengths = batch.response_mask.sum(1).tolist()
    assert rewards[0, lengths[0] - 1] == 1.0 and rewards.sum() == 1.0  # the reward on the last token only


# --- end to end ---------------------------------------------------------------------------------------


def test_end_to_end_the_shifted_policy_prefers_what_the_comparisons_preferred(cli, tiny_llama_dir, data, eval_prompts, tmp_path):
    out = tmp_path / "ilql"
    result = ilql(cli, "--policy", tiny_llama_dir, "--data", data, "--out", out, "--lr", "1e-3", "--epochs", "4",
                  "--batch-size", "8", "--val-fraction", "0.2", "--beta", "4", "--polyak", "0.2",
                  "--eval-every", "10")  # fmt: skip
    assert result["train"]["sequences"] == 80 and result["steps"] == 40
    evals = [r for r in read_metrics(out) if "loss/eval" in r]
    assert evals[0]["step"] == 0 and evals[-1]["loss/eval"] < evals[0]["loss/eval"] - 0.5, evals
    last = [r for r in read_metrics(out) if "loss/train" in r][-1]
    for key in ("loss/q", "loss/v", "loss/cql", "loss/bc", "ilql/q", "ilql/v", "ilql/advantage", "train/grad_norm"):
        assert key in last, key
    # the directory: a plain causal LM (π_β), the heads beside it, and rlhfkit.json saying so
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["stage"] == "ilql" and info["ilql"]["heads"] == "ilql_heads.safetensors" and info["ilql"]["beta"] == 4.0
    assert set(load_file(str(out / "ilql_heads.safetensors"))) >= {"target_q.net.2.weight", "v.net.2.weight"}
    # collect samples the shifted policy; the same directory without its heads is π_β
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    (plain / "ilql_heads.safetensors").unlink()
    shifted_count = word_rate(cli, out, eval_prompts, tmp_path / "shifted.jsonl")
    plain_count = word_rate(cli, plain, eval_prompts, tmp_path / "plain.jsonl")
    # measured: 115 vs 71 of 512 (with --seed 1 to 4: 140/80, 128/71, 157/69, 150/63; 4 × 32 samples were too few)
    assert shifted_count >= plain_count + 32, (shifted_count, plain_count)
    # a completion depends only on its prompt and seed: batch size 1 gives the same completions (ids and texts;
    # the logprob column may differ in its last rounded digit, as for any model batched differently)
    word_rate(cli, out, eval_prompts, tmp_path / "batched.jsonl", k=32)
    word_rate(cli, out, eval_prompts, tmp_path / "one_by_one.jsonl", "--batch-size", "1", k=32)

    def texts(path: Path) -> list[tuple[str, str]]:
        return [(c["id"], c["text"]) for line in path.read_text().splitlines() for c in json.loads(line)["completions"]]

    assert texts(tmp_path / "one_by_one.jsonl") == texts(tmp_path / "batched.jsonl")


def test_eval_scores_an_ilql_model_like_any_policy(cli, tiny_llama_dir, data, eval_prompts, tmp_path):
    out = tmp_path / "ilql"
    ilql(cli, "--policy", tiny_llama_dir, "--data", data, "--out", out, "--lr", "1e-3", "--max-steps", "10", "--batch-size", "8",
         "--val-fraction", "0", "--beta", "4", "--polyak", "0.5")  # fmt: skip
    result = cli("eval", "--policy", f"ilql={out}", "--baseline", f"base={tiny_llama_dir}", "--rm", POLITENESS, "--prompts",
                 eval_prompts, "--max-new-tokens", "8", "--n-samples", "2", "--device", "cpu",
                 "--out", tmp_path / "eval")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    kls = [c["kl"] for s in samples for c in s["completions"] if c["policy"] == "ilql"]
    assert len(kls) == 8 and all(k is not None for k in kls) and any(abs(k) > 1e-3 for k in kls)  # its own distribution


def test_lora_trains_adapters_and_heads(cli, tiny_llama_dir, data, tmp_path):
    out = tmp_path / "lora"
    ilql(cli, "--policy", tiny_llama_dir, "--data", data, "--out", out, "--lora", "--lora-r", "4", "--lr", "1e-2",
         "--max-steps", "3", "--batch-size", "8", "--val-fraction", "0")  # fmt: skip
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    trained = load_file(str(checkpoint / "ilql.safetensors"))
    assert all("lora_" in k or k.startswith(("q.", "v.")) for k in trained) and any("lora_" in k for k in trained)
    assert (checkpoint / "target_q.safetensors").is_file() and ilql_heads.has_heads(out)


def test_resume_from_a_checkpoint_continues_exactly(cli, tiny_llama_dir, data, tmp_path):
    args = ["ilql", "--policy", tiny_llama_dir, "--data", data, "--lr", "1e-3", "--batch-size", "4", "--max-steps", "6",
            "--save-every", "3", "--keep-checkpoints", "0", "--val-fraction", "0.2", "--eval-every", "2", "--polyak", "0.3",
            "--device", "cpu"]  # fmt: skip
    full, run, resumed = stop_and_resume(cli, args, tmp_path, step=3)
    assert json.loads(resumed.stdout)["resumed_from"] == 3
    assert_same_weights(full, run, ("model.safetensors", "ilql_heads.safetensors"))  # the target Q̂ too: it is checkpointed
    assert measured_metrics(run) == measured_metrics(full)


@pytest.mark.slow  # two subprocesses
def test_sigkill_and_resume(tiny_llama_dir, data, tmp_path):
    args = ["ilql", "--policy", tiny_llama_dir, "--data", data, "--lr", "1e-3", "--batch-size", "2", "--epochs", "2",
            "--save-every", "2", "--val-fraction", "0.2", "--device", "cpu"]  # fmt: skip
    full, killed = sigkill_and_resume(tmp_path, args, step=4)
    assert_same_weights(full, killed, ("model.safetensors", "ilql_heads.safetensors"), exact=False)


@pytest.mark.slow  # subprocesses
def test_torchrun_two_processes_match_one_process(cli, tiny_llama_dir, data, tmp_path):
    """2 ranks × 4 sequences is the step of 1 process × 8 (the same sequences per step; losses are
    token means per rank, so the match is close, not exact)."""
    common = ["--policy", str(tiny_llama_dir), "--data", str(data), "--lr", "1e-3", "--max-steps", "3", "--val-fraction", "0.2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlhfkit", "ilql",
           *common, "--out", str(tmp_path / "ddp"), "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 1
    assert ilql_heads.has_heads(tmp_path / "ddp") and (tmp_path / "ddp" / "rlhfkit.json").is_file()
    single = ilql(cli, *common, "--out", tmp_path / "single", "--batch-size", "8")
    ddp_result = json.loads(proc.stdout.splitlines()[-1])
    assert ddp_result["metrics"]["loss/eval"] == pytest.approx(single["metrics"]["loss/eval"], rel=0.02)


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tau", "1"], "--tau: must be in (0, 1)"),
        (["--polyak", "0"], "--polyak: must be in (0, 1]"),
        (["--gamma", "1.5"], "--gamma: must be in [0, 1]"),
        (["--data", "UNSCORED"], "unscored.jsonl:1: field 'completions.0.score': missing"),
        (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    ],
)
def test_cli_errors_are_one_line(cli, tiny_llama_dir, data, tmp_path, extra, message):
    unscored = scored_samples(2)
    del unscored[0]["completions"][0]["score"]
    files = {
        "UNSCORED": str(write_jsonl(tmp_path / "unscored.jsonl", unscored)),
        "missing.jsonl": str(tmp_path / "missing.jsonl"),
    }
    extra = [files.get(e, e) for e in extra]
    result = cli("ilql", "--policy", tiny_llama_dir, "--data", data, "--out", tmp_path / "out", "--device", "cpu", *extra)
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
