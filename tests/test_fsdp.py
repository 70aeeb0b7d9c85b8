"""``--strategy fsdp`` (FSDP2) for sft, train-rm and ppo on CPU with gloo: the same trajectory as one
process on the same global batch, exact resume after SIGKILL, sharded (DCP) checkpoints read by
another number of processes, a final model that plain transformers loads, and two torchrun "nodes"
on the loopback rendezvous.

Tolerances: two processes and one compute the same sums in another order, so losses agree to a
relative 1e-5 and weights (after Adam, which magnifies float noise in near-zero gradients) to
1e-4 relative + 1e-5 absolute, as the DDP tests in test_sft.py; a resumed run agrees with an
uninterrupted one to assert_close's float32 default.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, rlhfkit_command, subprocess_env, write_jsonl
from preference_rows import comparisons
from rlhfkit import sharding, training
from rlhfkit.config import PPOConfig, SFTConfig
from rlhfkit.errors import ConfigError
from rlhfkit.testing import save_tiny_model
from test_sft import write_demos

SLOW_E_COUNT = f"python:{REPO / 'tests' / 'ppo_rewards.py'}:slow_e_count"
TEXTS = ["the cat", "What is the sky", "one two three", "The river and the sea", "a dog", "the sun", "red and blue", "a story"]
PROMPTS = [{"id": c, "prompt": p} for c, p in zip("abcdefgh", TEXTS)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama without dropout (runs that must agree across processes)."""
    path = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-nodrop")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.0}))
    return path


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("data") / "demos.jsonl", 40)


def torchrun(
    *args: object, nproc: int = 2, timeout: int = 300, extra: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *extra,
           "-m", "rlhfkit", *map(str, args)]  # fmt: skip
    run = subprocess.run(cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def results(run: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def one_process(*args: object) -> dict:
    run = subprocess.run(rlhfkit_command(*args), env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, **tolerance) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], **tolerance)


def losses(out: Path, key: str = "loss/train") -> list[float]:
    return [row[key] for row in training.read_metrics(out) if key in row]


def assert_sharded_checkpoint(checkpoint: Path, world: int) -> None:
    """DCP's layout: every rank's shard, rank 0's index, and rlhfkit's trainer.pt + state.json."""
    names = {p.name for p in checkpoint.iterdir()}
    assert {".metadata", "trainer.pt", "state.json", *(f"__{r}_0.distcp" for r in range(world))} <= names, names
    assert not any(n.endswith(".safetensors") for n in names)
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == world


