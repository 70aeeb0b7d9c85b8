"""The shared training machinery: schedules, data order, checkpoints that restore everything."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from rlhfkit import training
from rlhfkit.errors import ConfigError


def test_schedules():
    def lrs(schedule, warmup, total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = training.make_scheduler(opt, schedule, warmup, total)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("linear", 2, 6) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert lrs("cosine", 0, 4) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert lrs("constant", 1, 3) == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ConfigError):
        lrs("exp", 0, 3)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = training.epoch_order(10, seed=3, epoch=1)
    assert sorted(a) == list(range(10)) and a == training.epoch_order(10, 3, 1) != training.epoch_order(10, 3, 2)


def test_shard():
    assert training.shard(list(range(5)), training.Dist(rank=1, world_size=2)) == [1, 3]


def test_optimizer_groups_skip_decay_on_vectors(tiny_llama):
    opt = training.make_optimizer(tiny_llama, lr=1e-3, weight_decay=0.1)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.1, 0.0}
    assert all(p.ndim == 1 for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"])


def test_the_optimizer_is_fused_on_the_cpu_and_steps_like_the_unfused_one(tokenizer):
    """Every training stage gets PyTorch's fused AdamW on CPU/CUDA (one kernel, not a loop of
    elementwise ops per parameter); its steps match the reference implementation's."""
    from rlhfkit.testing import make_model

    models = [make_model(tokenizer, seed=3).eval() for _ in range(2)]  # eval: no dropout
    fused = training.make_optimizer(models[0], lr=1e-2, weight_decay=0.1)
    plain = training.make_optimizer(models[1], lr=1e-2, weight_decay=0.1, fused=False)
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in plain.param_groups)
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, opt in zip(models, (fused, plain)):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 rounding of two kernels


def test_checkpoint_roundtrip_restores_weights_optimizer_scheduler_and_rngs(tmp_path, tokenizer):
    from rlhfkit.testing import make_model

    def step(model, opt, sched):
        x = torch.randint(0, 100, (2, 5))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    model = make_model(tokenizer, seed=1)
    opt = training.make_optimizer(model, lr=1e-2)
    sched = training.make_scheduler(opt, "linear", 1, 10)
    training.seed_everything(5)
    step(model, opt, sched)
    path = training.save_checkpoint(
        tmp_path,
        1,
        modules={"policy": model},
        optimizers={"policy": opt},
        schedulers={"policy": sched},
        state={"epoch": 0, "config": {"lr": 0.01}},
    )
    assert training.latest_checkpoint(tmp_path) == path and json.loads((path / "state.json").read_text())["step"] == 1
    # continue uninterrupted
    step(model, opt, sched)
    expected_draw = (torch.rand(3), random.random())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    # a fresh process would start from the input model; restore and replay the same step
    model2 = make_model(tokenizer, seed=99)
    opt2 = training.make_optimizer(model2, lr=1e-2)
    sched2 = training.make_scheduler(opt2, "linear", 1, 10)
    state = training.load_checkpoint(path, modules={"policy": model2}, optimizers={"policy": opt2}, schedulers={"policy": sched2})
    assert state["step"] == 1 and state["epoch"] == 0
    step(model2, opt2, sched2)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    draw = (torch.rand(3), random.random())
    assert torch.equal(draw[0], expected_draw[0]) and draw[1] == expected_draw[1]
    with pytest.raises(ConfigError, match="option 'lr' was 0.01"):
        training.check_resume_config(path, {"lr": 0.02})


