"""train-rm's score head (issue "make a few hundred comparisons count"): the probe initialisation
(LP-FT), top-layer training, ensembles and their uncertainty, early stopping, data-size defaults,
and accuracy with its interval."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from conftest import write_jsonl
from rlhfkit import models, rm_data, scoring
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


# --- --depth: the reward model cut to its bottom layers ----------------------------------------------


@pytest.fixture(scope="module")
def four_layer_dirs(tmp_path_factory):
    from rlhfkit.testing import save_tiny_model

    root = tmp_path_factory.mktemp("deep")
    return {arch: save_tiny_model(root / arch, arch=arch, num_hidden_layers=4) for arch in ("llama", "gpt2")}


def _elements(model_dir, data):
    from rlhfkit.data import records

    tokenizer = models.load_tokenizer(str(model_dir))
    elements, _ = rm_data.build_elements(records.load(str(data), records.parse_comparison), rm_data.Encoder(tokenizer), 1024)
    return tokenizer, elements


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pooling", ["last", "last+mean"])
def test_depth_features_are_what_the_cut_model_reads(tmp_path, four_layer_dirs, arch, pooling):
    """One forward pass gives, for every depth d, exactly the features of the model truncated to d layers."""
    from rlhfkit.scoring import add_mean_head

    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(6))
    tokenizer, elements = _elements(four_layer_dirs[arch], data)
    read = {"batch_size": 5, "pad_token_id": tokenizer.pad_token_id, "device": torch.device("cpu")}

    def load():
        model = models.load_model(str(four_layer_dirs[arch]), kind="reward").eval()
        if pooling == "last+mean":
            add_mean_head(model)
        return model

    by_depth = rm_head.depth_features(load(), elements, mean=pooling == "last+mean", **read)
    assert len(by_depth) == 4
    for d, got in enumerate(by_depth, start=1):
        cut = load()
        rm_head.truncate(cut, d)
        assert len(rm_head.decoder_layers(cut)) == d and cut.config.num_hidden_layers == d
        expected = rm_head.pair_features(cut, elements, **read)
        width = 64 * (2 if pooling == "last+mean" else 1)
        assert got.features.shape == expected.features.shape == (expected.features.size(0), width)
        torch.testing.assert_close(got.features, expected.features, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.winners, expected.winners) and torch.equal(got.groups, expected.groups)
    assert not torch.allclose(by_depth[0].features, by_depth[-1].features)


def test_choose_depth_takes_the_lowest_cross_validated_loss():
    """Depth 2 carries the preference, depths 1 and 3 are noise: the probe's CV loss picks 2; equal
    losses go to the deeper model."""
    from rlhfkit.probe import PairFeatures

    g = torch.Generator().manual_seed(0)
    n_groups, per = 30, 4
    quality = torch.randn(n_groups * per, generator=g)
    winners, losers, groups = [], [], []
    for grp in range(n_groups):
        rows = list(range(grp * per, grp * per + per))
        for a in rows:
            for b in rows:
                if quality[a] > quality[b]:
                    winners.append(a), losers.append(b), groups.append(grp)
    noise = torch.randn(quality.numel(), 3, generator=g)

    def pairs(features):
        return PairFeatures(features, torch.tensor(winners), torch.tensor(losers), torch.zeros(len(winners), dtype=torch.bool),
                            torch.tensor(groups))  # fmt: skip

    signal = torch.cat([quality[:, None], noise[:, :2]], 1)
    by_depth = [pairs(noise), pairs(signal), pairs(torch.randn(quality.numel(), 3, generator=g))]
    depth, l2, losses = rm_head.choose_depth(by_depth, l2=None, seed=0)
    assert depth == 2 and set(losses) == {1, 2, 3}
    assert losses[2] == min(losses.values()) and losses[2] < 0.5 < min(losses[1], losses[3])
    assert l2 == choose_l2(by_depth[1], seed=0)[0]
    same = [pairs(signal), pairs(signal)]
    assert rm_head.choose_depth(same, l2=1.0, seed=0)[0] == 2  # a tie: the deeper one


def test_depth_auto_saves_a_cut_model_that_loads_anywhere(tmp_path, four_layer_dirs):
    """--depth auto --trainable-layers 0: the saved reward model has the chosen number of layers, its
    weights are the base model's bottom ones, plain transformers loads it, and rlhfkit scores with it."""
    import transformers

    base_dir = four_layer_dirs["llama"]
    rows = preference_data(30)
    data = write_jsonl(tmp_path / "cmp.jsonl", rows)
    chosen = train_rm.run(config(base_dir, data, tmp_path / "auto", val_fraction=0.0, trainable_layers=0, depth="auto",
                                 pooling="last+mean"))  # fmt: skip
    assert 1 <= chosen["depth"] <= 4 and chosen["metrics"]["rm/depth"] == chosen["depth"]
    assert models.load_model(str(tmp_path / "auto"), kind="reward").config.num_hidden_layers == chosen["depth"]

    result = train_rm.run(config(base_dir, data, tmp_path / "rm", val_fraction=0.0, trainable_layers=0, depth="2",
                                 pooling="last+mean"))  # fmt: skip
    assert result["depth"] == 2
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert plain.config.num_hidden_layers == 2 and len(plain.model.layers) == 2
    base = models.load_model(str(base_dir), kind="reward").state_dict()
    for name, weight in plain.state_dict().items():
        if not name.startswith("score"):
            assert torch.equal(weight, base[name]), name
    reward = load_reward(str(tmp_path / "rm"), models.load_tokenizer(str(base_dir)))
    assert len(rm_head.decoder_layers(reward.model)) == 2
    chosen_scores = reward.raw_scores([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected_scores = reward.raw_scores([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen_scores > rejected_scores).float().mean() > 0.9  # the cut model ranks what its probe learnt


def test_depth_auto_resumes_at_the_depth_it_chose(tmp_path, four_layer_dirs, monkeypatch):
    """A resumed --depth auto run cuts the model where the interrupted run did (its checkpoint's
    state), and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    base_dir = four_layer_dirs["llama"]
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(12))
    options = dict(val_fraction=0.0, depth="auto", trainable_layers=1, batch_size=2, epochs=2, lr=1e-3, save_every=1)
    chosen = []

    def shallow(by_depth, *, l2, seed):  # the choice is forced to 1 layer so that "all" would differ
        chosen.append(len(by_depth))
        return 1, 1.0, {d: 0.5 for d in range(1, len(by_depth) + 1)}

    monkeypatch.setattr(rm_head, "choose_depth", shallow)
    run = tmp_path / "run"
    full = train_rm.run(config(base_dir, data, run, keep_checkpoints=0, **options))
    assert full["depth"] == 1 and chosen == [4] and full["steps"] > 3
    shutil.copytree(run, tmp_path / "full")
    # the run as a SIGKILL after step 3 leaves it: that checkpoint, the metrics, no final model
    for path in run.iterdir():
        if path.name not in ("checkpoints", "metrics.jsonl"):
            path.unlink()
    for path in (run / "checkpoints").iterdir():
        if path.name != "step-000003":
            shutil.rmtree(path)
    resumed = train_rm.run(config(base_dir, data, run, resume=True, keep_checkpoints=0, **options))
    assert chosen == [4]  # not chosen again: the depth came from the checkpoint
    assert resumed["depth"] == 1 and resumed["steps"] == full["steps"]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and not any(".layers.1." in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "0"], "--depth 0: expected all, auto or a number of layers"),
        (["--depth", "deep"], "--depth deep: expected all, auto or a number of layers"),
        (["--depth", "auto", "--head-init", "random"], "--depth auto chooses the layer by the probe"),
        (["--depth", "3"], "--depth 3:"),
    ],
)
def test_depth_option_errors(cli, tmp_path, tiny_llama_dir, args, message):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(4))
    result = cli("train-rm", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / "rm", "--device", "cpu", *args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    if args == ["--depth", "3"]:
        assert "has 2 decoder layers" in result.stderr
    assert not (tmp_path / "rm").exists()


# --- --feature-layers: the head reads several layers ------------------------------------------------


def test_read_layers_spaces_them_evenly(four_layer_dirs):
    model = models.load_model(str(four_layer_dirs["llama"]), kind="reward")
    assert rm_head.read_layers(model, 1) == () and scoring.feature_layers(model) == ()
    assert rm_head.read_layers(model, 2) == (2,)
    assert rm_head.read_layers(model, 3) == (1, 3)  # round(4/3), round(8/3)
    assert rm_head.read_layers(model, 4) == (1, 2, 3) and scoring.feature_layers(model) == (1, 2, 3)
    with pytest.raises(ValueError, match="5 feature layers: the model has 4"):
        rm_head.read_layers(model, 5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_multi_layer_features_are_each_layers_cut_model_features(tmp_path, four_layer_dirs, arch):
    """[last ⊕ mean] of the last layer, then of each lower layer read: exactly what the model cut to
    that layer reads (`depth_features`)."""
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(5))
    tokenizer, elements = _elements(four_layer_dirs[arch], data)
    read = {"batch_size": 4, "pad_token_id": tokenizer.pad_token_id, "device": torch.device("cpu")}
    model = models.load_model(str(four_layer_dirs[arch]), kind="reward").eval()
    by_depth = rm_head.depth_features(model, elements, mean=True, **read)
    assert rm_head.read_layers(model, 3) == (1, 3)
    scoring.add_mean_head(model)
    assert scoring.mean_head(model).weight.shape == (1, 64 * 5)  # mean of layer 4, [last ⊕ mean] of layers 1 and 3
    got = rm_head.pair_features(model, elements, **read).features
    expected = torch.cat([by_depth[3].features, by_depth[0].features, by_depth[2].features], 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_feature_layers_end_to_end(tmp_path, four_layer_dirs):
    """--feature-layers 3: the probe is fitted on the multi-layer features, the saved model records
    its layers and reads them again in ppo/eval (`load_reward`); plain transformers still loads it."""
    import transformers

    base_dir = four_layer_dirs["llama"]
    rows = preference_data(30)
    data = write_jsonl(tmp_path / "cmp.jsonl", rows)
    result = train_rm.run(config(base_dir, data, tmp_path / "rm", val_fraction=0.0, trainable_layers=0, pooling="last+mean",
                                 feature_layers=3, ensemble=2))  # fmt: skip
    assert result["steps"] == 0
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["rlhfkit_feature_layers"] == [1, 3] and saved["num_hidden_layers"] == 4
    assert transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).config.num_labels == 1
    assert read_ensemble(tmp_path / "rm").weight.shape == (2, 64 * 6)

    tokenizer = models.load_tokenizer(str(base_dir))
    reward = load_reward(str(tmp_path / "rm"), tokenizer)
    assert scoring.feature_layers(reward.model) == (1, 3)
    chosen = reward.raw_scores([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = reward.raw_scores([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean() > 0.9
    # the saved score is the probe's: the mean of the normalised members, read off the multi-layer features
    _, elements = _elements(base_dir, data)
    model = models.load_model(str(base_dir), kind="reward").eval()
    rm_head.read_layers(model, 3)
    scoring.add_mean_head(model)
    cpu = torch.device("cpu")
    features = rm_head.pair_features(model, elements, batch_size=16, pad_token_id=tokenizer.pad_token_id, device=cpu)
    members = read_ensemble(tmp_path / "rm")
    by_hand = members.scores(features.features).mean(1)  # (N,)
    by_model = scoring.head_scores(reward.model, features.features) * reward.gain + reward.bias
    torch.testing.assert_close(by_model, by_hand, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--feature-layers", "2"], "--feature-layers: reads [last ⊕ mean] of each layer; use it with --pooling last+mean"),
        (["--feature-layers", "0", "--pooling", "last+mean"], "--feature-layers: must be at least 1"),
        (["--feature-layers", "3", "--pooling", "last+mean"], "--feature-layers 3: the reward model has 2 decoder layers"),
    ],
)
def test_feature_layers_option_errors(cli, tmp_path, tiny_llama_dir, args, message):
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(4))
    result = cli("train-rm", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / "rm", "--device", "cpu", *args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "rm").exists()
