"""--chat-template auto|always|never: a string prompt to a model with a chat template is rendered as
one user turn, the same way in collect, ppo, eval, train-rm and sft (and by the reward model when it
re-encodes texts); ``never`` keeps it raw; the choice is recorded where the run is recorded."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import write_jsonl
from rlhfkit import chat, rm_data
from rlhfkit.models import load_tokenizer

TEXT = "Tell me about the cat."
AS_CHAT = [{"role": "user", "content": TEXT}]


@pytest.fixture()
def tok(tiny_llama_dir):
    return load_tokenizer(str(tiny_llama_dir))


def expected_ids(tok, mode: str) -> tuple[int, ...]:
    """What every stage must encode TEXT to: the messages rendering (auto/always), or the raw text (never)."""
    return tuple(chat.encode_prompt(tok, AS_CHAT) if mode != "never" else tok(TEXT)["input_ids"])


@pytest.fixture()
def sampled_prompts(monkeypatch):
    """The prompt ids every `generation.sample` call of a stage receives (stages import it when they run)."""
    import rlhfkit.generation as generation

    seen: list[tuple[int, ...]] = []
    real = generation.sample

    def sample(model, prompts, *args, **kwargs):
        seen.extend(tuple(p) for p in prompts)
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "sample", sample)
    return seen


# --- the rendering itself ---------------------------------------------------------------------------


def test_modes_on_a_tokenizer_with_and_without_a_chat_template(tok, capsys):
    chatml = "<|im_start|>user\nTell me about the cat.<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render_prompt(tok, TEXT) == chat.render_prompt(tok, AS_CHAT) == chatml  # auto, the default
    assert chat.render_prompt(tok, TEXT, "always") == chatml
    assert chat.render_prompt(tok, TEXT, "never") == TEXT
    assert chat.render_prompt(tok, AS_CHAT, "never") == chatml  # a conversation always goes through the template
    # a rendered prompt holds its special tokens: no BOS added in front (the raw one gets whatever the tokenizer adds)
    assert chat.encode_prompt(tok, TEXT) == tok(chatml, add_special_tokens=False)["input_ids"]
    assert chat.encode_prompt(tok, TEXT, "never") == tok(TEXT)["input_ids"]

    plain = copy.deepcopy(tok)
    plain.chat_template = None  # a base model: auto keeps its prompts raw, always uses ChatML
    assert chat.render_prompt(plain, TEXT) == TEXT
    assert chat.render_prompt(plain, TEXT, "always") == chatml
    with pytest.raises(ValueError, match="auto, always or never"):
        chat.render_prompt(tok, TEXT, "sometimes")


def test_auto_says_once_per_model_that_it_renders_string_prompts(tok, capsys):
    capsys.readouterr()
    chat.encode_prompt(tok, TEXT)
    chat.encode_prompt(tok, "another prompt")
    chat.encode_prompt(tok, TEXT, "always")
    err = capsys.readouterr().err
    assert err.count("note: prompts are plain strings") == 1, err
    assert "has a chat template: rendering them as user turns (--chat-template never keeps them raw)" in err
    other = copy.deepcopy(tok)
    chat.encode_prompt(other, AS_CHAT)  # a conversation: nothing to say
    chat.encode_prompt(other, TEXT, "never")
    assert capsys.readouterr().err == ""


def test_the_reward_model_and_train_rm_encode_string_prompts_the_same_way(tok):
    for mode in ("auto", "never"):
        encode = rm_data.Encoder(tok, mode)
        completion = chat.encode_completion(tok, "red")
        assert encode(TEXT, "red") == expected_ids(tok, mode) + tuple(completion)


# --- every stage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_collect_renders_string_prompts_as_told(cli, tiny_llama_dir, tok, tmp_path, sampled_prompts, mode):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": TEXT}])
    out = tmp_path / "s.jsonl"
    result = cli("collect", "--policy", tiny_llama_dir, "--prompts", prompts, "--out", out, "--k", "2", "--max-new-tokens", "3",
                 "--chat-template", mode)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert set(sampled_prompts) == {expected_ids(tok, mode)}
    line = json.loads(out.read_text())
    assert line["prompt"] == TEXT and line["sampling"]["chat_template"] == mode  # the prompt as given; the mode recorded
    assert ("note: prompts are plain strings" in result.stderr) == (mode == "auto")


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_ppo_renders_string_prompts_as_told_and_records_the_mode(cli, tiny_llama_dir, tok, tmp_path, sampled_prompts, mode):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": TEXT}])
    out = tmp_path / "ppo"
    ptx = write_jsonl(tmp_path / "ptx.jsonl", [{"prompt": TEXT, "response": "red"}])
    result = cli("ppo", "--policy", tiny_llama_dir, "--rm", "python:tests/ppo_rewards.py:constant", "--prompts", prompts,
                 "--out", out, "--steps", "1", "--batch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "3",
                 "--ptx-data", ptx, "--ptx-coef", "0.1", "--sample-every", "0", "--device", "cpu",
                 "--chat-template", mode)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert set(sampled_prompts) == {expected_ids(tok, mode)}
    assert json.loads((out / "rlhfkit.json").read_text())["config"]["chat_template"] == mode


def test_ppo_passes_its_mode_to_the_reward_model(tiny_llama_dir, tmp_path):
    import torch

    from rlhfkit import models
    from rlhfkit.config import PPOConfig
    from rlhfkit.provenance import RunInfo
    from rlhfkit.stages.ppo_models import build_models

    torch.manual_seed(0)
    rm = models.load_model(str(tiny_llama_dir), kind="reward")
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    tok = load_tokenizer(str(tiny_llama_dir))
    rm_dir = models.save_model_dir(rm, tok, tmp_path / "rm", RunInfo("train-rm", {}, {}))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": TEXT}])
    for mode in ("never", "always"):
        config = PPOConfig(policy=str(tiny_llama_dir), rm=str(rm_dir), prompts=str(prompts), out=str(tmp_path / "o"),
                           device="cpu", batch_size=2, chat_template=mode)  # fmt: skip
        reward = build_models(config, tok, torch.device("cpu"), torch.float32).reward
        assert reward.chat_template == mode
        # re-encoding the texts (no token ids given) renders a string prompt as the policy's prompts were rendered
        as_string, as_chat = reward.score([TEXT, AS_CHAT], ["red", "red"]).tolist()
        assert (as_string == as_chat) == (mode == "always"), (as_string, as_chat)


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_eval_renders_string_prompts_as_told(cli, tiny_llama_dir, tok, tmp_path, sampled_prompts, mode):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": TEXT}])
    result = cli("eval", "--policy", f"a={tiny_llama_dir}", "--baseline", f"b={tiny_llama_dir}", "--prompts", prompts,
                 "--max-new-tokens", "3", "--device", "cpu", "--chat-template", mode)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert set(sampled_prompts) == {expected_ids(tok, mode)}
    assert json.loads(result.stdout)["sampling"]["chat_template"] == mode


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_train_rm_encodes_string_prompts_as_told_and_records_the_mode(tiny_llama_dir, tok, tmp_path, monkeypatch, mode):
    from rlhfkit.config import TrainRMConfig
    from rlhfkit.stages import train_rm

    built = []
    real = rm_data.build_elements

    def build_elements(comparisons, encode, max_length):
        elements, stats = real(comparisons, encode, max_length)
        built.extend(elements)
        return elements, stats

    monkeypatch.setattr(rm_data, "build_elements", build_elements)
    data = write_jsonl(tmp_path / "cmp.jsonl", [{"prompt": TEXT, "chosen": "red", "rejected": "blue"}] * 2)
    out = tmp_path / "rm"
    train_rm.run(TrainRMConfig(model=str(tiny_llama_dir), data=str(data), out=str(out), device="cpu", max_steps=1,
                               val_fraction=0.0, chat_template=mode))  # fmt: skip
    prompt = expected_ids(tok, mode)
    sequences = [s for e in built for s in e.sequences]
    assert sequences and all(s[: len(prompt)] == prompt for s in sequences)
    assert json.loads((out / "rlhfkit.json").read_text())["config"]["chat_template"] == mode


def test_sft_prompt_response_demonstrations_follow_the_mode(tok):
    from rlhfkit.demonstrations import encode_prompt_response

    for mode in ("auto", "never"):
        ids, labels = encode_prompt_response(tok, TEXT, "red", mode)
        prompt = expected_ids(tok, mode)
        assert tuple(ids[: len(prompt)]) == prompt and set(labels[: len(prompt)]) == {-100}


def test_a_bad_mode_is_one_line(cli, tiny_llama_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": TEXT}])
    result = cli("collect", "--policy", tiny_llama_dir, "--prompts", prompts, "--out", tmp_path / "s.jsonl",
                 "--chat-template", "raw")  # fmt: skip
    assert result.exit_code == 2 and "--chat-template" in result.stderr