def loads_in_plain_transformers(out: Path, kind: str = "AutoModelForCausalLM") -> None:
    """In a fresh interpreter that never imports rlhfkit: the directory is an ordinary HF model."""
    code = (f"import sys, transformers; m = transformers.{kind}.from_pretrained(sys.argv[1]); "
            "assert 'rlhfkit' not in sys.modules; print(type(m).__name__)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, str(out)], env={**subprocess_env(), "PYTHONPATH": ""}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


# --- fast: options, the single-process path, the checks on resuming ----------------------------------


def test_options_are_checked():
    base = dict(model="m", data="d", out="/tmp/never-written-x")
    with pytest.raises(ConfigError, match="--cpu-offload needs --strategy fsdp"):
        SFTConfig(**base, cpu_offload=True).check()
    with pytest.raises(ConfigError, match="--strategy: expected one of ddp, fsdp"):
        SFTConfig(**base, strategy="zero3").check()
    assert PPOConfig().strategy == "ddp" and not PPOConfig().gradient_checkpointing


def test_fsdp_in_one_process_writes_a_sharded_checkpoint_and_resumes_it(cli, model_dir, demos, tmp_path):
    """One process shards nothing but writes DCP checkpoints (so that N processes can continue the
    run), resumes them exactly, and refuses to resume one with the other strategy."""
    # a constant learning rate: stopping at step 2 and continuing to 4 is then the run of 4 steps
    args = ("sft", "--model", model_dir, "--data", demos, "--max-length", 48, "--lr", 1e-3, "--batch-size", 4, "--device", "cpu",
            "--gradient-checkpointing", "--schedule", "constant", "--log-every", 1)  # fmt: skip
    full = cli(*args, "--out", tmp_path / "full", "--max-steps", 4, "--strategy", "fsdp")
    assert full.exit_code == 0, full.stderr
    assert_sharded_checkpoint(training.latest_checkpoint(tmp_path / "full"), world=1)
    part = cli(*args, "--out", tmp_path / "part", "--max-steps", 2, "--strategy", "fsdp")
    assert part.exit_code == 0, part.stderr
    refused = cli(*args, "--out", tmp_path / "part", "--max-steps", 4, "--resume")
    assert refused.exit_code == 1 and "option 'strategy' was 'fsdp'" in refused.stderr
    resumed = cli(*args, "--out", tmp_path / "part", "--max-steps", 4, "--strategy", "fsdp", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_weights(tmp_path / "full", tmp_path / "part")
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    # the same run under ddp: the same numbers (the strategy changes where weights live, not what is computed)
    ddp = cli(*args, "--out", tmp_path / "ddp", "--max-steps", 4)
    assert ddp.exit_code == 0, ddp.stderr
    assert_same_weights(tmp_path / "full", tmp_path / "ddp")


def test_per_process_sizes_may_change_with_the_number_of_processes(tmp_path):
    checkpoint = tmp_path / "step-000002"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "world_size": 2, "config": {"batch_size": 2, "lr": 0.1}}))
    training.check_resume_config(checkpoint, {"batch_size": 4, "lr": 0.1}, world_size=1, per_process=("batch_size",))
    training.check_resume_config(checkpoint, {"batch_size": 2, "lr": 0.1}, world_size=2, per_process=("batch_size",))
    with pytest.raises(ConfigError, match=r"'batch_size' was 2 × 2 processes \(give 4 for 1\)"):
        training.check_resume_config(checkpoint, {"batch_size": 2, "lr": 0.1}, world_size=1, per_process=("batch_size",))
    with pytest.raises(ConfigError, match="'batch_size' was 2"):  # not a per-process size for this stage
        training.check_resume_config(checkpoint, {"batch_size": 4, "lr": 0.1}, world_size=1)


def test_units_are_decoder_layers_and_the_tied_embedding_stays_whole(model_dir):
    from rlhfkit.models import load_model

    model = load_model(str(model_dir))
    layers = sharding.decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * model.config.num_hidden_layers
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: shard() keeps both modules in one unit
    assert training.enable_gradient_checkpointing(model) == 1 and training.enable_gradient_checkpointing(model) == 0


def test_eval_reads_the_policy_of_sharded_ppo_checkpoints(model_dir, tmp_path):
    """eval --checkpoints on a ppo run written with --strategy fsdp: the policy's entries of each DCP
    checkpoint (all weights, or LoRA adapters merged) give the model that was saved."""
    from rlhfkit.models import apply_lora, load_model
    from rlhfkit.stages.eval_sampling import find_checkpoints, load_checkpoint_policy

    run = tmp_path / "run"
    full = load_model(str(model_dir))
    torch.nn.init.normal_(full.model.norm.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    lora = apply_lora(load_model(str(model_dir)), r=4, alpha=8)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(0))
    for step, model, config in ((1, full, {}), (2, lora, {"lora": True, "lora_r": 4, "lora_alpha": 8})):
        sharding.mark(model)  # as wrap_model does under --strategy fsdp
        training.save_checkpoint(run, step, modules={"policy": model}, optimizers={}, schedulers={},
                                 state={"config": {"policy": str(model_dir), **config}}, keep=10)  # fmt: skip
    assert [s for s, _ in find_checkpoints(str(run))] == [1, 2]
    ids = torch.tensor([[5, 6, 7, 8]])
    for step, model in ((1, full), (2, lora)):
        assert_sharded_checkpoint(run / "checkpoints" / f"step-00000{step}", world=1)
        loaded, _ = load_checkpoint_policy(str(run), run / "checkpoints" / f"step-00000{step}", device="cpu", dtype=torch.float32,
                                           trust_remote_code=False)  # fmt: skip
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


# --- two processes (gloo) ------------------------------------------------------------------------------


