"""The shared decoding loop: left padding, per-row seeds, stop handling, log-probs."""

from __future__ import annotations

import torch

from rlhfkit.chat import encode_prompt, stop_token_ids
from rlhfkit.generation import left_pad, policy_logprobs, sample


def _prompts(tokenizer):
    return [
        encode_prompt(tokenizer, [{"role": "user", "content": "Tell me a story about a cat."}]),
        encode_prompt(tokenizer, "the dog"),
        encode_prompt(tokenizer, [{"role": "user", "content": "hi"}]),
    ]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_matches_unpadded_decoding(tiny_llama, tokenizer):
    """Left padding and the KV cache change nothing: each row equals decoding it alone, step by step."""
    tiny_llama.eval()
    prompts = _prompts(tokenizer)
    stops = stop_token_ids(tokenizer, tiny_llama.config)
    batch = sample(
        tiny_llama, prompts, max_new_tokens=8, temperature=0, stop_token_ids=stops, pad_token_id=tokenizer.pad_token_id
    )
    for i, p in enumerate(prompts):
        ids = list(p)
        expected = []
        for _ in range(8):
            nxt = int(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
            if nxt in stops:
                break
        assert batch.response_ids(i) == expected


def test_rows_depend_only_on_their_seed(tiny_llama, tokenizer):
    prompts = _prompts(tokenizer)
    kwargs = dict(max_new_tokens=6, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    a = sample(tiny_llama, prompts, seeds=[1, 2, 3], **kwargs)
    b = sample(tiny_llama, prompts[1:], seeds=[2, 3], **kwargs)
    assert a.response_ids(1) == b.response_ids(0) and a.response_ids(2) == b.response_ids(1)


def test_stop_token_ends_the_row_and_is_masked_after(tiny_llama, tokenizer):
    """Force an EOS early by making it the only likely token; everything after is masked padding."""
    eos = tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer))
    bias[eos] = 50.0
    handle = tiny_llama.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        r = sample(tiny_llama, _prompts(tokenizer), max_new_tokens=5, stop_token_ids=[eos], pad_token_id=eos, seeds=[0, 1, 2])
    finally:
        handle.remove()
    assert r.stopped.all() and r.response_mask.tolist() == [[1], [1], [1]] and r.response[:, 0].tolist() == [eos] * 3
    assert r.completion_text(0, tokenizer) == ""


def test_length_finish_and_policy_logprobs_agree(tiny_llama, tokenizer):
    tiny_llama.eval()  # the fixture ships with attention dropout, as real checkpoints do
    prompts = _prompts(tokenizer)
    r = sample(
        tiny_llama,
        prompts,
        max_new_tokens=6,
        stop_token_ids=[],
        pad_token_id=tokenizer.pad_token_id,
        seeds=[4, 5, 6],
        temperature=0.7,
    )
    assert not r.stopped.any() and r.response_mask.sum(1).tolist() == [6, 6, 6]
    with torch.no_grad():
        lp, ent, _ = policy_logprobs(
            tiny_llama, r.query, r.query_mask, r.response, r.response_mask, temperature=0.7, with_entropy=True
        )
    torch.testing.assert_close(lp, r.logprobs, atol=1e-4, rtol=1e-4)
    assert (ent > 0).all()


def test_stop_strings(tiny_llama, tokenizer):
    r = sample(
        tiny_llama, _prompts(tokenizer), max_new_tokens=30, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id,
        seeds=[7, 8, 9], stop_strings=["e"], tokenizer=tokenizer,
    )  # fmt: skip
    for i in range(3):
        text = r.completion_text(i, tokenizer)
        assert "e" not in text
        if r.stopped[i]:
            assert "e" in tokenizer.decode(r.response_ids(i))


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_llama, tokenizer):
    """Stopped rows are dropped from the batch and the KV cache; every row still equals its
    decoding alone (a batch of one never drops a row)."""
    prompts = _prompts(tokenizer) + [encode_prompt(tokenizer, "one two three four")]
    kwargs = dict(
        max_new_tokens=12, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id, stop_strings=["e"], tokenizer=tokenizer
    )
    together = sample(tiny_llama, prompts, seeds=[11, 12, 13, 14], **kwargs)
    lengths = together.response_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # the rows really stopped at different steps
    for i, p in enumerate(prompts):
        alone = sample(tiny_llama, [p], seeds=[11 + i], **kwargs)
        assert together.response_ids(i) == alone.response_ids(0)
        assert bool(together.stopped[i]) == bool(alone.stopped[0])
        torch.testing.assert_close(together.logprobs[i, : lengths[i]], alone.logprobs[0, : lengths[i]], atol=1e-5, rtol=1e-5)
