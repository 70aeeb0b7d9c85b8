"""train-rm's score head (issue "make a few hundred comparisons count"): the probe initialisation
(LP-FT), top-layer training, ensembles and their uncertainty, early stopping, data-size defaults,
and accuracy with its interval."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import write_jsonl
from rlhfkit import models, rm_data
from rlhfkit.probe import bootstrap_weights, choose_l2, fit_probe
from rlhfkit.reward import load_reward
from rlhfkit.scoring import classifier_parts, read_ensemble
from rlhfkit.stages import rm_head, train_rm
from test_train_rm import WORD, config, preference_data


def head_weight(model_dir) -> torch.Tensor:
    model = models.load_model(str(model_dir), kind="reward")
    return classifier_parts(model)[1].weight.detach().clone()


def test_probe_alone_is_the_logistic_regression_on_frozen_features(tmp_path, tiny_llama_dir):
    """--trainable-layers 0: the saved head is exactly the probe fitted on the base model's features."""
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(40))
    result = train_rm.run(config(tiny_llama_dir, data, tmp_path / "rm", val_fraction=0.0, trainable_layers=0))
    assert result["steps"] == 0
    # the same fit, by hand: features of the untouched base model, λ by the same cross-validation
    tokenizer = models.load_tokenizer(str(tiny_llama_dir))
    from rlhfkit.data import records

    elements, _ = rm_data.build_elements(records.load(str(data), records.parse_comparison), rm_data.Encoder(tokenizer), 1024)
    torch.manual_seed(0)
    base = models.load_model(str(tiny_llama_dir), kind="reward").eval()
    cpu = torch.device("cpu")
    features = rm_head.pair_features(base, elements, batch_size=16, pad_token_id=tokenizer.pad_token_id, device=cpu)
    l2, _ = choose_l2(features, seed=0)
    expected = fit_probe(features, l2=l2)
    saved = head_weight(tmp_path / "rm")[0]
    assert result["metrics"]["probe/l2"] == l2
    assert torch.allclose(saved, expected, atol=1e-5)
    # the probe ranks the training pairs better than chance before any fine-tuning
    scores = features.features @ saved
    assert (scores[features.winners] > scores[features.losers]).float().mean() > 0.6


def test_probe_init_starts_fine_tuning_below_chance_loss(tmp_path, tiny_llama_dir):
    """With the probe the first optimizer step already sees a fitted head (loss < ln 2); a random head starts at ≈ ln 2."""
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(40))
    first = {}
    for init in ("probe", "random"):
        train_rm.run(config(tiny_llama_dir, data, tmp_path / init, val_fraction=0.0, head_init=init, max_steps=1, lr=1e-6))
        rows = [json.loads(line) for line in (tmp_path / init / "metrics.jsonl").read_text().splitlines()]
        first[init] = next(r["loss/train"] for r in rows if "loss/train" in r)
    assert first["probe"] < math.log(2) - 0.05
    assert abs(first["random"] - math.log(2)) < 0.05
    assert first["probe"] < first["random"]


def test_trainable_layers_freezes_the_rest(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(20))
    before = models.load_model(str(tiny_llama_dir), kind="reward").state_dict()
    train_rm.run(config(tiny_llama_dir, data, tmp_path / "rm", val_fraction=0.0, trainable_layers=1, max_steps=3))
    after = models.load_model(str(tmp_path / "rm"), kind="reward").state_dict()
    layers = sorted({k.split(".")[2] for k in before if k.startswith("model.layers.")}, key=int)
    top = f"model.layers.{layers[-1]}."
    for name, weight in before.items():
        if name.startswith("score"):
            continue
        moved = not torch.equal(weight, after[name])
        assert moved == (name.startswith(top) or name == "model.norm.weight"), name


