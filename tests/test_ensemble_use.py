"""A reward-model ensemble's disagreement put to use: ppo's conservative reward (mean − λ·std over
the members) and ``collect --select`` (label the prompts the members disagree on most)."""

from __future__ import annotations

import json
import statistics
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

from conftest import E_COUNT
from rlhfkit import models
from rlhfkit.chat import encode_completion, encode_prompt
from rlhfkit.config import PPOConfig
from rlhfkit.generation import left_pad, right_pad
from rlhfkit.provenance import RunInfo
from rlhfkit.reward import load_reward
from rlhfkit.scoring import Ensemble
from rlhfkit.stages import ppo
from rlhfkit.stages.collect import disagreement, pool_path
from rlhfkit.stages.ppo_data import PromptItem
from rlhfkit.training import read_metrics


def save_rm(tiny_llama_dir, out, members: int):
    """A reward-model directory as train-rm writes one; with ``members`` > 1, an ensemble of that many heads."""
    torch.manual_seed(5)
    rm = models.load_model(str(tiny_llama_dir), kind="reward")
    weight = torch.randn(max(members, 1), rm.config.hidden_size)
    with torch.no_grad():
        rm.score.weight.copy_(weight.mean(0, keepdim=True))  # the model's own head: the members' mean
    tokenizer = models.load_tokenizer(str(tiny_llama_dir))
    models.save_model_dir(rm, tokenizer, out, RunInfo("train-rm", {}, {}))
    if members > 1:
        Ensemble(weight, torch.tensor([1.0, 0.5, 2.0][:members]), torch.tensor([0.0, 0.3, -0.2][:members])).save(out)
    return out


@pytest.fixture(scope="module")
def ensemble_dir(tiny_llama_dir, tmp_path_factory):
    return save_rm(tiny_llama_dir, tmp_path_factory.mktemp("ens") / "rm", members=3)


# --- ppo --conservative-coef --------------------------------------------------------------------------


def test_the_conservative_score_is_the_members_mean_minus_lambda_std(ensemble_dir, tiny_llama_dir):
    tokenizer = models.load_tokenizer(str(tiny_llama_dir))
    reward = load_reward(str(ensemble_dir), tokenizer)
    assert reward.members == 3
    prompts = ["the cat", [{"role": "user", "content": "hi"}], "one two three"]
    texts = ["a red dog.", "hello there", "the sea"]
    stopped = torch.tensor([True, False, True])
    query, query_mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    responses = [encode_completion(tokenizer, t, stopped=bool(s)) for t, s in zip(texts, stopped)]
    response, response_mask = right_pad(responses, tokenizer.pad_token_id)
    rollout = SimpleNamespace(query=query, query_mask=query_mask, response=response, response_mask=response_mask, stopped=stopped)
    items = [PromptItem(str(i), p, ()) for i, p in enumerate(prompts)]
    members = reward.member_scores(prompts, texts, query, query_mask, response, response_mask, stopped=stopped).tolist()
    for coef in (0.0, 0.5):
        config = PPOConfig(policy="p", rm=str(ensemble_dir), prompts="x", out="o", conservative_coef=coef)
        scores, raw, spread = ppo.score(SimpleNamespace(reward=reward), items, texts, rollout, config)
        means = [statistics.fmean(m) for m in members]
        stds = [statistics.pstdev(m) for m in members]  # population std over the 3 members
        assert raw.tolist() == pytest.approx([mu - coef * sd for mu, sd in zip(means, stds)], abs=1e-5)
        assert spread.tolist() == pytest.approx(stds, abs=1e-5) and min(stds) > 0
        assert torch.equal(scores, raw)  # no clip, no missing-EOS penalty


def test_ppo_logs_the_spread_and_refuses_lambda_with_one_member(cli, ensemble_dir, tiny_llama_dir, prompts_file, tmp_path):
    base = ["ppo", "--policy", tiny_llama_dir, "--prompts", prompts_file, "--steps", "2", "--batch-size", "4",
            "--ppo-epochs", "1", "--max-new-tokens", "4", "--sample-every", "0", "--device", "cpu"]  # fmt: skip
    result = cli(*base, "--rm", ensemble_dir, "--out", tmp_path / "ens", "--conservative-coef", "0.5")
    assert result.exit_code == 0, result.stderr
    rows = read_metrics(tmp_path / "ens")
    assert len(rows) == 2 and all(r["objective/score_std"] > 0 for r in rows)
    info = json.loads((tmp_path / "ens" / "rlhfkit.json").read_text())
    assert info["config"]["conservative_coef"] == 0.5
    single = save_rm(tiny_llama_dir, tmp_path / "single", members=1)
    for rm in (single, E_COUNT):
        refused = cli(*base, "--rm", rm, "--out", tmp_path / "o", "--conservative-coef", "0.5")
        lines = [line for line in refused.stderr.splitlines() if not line.startswith("note: ")]  # the --chat-template note
        assert (
            refused.exit_code == 1
            and len(lines) == 1
            and "--conservative-coef: the reward" in lines[0]
            and "one member" in lines[0]
        )
    plain = cli(*base, "--rm", E_COUNT, "--out", tmp_path / "plain")
    assert plain.exit_code == 0 and "objective/score_std" not in read_metrics(tmp_path / "plain")[-1]  # one reward: no spread


