"""train-rm: learns a preference, InstructGPT group batching, normalisation, exact resume,
plain-transformers interchange, LoRA, and one-line CLI errors."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import rlhfkit_command, subprocess_env, write_jsonl
from rlhfkit import chat, models, rm_data
from rlhfkit.chat import encode_completion, encode_prompt
from rlhfkit.config import TrainRMConfig
from rlhfkit.data import records
from rlhfkit.generation import left_pad, right_pad
from rlhfkit.losses import ranking_loss
from rlhfkit.reward import load_reward
from rlhfkit.scoring import last_token_scores, normalization, read_ensemble
from rlhfkit.stages import train_rm
from rlhfkit.testing import _WORDS

WORD = "thanks"  # the synthetic preference: a completion that says it beats one that does not


def preference_data(n_prompts: int, k: int = 4, seed: int = 0, group: bool = True, chat_prompts: bool = False) -> list[dict]:
    """Comparisons of k completions per prompt (one ranking each): every completion containing
    WORD beats every completion without it, in random sentences of the tiny vocabulary."""
    rng = random.Random(seed)
    vocab = [w for w in _WORDS if w not in (WORD, "thank")]
    rows = []
    for p in range(n_prompts):
        text = f"Tell me about the {rng.choice(vocab)} {rng.choice(vocab)}."
        prompt = [{"role": "user", "content": text}] if chat_prompts else text

        def sentence(good: bool) -> str:
            words = [rng.choice(vocab) for _ in range(rng.randint(3, 7))]
            if good:
                words.insert(rng.randint(0, len(words)), WORD)
            return " ".join(words) + "."

        good = [sentence(True) for _ in range(k // 2)]
        bad = [sentence(False) for _ in range(k - k // 2)]
        for g in good:
            for b in bad:
                row = {"prompt": prompt, "chosen": g, "rejected": b}
                if group:
                    row["group"] = f"p{p}/ann-1"
                rows.append(row)
    return rows


def config(model_dir, data, out, **overrides) -> TrainRMConfig:
    base = dict(
        model=str(model_dir), data=str(data), out=str(out), device="cpu", lr=3e-3, batch_size=4, epochs=3, val_fraction=0.2
    )
    return TrainRMConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """One reward model trained on the synthetic preference, shared by several tests."""
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "cmp.jsonl", preference_data(100))
    # a random head, so that learning shows step by step (the probe head starts perfect here: test_rm_head)
    result = train_rm.run(config(tiny_llama_dir, data, root / "rm", eval_every=10, head_init="random"))
    return root / "rm", data, result


# --- learning ---------------------------------------------------------------------------------------


def test_learns_a_preference_and_reports_held_out_accuracy(trained):
    out, _, result = trained
    assert result["metrics"]["rm/accuracy"] >= 0.85
    assert result["metrics"]["rm/margin"] > 0
    assert result["train"]["pairs"] == 320 and result["val"]["pairs"] == 80  # 20 of 100 prompts held out, 4 pairs each
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "rm/accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]  # --eval-every 10, and at the end (3 epochs × 20 steps)
    assert evals[0]["rm/accuracy"] < evals[-1]["rm/accuracy"]
    train_rows = [r for r in rows if "loss/train" in r]
    assert len(train_rows) == 60 and all(r["perf/pairs_per_s"] > 0 for r in train_rows)
    assert train_rows[-1]["loss/train"] < train_rows[0]["loss/train"]
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["stage"] == "train-rm" and info["inputs"]["data"][0]["sha256"]
    assert info["metrics"]["rm/accuracy"] == result["metrics"]["rm/accuracy"]


def test_saved_model_reproduces_the_reported_accuracy(trained, tokenizer):
    """The directory on disk is the model that was evaluated (nothing lost in saving)."""
    out, data, result = trained
    comparisons = records.load(data, records.parse_comparison)
    _, val = rm_data.split_by_prompt(list(comparisons), 0.2, seed=0)
    elements, _ = rm_data.build_elements(val, rm_data.Encoder(tokenizer), 1024)
    model = models.load_model(str(out), kind="reward").eval()
    again = train_rm.evaluate(model, elements, batch_size=7, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    assert float(again["rm/accuracy"]) == pytest.approx(result["metrics"]["rm/accuracy"])
    assert float(again["rm/margin"]) == pytest.approx(result["metrics"]["rm/margin"], rel=1e-4)


# --- InstructGPT batching ---------------------------------------------------------------------------


def test_group_batching_encodes_each_completion_once_and_gives_the_expanded_loss(tokenizer, tiny_llama_dir):
    # two rankings of K = 4 (6 pairs each, InstructGPT-style: every ordered pair of a ranking)
    rankings = {
        "p1": ["a cat said thanks.", "the dog ran.", "a bird.", "river sea sky sun moon."],
        "p2": ["one two.", "red blue.", "yes no yes.", "go"],
    }
    rows = []
    for prompt, ranked in rankings.items():
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                rows.append(
                    records.parse_comparison(
                        {"prompt": prompt, "chosen": ranked[i], "rejected": ranked[j], "group": f"{prompt}/ann"}
                    )
                )
    ungrouped = [records.Comparison(c.prompt, c.chosen, c.rejected) for c in rows]
    encode = rm_data.Encoder(tokenizer)
    grouped, g_stats = rm_data.build_elements(rows, encode, 1024)
    expanded, e_stats = rm_data.build_elements(ungrouped, encode, 1024)
    assert (len(grouped), len(expanded)) == (2, 12)
    assert (g_stats.sequences, e_stats.sequences, g_stats.sequences_if_expanded) == (8, 24, 24)

    torch.manual_seed(0)
    model = models.load_model(str(tiny_llama_dir), kind="reward")
    models.disable_dropout(model)
    seen = []  # rows and real tokens of every backbone forward
    model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["attention_mask"].shape[0], int(kwargs["attention_mask"].sum()))),
        with_kwargs=True,
    )
    scorer = train_rm.RewardScorer(model)

    def loss_and_grads(elements):
        model.zero_grad()
        batch = rm_data.collate(elements, tokenizer.pad_token_id)
        loss, _ = train_rm.pair_loss(scorer(batch.input_ids, batch.attention_mask), batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    g_loss, g_grads = loss_and_grads(grouped)
    e_loss, e_grads = loss_and_grads(expanded)
    assert seen[0][0] == 8 and seen[1][0] == 24  # one forward row per distinct completion vs two per pair
    assert seen[0][1] == sum(len(s) for e in grouped for s in e.sequences) and seen[1][1] == sum(
        len(s) for e in expanded for s in e.sequences
    )
    assert seen[0][1] < seen[1][1]
    torch.testing.assert_close(g_loss, e_loss)
    for name in g_grads:
        torch.testing.assert_close(g_grads[name], e_grads[name], rtol=1e-4, atol=1e-6)
    # for a true ranking this is exactly losses.ranking_loss over the distinct rewards
    batch = rm_data.collate(grouped, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = scorer(batch.input_ids, batch.attention_mask)
        expected, _ = ranking_loss(rewards, [[[0], [1], [2], [3]], [[4], [5], [6], [7]]])
        got, _ = train_rm.pair_loss(rewards, batch)
    torch.testing.assert_close(got, expected)


def test_collate_example_from_the_docstring():
    e1 = rm_data.Element(((5, 6, 7), (5, 8)), (0,), (1,), (0.0,))
    e2 = rm_data.Element(((9, 9), (9, 4, 4, 4), (9, 3)), (0, 2), (1, 1), (1.0, 0.5))
    batch = rm_data.collate([e1, e2], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [5, 8, 0, 0], [9, 9, 0, 0], [9, 4, 4, 4], [9, 3, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert (batch.winners.tolist(), batch.losers.tolist(), batch.margins.tolist()) == ([0, 2, 4], [1, 3, 3], [0.0, 1.0, 0.5])


def test_groups_dedupe_by_content_and_drop_long_pairs(tokenizer):
    rows = [
        records.parse_comparison({"prompt": "q", "chosen": "a", "rejected": "b", "group": "g", "margin": 2}),
        records.parse_comparison({"prompt": "q", "chosen": "b", "rejected": "c", "group": "g"}),
        records.parse_comparison({"prompt": "q", "chosen": "a", "rejected": "c", "group": "g"}),
        records.parse_comparison({"prompt": "q", "chosen": "a", "rejected": "b"}),  # no group: its own element
        records.parse_comparison({"prompt": "q", "chosen": "a " * 50, "rejected": "b", "group": "g"}),  # too long
    ]
    elements, stats = rm_data.build_elements(rows, rm_data.Encoder(tokenizer), max_length=20)
    assert len(elements) == 2 and stats.dropped_too_long == 1 and stats.pairs == 4
    g = elements[0]
    assert len(g.sequences) == 3 and (g.winners, g.losers, g.margins) == ((0, 1, 0), (1, 2, 2), (2.0, 0.0, 0.0))
    assert g.sequences[0] == tuple(chat.encode_prompt(tokenizer, "q") + chat.encode_completion(tokenizer, "a"))
    assert g.sequences[0][-1] == tokenizer.eos_token_id  # scored with the EOS, as ppo scores it


def test_split_by_prompt_is_deterministic_and_disjoint():
    rows = [records.parse_comparison(r) for r in preference_data(30, group=True)]
    train, val = rm_data.split_by_prompt(rows, 0.2, seed=1)
    assert len({rm_data.content_key(c.prompt) for c in val}) == 6
    assert not {rm_data.content_key(c.prompt) for c in train} & {rm_data.content_key(c.prompt) for c in val}
    shuffled = rows[::-1]
    assert {id(c) for c in rm_data.split_by_prompt(shuffled, 0.2, seed=1)[1]} == {id(c) for c in val}  # independent of order
    assert rm_data.split_by_prompt(rows, 0.0, seed=1) == (rows, [])


def test_pair_loss_margin_and_centering_by_hand():
    batch = rm_data.Batch(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
    rewards = torch.tensor([1.0, 0.0])
    plain, stats = train_rm.pair_loss(rewards, batch)
    assert float(plain) == pytest.approx(math.log(1 + math.exp(-1)))  # 0.3133
    with_margin, _ = train_rm.pair_loss(rewards, batch, use_margin=True)
    assert float(with_margin) == pytest.approx(math.log(2))
    centred, _ = train_rm.pair_loss(rewards, batch, center_rewards_coef=0.5)
    assert float(centred) == pytest.approx(math.log(1 + math.exp(-1)) + 0.5 * 1.0)  # η·(r_w + r_l)²
    assert float(stats["accuracy"]) == 1.0


def test_margin_zero_pairs_are_ties_pulled_together(tokenizer):
    """rank-import --tie-pairs writes a tie as a pair with margin 0: no order is learnt from it."""
    rows = [
        records.parse_comparison({"prompt": "q", "chosen": "a", "rejected": "b", "group": "g", "margin": 1.5}),
        records.parse_comparison({"prompt": "q", "chosen": "b", "rejected": "c", "group": "g", "margin": 0}),
    ]
    elements, stats = rm_data.build_elements(rows, rm_data.Encoder(tokenizer), 64)
    assert stats.ties == 1 and elements[0].ties == (False, True)
    batch = rm_data.collate(elements, tokenizer.pad_token_id)
    assert batch.ties.tolist() == [False, True]
    rewards = torch.tensor([2.0, 1.0, 0.0])  # a, b, c
    loss, stats = train_rm.pair_loss(rewards, batch, use_margin=True)
    ordered = math.log(1 + math.exp(-(1.0 - 1.5)))  # −log σ(r_a − r_b − 1.5)
    tie = 0.5 * (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0)))  # −½[log σ(1) + log σ(−1)] = 0.8133
    assert float(loss) == pytest.approx((ordered + tie) / 2)
    assert float(stats["accuracy"]) == 1.0 and float(stats["margin_mean"]) == 1.0  # over the ordered pair only
    equal = torch.tensor([0.5, 0.5], requires_grad=True)
    tie_loss, _ = train_rm.pair_loss(
        equal, rm_data.collate([rm_data.Element(((1,), (2,)), (0,), (1,), (0.0,), None, (True,))], 0)
    )
    assert float(tie_loss.detach()) == pytest.approx(math.log(2))
    tie_loss.backward()
    assert equal.grad.abs().max() == 0  # equal rewards are where a tie wants them


# --- normalisation ----------------------------------------------------------------------------------


def test_normalisation_gives_mean_0_std_1_on_the_training_completions(trained, tokenizer):
    out, data, result = trained
    info = json.loads((out / "rlhfkit.json").read_text())
    reward = info["reward"]
    assert reward == result["reward"] and reward["source"] == "train" and reward["n"] == 320  # distinct training completions
    gain, bias = normalization(info)
    assert (gain, bias) == (reward["gain"], reward["bias"])
    comparisons = records.load(data, records.parse_comparison)
    train_cmp, _ = rm_data.split_by_prompt(list(comparisons), 0.2, seed=0)
    encode = rm_data.Encoder(tokenizer)
    completions = rm_data.comparison_completions(train_cmp)
    seqs = [encode(p, c) for p, c, _ in completions]
    starts = [encode.start(p) for p, _, _ in completions]
    model = models.load_model(str(out), kind="reward").eval()
    raw = train_rm.raw_rewards(
        model, seqs, starts, batch_size=32, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu")
    ).double()
    normalised = gain * raw + bias
    assert len(seqs) == 320
    assert float(normalised.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(normalised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_normalisation_on_norm_samples_and_constant_rewards(tmp_path, tiny_llama_dir, tokenizer):
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"prompt_id": "a", "prompt": [{"role": "user", "content": "hi"}], "completions": [
            {"id": "a-1", "text": "hello there", "finish_reason": "stop"},
            {"id": "a-2", "text": "hello the", "finish_reason": "length"},
        ]},
        {"prompt_id": "b", "prompt": "Say a colour:", "completions": [{"id": "b-1", "text": " red", "finish_reason": "stop"}]},
    ]  # fmt: skip
    write_jsonl(samples, rows)
    reference = rm_data.load_reference(str(samples))
    assert [s for _, _, s in reference] == [True, False, True]  # a truncated sample is scored without EOS, as ppo sees it
    model = models.load_model(str(tiny_llama_dir), kind="reward").eval()
    encode = rm_data.Encoder(tokenizer)
    seqs = [encode(p, c, stopped=s) for p, c, s in reference]
    starts = [encode.start(p) for p, _, _ in reference]
    assert seqs[1][-1] != tokenizer.eos_token_id
    norm = train_rm.reward_normalization(
        model, seqs, starts, batch_size=2, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu")
    )
    raw = train_rm.raw_rewards(
        model, seqs, starts, batch_size=3, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu")
    ).double()
    z = norm["gain"] * raw + norm["bias"]
    assert (
        norm["n"] == 3
        and float(z.mean()) == pytest.approx(0, abs=1e-6)
        and float(z.std(unbiased=False)) == pytest.approx(1, abs=1e-6)
    )
    same = train_rm.reward_normalization(
        model, [seqs[0]] * 4, [starts[0]] * 4, batch_size=2, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu")
    )
    assert (
        same["gain"] == 1.0 and same["bias"] == pytest.approx(-same["raw_mean"]) and same["raw_std"] == pytest.approx(0, abs=1e-6)
    )


# --- interchange ------------------------------------------------------------------------------------

PLAIN = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, seqs = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    scores = [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
print(json.dumps({"scores": scores, "pad_token_id": model.config.pad_token_id, "eos": tok.eos_token_id,
                  "rlhfkit_imported": any(m.startswith("rlhfkit") for m in sys.modules)}))
"""