@pytest.mark.slow  # torchrun + one process, ~25 s on 2 cores
def test_sft_two_processes_match_one_process(model_dir, demos, tmp_path):
    """2 ranks × batch 2 under FSDP = 1 process × batch 4: losses, held-out loss, final weights;
    the checkpoint holds both ranks' shards; the final model is a plain transformers directory."""
    common = ("--model", model_dir, "--data", demos, "--max-steps", 4, "--lr", 1e-3, "--max-length", 48, "--val-fraction", 0.1,
              "--log-every", 1, "--device", "cpu")  # fmt: skip
    fsdp = ("--strategy", "fsdp", "--gradient-checkpointing")
    run = torchrun("sft", *common, "--out", tmp_path / "fsdp", "--batch-size", 2, *fsdp)
    assert len(results(run)) == 1  # rank 0 alone prints and writes
    single = one_process("sft", *common, "--out", tmp_path / "single", "--batch-size", 4)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert results(run)[0]["loss/eval"] == pytest.approx(single["loss/eval"], rel=1e-5)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single", rtol=1e-4, atol=1e-5)
    assert_sharded_checkpoint(training.latest_checkpoint(tmp_path / "fsdp"), world=2)
    loads_in_plain_transformers(tmp_path / "fsdp")


@pytest.mark.slow  # torchrun + one process; inductor compiles the layer on each rank
def test_compiled_layers_under_fsdp_train_as_eager_in_one_process(model_dir, demos, tmp_path):
    """--compile with --strategy fsdp on 2 ranks: each rank compiles its decoder layers around
    FSDP2's per-layer hooks, and the run trains the weights of one eager process (fused kernels round
    differently: Adam's tolerance as in test_sft's --compile test)."""
    common = ("--model", model_dir, "--data", demos, "--max-steps", 3, "--lr", 1e-3, "--max-length", 48, "--log-every", 1,
              "--device", "cpu")  # fmt: skip
    cache = tmp_path / "inductor"  # a cache of this test's own: the ranks compile, and what they compiled is there
    run = torchrun("sft", *common, "--out", tmp_path / "fsdp", "--batch-size", 2, "--strategy", "fsdp", "--compile", timeout=600,
                   env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})  # fmt: skip
    assert len(results(run)) == 1
    assert any(p.suffix == ".py" for p in cache.rglob("*")), "no compiled code under TORCHINDUCTOR_CACHE_DIR"
    one_process("sft", *common, "--out", tmp_path / "single", "--batch-size", 4)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single", rtol=1e-4, atol=1e-5)
    loads_in_plain_transformers(tmp_path / "fsdp")


@pytest.mark.slow  # two torchrun jobs + one process, ~35 s
def test_lora_under_fsdp_resumes_and_saves_the_merged_model_and_the_adapter(model_dir, demos, tmp_path):
    """LoRA layers inside the sharded decoder layers (frozen base, trained adapters in one unit); the
    checkpoint holds the adapters only; resumed on 2 ranks it ends as one process does."""
    common = ("sft", "--model", model_dir, "--data", demos, "--lr", 1e-2, "--max-length", 48, "--device", "cpu", "--lora",
              "--lora-r", 4, "--save-adapter", "--schedule", "constant", "--log-every", 1)  # fmt: skip
    torchrun(*common, "--out", tmp_path / "fsdp", "--batch-size", 2, "--max-steps", 2, "--strategy", "fsdp")
    run = torchrun(*common, "--out", tmp_path / "fsdp", "--batch-size", 2, "--max-steps", 4, "--strategy", "fsdp", "--resume")
    assert "resuming from" in run.stderr
    one_process(*common, "--out", tmp_path / "single", "--batch-size", 4, "--max-steps", 4)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single", rtol=1e-4, atol=1e-4)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("fsdp", "single"))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    loads_in_plain_transformers(tmp_path / "fsdp")


@pytest.mark.slow  # torchrun + one process, ~20 s
def test_train_rm_two_processes_match_one_process(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "cmp.jsonl", comparisons(16, group=False))
    common = ("--model", model_dir, "--data", data, "--device", "cpu", "--val-fraction", 0.25, "--max-steps", 4, "--lr", 1e-3,
              "--head-init", "random", "--log-every", 1)  # fmt: skip
    # --cpu-offload: the shards and AdamW's state in CPU memory (here everything is on the CPU: the numbers must not move)
    torchrun("train-rm", *common, "--out", tmp_path / "fsdp", "--batch-size", 2, "--strategy", "fsdp", "--cpu-offload")
    one_process("train-rm", *common, "--out", tmp_path / "single", "--batch-size", 4)
    assert len(losses(tmp_path / "fsdp")) == 4
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert losses(tmp_path / "fsdp", "loss/eval") == pytest.approx(losses(tmp_path / "single", "loss/eval"), rel=1e-5)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single", rtol=1e-4, atol=1e-5)
    a, b = (json.loads((tmp_path / d / "rlhfkit.json").read_text())["reward"] for d in ("fsdp", "single"))
    assert a["gain"] == pytest.approx(b["gain"], rel=1e-4) and a["n"] == b["n"]
    loads_in_plain_transformers(tmp_path / "fsdp", "AutoModelForSequenceClassification")