# --- collect --select ---------------------------------------------------------------------------------


def test_disagreement_worked_examples():
    assert disagreement(torch.tensor([[1.0, 3.0], [0.0, 0.0]])) == pytest.approx(1.0)
    assert disagreement(torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, 2.0]])) == pytest.approx(2 / 3)
    assert disagreement(torch.tensor([[1.0, 5.0], [2.0, 6.0]])) == 0.0  # the members agree on the difference
    assert disagreement(torch.tensor([[1.0, 2.0]])) is None  # one completion: nothing to rank
    assert pool_path("runs/samples.jsonl") == "runs/samples.pool.jsonl" and pool_path("s.jsonl.gz") == "s.pool.jsonl.gz"


def test_collect_selects_the_prompts_the_ensemble_disagrees_on_most(cli, ensemble_dir, tiny_llama_dir, prompts_file, tmp_path):
    def collect(out):
        result = cli("collect", "--policy", tiny_llama_dir, "--prompts", prompts_file, "--out", out, "--k", "3",
                     "--max-new-tokens", "6", "--select", "2", "--select-by", ensemble_dir)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout), [json.loads(line) for line in out.read_text().splitlines()]

    result, chosen = collect(tmp_path / "s.jsonl")
    pool = [json.loads(line) for line in (tmp_path / "s.pool.jsonl").read_text().splitlines()]
    assert [p["prompt_id"] for p in pool] == list("abcdef") and all(len(p["completions"]) == 3 for p in pool)
    # by hand: every member's score of every completion, the std over members of each pair's score difference, their mean
    reward = load_reward(str(ensemble_dir), None)
    expected = {}
    for line in pool:
        texts = [c["text"] for c in line["completions"]]
        stopped = [c["finish_reason"] == "stop" for c in line["completions"]]
        s = reward.member_scores([line["prompt"]] * 3, texts, stopped=stopped).tolist()  # (3 completions, 3 members)
        pairs = [statistics.pstdev([a - b for a, b in zip(s[i], s[j])]) for i, j in combinations(range(3), 2)]
        expected[line["prompt_id"]] = statistics.fmean(pairs)
    top = sorted(sorted(expected, key=lambda pid: -expected[pid])[:2], key="abcdef".index)
    assert [line["prompt_id"] for line in chosen] == top
    assert chosen == [line for line in pool if line["prompt_id"] in top]  # the lines as sampled, blind order unchanged
    select = result["select"]
    assert (select["pool"], select["selected"], select["members"], result["lines"]) == (6, 2, 3, 2)
    by_id = {p["prompt_id"]: p["disagreement"] for p in select["prompts"]}
    assert by_id == pytest.approx({pid: expected[pid] for pid in top}, rel=1e-4)
    assert select["disagreement"]["pool_mean"] == pytest.approx(statistics.fmean(expected.values()), rel=1e-4)
    assert select["disagreement"]["cutoff"] >= max(v for pid, v in expected.items() if pid not in top) - 1e-6
    # deterministic: the same file again, and a rerun resumes the complete pool without sampling
    _, again = collect(tmp_path / "t.jsonl")
    assert again == chosen
    rerun, same = collect(tmp_path / "s.jsonl")
    assert rerun["collected"] == 0 and same == chosen


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--select", "2"], "--select and --select-by: give both"),
        (["--select", "2", "--select-by", "TINY"], "not a reward-model ensemble"),
        (["--select", "2", "--select-by", E_COUNT], "a scripted reward has no members"),
        (["--select", "2", "--select-by", "ENS", "--out", "-"], "--select: needs --out FILE"),
    ],
)
def test_select_errors_are_one_line(cli, ensemble_dir, tiny_llama_dir, prompts_file, tmp_path, extra, message):
    extra = [str(tiny_llama_dir) if a == "TINY" else str(ensemble_dir) if a == "ENS" else a for a in extra]
    out = ["--out", str(tmp_path / "s.jsonl")] if "--out" not in extra else []
    result = cli("collect", "--policy", tiny_llama_dir, "--prompts", prompts_file, *out, *extra)
    assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "s.pool.jsonl").exists()
