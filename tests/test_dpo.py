"""dpo: the comparisons train-rm reads (groups, split), the reference computed once and cached, an
end-to-end run whose held-out preference loss falls, LoRA, exact resume, torchrun and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_weights, measured_metrics, sigkill_and_resume, stop_and_resume, subprocess_env, write_jsonl
from preference_rows import comparisons
from rlhfkit import rm_data
from rlhfkit.data import records
from rlhfkit.stages import preference_data
from rlhfkit.training import Dist, read_metrics


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "cmp.jsonl", comparisons(24))


def dpo(cli, *args):
    result = cli("dpo", *args, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --- data ---------------------------------------------------------------------------------------------


def test_groups_split_and_ties_follow_train_rm(tokenizer, tmp_path):
    rows = comparisons(10)
    rows.append({"prompt": "Tell me about the sky.", "chosen": "a", "rejected": "b", "margin": 0})  # a tie
    rows.append({"prompt": "Tell me about the sky.", "chosen": "blue sky", "rejected": "red"})  # no group: its own element
    path = write_jsonl(tmp_path / "cmp.jsonl", rows)
    train, val, skipped = preference_data.load_comparisons(str(path), "", 0.2, seed=3)
    expected = rm_data.split_by_prompt(list(records.load(str(path), records.parse_comparison)), 0.2, 3)
    assert (train, val) == expected and skipped == 0  # train-rm's split, the same prompts held out
    encode = preference_data.Encoder(tokenizer)
    groups, stats = preference_data.build_groups(train + val, encode, max_length=1024)
    assert stats.dropped_ties == 1 and stats.pairs == 10 * 4 + 1 and stats.elements == 11
    ranking = groups[0]  # a ranking of 4 (2 good beat 2 bad): 4 pairs over 4 distinct completions, each encoded once
    assert len(ranking.completions) == 4 and ranking.num_pairs == 4
    assert ranking.outcomes() == [1.0, -1.0, -1.0, 1.0]  # in order of first appearance: good 1, bad 1, bad 2, good 2
    assert ranking.prompt == tuple(encode.prompt(rows[0]["prompt"]))
    from rlhfkit.chat import encode_completion

    assert ranking.completions[0] == tuple(encode_completion(tokenizer, rows[0]["chosen"], stopped=True))  # ends with EOS
    cut = records.parse_comparison({"prompt": "p", "chosen": "a b", "rejected": "a b c", "rejected_finish_reason": "length"})
    (group,), _ = preference_data.build_groups([cut], encode, max_length=1024)
    assert group.completions[0][-1] == tokenizer.eos_token_id  # stopped: ends with EOS; cut off at the length limit: not
    assert group.completions[1] == tuple(encode_completion(tokenizer, "a b c", stopped=False))
    _, short = preference_data.build_groups(train, encode, max_length=len(ranking.prompt) + 2)
    assert short.pairs == 0 and short.dropped_too_long == sum(c.margin != 0 for c in train)


def test_collate_lays_out_prompt_and_completion_like_generation():
    batch = preference_data.collate([((5, 6), (7,)), ((9,), (3, 4))], pad_token_id=0)
    assert batch.query.tolist() == [[5, 6], [0, 9]] and batch.query_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.response.tolist() == [[7, 0], [3, 4]] and batch.response_mask.tolist() == [[1, 0], [1, 1]]


def test_step_batches_worked_example():
    """5 elements, one process, batch size 2, grad-accum 2: 2 steps an epoch (2 micro-batches, then 1)."""
    batches = preference_data.StepBatches(5, Dist(), batch_size=2, grad_accum=2, seed=3)
    assert batches.steps_per_epoch == 2
    epoch0 = preference_data.epoch_batches(5, Dist(), 2, seed=3, epoch=0)
    assert batches(0) == epoch0[:2] and batches(1) == epoch0[2:] and len(batches(1)[0]) == 1
    assert batches(2) == preference_data.epoch_batches(5, Dist(), 2, seed=3, epoch=1)[:2] != epoch0[:2]
    assert batches(1) == epoch0[2:]  # a function of the step alone: going back to an earlier epoch is the same


# --- end to end ---------------------------------------------------------------------------------------


def test_end_to_end_the_held_out_preference_loss_falls(cli, tiny_llama_dir, data, tmp_path):
    out = tmp_path / "dpo"
    result = dpo(cli, "--policy", tiny_llama_dir, "--data", data, "--out", out, "--lr", "1e-3", "--epochs", "3",
                 "--batch-size", "4", "--val-fraction", "0.2", "--eval-every", "5", "--save-every", "5")  # fmt: skip
    assert result["train"]["pairs"] == 80 and result["val"]["pairs"] == 16 and result["steps"] == 15
    rows = read_metrics(out)
    evals = [r for r in rows if "loss/eval" in r]
    assert [r["step"] for r in evals] == [0, 5, 10, 15]
    assert evals[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference: h = 0
    assert evals[-1]["loss/eval"] < evals[0]["loss/eval"] - 0.05, evals
    assert evals[-1]["eval/accuracy"] >= 0.75 and evals[-1]["eval/margin"] > 0
    train = [r for r in rows if "loss/train" in r]
    assert train[0]["loss/train"] == pytest.approx(math.log(2), abs=1e-4) and train[-1]["rewards/margins"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "train/lr", "train/grad_norm", "perf/pairs_per_s"):  # fmt: skip
        assert key in train[-1], key
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["stage"] == "dpo" and info["dpo"]["beta"] == 0.1 and "eval/accuracy" in info["metrics"]
    cache = out / "checkpoints" / "reference_logps.safetensors"
    assert load_file(str(cache))["train"].shape == (80,)  # one log-prob per distinct training completion
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_the_cached_reference_is_the_starting_policy(tiny_llama_dir, data, tmp_path):
    """A completion's cached reference log-prob is log π_SFT(completion | prompt), summed over its tokens."""
    from rlhfkit import models
    from rlhfkit.config import DPOConfig
    from rlhfkit.generation import policy_logprobs
    from rlhfkit.stages import dpo as dpo_stage

    out = tmp_path / "out"
    dpo_stage.run(DPOConfig(policy=str(tiny_llama_dir), data=str(data), out=str(out), device="cpu", max_steps=1, val_fraction=0))
    cached = load_file(str(out / "checkpoints" / "reference_logps.safetensors"))["train"]
    tokenizer = models.load_tokenizer(str(tiny_llama_dir))
    groups, _ = preference_data.build_groups(
        records.load(str(data), records.parse_comparison), preference_data.Encoder(tokenizer), 1024
    )
    prompt, completion = groups[1].prompt, groups[1].completions[2]
    model = models.load_model(str(tiny_llama_dir)).eval()
    batch = preference_data.collate([(prompt, completion)], tokenizer.pad_token_id)
    with torch.no_grad():
        by_hand = policy_logprobs(model, *batch.args())[0].sum()
    assert cached[4 + 2].item() == pytest.approx(by_hand.item(), abs=1e-4)


