"""``rlhfkit sft`` end to end on a tiny model: learning, gradient accumulation, exact resume after
SIGKILL, torchrun with two processes, LoRA, and the command's error paths."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rlhfkit_command, subprocess_env
from rlhfkit.data.records import Demonstration
from rlhfkit.demonstrations import collate, encode_demonstration
from rlhfkit.testing import corpus, save_tiny_model
from rlhfkit.training import Dist, latest_checkpoint, read_metrics


def write_demos(path: Path, n: int, seed: int = 0) -> Path:
    """A small demonstration set that mixes the three shapes, from the built-in pseudo-English corpus."""
    lines = corpus(3 * n, seed=seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b, c = lines[3 * i : 3 * i + 3]
            record = [
                {"text": f"{a} {b}"},
                {"prompt": a, "response": b},
                {
                    "messages": [
                        {"role": "user", "content": a},
                        {"role": "assistant", "content": b},
                        {"role": "user", "content": c},
                        {"role": "assistant", "content": a},
                    ]
                },  # fmt: skip
            ][i % 3]
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("data") / "demos.jsonl", 120)


@pytest.fixture(scope="module")
def no_dropout_dir(tmp_path_factory):
    """A tiny Llama without dropout: runs that must match across batch splits or processes."""
    path = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-nodrop")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.0}))
    return path


def sft(cli, *args):
    result = cli("sft", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


# --- learning ---------------------------------------------------------------------------------------


def test_training_loss_and_held_out_perplexity_go_down(cli, tiny_llama_dir, demos, tmp_path):
    out = tmp_path / "sft"
    result = sft(cli, "--model", tiny_llama_dir, "--data", demos, "--out", out, "--epochs", 3, "--lr", 3e-3,
                 "--batch-size", 8, "--max-length", 64, "--val-fraction", 0.2, "--eval-every", 10, "--log-every", 1,
                 "--warmup-steps", 2)  # fmt: skip
    rows = read_metrics(out)
    train = [r["loss/train"] for r in rows if "loss/train" in r]
    evals = [(r["step"], r["eval/perplexity"]) for r in rows if "eval/perplexity" in r]
    assert len(train) == result["train/steps"] == 36  # 96 training examples / 8 per step × 3 epochs
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5
    assert evals[0][0] == 0 and [s for s, _ in evals] == [0, 10, 20, 30, 36]
    assert evals[-1][1] < 0.5 * evals[0][1]  # held-out perplexity (from ~vocabulary size) at least halves
    assert result["eval/perplexity"] == evals[-1][1] and result["eval/perplexity_initial"] == evals[0][1]
    assert all(r["perf/tokens_per_s"] > 0 and "train/lr" in r and "train/grad_norm" in r for r in rows if "loss/train" in r)

    # a plain transformers directory + rlhfkit.json with config, input hashes, metrics, data report
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["stage"] == "sft" and info["config"]["lr"] == 3e-3 and info["config"]["val_fraction"] == 0.2
    assert info["inputs"]["data"][0]["sha256"] and info["inputs"]["model"][0]["sha256"]
    for key in ("loss/train", "loss/eval", "eval/perplexity", "perf/tokens_per_s"):
        assert info["metrics"][key] == result[key]
    assert info["data"]["train"]["examples"] == 96 and info["data"]["val"]["examples"] == 24
    assert info["data"]["train"]["kinds"].keys() == {"text", "prompt", "messages"}
    assert (out / "checkpoints").is_dir() and not list(out.parent.glob(".sft*"))  # no temporary leftovers


def test_truncation_is_reported_not_silent(cli, tiny_llama_dir, demos, tmp_path):
    out = tmp_path / "sft"
    result = cli("sft", "--model", tiny_llama_dir, "--data", demos, "--out", out, "--max-steps", 1, "--max-length", 12)
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["data"]["train"]
    assert stats["truncated"] > 0 and stats["dropped_no_target"] > 0  # chats whose assistant turn starts after 12 tokens
    assert f"{stats['truncated']} truncated at --max-length 12" in " ".join(result.stderr.split())
    assert json.loads((out / "rlhfkit.json").read_text())["data"]["train"]["truncated"] == stats["truncated"]


def test_packing_trains_on_fewer_longer_rows(cli, tiny_llama_dir, demos, tmp_path):
    val = write_demos(tmp_path / "val.jsonl", 12, seed=7)
    result = sft(cli, "--model", tiny_llama_dir, "--data", demos, "--val-data", val, "--out", tmp_path / "sft", "--packing",
                 "--max-length", 128, "--batch-size", 4, "--epochs", 1, "--lr", 3e-3, "--log-every", 1)  # fmt: skip
    stats = result["data"]["train"]
    assert stats["rows"] < stats["examples"] / 2
    assert result["train/steps"] == -(-stats["rows"] // 4)
    assert result["data"]["val"]["examples"] == result["data"]["val"]["rows"] == 12  # held-out rows are never packed
    assert result["eval/perplexity"] < result["eval/perplexity_initial"]


def test_bf16_autocast_and_gradient_checkpointing_on_cpu(cli, tiny_llama_dir, demos, tmp_path):
    out = tmp_path / "sft"
    result = sft(
        cli,
        "--model",
        tiny_llama_dir,
        "--data",
        demos,
        "--out",
        out,
        "--max-steps",
        2,
        "--bf16",
        "--gradient-checkpointing",
        "--max-length",
        32,
    )
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["precision"] == {"weights": "float32", "bf16_autocast": True}
    assert 0 < result["loss/train"] < 100 and weights(out)["model.norm.weight"].dtype == torch.float32


@pytest.mark.parametrize("fast_bf16", ["1", "0"])
def test_dtype_auto_on_cpu_follows_the_bf16_detection(cli, tiny_llama_dir, demos, tmp_path, monkeypatch, fast_bf16):
    """--dtype auto (the default) on a CPU: bf16 autocast with float32 weights where bf16 is faster
    (models.cpu_bf16_fast, forced here with RLHFKIT_CPU_BF16), plain float32 elsewhere."""
    monkeypatch.setenv("RLHFKIT_CPU_BF16", fast_bf16)
    out = tmp_path / "sft"
    sft(cli, "--model", tiny_llama_dir, "--data", demos, "--out", out, "--max-steps", 1, "--max-length", 32)
    info = json.loads((out / "rlhfkit.json").read_text())
    assert info["precision"] == {"weights": "float32", "bf16_autocast": fast_bf16 == "1"}
    assert weights(out)["model.norm.weight"].dtype == torch.float32


# --- gradient accumulation ------------------------------------------------------------------------


def test_gradient_accumulation_normalises_by_the_step_token_count(tokenizer):
    """batch 4 × accumulation 1 and batch 2 × accumulation 2 give the same gradient: the loss is
    the sum of token losses over the optimizer step / the number of labelled tokens in the step."""
    from rlhfkit.stages.sft import TokenNLL, accumulate_gradients
    from rlhfkit.testing import make_model

    texts = ["the cat is red.", "one two three four five six seven eight", "hi", "a dog and a bird on a tree"]
    examples = [encode_demonstration(tokenizer, Demonstration(text=t), 64) for t in texts]

    def grads(split):
        model = make_model(tokenizer, seed=3).eval()  # no dropout: both runs see the same function
        batches = [collate(examples[i:j], tokenizer.pad_token_id) for i, j in split]
        nll, label_tokens, tokens = accumulate_gradients(TokenNLL(model), batches, device=torch.device("cpu"), dist=Dist())
        assert label_tokens == sum(e.num_label_tokens for e in examples) and tokens == sum(len(e) for e in examples)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, nll

    one, nll_one = grads([(0, 4)])
    two, nll_two = grads([(0, 2), (2, 4)])
    torch.testing.assert_close(nll_one, nll_two)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-7)
    # what the test guards against: mean loss per micro-batch, divided by the accumulation steps
    model = make_model(tokenizer, seed=3).eval()
    for i, j in [(0, 2), (2, 4)]:
        batch = collate(examples[i:j], tokenizer.pad_token_id)
        (model(input_ids=batch.input_ids, labels=batch.labels).loss / 2).backward()
    naive = dict(model.named_parameters())["model.embed_tokens.weight"].grad  # (tied with lm_head)
    assert not torch.allclose(naive, one["model.embed_tokens.weight"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_layer_on_trained_positions_only_gives_the_full_loss_and_gradient(tokenizer, arch):
    from rlhfkit.stages.sft import TokenNLL
    from rlhfkit.testing import make_model

    demos = [Demonstration(prompt="Name a color.", response="red"), Demonstration(text="one two three"),
             Demonstration(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]  # fmt: skip
    batch = collate([encode_demonstration(tokenizer, d, 64) for d in demos], tokenizer.pad_token_id)
    results = []
    for selective in (True, False):
        module = TokenNLL(make_model(tokenizer, arch=arch, seed=1).eval())
        assert module.selective and module.check(batch)
        module.selective = selective
        nll = module(batch)
        nll.backward()
        results.append((nll.detach(), {n: p.grad for n, p in module.model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_a_model_that_post_processes_its_logits_keeps_the_full_forward(tokenizer):
    from transformers import AutoModelForCausalLM, Gemma2Config

    from rlhfkit.stages.sft import TokenNLL
    from rlhfkit.testing import make_model

    batch = collate([encode_demonstration(tokenizer, Demonstration(text="the cat is red."), 64)], tokenizer.pad_token_id)
    # known from the config: Gemma 2 soft-caps its logits
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)  # fmt: skip
    assert not TokenNLL(AutoModelForCausalLM.from_config(config)).selective
    # found by the check: a forward that rescales the logits
    model = make_model(tokenizer).eval()
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out

    model.forward = scaled
    module = TokenNLL(model)
    assert module.selective and not module.check(batch) and not module.selective
    torch.testing.assert_close(module(batch), module.full(batch))


def test_batch_4_equals_batch_2_with_accumulation_2(cli, no_dropout_dir, demos, tmp_path):
    common = ("--model", no_dropout_dir, "--data", demos, "--max-steps", 3, "--lr", 1e-3, "--max-length", 48)
    sft(cli, *common, "--out", tmp_path / "a", "--batch-size", 4)
    sft(cli, *common, "--out", tmp_path / "b", "--batch-size", 2, "--grad-accum", 2)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    base = weights(no_dropout_dir)
    assert not torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    for name in a:  # Adam magnifies float noise in near-zero gradients: allow 1% of one step's size (lr)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # inductor compiles the layer (C++), ~30 s on 2 cores
def test_compile_trains_the_same_weights(cli, no_dropout_dir, demos, tmp_path):
    """--compile (every decoder layer through torch.compile) changes the speed, not the update: the
    same weights as eager after 3 steps of sequences of different lengths, under the same names."""
    common = ("--model", no_dropout_dir, "--data", demos, "--max-steps", 3, "--lr", 1e-3, "--max-length", 48, "--batch-size", 4)
    from torch._dynamo.utils import counters

    sft(cli, *common, "--out", tmp_path / "eager")
    torch._dynamo.reset()  # a layer compiled by an earlier test would be reused without counting
    graphs = counters["stats"]["unique_graphs"]
    sft(cli, *common, "--out", tmp_path / "compiled", "--compile")
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile (the cli fixture runs in this process)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], weights(no_dropout_dir)["model.embed_tokens.weight"])
    for name in a:  # fused kernels round differently; Adam magnifies it in near-zero gradients (as above)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# --- exact resume, torchrun -------------------------------------------------------------------------


@pytest.mark.slow  # subprocesses, seconds of imports each: make test-slow
def test_resume_after_sigkill_ends_with_the_same_weights(tiny_llama_dir, demos, tmp_path):
    # the tiny Llama has attention dropout 0.1: the RNG states are restored too
    args = ("--model", tiny_llama_dir, "--data", demos, "--max-steps", 60, "--save-every", 4, "--batch-size", 8,
            "--max-length", 64, "--lr", 1e-3, "--val-fraction", 0.1, "--eval-every", 20)  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(
        rlhfkit_command("sft", *args, "--out", full), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    proc = subprocess.Popen(
        rlhfkit_command("sft", *args, "--out", killed), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while latest_checkpoint(killed) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, proc.stderr.read().decode()[-2000:]
    checkpoint = latest_checkpoint(killed)
    assert checkpoint is not None and not (killed / "model.safetensors").exists()
    killed_at = json.loads((checkpoint / "state.json").read_text())["step"]
    assert killed_at < 60

    resumed = subprocess.run(
        rlhfkit_command("sft", *args, "--out", killed, "--resume"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {checkpoint}" in " ".join(resumed.stderr.split())
    stdout, stderr = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, stderr.decode()[-2000:]

    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    # metrics.jsonl reads as one run: every step once
    steps = [r["step"] for r in read_metrics(killed) if "loss/train" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert json.loads(resumed.stdout)["loss/eval"] == pytest.approx(json.loads(stdout)["loss/eval"], rel=1e-5)


@pytest.mark.slow  # subprocesses, seconds of imports each: make test-slow
def test_torchrun_two_processes_match_one_process_and_write_once(cli, no_dropout_dir, demos, tmp_path):
    """2 ranks × batch 2 is the same optimizer step as 1 process × batch 4 (gloo on CPU)."""
    common = (
        "--model",
        no_dropout_dir,
        "--data",
        demos,
        "--max-steps",
        3,
        "--lr",
        1e-3,
        "--max-length",
        48,
        "--val-fraction",
        0.1,
    )
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlhfkit", "sft",
           *map(str, common), "--out", str(out), "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 alone prints and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert (out / "rlhfkit.json").is_file() and len(list((out / "checkpoints").iterdir())) == 1

    single = sft(cli, *common, "--out", tmp_path / "single", "--batch-size", 4)
    a, b = weights(out), weights(tmp_path / "single")
    for name in a:  # Adam magnifies float noise in near-zero gradients: allow 1% of one step's size (lr)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert results[0]["loss/eval"] == pytest.approx(single["loss/eval"], rel=1e-5)
    assert results[0]["train/tokens"] == single["train/tokens"]


# --- LoRA -------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_saves_a_plain_merged_model(cli, tiny_llama_dir, demos, tmp_path):
    out = tmp_path / "lora"
    sft(cli, "--model", tiny_llama_dir, "--data", demos, "--out", out, "--lora", "--lora-r", 4,
        "--lora-target-modules", "q_proj,v_proj", "--save-adapter", "--max-steps", 3, "--lr", 1e-2,
        "--max-length", 48)  # fmt: skip
    # the checkpoint holds only adapter weights: nothing else had a gradient
    checkpoint = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    assert checkpoint and all("lora_" in k for k in checkpoint)
    # the merged model: same tensors as the base, changed exactly where adapters were merged in
    base, merged = weights(tiny_llama_dir), weights(out)
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    config = json.loads((out / "config.json").read_text())
    assert "peft" not in json.dumps(config).lower() and not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


# --- errors ---------------------------------------------------------------------------------------


def _error(result) -> str:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_errors_are_one_line(cli, tiny_llama_dir, demos, tmp_path):
    base = ("--model", tiny_llama_dir, "--out", tmp_path / "x")
    assert "--data is required" in _error(cli("sft", *base))
    assert "give one or the other" in _error(cli("sft", *base, "--data", demos, "--val-data", demos, "--val-fraction", 0.1))
    assert "--save-adapter needs --lora" in _error(cli("sft", *base, "--data", demos, "--save-adapter"))
    assert "--max-length: must be at least 2" in _error(cli("sft", *base, "--data", demos, "--max-length", 1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "p", "response": 3}\n')
    assert f"{bad}:2: field 'response'" in _error(cli("sft", *base, "--data", bad))
    assert not (tmp_path / "x").exists()  # nothing written before the inputs were checked


def test_options_from_a_config_file(cli, tiny_llama_dir, demos, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {tiny_llama_dir}\ndata: {demos}\nmax-steps: 2\nlr: 0.001\nschedule: linear\nmax_length: 32\n")
    result = sft(cli, "--config", config, "--out", tmp_path / "sft", "--lr", 0.002)  # the command line wins
    info = json.loads((tmp_path / "sft" / "rlhfkit.json").read_text())
    assert result["train/steps"] == 2 and info["config"]["lr"] == 0.002 and info["config"]["schedule"] == "linear"


def test_out_is_never_overwritten_and_resume_refuses_changed_options(cli, tiny_llama_dir, demos, tmp_path):
    out = tmp_path / "sft"
    args = ("--model", tiny_llama_dir, "--data", demos, "--out", out, "--max-steps", 2, "--max-length", 32)
    sft(cli, *args)
    assert "holds an earlier run (pass --resume" in _error(cli("sft", *args))
    assert "option 'lr' was 2e-05" in _error(cli("sft", *args, "--resume", "--lr", 1e-3))
    again = sft(cli, *args, "--resume", "--max-steps", 3)  # more steps: continues from step 2
    assert again["train/steps"] == 3 and [r["step"] for r in read_metrics(out) if "loss/train" in r][-1] == 3
