"""ppo: the first PPO epoch's first forward doubles as the rollout's policy and critic forward
(`ppo.first_forward`, ``--grad-accum 1``): the same step, bit for bit, one forward less."""

from __future__ import annotations

import pytest
import torch

import test_ppo
from conftest import write_jsonl
from rlhfkit.stages import ppo, ppo_data, ppo_options
from test_ppo import make_config, one_step, setup, weights

reward_dir = test_ppo.reward_dir  # the fixture

VARIANTS = {
    "value-model-from-rm": lambda reward, ptx: dict(rm=str(reward)),
    "value-head-on-policy": lambda reward, ptx: dict(value_head="policy"),
    "lora": lambda reward, ptx: dict(lora=True, lora_r=4, lr=1e-2),
    "grpo": lambda reward, ptx: dict(algo="grpo", k=2),
    "ptx": lambda reward, ptx: dict(ptx_data=str(ptx), ptx_coef=1.0),  # the first ptx batch goes with the first forward
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_first_forward_gives_the_step_of_a_separate_rollout_forward(
    tiny_llama_dir, reward_dir, prompts_file, tmp_path, monkeypatch, variant
):
    """With one micro-batch per mini-batch the rollout's log-probs, values and entropies come from
    the update's first forward: the first ratio is exactly 1, the first-step KL exactly 0, and the
    step (rollout tensors, metrics, weights after both epochs) equals the step that runs the rollout
    forward apart, bit for bit. Two mini-batches of 4: only the first one's forward is shared."""
    ptx_file = write_jsonl(tmp_path / "ptx.jsonl", [{"text": "the cat and the dog are friends."}, {"text": "one two three"}])
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", grad_accum=1, **VARIANTS[variant](reward_dir, ptx_file))

    def step():
        torch.manual_seed(0)  # LoRA's A matrices start random: the same start for both runs
        models, optimizer, items = setup(config)
        feed = ppo_data.load_ptx(config, models.tokenizer, ppo_options.sizes(config).micro_batch)[0] if config.ptx_data else None
        return models, one_step(models, optimizer, items, config, ptx=feed)

    calls = []
    real = ppo.first_forward
    monkeypatch.setattr(ppo, "first_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    models, fused = step()
    fused_weights = weights(models.core)
    assert calls and len(fused["update"]["minibatches"]) == 4  # 2 epochs x 2 mini-batches of one micro-batch
    first = fused["update"]["minibatches"][0]
    assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0
    assert torch.equal(fused["forward"]["logprobs"], fused["forward"]["ref_logprobs"])  # policy == reference
    assert torch.count_nonzero(fused["kl"]) == 0 and fused["metrics"]["objective/kl"] == 0

    monkeypatch.setattr(ppo, "first_forward", lambda *a, **k: None)  # the rollout forward apart, the update's own
    models, apart = step()
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert torch.equal(fused["forward"][name], apart["forward"][name]), name
    assert fused["metrics"].keys() == apart["metrics"].keys()
    for key, value in fused["metrics"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(apart["metrics"][key])), key
    after = weights(models.core)
    assert all(torch.equal(fused_weights[k], after[k]) for k in after)


def test_several_micro_batches_keep_the_rollout_forward_apart(tiny_llama_dir, prompts_file, tmp_path):
    """--grad-accum 2: the first mini-batch is two micro-batches; no graph is held across the scoring."""
    config = make_config(tiny_llama_dir, prompts_file, tmp_path / "out", grad_accum=2)
    models, _, _ = setup(config)
    from rlhfkit.stages.ppo_data import Experience, minibatch_order
    from rlhfkit.stages.ppo_options import sizes

    exp = Experience(*(torch.zeros(8, 3, dtype=torch.long) for _ in range(4)))
    order = minibatch_order(config.seed, 0, 0, 8, torch.device("cpu"))
    assert ppo.first_forward(models, exp, order, sizes(config), config) is None