def test_ipo_loss_starts_at_its_target_gap_and_falls(cli, tiny_llama_dir, data, tmp_path):
    out = tmp_path / "ipo"
    result = dpo(cli, "--policy", tiny_llama_dir, "--data", data, "--out", out, "--loss", "ipo", "--beta", "0.5", "--lr", "1e-3",
                 "--batch-size", "4", "--max-steps", "8", "--val-fraction", "0.2")  # fmt: skip
    evals = [r for r in read_metrics(out) if "loss/eval" in r]
    assert evals[0]["loss/eval"] == pytest.approx(1.0, abs=1e-4)  # (0 − 1/(2·0.5))²
    assert evals[-1]["loss/eval"] < evals[0]["loss/eval"] and result["metrics"]["eval/margin"] > 0


def test_lora_reference_is_the_adapter_switched_off(cli, tiny_llama_dir, data, tmp_path):
    out = tmp_path / "lora"
    dpo(cli, "--policy", tiny_llama_dir, "--data", data, "--out", out, "--lora", "--lora-r", "4", "--lr", "1e-2",
        "--batch-size", "4", "--max-steps", "4", "--val-fraction", "0.2", "--save-adapter")  # fmt: skip
    evals = [r for r in read_metrics(out) if "loss/eval" in r]
    assert evals[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-5) and evals[-1]["loss/eval"] < evals[0]["loss/eval"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    checkpoint = load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "policy.safetensors"))
    assert checkpoint and all("lora_" in k for k in checkpoint)  # only adapters trained
    merged, base = load_file(str(out / "model.safetensors")), load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    assert any(not torch.equal(merged[k], base[k]) for k in base)


