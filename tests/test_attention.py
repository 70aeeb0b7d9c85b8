"""rlhfkit.attention: short CPU training sequences under bf16 run SDPA in float32; nothing else changes."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhfkit import attention, training
from rlhfkit.testing import make_model


@pytest.fixture()
def kernel_dtypes(monkeypatch):
    """The query dtype of every SDPA kernel call, in order."""
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.dtype)
        return real(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def qkv(T: int, dtype=torch.bfloat16, grad: bool = True, seed: int = 0):
    """(B=2, 4 query heads, T, 8) and (2, 2 key/value heads, T, 8): grouped-query attention."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, T, 8), (2, 2, T, 8), (2, 2, T, 8)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in shapes]


def reference(q, k, v, mask=None):
    """Causal grouped-query attention in float64 by hand, in transformers' (B, T, heads, D) layout."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


MODULE = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=2)


def test_a_short_bf16_training_forward_runs_the_kernel_in_float32(kernel_dtypes):
    q, k, v = qkv(10)
    out, _ = attention.sdpa_attention(MODULE, q, k, v, None)
    assert kernel_dtypes == [torch.float32] and out.dtype == torch.bfloat16
    # float32 attention rounded once to bf16: within one bf16 rounding of the exact values
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=2**-8, atol=1e-6)
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


def test_under_cpu_autocast_the_float32_queries_stay_float32_in_the_kernel(kernel_dtypes):
    """Under autocast the rotary embedding leaves the queries in float32 and autocast would cast
    SDPA's inputs to bf16: the kernel sees float32 and the output has autocast's dtype."""
    q, k, v = qkv(10, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.sdpa_attention(MODULE, q, k, v, None)
    assert kernel_dtypes == [torch.float32] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_are_kept(kernel_dtypes, kind):
    q, k, v = qkv(6)
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    allowed[0, :, :, :2] = False  # row 0: two left-padding positions nobody attends to
    allowed[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # (the padding rows see themselves: no empty softmax)
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, -1e4)
    out, _ = attention.sdpa_attention(MODULE, q, k, v, mask)
    assert kernel_dtypes == [torch.float32]
    torch.testing.assert_close(out.double(), reference(q, k, v, allowed), rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["no grad", "inputs without grad", "float32 without autocast", "longer than SHORT_SEQUENCE"],
)
def test_everything_else_is_transformers_sdpa_unchanged(kernel_dtypes, case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T = attention.SHORT_SEQUENCE + 1 if case == "longer than SHORT_SEQUENCE" else 10
    dtype = torch.float32 if case == "float32 without autocast" else torch.bfloat16
    q, k, v = qkv(T, dtype=dtype, grad=case != "inputs without grad")
    with torch.set_grad_enabled(case != "no grad"):
        out, _ = attention.sdpa_attention(MODULE, q, k, v, None)
        expected, _ = sdpa_attention_forward(MODULE, q, k, v, None)
    assert kernel_dtypes == [dtype, dtype]
    assert torch.equal(out, expected)


def test_the_switch_applies_to_sdpa_models_only_and_is_not_saved(tokenizer, tmp_path):
    model = make_model(tokenizer, arch="llama")
    eager = make_model(tokenizer, arch="llama", attn_implementation="eager")
    plain = make_model(tokenizer, arch="llama")  # the same weights, left on "sdpa"
    assert model.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    assert attention.use_float32_short_attention(model) == 1 and model.config._attn_implementation == attention.NAME
    assert attention.use_float32_short_attention(model) == 0  # already switched
    assert attention.use_float32_short_attention(eager) == 0 and eager.config._attn_implementation == "eager"

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])  # left padding: a mask left out would show
    model.eval(), plain.eval()
    with torch.no_grad():  # no gradient: exactly transformers' SDPA
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 training forward: close to float32
        logits = model(input_ids=ids, attention_mask=mask).logits
    exact = plain.float()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real].float(), exact[real], rtol=0.05, atol=0.05)
    alone = plain(input_ids=ids[1:, 2:]).logits[0]  # the padded row without its padding
    torch.testing.assert_close(logits[1, 2:].float(), alone, rtol=0.05, atol=0.05)

    model.save_pretrained(tmp_path)
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_wrap_model_switches_on_cpu(tokenizer):
    model = make_model(tokenizer, arch="llama")
    training.wrap_model(model, training.Dist(), torch.device("cpu"), SimpleNamespace(strategy="ddp"), trainable=False)
    assert model.config._attn_implementation == attention.NAME
