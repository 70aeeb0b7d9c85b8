"""ppo --algo a2c|rloo|grpo: the advantage estimators and losses inside the PPO step, an end-to-end
run of each that learns a scripted reward, exact resume, and one-line errors for options that do not
fit the algorithm. (ppo itself: tests/test_ppo.py, which runs unchanged.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import E_COUNT, REPO, SLOW_E_COUNT, kill_at_checkpoint, measured_metrics, rlhfkit_command, subprocess_env, wait_all
from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.stages import ppo, ppo_data, ppo_models
from rlhfkit.training import make_optimizer, read_metrics


def make_config(policy, prompts, out, **overrides) -> PPOConfig:
    options = dict(
        policy=str(policy), rm=E_COUNT, prompts=str(prompts), out=str(out), device="cpu", dtype="float32",
        batch_size=8, grad_accum=2, ppo_epochs=1, max_new_tokens=8, lr=1e-3, value_head="policy",
    )  # fmt: skip
    options.update(overrides)
    return PPOConfig(**options)


def setup(config: PPOConfig):
    from rlhfkit import models as model_io

    config.check()
    tokenizer = model_io.load_tokenizer(config.policy)
    items, _ = ppo_data.load_prompts(config, tokenizer)
    models = ppo_models.build_models(config, tokenizer, torch.device("cpu"), torch.float32)
    optimizer = make_optimizer(models.actor_critic, config.lr, eps=config.adam_eps)
    return models, optimizer, items


def one_step(models, optimizer, items, config, step=0):
    return ppo.ppo_step(models, optimizer, ppo.make_kl_controller(config), items, config, step)


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- phases 5-7: group baselines --------------------------------------------------------------------


def test_group_advantages_in_the_step_by_hand():
    """K = 3 samples of one prompt with scores [1, 2, 6]; the first sample has a KL of 0.5 per token."""
    scores = torch.tensor([1.0, 2.0, 6.0])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.5, -1.0], [-2.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    rloo = ppo.compute_group_advantages(scores, ref_logprobs, ref_logprobs, mask, k=3, algo="rloo", kl_coef=0.1)
    expected = torch.tensor([[-3.0, -3.0, -3.0], [-1.5, -1.5, 0.0], [4.5, 0.0, 0.0]])  # on every response token
    torch.testing.assert_close(rloo["advantages"], expected)
    assert torch.count_nonzero(rloo["values"]) == 0 and torch.count_nonzero(rloo["returns"]) == 0
    # KL in the reward: R = [1 − 0.1·(0.5 + 0.5), 2, 6] = [0.9, 2, 6] → baselines [4, 3.45, 1.45]
    with_kl = ppo.compute_group_advantages(scores, logprobs, ref_logprobs, mask, k=3, algo="rloo", kl_coef=0.1)
    torch.testing.assert_close(with_kl["advantages"][:, 0], torch.tensor([0.9 - 4.0, 2.0 - 3.45, 6.0 - 1.45]))
    torch.testing.assert_close(with_kl["rewards"].sum(1), torch.tensor([0.9, 2.0, 6.0]))
    # grpo: the scores standardised (mean 3, std √7); the KL is its loss term, not in the reward
    grpo = ppo.compute_group_advantages(scores, logprobs, ref_logprobs, mask, k=3, algo="grpo", kl_coef=0.1, kl_in_reward=False)
    normalised = torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7) + 1e-4)
    torch.testing.assert_close(grpo["advantages"][:, 0], normalised)
    assert grpo["advantages"][0, 2] == grpo["advantages"][0, 0] and grpo["advantages"][2, 1] == 0
    torch.testing.assert_close(grpo["kl"].sum(1), torch.tensor([1.0, 0.0, 0.0]))  # what objective/kl reports


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rloo_and_grpo_sample_k_per_prompt_without_a_critic(tiny_llama_dir, prompts_file, tmp_path, algo):
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", algo=algo, k=4, value_head="separate")
    models, optimizer, items = setup(config)
    assert models.core.critic is None  # no value model is even loaded
    result = one_step(models, optimizer, items, config)
    ids = [it.id for it in result["items"]]
    assert len(ids) == 8 and all(len(set(ids[g * 4 : g * 4 + 4])) == 1 for g in range(2)) and ids[0] != ids[4]
    texts = result["texts"][:4]
    assert len(set(texts)) > 1  # each rollout its own seed
    group_sums = result["advantages"]["advantages"][:, 0].view(2, 4).sum(1)
    torch.testing.assert_close(group_sums, torch.zeros(2), atol=1e-5, rtol=0)  # a baseline from the group: they sum to 0
    metrics = result["metrics"]
    assert "loss/value" not in metrics and "val/explained_variance" not in metrics
    assert ("loss/kl" in metrics) == (algo == "grpo") and metrics["objective/kl"] == 0  # policy == reference at step 0
    assert result["update"]["minibatches"][0]["ratio_min"] == 1.0 == result["update"]["minibatches"][0]["ratio_max"]


def test_a2c_takes_one_unclipped_step_that_equals_the_first_ppo_step(tiny_llama_dir, prompts_file, tmp_path):
    """At A2C's single step π = π_old, so −A·log π has the gradient of PPO's surrogate at ratio 1,
    and the unclipped value loss that of the clipped one at V = V_old: the same update."""
    a2c_config = make_config(tiny_llama_dir, prompts_file, tmp_path / "a2c", algo="a2c", ppo_epochs=4)
    models, optimizer, items = setup(a2c_config)
    a2c = one_step(models, optimizer, items, a2c_config)
    assert a2c["update"]["updates"] == 1 and len(a2c["update"]["minibatches"]) == 1  # --ppo-epochs does not apply
    assert "policy/clipfrac" not in a2c["metrics"] and "val/clipfrac" not in a2c["metrics"]
    ppo_config = make_config(tiny_llama_dir, prompts_file, tmp_path / "ppo", ppo_epochs=1)
    ppo_models_, ppo_optimizer, _ = setup(ppo_config)
    first = one_step(ppo_models_, ppo_optimizer, items, ppo_config)
    assert first["texts"] == a2c["texts"]
    w1, w2 = weights(models.core), weights(ppo_models_.core)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6)
    assert a2c["metrics"]["loss/policy"] != first["metrics"]["loss/policy"]  # −A·log π, not −A·ρ


def test_grpo_kl_is_a_loss_term_unless_kl_in_reward(tiny_llama_dir, prompts_file, tmp_path):
    results = {}
    for kl_in_reward in (False, True):
        config = make_config(tiny_llama_dir, prompts_file, tmp_path / str(kl_in_reward), algo="grpo", k=2, kl_coef=0.5,
                             kl_in_reward=kl_in_reward, ppo_epochs=2)  # fmt: skip
        models, optimizer, items = setup(config)
        one_step(models, optimizer, items, config)
        results[kl_in_reward] = one_step(models, optimizer, items, config, step=1)  # now π ≠ π_ref
    loss_term, in_reward = results[False], results[True]
    assert loss_term["metrics"]["loss/kl"] > 0 and "loss/kl" not in in_reward["metrics"]
    assert loss_term["metrics"]["objective/kl"] != 0 and in_reward["metrics"]["objective/kl"] != 0


def test_grpo_with_lora_trains_adapters_and_measures_the_kl_to_the_adapter_switched_off(tiny_llama_dir, prompts_file, tmp_path):
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", algo="grpo", k=2, lora=True, lora_r=4, lr=1e-2,
                         ppo_epochs=2)  # fmt: skip
    models, optimizer, items = setup(config)
    assert models.reference is None and models.core.critic is None  # one backbone in memory, no critic
    before = weights(models.policy)
    first = one_step(models, optimizer, items, config)
    second = one_step(models, optimizer, items, config, step=1)
    changed = {k for k, v in weights(models.policy).items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)
    assert first["metrics"]["objective/kl"] == 0 and second["metrics"]["loss/kl"] > 0


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["a2c", "rloo", "grpo"])
def test_end_to_end_each_algorithm_raises_the_score(cli, tiny_llama_dir, prompts_file, tmp_path, algo):
    """16 steps of a tiny random policy on the scripted letter-e reward (as test_ppo's PPO run)."""
    out = tmp_path / algo
    result = cli("ppo", "--algo", algo, "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file, "--out", out,
                 "--steps", "16", "--batch-size", "16", "--max-new-tokens", "12", "--lr", "1e-3", "--schedule", "constant",
                 "--sample-every", "8", "--num-samples", "2", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    score = [r["objective/score"] for r in rows]
    assert sum(score[-4:]) / 4 > sum(score[:4]) / 4 + 0.1, score
    assert rows[0]["objective/kl"] == 0.0 and all(math.isfinite(r["objective/kl"]) for r in rows)
    updates = 1 if algo == "a2c" else 4  # a2c: one gradient step per batch; rloo, grpo: --ppo-epochs 4 of one mini-batch
    assert all(r["ppo/updates"] == updates for r in rows)
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["stage"] == "ppo" and info["config"]["algo"] == algo
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "value.safetensors").is_file() == (algo == "a2c")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_resume_from_a_checkpoint_continues_exactly(cli, tiny_llama_dir, prompts_file, tmp_path):
    """In process: a run that stopped after its step-2 checkpoint, resumed, ends as the uninterrupted run
    (grpo with the adaptive β: the KL loss term follows the controller's state)."""
    args = ["ppo", "--algo", "grpo", "--k", "2", "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file,
            "--steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--batch-size", "4", "--max-new-tokens", "6",
            "--lr", "3e-3", "--target-kl", "0.2", "--kl-horizon", "20", "--sample-every", "1", "--device", "cpu"]  # fmt: skip
    run, full = tmp_path / "run", tmp_path / "full"
    assert cli(*args, "--out", run).exit_code == 0
    shutil.copytree(run, full)  # the uninterrupted run
    for path in run.iterdir():  # back to the moment after the step-2 checkpoint (metrics and samples of
        if path.name not in ("checkpoints", "metrics.jsonl", "samples.jsonl"):  # steps 3-4 stay: resume must drop them)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(run / "checkpoints" / "step-000004")
    resumed = cli(*args, "--out", run, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    a, b = load_file(str(full / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert measured_metrics(run, drop=("perf/", "time/")) == measured_metrics(full, drop=("perf/", "time/"))
    assert (full / "samples.jsonl").read_text() == (run / "samples.jsonl").read_text()


@pytest.mark.slow  # two subprocesses
def test_sigkill_and_resume_rloo(tiny_llama_dir, prompts_file, tmp_path):
    def start(out: Path, *extra: str) -> subprocess.Popen:
        args = rlhfkit_command("ppo", "--algo", "rloo", "--k", "2", "--policy", tiny_llama_dir, "--rm", SLOW_E_COUNT,
                               "--prompts", prompts_file, "--out", out, "--steps", "6", "--save-every", "2",
                               "--batch-size", "4", "--max-new-tokens", "6", "--lr", "3e-3", "--sample-every", "1",
                               "--device", "cpu", *extra)  # fmt: skip
        return subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)

    full, killed_out = start(tmp_path / "full"), tmp_path / "killed"
    killed = start(killed_out)
    kill_at_checkpoint(killed, killed_out, 2, poll=0.02)
    wait_all(full, start(killed_out, "--resume"))
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(killed_out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    for key in ("objective/score", "objective/kl", "loss/policy"):
        assert [r[key] for r in read_metrics(killed_out)] == pytest.approx([r[key] for r in read_metrics(tmp_path / "full")]), key


# --- options that do not fit the algorithm ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--algo", "rloo", "--k", "1"], "--k: rloo needs at least 2 samples per prompt"),
        (["--k", "2"], "--k: only with --algo rloo or grpo"),
        (["--algo", "grpo", "--batch-size", "6"], "--batch-size must be a multiple of --k (rollouts = prompts x K, K = 4)"),
        (["--algo", "rloo", "--kl-in-reward"], "--kl-in-reward: only with --algo grpo"),
        (["--algo", "a2c", "--mini-batch-size", "2"], "--mini-batch-size: a2c takes one gradient step per rollout batch"),
        (["--algo", "grpo", "--value-model", "x"], "--value-model: grpo has no critic"),
        (["--algo", "trpo"], "'trpo' is not one of"),
    ],
)
def test_cli_errors_are_one_line(cli, tiny_llama_dir, prompts_file, tmp_path, extra, message):
    args = ["ppo", "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file, "--out", tmp_path / "out",
            "--steps", "1", "--batch-size", "4", "--device", "cpu", *extra]  # fmt: skip
    result = cli(*args)
    assert result.exit_code != 0
    assert message in result.stderr, result.stderr
    if "is not one of" not in message:  # click's own usage errors take a few lines
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_config_check_names_the_option():
    with pytest.raises(ConfigError, match="--early-stop-kl: a2c"):
        PPOConfig(policy="p", rm=E_COUNT, prompts="x", out="o", algo="a2c", early_stop_kl=0.1).check_algo()
    assert PPOConfig(algo="rloo").samples_per_prompt == 4 and PPOConfig(algo="grpo", k=3).samples_per_prompt == 3
    assert PPOConfig().samples_per_prompt == 1 and PPOConfig(algo="a2c").has_critic and not PPOConfig(algo="grpo").has_critic