@pytest.mark.slow  # torchrun + one process, ~20 s
def test_dpo_two_processes_match_one_process(model_dir, tmp_path):
    """dpo's policy sharded, its reference log-probs computed under `training.gathered` (uneven shards)."""
    data = write_jsonl(tmp_path / "cmp.jsonl", comparisons(16, group=False))
    common = ("--policy", model_dir, "--data", data, "--device", "cpu", "--val-fraction", 0.25, "--max-steps", 3, "--lr", 1e-3,
              "--log-every", 1)  # fmt: skip
    torchrun("dpo", *common, "--out", tmp_path / "fsdp", "--batch-size", 2, "--strategy", "fsdp", "--gradient-checkpointing")
    one_process("dpo", *common, "--out", tmp_path / "single", "--batch-size", 4)
    assert len(losses(tmp_path / "fsdp")) == 3
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert losses(tmp_path / "fsdp", "loss/eval") == pytest.approx(losses(tmp_path / "single", "loss/eval"), rel=1e-5)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single", rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    from rlhfkit import models
    from rlhfkit.provenance import RunInfo

    torch.manual_seed(3)
    rm = models.load_model(str(model_dir), kind="reward")
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    out = tmp_path_factory.mktemp("rm") / "rm"
    return models.save_model_dir(rm, models.load_tokenizer(str(model_dir)), out, RunInfo("train-rm", {}, {}),
                                 extra={"reward": {"gain": 2.0, "bias": -0.5}})  # fmt: skip


@pytest.mark.slow  # torchrun + one process, ~25 s
def test_ppo_two_processes_match_one_process(model_dir, reward_dir, tmp_path):
    """rloo with a reward model (sharded, frozen), the reference (sharded, frozen) and the policy
    (sharded, activations recomputed):
    2 ranks × 2 prompts × K 2 = 1 process × 4 prompts × K 2 (same prompts, same row seeds). Every
    rollout here runs to --max-new-tokens, so each rank's token mean is the global one (with rows of
    different lengths the mean of per-rank means differs, under DDP as under FSDP)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    common = ("--policy", model_dir, "--rm", reward_dir, "--prompts", prompts, "--steps", 2, "--max-new-tokens", 4, "--lr", 1e-3,
              "--device", "cpu", "--dtype", "float32", "--sample-every", 0, "--algo", "rloo", "--k", 2,
              "--ppo-epochs", 2)  # fmt: skip
    # --gradient-checkpointing recomputes the policy's layers in the update: the same numbers
    torchrun("ppo", *common, "--out", tmp_path / "fsdp", "--batch-size", 4, "--strategy", "fsdp", "--gradient-checkpointing")
    one_process("ppo", *common, "--out", tmp_path / "single", "--batch-size", 8)
    a, b = training.read_metrics(tmp_path / "fsdp"), training.read_metrics(tmp_path / "single")
    assert [r["response/length"] for r in a] == [4.0, 4.0]
    for key in ("objective/score", "objective/kl", "loss/policy", "policy/approxkl"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single", rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two torchrun jobs, ~40 s
def test_ppo_sigkill_and_resume_under_fsdp_ends_with_the_weights_of_an_uninterrupted_run(model_dir, tmp_path):
    """Policy and critic (a value model) sharded; every rank killed after the checkpoint of step 2."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)

    def launch(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rlhfkit", "ppo",
               "--policy", str(model_dir), "--rm", SLOW_E_COUNT, "--prompts", str(prompts), "--out", str(out), "--steps", "5",
               "--save-every", "2", "--batch-size", "2", "--max-new-tokens", "6", "--lr", "3e-3", "--device", "cpu",
               "--target-kl", "0.5", "--sample-every", "0", "--strategy", "fsdp", *extra]  # fmt: skip
        # a session of its own: the SIGKILL reaches torchrun and both ranks at once
        return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                                start_new_session=True)  # fmt: skip

    full = launch(tmp_path / "full")
    killed_out = tmp_path / "killed"
    killed = launch(killed_out)
    deadline = time.time() + 240
    while not (killed_out / "checkpoints" / "step-000002" / "state.json").is_file():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1].decode()[-3000:]
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (killed_out / "model.safetensors").exists()
    assert_sharded_checkpoint(training.latest_checkpoint(killed_out), world=2)
    resumed = launch(killed_out, "--resume")
    for p in (full, resumed):
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err.decode()[-3000:]
    assert_same_weights(tmp_path / "full", killed_out)
    full_rows, resumed_rows = training.read_metrics(tmp_path / "full"), training.read_metrics(killed_out)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]
    for key in ("objective/score", "objective/kl", "objective/kl_coef", "loss/value"):
        assert [r[key] for r in resumed_rows] == pytest.approx([r[key] for r in full_rows]), key