@pytest.mark.slow  # subprocesses, seconds of imports each: make test-slow
def test_plain_transformers_gives_the_same_raw_scores(trained, tokenizer, tmp_path):
    out, _, _ = trained
    encode = rm_data.Encoder(tokenizer)
    chat_prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Tell me about the cat."}]
    seqs = [
        list(encode("Tell me about the cat.", "the cat said thanks.")),
        list(encode(chat_prompt, "a dog.")),
        list(encode(chat_prompt, "a dog", stopped=False)),
    ]
    assert (
        seqs[1][-1] == tokenizer.eos_token_id == tokenizer.pad_token_id and seqs[1][:-1].count(tokenizer.eos_token_id) >= 2
    )  # EOS inside the prompt too
    model = models.load_model(str(out), kind="reward").eval()
    with torch.no_grad():
        ours = [float(last_token_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))) for s in seqs]
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(out), json.dumps(seqs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not plain["rlhfkit_imported"] and plain["pad_token_id"] is None
    assert plain["scores"] == pytest.approx(ours, abs=1e-5)
    assert ours[1] != pytest.approx(ours[2], abs=1e-3)  # the final EOS is what is scored


def test_lora_with_val_data_and_norm_samples(tmp_path, tiny_llama_dir, tokenizer):
    """LoRA trains the adapters and the score head and saves a merged model (and the adapter);
    --val-data is the held-out set; --norm-samples sets the normalisation."""
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(20, seed=3))
    val_data = write_jsonl(tmp_path / "val.jsonl", preference_data(5, seed=4))
    samples = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {
                "prompt_id": f"s{i}",
                "prompt": "Tell me about the sea.",
                "completions": [
                    {"id": f"s{i}-{j}", "text": f"the sea {w}."} for j, w in enumerate(["is blue", "says thanks", "is long"])
                ],
            }
            for i in range(2)
        ],
    )
    result = train_rm.run(
        config(tiny_llama_dir, data, tmp_path / "rm", lora=True, lora_r=4, epochs=1, save_adapter=True,
               val_data=str(val_data), norm_samples=str(samples))
    )  # fmt: skip
    out = tmp_path / "rm"
    assert result["train"]["pairs"] == 80 and result["val"]["pairs"] == 20  # --val-data replaces the split
    assert result["reward"]["source"] == str(samples) and result["reward"]["n"] == 6
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights) and "score.weight" in weights
    elements, _ = rm_data.build_elements(records.load(val_data, records.parse_comparison), rm_data.Encoder(tokenizer), 1024)
    merged = models.load_model(str(out), kind="reward").eval()
    again = train_rm.evaluate(merged, elements, batch_size=8, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    assert float(again["rm/margin"]) == pytest.approx(result["metrics"]["rm/margin"], rel=1e-4, abs=1e-6)
    torch.manual_seed(0)
    fresh = models.load_model(str(tiny_llama_dir), kind="reward")
    assert not torch.allclose(fresh.score.weight, merged.score.weight)  # the head trained


def test_cli_trains_on_conversational_implicit_prompt_data(cli, tmp_path, tiny_llama_dir):
    """Public preference data in the conversational, implicit-prompt flavour (whole transcripts)."""
    rows = []
    for r in preference_data(12, group=False, chat_prompts=True):
        rows.append(
            {
                "chosen": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}],
                "rejected": r["prompt"] + [{"role": "assistant", "content": r["rejected"]}],
            }
        )
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = cli(
        "train-rm",
        "--model",
        tiny_llama_dir,
        "--data",
        data,
        "--out",
        tmp_path / "rm",
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--val-fraction",
        "0.25",
        "--max-steps",
        "2",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["steps"] == 2
        and summary["train"]["elements"] == summary["train"]["pairs"] == 36
        and summary["val"]["pairs"] == 12
    )
    assert summary["train"]["sequences"] == 72  # no group: two sequences per pair
    assert (tmp_path / "rm" / "rlhfkit.json").is_file() and "rm/accuracy" in summary["metrics"]