def test_keep_only_newest_checkpoints(tmp_path):
    m = torch.nn.Linear(2, 2)
    for s in (1, 2, 3):
        training.save_checkpoint(tmp_path, s, modules={"m": m}, optimizers={}, schedulers={}, state={}, keep=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000002", "step-000003"]


def test_metrics_log_truncates_on_resume(tmp_path):
    log = training.MetricsLog(tmp_path)
    for s in range(1, 5):
        log.log(s, {"loss/train": torch.tensor(float(s))})
    training.MetricsLog(tmp_path, resume_step=2)
    assert [r["step"] for r in training.read_metrics(tmp_path)] == [1, 2]
    assert training.read_metrics(tmp_path)[1]["loss/train"] == 2.0


def test_last_metrics_is_the_newest_line_with_the_key(tmp_path):
    log = training.MetricsLog(tmp_path)
    log.log(0, {"loss/eval": torch.tensor(0.7)})
    log.log(2, {"loss/train": torch.tensor(0.5)})
    log.log(4, {"loss/train": torch.tensor(0.25)})
    log.log(4, {"loss/eval": torch.tensor(0.3)})
    assert training.last_metrics(tmp_path)["loss/train"] == 0.25 and training.last_metrics(tmp_path)["step"] == 4
    assert training.last_metrics(tmp_path, "loss/eval")["loss/eval"] == pytest.approx(0.3)
    assert training.last_metrics(tmp_path / "nothing") == {}


def test_step_metrics_worked_example():
    """The docstring's example: step 3 of 2 an epoch, 2 ranks that have each done 12 pairs in 4 s."""
    mean = {"grad_norm": torch.tensor(0.5), "pairs": torch.tensor(12.0), "tokens": torch.tensor(100.0)}
    got = training.step_metrics(mean, 1e-3, 3, 2, 4.0, training.Dist(rank=0, world_size=2), unit="pairs")
    assert list(got) == ["train/lr", "train/grad_norm", "train/epoch", "perf/pairs_per_s", "perf/tokens_per_s"]
    assert got["train/epoch"] == 1.5 and float(got["perf/pairs_per_s"]) == 6.0 and float(got["perf/tokens_per_s"]) == 50.0


def test_periodic_evaluates_on_the_way_and_saves_every_n_and_at_the_last_step():
    evaluated, saved = [], []
    for step in range(1, 8):
        training.periodic(step, 7, eval_every=2, save_every=3, held_out=evaluated.append, checkpoint=saved.append)
    assert evaluated == [2, 4, 6] and saved == [3, 6, 7]  # the last step's evaluation follows the loop
    saved.clear()
    assert [training.periodic(s, 3, 0, 0, evaluated.append, saved.append) for s in (1, 2, 3)] == [False, False, True]
    assert saved == [3]


def test_check_same_data_refuses_a_checkpoint_of_other_data(tmp_path):
    training.check_same_data({"data_sha256": "aa"}, "cmp.jsonl", "aa", tmp_path)
    training.check_same_data({}, "cmp.jsonl", "aa", tmp_path)  # an older checkpoint without the digest
    training.check_same_data({"data_sha256": "aa"}, "-", None, tmp_path)  # stdin: nothing to compare
    with pytest.raises(ConfigError, match="--resume: cmp.jsonl changed since"):
        training.check_same_data({"data_sha256": "aa"}, "cmp.jsonl", "bb", tmp_path)


def test_compile_layers_compiles_every_decoder_layer_in_place(tokenizer):
    """--compile: each decoder layer gets its compiled call (run lazily), the rest of the model and
    its parameter names stay as they are."""
    from rlhfkit.testing import make_model
    from rlhfkit.training import compile_layers

    model = make_model(tokenizer, arch="llama")
    names = [name for name, _ in model.named_parameters()]
    assert compile_layers(model) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model._compiled_call_impl is None and model.lm_head._compiled_call_impl is None
    assert [name for name, _ in model.named_parameters()] == names


def test_own_memory_copies_trained_parameters_and_keeps_ties(tokenizer):
    """Trained CPU parameters get storage of their own (the same values); frozen ones, and two
    parameters on one storage, are left as they are; a tied output layer stays tied."""
    from rlhfkit.testing import make_model
    from rlhfkit.training import own_memory

    model = make_model(tokenizer, arch="llama")
    model.model.norm.weight.requires_grad_(False)  # frozen: never written, so left alone
    shared = torch.zeros(8)
    model.register_parameter("view_a", torch.nn.Parameter(shared[:4]))  # two parameters, one storage
    model.register_parameter("view_b", torch.nn.Parameter(shared[4:]))
    before = {name: (p.detach().clone(), p.untyped_storage().data_ptr()) for name, p in model.named_parameters()}
    trained = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("view_")]

    assert own_memory(model) == len(trained)
    for name, p in model.named_parameters():
        values, ptr = before[name]
        assert torch.equal(p.detach(), values)
        assert (p.untyped_storage().data_ptr() != ptr) == (name in trained), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_wrap_model_gives_trained_modules_their_own_memory_on_cpu(tokenizer):
    from types import SimpleNamespace

    from rlhfkit.testing import make_model
    from rlhfkit.training import Dist, wrap_model

    trained, frozen = make_model(tokenizer, arch="llama"), make_model(tokenizer, arch="llama")
    frozen.requires_grad_(False)
    ptrs = {id(m): [p.untyped_storage().data_ptr() for p in m.parameters()] for m in (trained, frozen)}
    config = SimpleNamespace(strategy="ddp")
    wrap_model(trained, Dist(), torch.device("cpu"), config)
    wrap_model(frozen, Dist(), torch.device("cpu"), config, trainable=False)
    assert all(p.untyped_storage().data_ptr() != old for p, old in zip(trained.parameters(), ptrs[id(trained)]))
    assert [p.untyped_storage().data_ptr() for p in frozen.parameters()] == ptrs[id(frozen)]


