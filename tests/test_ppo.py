"""ppo: one test per implementation detail of SPEC §5 ppo, an end-to-end run that learns, exact
resume after SIGKILL, and one-line CLI errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import E_COUNT, REPO, SLOW_E_COUNT, kill_at_checkpoint, rlhfkit_command, subprocess_env, wait_all, write_jsonl
from rlhfkit import models as model_io
from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.losses import kl_estimate
from rlhfkit.provenance import RunInfo
from rlhfkit.reward import load_reward
from rlhfkit.seeds import row_seed
from rlhfkit.stages import ppo, ppo_data, ppo_models, ppo_options
from rlhfkit.training import Dist, make_optimizer, read_metrics

CONSTANT = f"python:{REPO / 'tests' / 'ppo_rewards.py'}:constant"


@pytest.fixture(scope="module")
def reward_dir(tiny_llama_dir, tmp_path_factory):
    """A reward model saved as train-rm saves one: one-label classifier + gain/bias in rlhfkit.json."""
    torch.manual_seed(3)
    rm = model_io.load_model(str(tiny_llama_dir), kind="reward")
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    out = tmp_path_factory.mktemp("rm") / "rm"
    tokenizer = model_io.load_tokenizer(str(tiny_llama_dir))
    return model_io.save_model_dir(rm, tokenizer, out, RunInfo("train-rm", {}, {}), extra={"reward": {"gain": 2.0, "bias": -0.5}})


def make_config(policy, prompts, out, **overrides) -> PPOConfig:
    options = dict(
        policy=str(policy), rm=E_COUNT, prompts=str(prompts), out=str(out), device="cpu", dtype="float32",
        batch_size=8, mini_batch_size=4, grad_accum=2, ppo_epochs=2, max_new_tokens=8, lr=1e-3,
    )  # fmt: skip
    options.update(overrides)
    return PPOConfig(**options)


def setup(config: PPOConfig):
    tokenizer = model_io.load_tokenizer(config.policy)
    items, _ = ppo_data.load_prompts(config, tokenizer)
    models = ppo_models.build_models(config, tokenizer, torch.device("cpu"), torch.float32)
    optimizer = make_optimizer(models.actor_critic, config.lr, eps=config.adam_eps)
    return models, optimizer, items


def batch(items, config, step=0):
    rows = ppo_data.step_rows(len(items), config.seed, step, config.batch_size, Dist())
    return [items[i] for _, i in rows], [row_seed(config.seed, step, j, scheme="poly") for j, _ in rows]


def one_step(models, optimizer, items, config, step=0, ptx=None):
    return ppo.ppo_step(models, optimizer, ppo.make_kl_controller(config), items, config, step, ptx)


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- the details of SPEC §5 ppo, one test each -----------------------------------------------------


@pytest.mark.parametrize("variant", ["value-model-from-rm", "value-head-on-policy", "lora"])
def test_first_step_kl_is_exactly_zero_and_first_ratio_exactly_one(tiny_llama_dir, reward_dir, prompts_file, tmp_path, variant):
    overrides = {
        "value-model-from-rm": dict(rm=str(reward_dir)),
        "value-head-on-policy": dict(value_head="policy"),
        "lora": dict(lora=True, lora_r=4, lr=1e-2),
    }[variant]
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", **overrides)
    models, optimizer, items = setup(config)
    if variant == "value-model-from-rm":  # the critic starts as the reward model
        rm_head = model_io.load_model(str(reward_dir), kind="reward").score.weight
        torch.testing.assert_close(models.core.value_model.score.weight, rm_head, rtol=0, atol=0)
    result = one_step(models, optimizer, items, config)
    fwd = result["forward"]
    assert torch.equal(fwd["logprobs"], fwd["ref_logprobs"])  # bit for bit: policy == reference
    assert torch.count_nonzero(result["kl"]) == 0 and result["metrics"]["objective/kl"] == 0
    minibatches = result["update"]["minibatches"]
    assert len(minibatches) == 4  # 2 epochs x 2 mini-batches (of 2 micro-batches each)
    assert minibatches[0]["ratio_min"] == 1.0 and minibatches[0]["ratio_max"] == 1.0
    # ...and the check is not vacuous: after the first optimizer step the ratio moves
    assert minibatches[1]["ratio_max"] > 1.0 or minibatches[1]["ratio_min"] < 1.0


@pytest.mark.slow  # inductor compiles the layers in train, eval and no-grad modes, ~40 s on 2 cores
def test_compiled_layers_keep_the_first_step_exact(tiny_llama_dir, prompts_file, tmp_path):
    """--compile: policy, reference and critic run compiled decoder layers, and the first step is still
    exact (KL 0 bit for bit, first ratio 1): equal weights through the same compiled code."""
    from torch._dynamo.utils import counters

    # one micro-batch per mini-batch: the old log-probs come from the first epoch's own forward (with
    # --grad-accum 2 they come from a separate no-grad pass, compiled to other fused kernels: ratio 1 up to rounding)
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", compile=True, grad_accum=1)
    torch._dynamo.reset()  # a layer compiled by an earlier test would be reused without counting
    graphs = counters["stats"]["unique_graphs"]
    models, optimizer, items = setup(config)
    result = one_step(models, optimizer, items, config)
    assert counters["stats"]["unique_graphs"] > graphs
    fwd = result["forward"]
    assert torch.equal(fwd["logprobs"], fwd["ref_logprobs"]) and result["metrics"]["objective/kl"] == 0
    first = result["update"]["minibatches"][0]
    assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0

def test_ref_sets_the_kl_reference_apart_from_the_starting_policy(tiny_llama_dir, prompts_file, tmp_path):
    """Iterated RLHF continues from a PPO policy but measures KL to the SFT model (--ref)."""
    other = tmp_path / "other"
    from rlhfkit.testing import save_tiny_model

    save_tiny_model(other, arch="llama", seed=7)  # same tokenizer, different weights
    same = one_step(*setup(config := make_config(tiny_llama_dir, prompts_file, tmp_path / "a", ref=str(tiny_llama_dir))), config)
    assert same["metrics"]["objective/kl"] == 0  # --ref equal to --policy: the copy it would make anyway
    apart = one_step(*setup(config := make_config(other, prompts_file, tmp_path / "b", ref=str(tiny_llama_dir))), config)
    fwd = apart["forward"]
    assert not torch.equal(fwd["logprobs"], fwd["ref_logprobs"]) and apart["metrics"]["objective/kl"] != 0
    with pytest.raises(ConfigError, match="--ref: not with --lora"):
        make_config(tiny_llama_dir, prompts_file, tmp_path / "c", ref=str(tiny_llama_dir), lora=True).check()


def test_tokens_after_the_end_change_no_loss_no_kl_and_no_advantage(tiny_llama_dir, prompts_file, tmp_path):
    # the math of phases 5-7: garbage (even nan) after the end reaches nothing
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    logprobs, ref_logprobs, values = (torch.randn(3, 5, generator=g) for _ in range(3))
    scores = torch.tensor([1.0, -0.5, 2.0])
    kwargs = dict(kl_coef=0.1, kl_estimator="k3", whiten_rewards=True)
    clean = ppo.compute_rewards_and_advantages(scores, logprobs, ref_logprobs, values, mask, **kwargs)
    dirty_inputs = [torch.where(mask.bool(), x, torch.tensor(float("nan"))) for x in (logprobs, ref_logprobs, values)]
    dirty = ppo.compute_rewards_and_advantages(scores, *dirty_inputs, mask, **kwargs)
    for name in ("kl", "rewards", "values", "advantages", "returns"):
        assert torch.equal(clean[name], dirty[name]), name
        assert torch.count_nonzero(clean[name][~mask.bool()]) == 0, name

    # the update: tokens, old log-probs, values, advantages and returns after the end change no weight
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", max_new_tokens=6)
    models, optimizer, items = setup(config)
    exp = one_step(models, optimizer, items, config)["experience"]
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 2, 4])
    short = (torch.arange(exp.response.size(1))[None, :] < lengths[:, None]).long()  # responses that ended earlier
    after = ~short.bool()

    def variant(fill: float, token: int) -> ppo_data.Experience:
        e = ppo_data.Experience(exp.query, exp.query_mask, torch.where(after, token, exp.response), short)
        e.logprobs, e.values, e.advantages, e.returns = (
            torch.where(after, fill, x) for x in (exp.logprobs, exp.values, exp.advantages, exp.returns)
        )
        return e

    results = []
    for fill, token in ((0.0, 0), (123.0, 77)):
        m, opt, _ = setup(config)
        stats = ppo.ppo_update(m, opt, variant(fill, token), config, step=0)
        results.append((weights(m.core), stats))
    (w1, s1), (w2, s2) = results
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert s1["loss/policy"] == s2["loss/policy"] and s1["loss/value"] == s2["loss/value"]
    assert s1["loss/policy"] != 0


def test_temperature_divides_the_logits_of_policy_and_reference(tiny_llama_dir, prompts_file, tmp_path):
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", temperature=0.5)
    models, optimizer, items = setup(config)
    one_step(models, optimizer, items, config)  # the policy moves away from the reference
    batch_items, seeds = batch(items, config, step=1)
    rollout = ppo.generate(models, batch_items, seeds, config)
    exp = ppo_data.Experience(rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
    order = ppo_data.minibatch_order(config.seed, 1, 0, config.batch_size)
    fwd = ppo.rollout_forward(models, exp, order, ppo_options.sizes(config), config.temperature)

    def by_hand(model, temperature):
        T = exp.response.size(1)
        ids = torch.cat([exp.query, exp.response], 1)
        attention = torch.cat([exp.query_mask, exp.response_mask], 1)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits[:, -T - 1 : -1]
        logprobs = torch.log_softmax(logits / temperature, -1).gather(-1, exp.response[..., None]).squeeze(-1)
        return logprobs * exp.response_mask

    torch.testing.assert_close(fwd["logprobs"], by_hand(models.policy, 0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fwd["ref_logprobs"], by_hand(models.reference, 0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fwd["logprobs"], rollout.logprobs, atol=1e-4, rtol=1e-4)  # what the sampler drew from
    assert not torch.allclose(fwd["logprobs"], by_hand(models.policy, 1.0), atol=1e-2)
    assert not torch.allclose(fwd["ref_logprobs"], by_hand(models.reference, 1.0), atol=1e-2)


def test_the_score_sits_on_the_last_real_response_token():
    """Per-token rewards: −β·kl_t everywhere, plus the score on the last response token only."""
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -9.0, -9.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0, -1.0], [-0.5, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = ppo.compute_rewards_and_advantages(scores, logprobs, ref_logprobs, torch.zeros(2, 4), mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.0, 2.0 - 0.05, 0.0], [-1.0 + 0.05, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out["rewards"], expected)
    torch.testing.assert_close(out["kl"], kl_estimate(logprobs, ref_logprobs) * mask)


def test_reward_clip_and_missing_eos_penalty_replace_the_score(tokenizer):
    reward = load_reward(CONSTANT, tokenizer)  # 0.7 for every completion
    rollout = SimpleNamespace(
        query=torch.ones(4, 2, dtype=torch.long), query_mask=torch.ones(4, 2, dtype=torch.long),
        response=torch.ones(4, 3, dtype=torch.long), response_mask=torch.ones(4, 3, dtype=torch.long),
        stopped=torch.tensor([True, False, True, False]),
    )  # fmt: skip
    items = [ppo_data.PromptItem(str(i), "p", (1,)) for i in range(4)]
    models = SimpleNamespace(reward=reward)
    texts = ["a", "b", "c", "d"]
    base = dict(policy="p", rm=CONSTANT, prompts="x", out="o")
    scores, raw, spread = ppo.score(models, items, texts, rollout, PPOConfig(**base))
    assert scores.tolist() == pytest.approx([0.7] * 4) and raw.tolist() == pytest.approx([0.7] * 4) and spread is None
    scores, _, _ = ppo.score(models, items, texts, rollout, PPOConfig(**base, missing_eos_penalty=-1.0))
    assert scores.tolist() == pytest.approx([0.7, -1.0, 0.7, -1.0])
    scores, _, _ = ppo.score(models, items, texts, rollout, PPOConfig(**base, missing_eos_penalty=-1.0, reward_clip=0.5))
    assert scores.tolist() == pytest.approx([0.5, -1.0, 0.5, -1.0])  # the penalty is not clipped


def test_ptx_changes_the_update_and_zero_ptx_does_not(tiny_llama_dir, prompts_file, tmp_path):
    ptx_file = write_jsonl(tmp_path / "ptx.jsonl", [
        {"text": "the cat and the dog are friends."},
        {"prompt": "What is the sky?", "response": "The sky is blue."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, how can I help?"}]},
    ])  # fmt: skip
    final, ptx_losses = {}, {}
    for name, extra in {
        "none": {},
        "zero": dict(ptx_data=str(ptx_file), ptx_coef=0.0),
        "one": dict(ptx_data=str(ptx_file), ptx_coef=1.0),
    }.items():
        config = make_config(tiny_llama_dir, prompts_file, tmp_path / name, **extra)
        models, optimizer, items = setup(config)
        feed, _ = ppo_data.load_ptx(config, models.tokenizer, ppo_options.sizes(config).micro_batch)
        result = one_step(models, optimizer, items, config, ptx=feed)
        final[name] = weights(models.policy)
        if name == "one":
            assert "loss/ptx" in result["metrics"] and feed.position == 8 * 2  # 8 micro-batches of 2 sequences
        # the language-model loss on the ptx data after the update
        from rlhfkit.data import records
        from rlhfkit.demonstrations import collate, encode_dataset
        from rlhfkit.value import ptx_loss

        loaded = records.load(str(ptx_file), records.parse_demonstration)
        examples, _ = encode_dataset(models.tokenizer, loaded, loaded.lines, source=str(ptx_file), max_length=64)
        with torch.no_grad():
            ptx_losses[name] = float(ptx_loss(models.policy, collate(examples, models.tokenizer.pad_token_id)))
    assert all(torch.equal(final["none"][k], final["zero"][k]) for k in final["none"])
    assert any(not torch.equal(final["none"][k], final["one"][k]) for k in final["none"])
    assert ptx_losses["one"] < ptx_losses["none"] - 0.01  # the ptx term pulls towards the ptx data


def test_lora_keeps_the_reference_frozen_and_trains_only_adapters(tiny_llama_dir, prompts_file, tmp_path):
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", lora=True, lora_r=4, lr=1e-2)
    models, optimizer, items = setup(config)
    assert models.reference is None  # one backbone in memory: the reference is the adapter switched off
    before = weights(models.policy)
    base = model_io.load_model(str(tiny_llama_dir)).eval()
    items8, seeds = batch(items, config)
    rollout = ppo.generate(models, items8, seeds, config)
    args = (rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
    from rlhfkit.generation import policy_logprobs

    with torch.no_grad():
        base_logprobs, _, _ = policy_logprobs(base, *args)
    for step in range(2):
        one_step(models, optimizer, items, config, step=step)
    after = weights(models.policy)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert all("lora_" in n for n, p in models.policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        ref = models.reference_logprobs(*args, temperature=1.0)
        now, _, _ = policy_logprobs(models.policy, *args)
    assert torch.equal(ref, base_logprobs)  # the reference is the untouched base model
    assert not torch.allclose(now, base_logprobs, atol=1e-3)  # while the policy has moved


def test_generation_in_several_calls_gives_the_same_rollouts(tiny_llama_dir, prompts_file, tmp_path):
    """Each rollout samples from its own seed: --generation-batch-size changes memory, not samples."""
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", stop=["n"])  # half the rows stop at it
    models, _, items = setup(config)
    batch_items, seeds = batch(items, config)
    whole = ppo.generate(models, batch_items, seeds, config)
    parts = ppo.generate(models, batch_items, seeds, dataclasses.replace(config, generation_batch_size=3))
    assert whole.stopped.any() and not whole.stopped.all()  # some rows stopped at the stop string
    for name in ("query", "query_mask", "response", "response_mask", "stopped"):
        assert torch.equal(getattr(whole, name), getattr(parts, name)), name
    torch.testing.assert_close(whole.logprobs, parts.logprobs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_agree_with_autograd_of_the_plain_formula(temperature):
    """The fused log-prob (forward, and its hand-written backward) against autograd of z_y − logsumexp(z)."""
    from rlhfkit.losses import logprobs_from_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, dtype=torch.float64, generator=g).requires_grad_()
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    upstream = torch.randn(3, 5, dtype=torch.float64, generator=g)
    ours = logprobs_from_logits(logits, tokens, temperature)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    z = logits / temperature
    plain = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), logits)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(grad, plain_grad)
    with torch.no_grad():
        assert torch.equal(logprobs_from_logits(logits, tokens, temperature), ours)  # the rollout pass: same bits


def test_prompt_order_is_a_function_of_the_step_and_sharded_by_rank():
    one = ppo_data.step_rows(5, seed=1, step=3, batch_size=4, dist=Dist())
    assert one == ppo_data.step_rows(5, seed=1, step=3, batch_size=4, dist=Dist())
    ranks = [ppo_data.step_rows(5, seed=1, step=3, batch_size=2, dist=Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(one)
    # every prompt comes once per epoch: steps 0-4 of batch 4 over 5 prompts cover 4 whole epochs
    drawn = [i for s in range(5) for _, i in ppo_data.step_rows(5, 1, s, 4, Dist())]
    assert all(sorted(drawn[e * 5 : e * 5 + 5]) == list(range(5)) for e in range(4))


# --- end to end -----------------------------------------------------------------------------------


def test_end_to_end_the_score_rises_while_the_kl_stays_bounded(cli, tiny_llama_dir, prompts_file, tmp_path):
    """20 PPO steps of a tiny random policy on a scripted reward it can learn (the letter e)."""
    out = tmp_path / "ppo"
    args = ["ppo", "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file, "--out", out, "--steps", "20",
            "--batch-size", "16", "--max-new-tokens", "12", "--lr", "1e-3", "--schedule", "constant",
            "--sample-every", "10", "--num-samples", "2", "--device", "cpu"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 20 and summary["kl_coef"] == 0.05
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    score = [r["objective/score"] for r in rows]
    kl = [r["objective/kl"] for r in rows]
    first, last = sum(score[:5]) / 5, sum(score[-5:]) / 5
    assert last > first + 0.15, score
    assert kl[0] == 0.0 and max(abs(k) for k in kl) < 5.0, kl
    for key in ("objective/score", "objective/kl", "objective/rlhf_reward", "objective/entropy", "objective/kl_coef",
                "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/explained_variance",
                "val/ratio", "val/clipfrac", "response/length", "response/stopped", "perf/tokens_per_s",
                "perf/seconds_per_step", "train/lr"):  # fmt: skip
        assert key in rows[-1], key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10, 10, 20, 20] and {"prompt", "response", "score", "kl"} <= set(samples[0])
    assert "ppo samples, step 10" in result.stderr
    # the final policy: a plain transformers directory with its provenance
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["stage"] == "ppo" and info["config"]["steps"] == 20 and "objective/score" in info["metrics"]
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").is_file()
    # resuming with a changed option is refused, in one line
    again = cli(*args, "--resume", "--lr", "0.5")
    assert again.exit_code == 1 and "option 'lr' was 0.001" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_adaptive_kl_controller_moves_beta_toward_the_target(cli, tiny_llama_dir, prompts_file, tmp_path):
    out = tmp_path / "ppo"
    target = 0.3
    result = cli("ppo", "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file, "--out", out, "--steps", "6",
                 "--batch-size", "8", "--max-new-tokens", "8", "--lr", "3e-3", "--kl-estimator", "k3", "--target-kl", str(target),
                 "--kl-horizon", "40", "--kl-coef", "0.2", "--sample-every", "0", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = read_metrics(out)
    betas = [r["objective/kl_coef"] for r in rows] + [json.loads(result.stdout)["kl_coef"]]
    assert rows[0]["objective/kl"] == 0.0 and betas[1] < betas[0]  # no KL yet: β falls
    for row, beta, next_beta in zip(rows, betas, betas[1:]):
        # above the target β grows, below it β shrinks, by at most 20 % x batch / horizon
        assert (next_beta > beta) == (row["objective/kl"] > target), (row, beta, next_beta)
        assert abs(next_beta / beta - 1) <= 0.2 * 8 / 40 + 1e-9
    assert any(r["objective/kl"] > target for r in rows), "the run never exceeded the target; raise --lr"


def _ppo_process(out: Path, policy: Path, prompts: Path, *extra: str) -> subprocess.Popen:
    args = rlhfkit_command("ppo", "--policy", policy, "--rm", SLOW_E_COUNT, "--prompts", prompts,
                           "--out", out, "--steps", "6", "--save-every", "2", "--batch-size", "4", "--mini-batch-size", "2",
                           "--max-new-tokens", "6", "--lr", "3e-3", "--ptx-data", prompts.parent / "ptx.jsonl",
                           "--ptx-coef", "0.5", "--target-kl", "0.5", "--sample-every", "1", "--device", "cpu",
                           *extra)  # fmt: skip
    return subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


@pytest.mark.slow  # two subprocesses, ~15 s
def test_sigkill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_llama_dir, prompts_file, tmp_path):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "ptx.jsonl", [{"text": "the cat and the dog."}, {"prompt": "hi", "response": "hello there"}])
    full = _ppo_process(tmp_path / "full", tiny_llama_dir, prompts_file)
    killed_out = tmp_path / "killed"
    killed = _ppo_process(killed_out, tiny_llama_dir, prompts_file)
    kill_at_checkpoint(killed, killed_out, 2, poll=0.02)
    done = sorted(p.name for p in (killed_out / "checkpoints").glob("step-*"))
    assert done and done[-1] < "step-000006"
    wait_all(full, _ppo_process(killed_out, tiny_llama_dir, prompts_file, "--resume"))
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(killed_out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    full_rows, resumed_rows = read_metrics(tmp_path / "full"), read_metrics(killed_out)
    assert [r["step"] for r in resumed_rows] == list(range(1, 7))
    for key in ("objective/score", "objective/kl", "objective/kl_coef", "loss/ptx"):
        assert [r[key] for r in resumed_rows] == pytest.approx([r[key] for r in full_rows]), key
    samples = [json.loads(line)["step"] for line in (killed_out / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(3) == 4  # rows after the checkpoint were not duplicated


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--batch-size", "6", "--mini-batch-size", "4"], "--batch-size must be a multiple of --mini-batch-size"),
        (["--mini-batch-size", "4", "--grad-accum", "3"], "--mini-batch-size must be a multiple of --grad-accum"),
        (["--ptx-coef", "0.5"], "--ptx-coef: needs --ptx-data"),
        (["--rm", "python:no_such_module_abc:f"], "cannot import module"),
        (["--temperature", "0"], "--temperature: must be > 0"),
        (["--value-head", "policy", "--value-model", "x"], "--value-model: only with --value-head separate"),
    ],
)
def test_cli_errors_are_one_line(cli, tiny_llama_dir, prompts_file, tmp_path, extra, message):
    args = ["ppo", "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file, "--out", tmp_path / "out",
            "--steps", "1", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if extra[0] == "--prompts":
        args[args.index("--prompts") + 1] = str(tmp_path / "missing.jsonl")
    result = cli(*args)
    assert result.exit_code == 1
    # the --chat-template note may come first
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert message in result.stderr and len(lines) == 1, result.stderr


def test_an_existing_run_is_not_overwritten_without_resume(cli, tiny_llama_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    result = cli("ppo", "--policy", tiny_llama_dir, "--rm", E_COUNT, "--prompts", prompts_file, "--out", out)
    assert result.exit_code == 1 and "holds an earlier run (pass --resume" in result.stderr


def test_ending_warning_worked_examples():
    from rlhfkit.stages.ppo import ending_warning

    config = PPOConfig(policy="p", rm="r", prompts="x", out="o", max_new_tokens=96)
    assert "only 30% of the completions end" in ending_warning(0.70, 0.30, 4, config)
    assert "--max-new-tokens 96" in ending_warning(0.70, 0.30, 4, config)
    assert ending_warning(0.70, 0.40, 4, config) is None  # above half of the first step's share
    assert ending_warning(0.90, 0.50, 4, config) is None  # not below 0.5
    penalised = PPOConfig(policy="p", rm="r", prompts="x", out="o", missing_eos_penalty=-1.0)
    assert ending_warning(0.20, 0.05, 4, penalised) is None