@pytest.mark.slow  # two torchrun jobs and three single processes, ~50 s
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(model_dir, demos, tmp_path):
    """DCP reshards: saved by 2 ranks × batch 2, continued by 1 process × batch 4, and the reverse;
    both end where an uninterrupted single-process run of the same global batch ends."""
    common = ("sft", "--model", model_dir, "--data", demos, "--lr", 1e-3, "--max-length", 48, "--device", "cpu",
              "--strategy", "fsdp", "--log-every", 1, "--schedule", "constant")  # fmt: skip
    one_process(*common, "--out", tmp_path / "single", "--batch-size", 4, "--max-steps", 4)
    # 2 -> 1
    torchrun(*common, "--out", tmp_path / "two-one", "--batch-size", 2, "--max-steps", 2)
    assert_sharded_checkpoint(training.latest_checkpoint(tmp_path / "two-one"), world=2)
    one_process(*common, "--out", tmp_path / "two-one", "--batch-size", 4, "--max-steps", 4, "--resume")
    # 1 -> 2
    one_process(*common, "--out", tmp_path / "one-two", "--batch-size", 4, "--max-steps", 2)
    run = torchrun(*common, "--out", tmp_path / "one-two", "--batch-size", 2, "--max-steps", 4, "--resume")
    assert "resuming from" in run.stderr
    for out in ("two-one", "one-two"):
        assert_same_weights(tmp_path / out, tmp_path / "single", rtol=1e-4, atol=1e-5)
        assert losses(tmp_path / out) == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert_sharded_checkpoint(training.latest_checkpoint(tmp_path / "one-two"), world=2)
    # the global batch must stay: 1 process with the per-process size of 2 is refused, naming the size to give
    again = rlhfkit_command(*common, "--out", tmp_path / "one-two", "--batch-size", 2, "--max-steps", 5, "--resume")
    refused = subprocess.run(again, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "give 4 for 1" in refused.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun launches, ~20 s
def test_two_nodes_on_the_loopback_rendezvous(model_dir, demos, tmp_path):
    """The multi-node recipe of the README, with two "nodes" as two torchrun launches (one process
    each) meeting at a c10d rendezvous on 127.0.0.1: the same run as one node with two processes."""
    common = ["sft", "--model", str(model_dir), "--data", str(demos), "--lr", "1e-3", "--max-length", "48", "--device", "cpu",
              "--strategy", "fsdp", "--batch-size", "2", "--max-steps", "3", "--log-every", "1"]  # fmt: skip
    port = _free_port()
    launches = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rlhfkit-test",
               "-m", "rlhfkit", *common, "--out", str(tmp_path / "nodes")]  # fmt: skip
        launches.append(subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         cwd=REPO))  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in launches]
    for p, (_, err) in zip(launches, outputs):
        assert p.returncode == 0, err[-3000:]
    assert sum(line.startswith("{") for out, _ in outputs for line in out.splitlines()) == 1  # global rank 0 alone
    torchrun(*common, "--out", tmp_path / "one-node")
    assert_same_weights(tmp_path / "nodes", tmp_path / "one-node")
    assert_sharded_checkpoint(training.latest_checkpoint(tmp_path / "nodes"), world=2)