def test_ensemble_members_scores_and_uncertainty(tmp_path, tiny_llama_dir):
    """--ensemble 4: one saved one-label model whose score is the members' mean; the members disagree
    more on text unlike the training data than on the training completions."""
    rows = preference_data(60)
    data = write_jsonl(tmp_path / "cmp.jsonl", rows)
    result = train_rm.run(config(tiny_llama_dir, data, tmp_path / "rm", val_fraction=0.0, ensemble=4, epochs=2))
    out = tmp_path / "rm"
    ensemble = read_ensemble(out)
    assert ensemble is not None and ensemble.members == 4
    assert result["reward"]["members"] == 4 and result["reward"]["gain"] == 1.0
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["reward"]["members"] == 4
    assert models.load_model(str(out), kind="reward").config.num_labels == 1  # the interchange format
    tokenizer = models.load_tokenizer(str(out))
    reward = load_reward(str(out), tokenizer)
    assert reward.members == 4
    prompts = [r["prompt"] for r in rows[:24]]
    seen = [r["chosen"] for r in rows[:12]] + [r["rejected"] for r in rows[:12]]
    members = reward.member_scores(prompts, seen)  # (24, 4)
    assert members.shape == (24, 4)
    assert torch.allclose(members.mean(-1), reward.score(prompts, seen), atol=1e-4)  # the saved head is the mean
    # each member separates the training preference
    chosen, rejected = members[:12], members[12:]
    assert ((chosen > rejected).float().mean(0) > 0.8).all()
    # off-distribution: long runs of one repeated word, never seen in training
    rng = random.Random(0)
    odd = [" ".join([rng.choice(["zebra", "quantum", "1234", "!!!"])] * 40) for _ in range(24)]
    spread_seen = members.std(-1, unbiased=False).mean()
    spread_odd = reward.member_scores(prompts, odd).std(-1, unbiased=False).mean()
    assert spread_odd > spread_seen


def test_bootstrap_members_see_different_data(tmp_path):
    w = bootstrap_weights(torch.arange(50), members=3, seed=0)
    assert (w.sum(1) == 50).all() and not torch.equal(w[0], w[1])
    assert (w == 0).any(1).all()  # each member leaves some rankings out


def test_early_stopping_keeps_the_best_held_out_loss(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(60))
    result = train_rm.run(config(tiny_llama_dir, data, tmp_path / "rm", lr=3e-2, epochs=4, early_stopping=True, eval_every=2))
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["loss/eval"]) for r in rows if "loss/eval" in r][:-1]  # the last line re-evaluates the kept weights
    best_step, best_loss = min(evals, key=lambda e: (e[1], e[0]))
    assert result["metrics"]["rm/best_step"] == best_step
    assert result["metrics"]["loss/eval"] == pytest.approx(min(best_loss, evals[-1][1]), rel=1e-5)


def test_epochs_from_data_size_and_accuracy_interval(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(24))  # 24 rankings, batch 4: 6 steps an epoch
    result = train_rm.run(config(tiny_llama_dir, data, tmp_path / "rm", epochs=None, min_steps=20, val_fraction=0.25))
    per_epoch = math.ceil(result["train"]["elements"] / 4)
    assert result["epochs"] == math.ceil(20 / per_epoch) and result["steps"] == result["epochs"] * per_epoch
    m = result["metrics"]
    assert m["rm/accuracy_low"] <= m["rm/accuracy"] <= m["rm/accuracy_high"]
    assert m["rm/pairs"] == result["val"]["pairs"]


def test_too_few_held_out_pairs_are_called_so(cli, tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(12))
    result = cli("train-rm", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / "rm", "--val-fraction", "0.2",
                 "--lr", "3e-3", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "too few held-out pairs to tell" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trainable-layers", "1", "--lora"], "--trainable-layers: not with --lora"),
        (["--trainable-layers", "0", "--head-init", "random"], "--trainable-layers 0 trains the head alone"),
        (["--ensemble", "0"], "--ensemble: must be at least 1"),
        (["--early-stopping", "--val-fraction", "0"], "--early-stopping: needs a held-out set"),
        (["--patience", "2"], "--patience: needs --early-stopping"),
        (["--head-lr", "0"], "--head-lr: must be > 0"),
    ],
)
def test_head_option_errors(cli, tmp_path, tiny_llama_dir, args, message):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(4))
    result = cli("train-rm", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / "rm", *args)
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "rm").exists()


def test_an_unknown_pooling_is_a_usage_error(cli, tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(4))
    result = cli("train-rm", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / "rm", "--pooling", "mean")
    assert result.exit_code == 2 and "--pooling" in result.stderr and "last+mean" in result.stderr
    assert not (tmp_path / "rm").exists()


assert WORD  # the synthetic preference of test_train_rm