# --- exact resume -----------------------------------------------------------------------------------


def _cli_args(model_dir, data, out, *extra):
    return rlhfkit_command("train-rm", "--model", model_dir, "--data", data, "--out", out, "--device", "cpu",
                           "--lr", "1e-3", "--batch-size", "1", "--epochs", "2", "--val-fraction", "0.1", "--save-every", "1",
                           *extra)  # fmt: skip


@pytest.mark.slow  # subprocesses, seconds of imports each: make test-slow
def test_resume_after_sigkill_is_exact(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(40, seed=5))
    env = subprocess_env()
    # the uninterrupted run, in-process (one thread, like the subprocesses) with the same options
    full = train_rm.run(
        config(tiny_llama_dir, data, tmp_path / "full", lr=1e-3, batch_size=1, epochs=2, val_fraction=0.1, save_every=1)
    )
    total = full["steps"]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_args(tiny_llama_dir, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = sorted((out / "checkpoints").glob("step-*/state.json")) if (out / "checkpoints").is_dir() else []
            if done and json.loads(done[-1].read_text())["step"] >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "rlhfkit.json").exists()  # killed mid-run: no final model
    killed_at = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())["step"]
    assert killed_at < total

    resumed = subprocess.run(
        _cli_args(tiny_llama_dir, data, out, "--resume"), capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    steps = [r["step"] for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss/train" in r]
    assert steps == list(range(1, total + 1))  # one uninterrupted history
    assert (
        json.loads((out / "rlhfkit.json").read_text())["reward"]
        == json.loads((tmp_path / "full" / "rlhfkit.json").read_text())["reward"]
    )


# --- CLI errors -------------------------------------------------------------------------------------


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.stdout + result.stderr
    # one error line (the --chat-template note may precede it: the prompts were read before the error)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


def test_cli_errors_are_one_line(cli, tmp_path, tiny_llama_dir):
    good = write_jsonl(tmp_path / "good.jsonl", preference_data(4))
    base = ["train-rm", "--model", tiny_llama_dir, "--out", tmp_path / "rm", "--device", "cpu"]
    _one_line_error(cli(*base, "--data", tmp_path / "missing.jsonl"), "missing.jsonl", "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    _one_line_error(cli(*base, "--data", bad), "bad.jsonl:2: field 'rejected'")
    _one_line_error(cli(*base, "--data", good, "--lr", "0"), "--lr")
    _one_line_error(cli(*base, "--data", good, "--val-fraction", "1.5"), "--val-fraction")
    _one_line_error(cli(*base, "--data", good, "--save-adapter"), "--save-adapter needs --lora")
    _one_line_error(cli(*base, "--data", good, "--use-margin"), "margin")
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for resume in ((), ("--resume",)):
        _one_line_error(cli(*base[:-4], "--out", other, "--data", good, *resume), "not-a-run")
    assert (other / "notes.txt").read_text() == "keep me"
    _one_line_error(cli(*base, "--data", good, "--max-length", "5"), "no training pair left")
    not_samples = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "x", "prompt": "q"}])
    _one_line_error(cli(*base, "--data", good, "--norm-samples", not_samples), "prompts.jsonl:1", "expected samples")
    _one_line_error(cli("train-rm", "--model", tmp_path / "nope", "--data", good, "--out", tmp_path / "rm"), "nope")
    # --resume with nothing to resume starts from the beginning (so a Makefile can always pass it)
    ok = cli(*base, "--data", good, "--max-steps", "1", "--val-fraction", "0", "--resume")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["val"]["pairs"] == 0 and "starting from the beginning" in ok.stderr
    # a finished run keeps its checkpoints; a second run into the same directory must resume
    _one_line_error(cli(*base, "--data", good), "pass --resume")
    _one_line_error(
        cli(*base, "--data", good, "--max-steps", "1", "--val-fraction", "0", "--resume", "--lr", "1e-4"), "option 'lr'"
    )


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tiny_llama_dir):
    """DDP on CPU (gloo): two ranks train on their shards; rank 0 writes one model directory."""
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(20))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlhfkit", "train-rm",
           "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "rm"), "--device", "cpu",
           "--batch-size", "2", "--val-fraction", "0.2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "rm" / "rlhfkit.json").read_text())
    assert info["reward"]["n"] == 64 and "rm/accuracy" in info["metrics"]