def test_resume_may_change_what_never_changes_the_computation_in_every_stage(tmp_path):
    """--save-every, --keep-checkpoints, --save-adapter, --device, --gradient-checkpointing,
    --cpu-offload, --compile and the epoch loop's --max-steps, --epochs, --eval-every,
    --eval-batch-size and --log-every may differ on --resume (one list, applied by prepare_run_dir
    for every stage); an option that changes the run (--lr) is refused. A stage's own list (ppo,
    train-rm) names fields of its config and repeats none of the shared ones."""
    import importlib

    from rlhfkit import config as configs

    saved = dataclasses.asdict(configs.SFTConfig(out=str(tmp_path / "run"), lr=0.01))
    m = torch.nn.Linear(2, 2)
    training.save_checkpoint(tmp_path / "run", 1, modules={"m": m}, optimizers={}, schedulers={}, state={"config": saved})
    changed = {"save_every": 5, "keep_checkpoints": 1, "save_adapter": True, "device": "cpu", "gradient_checkpointing": True,
               "cpu_offload": True, "compile": True, "max_steps": 7, "epochs": 9, "eval_every": 2, "eval_batch_size": 3,
               "log_every": 4}  # fmt: skip
    assert set(changed) == set(training.RESUME_MAY_CHANGE)
    assert all(saved[k] != v for k, v in changed.items())
    checkpoint = training.prepare_run_dir(tmp_path / "run", True, "sft", {**saved, **changed})
    assert checkpoint == tmp_path / "run" / "checkpoints" / "step-000001"
    with pytest.raises(ConfigError, match="option 'lr' was 0.01"):
        training.prepare_run_dir(tmp_path / "run", True, "sft", {**saved, **changed, "lr": 0.02})
    for name, config_class in {"train_rm": configs.TrainRMConfig, "ppo": configs.PPOConfig}.items():
        own = importlib.import_module(f"rlhfkit.stages.{name}").RESUME_MAY_CHANGE
        assert own and set(own) <= {f.name for f in dataclasses.fields(config_class)}, name
        assert not set(own) & set(training.RESUME_MAY_CHANGE), name


def test_trainer_state_is_written_without_zip_checksums_and_reads_back(tmp_path):
    """trainer.pt skips the zip's CRC-32s (torch.load never checks them); the global setting is
    restored afterwards, also when the save fails, and the state reads back exactly."""
    import zipfile

    from torch.utils.serialization import config

    state = {"optimizers": {"m": {"state": {0: {"exp_avg": torch.randn(1000)}}}}, "rng": {"x": torch.arange(3)}}
    assert config.save.compute_crc32
    training.save_trainer_state(state, tmp_path / "trainer.pt")
    assert config.save.compute_crc32
    back = torch.load(tmp_path / "trainer.pt", weights_only=True)
    assert torch.equal(back["optimizers"]["m"]["state"][0]["exp_avg"], state["optimizers"]["m"]["state"][0]["exp_avg"])
    with zipfile.ZipFile(tmp_path / "trainer.pt") as z:
        assert {i.CRC for i in z.infolist() if i.file_size > 1000} == {0}  # no checksum computed for the tensors
    with pytest.raises(TypeError, match="pickle"):
        training.save_trainer_state({"g": (x for x in ())}, tmp_path / "bad.pt")  # a generator cannot be pickled
    assert config.save.compute_crc32
