"""The model layer: loading, devices and dtypes, saving a plain directory with rlhfkit.json."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from rlhfkit import models
from rlhfkit.chat import encode_completion, encode_prompt, render_prompt
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.provenance import RunInfo, read_run_info


def test_device_and_dtype():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError):
        models.resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            models.resolve_device("cuda")


def test_auto_dtype_follows_fast_cpu_bf16(monkeypatch):
    """--dtype auto: bf16 on a CPU where bf16 is faster (AMX, AVX512-BF16), float32 on others (conftest pins the
    detection to 0 for the suite); the override takes only 0 or 1; MPS stays float32."""
    cpu = torch.device("cpu")
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.cpu_bf16_fast() is True
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    assert models.resolve_dtype("float32", cpu) == torch.float32  # an explicit dtype is never second-guessed
    assert models.auto_dtype(torch.device("mps")) == torch.float32
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setenv(models.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="RLHFKIT_CPU_BF16: expected 0 or 1"):
        models.auto_dtype(cpu)
    monkeypatch.delenv(models.CPU_BF16_ENV)
    if sys.platform == "linux" and platform.machine() == "x86_64":  # the detection agrees with the kernel's CPU flags
        flags = set(open("/proc/cpuinfo").read().split())
        assert models.cpu_bf16_fast() == bool(flags & {"amx_bf16", "avx512_bf16"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_any_nan_or_infinity_anywhere(dtype):
    # positions at the start, inside and at the end of vectorised reduction blocks, and the last element
    shape, bad_values = (129, 67), [float("nan"), float("inf"), -float("inf")]
    for position in (0, 1, 15, 16, 63, 4096, 129 * 67 - 1):
        for bad in bad_values:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(position)).to(dtype)
            assert models.all_finite(x)
            x.view(-1)[position] = bad
            assert not models.all_finite(x), (position, bad)
            assert not models.all_finite(x.t())  # a strided view reads the same elements
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    assert models.all_finite(big) and models.all_finite(-big)  # huge but finite: no overflow anywhere
    assert models.all_finite(torch.empty(0, dtype=dtype)) and models.all_finite(torch.arange(5))


def test_load_errors(tmp_path):
    with pytest.raises(RlhfkitError, match="no such model directory"):
        models.load_model(str(tmp_path / "missing"))
    with pytest.raises(RlhfkitError, match="not a model directory"):
        models.load_model(str(tmp_path))
    with pytest.raises(RlhfkitError, match="no such GGUF file"):
        models.load_model(str(tmp_path / "m.gguf"))


def test_refuses_pickled_weights(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style pickled checkpoint
    with pytest.raises(RlhfkitError, match="never loads pickled weights"):
        models.load_model(str(tmp_path))


def test_reward_model_from_causal_lm(tiny_llama_dir):
    rm = models.load_model(str(tiny_llama_dir), kind="reward")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    ids = torch.tensor([[5, 6, 7]])
    assert rm(input_ids=ids).logits.shape == (1, 1)


def test_saved_directory_is_plain_safetensors_with_provenance(tmp_path, tiny_llama_dir):
    model = models.load_model(str(tiny_llama_dir))
    tokenizer = models.load_tokenizer(str(tiny_llama_dir))
    data = tmp_path / "demos.jsonl"
    data.write_text('{"text": "hi"}\n')
    info = RunInfo("sft", {"lr": 1e-4, "model": str(tiny_llama_dir)}, {"model": str(tiny_llama_dir), "data": str(data)})
    out = models.save_model_dir(model, tokenizer, tmp_path / "out", info, {"loss/train": 1.5})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "rlhfkit.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    meta = read_run_info(out)
    assert meta["stage"] == "sft" and meta["config"]["lr"] == 1e-4

    import hashlib

    assert meta["inputs"]["data"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert len(meta["inputs"]["model"][0]["sha256"]) == 64
    assert {"torch", "transformers", "python"} <= set(meta["versions"])
    assert meta["started"] <= meta["finished"] and meta["metrics"] == {"loss/train": 1.5}


@pytest.mark.slow  # a subprocess, seconds of imports: make test-slow
def test_saved_directory_loads_in_a_process_without_rlhfkit(tmp_path, tiny_llama_dir):
    model, tokenizer = models.load_model(str(tiny_llama_dir)), models.load_tokenizer(str(tiny_llama_dir))
    out = models.save_model_dir(model, tokenizer, tmp_path / "out", RunInfo("sft", {}, {}))
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t('the cat', return_tensors='pt').input_ids\n"
        "print(float(m(ids).logits.sum()))\n"
        "assert 'rlhfkit' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""}
    )
    assert result.returncode == 0, result.stderr
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    assert float(result.stdout.strip()) == pytest.approx(float(model(ids).logits.sum().detach()), rel=1e-5)


def test_save_replaces_an_existing_directory(tmp_path, tiny_llama, tokenizer):
    info = RunInfo("sft", {}, {})
    out = tmp_path / "m"
    models.save_model_dir(tiny_llama, tokenizer, out, info)
    (out / "stale.txt").write_text("old")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run file: it stays
    models.save_model_dir(tiny_llama, tokenizer, out, info, extra={"reward": {"gain": 2.0, "bias": 0.5}})
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert read_run_info(out)["reward"] == {"gain": 2.0, "bias": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_chat_rendering_and_encoding(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    assert render_prompt(tokenizer, msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, "plain text", "never") == "plain text"  # auto: test_chat_template.py
    ids = encode_prompt(tokenizer, msgs)
    # the pad/EOS id occurs inside the prompt: masks must come from lengths, never from pad ids
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.eos_token_id in ids
    completion = encode_completion(tokenizer, "hello there")
    assert completion[-1] == tokenizer.eos_token_id
    assert encode_completion(tokenizer, "hello there", stopped=False) == completion[:-1]
    assert tokenizer.decode(completion[:-1]) == "hello there"


def test_gpt2_without_chat_template_gets_chatml(tiny_gpt2_dir):
    tokenizer = models.load_tokenizer(str(tiny_gpt2_dir))
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, [{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_disable_dropout_also_zeroes_functional_attention_dropout(tiny_llama):
    """Llama applies attention dropout from a float attribute in training mode (the tiny model has
    0.1 on purpose): after disable_dropout two forwards in training mode agree exactly."""
    from rlhfkit.models import disable_dropout

    ids = torch.arange(3, 19).reshape(2, 8)
    tiny_llama.train()
    assert not torch.equal(tiny_llama(ids).logits, tiny_llama(ids).logits)  # dropout on
    disable_dropout(tiny_llama)
    assert torch.equal(tiny_llama(ids).logits, tiny_llama(ids).logits)
    assert tiny_llama.config.attention_dropout == 0.0


def test_final_model_merges_lora_and_writes_the_adapter_only_when_asked(tmp_path, tiny_llama):
    assert models.final_model(tiny_llama, tmp_path, lora=False, adapter=False) == (tiny_llama, models.RUN_FILES)
    peft = models.apply_lora(tiny_llama, r=2, alpha=4)
    final, keep = models.final_model(peft, tmp_path, lora=True, adapter=False)
    assert keep == models.RUN_FILES and not (tmp_path / models.ADAPTER_DIR).exists()
    assert not any("lora_" in k for k in final.state_dict()) and any("lora_" in k for k in peft.state_dict())  # a copy
    final, keep = models.final_model(peft, tmp_path, lora=True, adapter=True)
    assert keep == (*models.RUN_FILES, "adapter") and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not any("lora_" in k for k in final.state_dict())
