"""The reward of ppo and eval: reward-model directories with their normalisation, foreign
classifiers, scripted rewards, and the score read at the last real token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit import models
from rlhfkit.chat import encode_completion, encode_prompt
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.generation import left_pad, right_pad
from rlhfkit.provenance import RunInfo
from rlhfkit.reward import load_reward
from rlhfkit.scoring import last_token_scores

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def save_reward_model(tiny_dir: Path, out: Path, gain: float | None = 2.0, bias: float = 0.5, seed: int = 3) -> Path:
    """A one-label classifier on the tiny Llama (random head), saved the way train-rm saves one."""
    torch.manual_seed(seed)
    rm = models.load_model(str(tiny_dir), kind="reward")
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # a head that tells tokens apart clearly
    tokenizer = models.load_tokenizer(str(tiny_dir))
    extra = {"reward": {"gain": gain, "bias": bias, "mean": 0.0, "std": 1.0}} if gain is not None else None
    return models.save_model_dir(rm, tokenizer, out, RunInfo("train-rm", {}, {}), extra=extra)


PROMPTS = ["the cat", [{"role": "user", "content": "Tell me a story about a dog."}], "What is the sky"]
COMPLETIONS = ["It is blue.", "Once upon a time there was a dog", "yes"]


def _policy_tensors(tokenizer, stopped):
    """The tensors ppo hands to the reward: left-padded prompts, right-padded responses."""
    query, query_mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    responses = [encode_completion(tokenizer, c, stopped=s) for c, s in zip(COMPLETIONS, stopped)]
    response, response_mask = right_pad(responses, tokenizer.pad_token_id)
    return query, query_mask, response, response_mask


def test_reward_model_scores_at_the_last_real_token_with_its_normalisation(tiny_llama_dir, tokenizer, tmp_path):
    path = save_reward_model(tiny_llama_dir, tmp_path / "rm", gain=2.0, bias=0.5)
    reward = load_reward(str(path), tokenizer, "cpu", torch.float32)
    assert (reward.gain, reward.bias) == (2.0, 0.5) and reward.same_vocab
    stopped = [True, False, True]
    tensors = _policy_tensors(tokenizer, stopped)
    got = reward.score(PROMPTS, COMPLETIONS, *tensors, stopped=torch.tensor(stopped))
    # expected: each prompt+completion alone, no padding at all, read at its last token (an EOS for
    # the stopped ones: pad == EOS in this tokenizer, so reading "the last non-pad id" would be wrong)
    rm = models.load_model(str(path), kind="reward").eval()
    for i, (p, c, s) in enumerate(zip(PROMPTS, COMPLETIONS, stopped)):
        ids = encode_prompt(tokenizer, p) + encode_completion(tokenizer, c, stopped=s)
        raw = last_token_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(got[i], 2.0 * raw[0] + 0.5, atol=1e-5, rtol=1e-5)
    # without the tensors (eval of texts), the reward encodes the texts itself: the same scores
    again = reward.score(PROMPTS, COMPLETIONS, stopped=stopped)
    torch.testing.assert_close(again, got, atol=1e-5, rtol=1e-5)
    assert got.shape == (3,) and got.dtype == torch.float32


def test_score_moves_with_the_last_token_only(tiny_llama_dir, tokenizer, tmp_path):
    """The stopped completion is scored on its EOS: dropping the EOS changes the score."""
    path = save_reward_model(tiny_llama_dir, tmp_path / "rm")
    reward = load_reward(str(path), tokenizer, "cpu", torch.float32)
    with_eos = reward.score(PROMPTS, COMPLETIONS, *_policy_tensors(tokenizer, [True] * 3))
    without = reward.score(PROMPTS, COMPLETIONS, *_policy_tensors(tokenizer, [False] * 3))
    assert not torch.allclose(with_eos, without)


def test_foreign_classifier_is_used_raw_and_a_causal_lm_is_refused(tiny_llama_dir, tokenizer, tmp_path):
    rm = models.load_model(str(tiny_llama_dir), kind="reward")
    rm.save_pretrained(tmp_path / "foreign")  # plain transformers: no rlhfkit.json
    tokenizer.save_pretrained(tmp_path / "foreign")
    reward = load_reward(str(tmp_path / "foreign"), tokenizer)
    assert (reward.gain, reward.bias) == (1.0, 0.0)
    with pytest.raises(RlhfkitError, match="not a reward model"):
        load_reward(str(tiny_llama_dir), tokenizer)


def test_reward_model_with_another_vocabulary_reencodes_the_texts(tiny_llama_dir, tokenizer, tmp_path):
    """A reward model whose tokenizer differs from the policy's scores texts, not the policy's ids."""
    from rlhfkit.testing import make_tokenizer

    path = save_reward_model(tiny_llama_dir, tmp_path / "rm")
    other = make_tokenizer(vocab_size=400)  # a different vocabulary for the "policy"
    reward = load_reward(str(path), other)
    assert not reward.same_vocab
    q, qm = left_pad([encode_prompt(other, p) for p in PROMPTS], other.pad_token_id)
    r, rmask = right_pad([encode_completion(other, c) for c in COMPLETIONS], other.pad_token_id)
    got = reward.score(PROMPTS, COMPLETIONS, q, qm, r, rmask)
    expected = load_reward(str(path), tokenizer).score(PROMPTS, COMPLETIONS, *_policy_tensors(tokenizer, [True] * 3))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_scripted_reward_by_module_and_by_file(tokenizer, monkeypatch):
    by_file = load_reward(f"python:{EXAMPLES / 'scripted_rewards.py'}:letter_e_share", tokenizer)
    assert by_file.score(["x", "y"], ["eee", "ab e"]).tolist() == pytest.approx([1.0, 1 / 3])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    by_module = load_reward("python:scripted_rewards:brevity", tokenizer)
    assert by_module.score(["x"], ["one two three"]).tolist() == pytest.approx([-0.3])
    assert by_module.info() == {"spec": "python:scripted_rewards:brevity", "gain": 1.0, "bias": 0.0}


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [1.0]", "returned 1 scores for 2 completions"),
        ("return [1.0, float('nan')]", "non-finite score"),
        ("raise KeyError('boom')", "raised KeyError"),
        ("return 3", "must return a list of numbers"),
    ],
)
def test_scripted_reward_errors_are_one_line(tmp_path, tokenizer, body, message):
    module = tmp_path / "bad_reward.py"
    module.write_text(f"def f(prompts, completions):\n    {body}\n")
    reward = load_reward(f"python:{module}:f", tokenizer)
    with pytest.raises(RlhfkitError, match=message):
        reward.score(["a", "b"], ["c", "d"])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("python:nonexistent_module_xyz:f", "cannot import module"),
        ("python:json:no_such_function", "has no function"),
        ("python:missing.py:f", "no such file"),
        ("python:just_a_module", "expected python:MODULE:FUNCTION"),
    ],
)
def test_bad_scripted_reward_specs(tokenizer, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward(spec, tokenizer)