# --- --pooling last+mean ------------------------------------------------------------------------------


def _training_completions(data, tokenizer):
    comparisons = records.load(data, records.parse_comparison)
    train_cmp, _ = rm_data.split_by_prompt(list(comparisons), 0.2, seed=0)
    completions = rm_data.comparison_completions(train_cmp)
    return [p for p, _, _ in completions], [c for _, c, _ in completions]


def test_pooling_last_plus_mean_reads_what_the_last_token_misses(tmp_path, tiny_llama_dir, tokenizer):
    """The preference (a word anywhere in the answer) is in the completion's mean hidden state more
    than in the last token's: the probe alone (no fine-tuning) measured 0.788 → 0.913 held out."""
    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(100))
    accuracy = {}
    for pooling in ("last", "last+mean"):
        result = train_rm.run(config(tiny_llama_dir, data, tmp_path / pooling, trainable_layers=0, pooling=pooling))
        accuracy[pooling] = result["metrics"]["rm/accuracy"]
    assert accuracy["last+mean"] >= accuracy["last"] + 0.05, accuracy
    out = tmp_path / "last+mean"
    assert (out / "mean_head.safetensors").is_file() and not (tmp_path / "last" / "mean_head.safetensors").exists()
    assert json.loads((out / "rlhfkit.json").read_text())["reward"]["pooling"] == "last+mean"
    # ppo/eval's reward reads both heads: the training completions come out normalised, from texts and from tensors alike
    reward = load_reward(str(out), tokenizer)
    prompts, texts = _training_completions(data, tokenizer)
    scores = reward.score(prompts, texts)
    assert float(scores.mean()) == pytest.approx(0, abs=1e-4) and float(scores.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    query, query_mask = left_pad([encode_prompt(tokenizer, p) for p in prompts[:6]], tokenizer.pad_token_id)
    response, response_mask = right_pad([encode_completion(tokenizer, c) for c in texts[:6]], tokenizer.pad_token_id)
    from_tensors = reward.score(prompts[:6], texts[:6], query, query_mask, response, response_mask)
    torch.testing.assert_close(from_tensors, scores[:6], atol=1e-4, rtol=1e-4)


def test_last_plus_mean_with_an_ensemble_and_with_lora(tmp_path, tiny_llama_dir, tokenizer):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "cmp.jsonl", preference_data(30))
    prompts, texts = _training_completions(data, tokenizer)
    train_rm.run(config(tiny_llama_dir, data, tmp_path / "ens", pooling="last+mean", ensemble=3, trainable_layers=1, epochs=1))
    members = read_ensemble(tmp_path / "ens")
    hidden_size = models.load_model(str(tiny_llama_dir), kind="reward").config.hidden_size
    assert members is not None and members.weight.shape == (3, 2 * hidden_size)
    reward = load_reward(str(tmp_path / "ens"), tokenizer)
    torch.testing.assert_close(reward.member_scores(prompts, texts).mean(-1), reward.score(prompts, texts), atol=1e-4, rtol=1e-4)

    train_rm.run(config(tiny_llama_dir, data, tmp_path / "lora", pooling="last+mean", lora=True, lora_r=4, epochs=1))
    weights = load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert not any("mean_score" in k or "lora" in k for k in weights)  # the interchange model stays a plain classifier
    mean = load_file(str(tmp_path / "lora" / "mean_head.safetensors"))["weight"]
    assert mean.shape == (1, hidden_size) and bool(torch.isfinite(mean).all()) and float(mean.abs().sum()) > 0