def test_resume_from_a_checkpoint_continues_exactly_and_reuses_the_cached_reference(cli, tiny_llama_dir, data, tmp_path):
    args = ["dpo", "--policy", tiny_llama_dir, "--data", data, "--lr", "1e-3", "--batch-size", "2", "--max-steps", "6",
            "--save-every", "3", "--keep-checkpoints", "0", "--val-fraction", "0.2", "--eval-every", "2",
            "--device", "cpu"]  # fmt: skip
    full, run, resumed = stop_and_resume(cli, args, tmp_path, step=3)  # later metrics lines stay: resume drops them
    assert json.loads(resumed.stdout)["resumed_from"] == 3 and "reference log-probs read from" in resumed.stderr
    assert_same_weights(full, run)
    assert measured_metrics(run) == measured_metrics(full)


@pytest.mark.slow  # two subprocesses
def test_sigkill_and_resume(tiny_llama_dir, data, tmp_path):
    args = ["dpo", "--policy", tiny_llama_dir, "--data", data, "--lr", "1e-3", "--batch-size", "1", "--epochs", "3",
            "--save-every", "2", "--val-fraction", "0.2", "--device", "cpu"]  # fmt: skip
    full, killed = sigkill_and_resume(tmp_path, args, step=4)
    assert_same_weights(full, killed, exact=False)
    assert [r["loss/eval"] for r in read_metrics(killed) if "loss/eval" in r] == pytest.approx(
        [r["loss/eval"] for r in read_metrics(full) if "loss/eval" in r]
    )


@pytest.mark.slow  # subprocesses
def test_torchrun_two_processes_match_one_process(cli, tiny_llama_dir, data, tmp_path):
    """2 ranks × 2 rankings is the step of 1 process × 4 rankings (every ranking has 4 pairs)."""
    common = ["--policy", str(tiny_llama_dir), "--data", str(data), "--lr", "1e-3", "--max-steps", "3", "--val-fraction", "0.2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlhfkit", "dpo",
           *common, "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 alone prints
    single = dpo(cli, *common, "--out", tmp_path / "single", "--batch-size", "4")
    a, b = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "single" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    ddp_result = json.loads(proc.stdout.splitlines()[-1])
    assert ddp_result["metrics"]["loss/eval"] == pytest.approx(single["metrics"]["loss/eval"], rel=1e-4)


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beta", "0"], "--beta: must be > 0"),
        (["--loss", "hinge"], "'hinge' is not one of"),
        (["--save-adapter"], "--save-adapter needs --lora"),
        (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--data", "BAD"], "bad.jsonl:2: field 'rejected'"),
        (["--data", "TIES"], "no training pair left (0 longer than --max-length 1024, 2 ties)"),
    ],
)
def test_cli_errors_are_one_line(cli, tiny_llama_dir, data, tmp_path, extra, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    ties = write_jsonl(tmp_path / "ties.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0}] * 2)
    extra = [{"BAD": str(bad), "TIES": str(ties), "missing.jsonl": str(tmp_path / "missing.jsonl")}.get(e, e) for e in extra]
    result = cli("dpo", "--policy", tiny_llama_dir, "--data", data, "--out", tmp_path / "out", "--device", "cpu", *extra)
    assert result.exit_code != 0 and message in result.stderr, result.stderr
    if "is not one of" not in message:
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
