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


def test_stopped_rows_wait_in_the_batch_until_an_eighth_has_stopped(tiny_llama, tokenizer):
    """With 12 rows the first stop (1/12) keeps the stopped row in the batch, its draws ignored, and
    later stops compact the batch and the KV cache: either way every row equals its decoding alone,
    and no token is recorded after a row's stop."""
    tiny_llama.eval()
    prompts = [p for p in _prompts(tokenizer) for _ in range(4)]
    seeds = list(range(40, 52))
    kwargs = dict(
        max_new_tokens=12, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id, stop_strings=["e"], tokenizer=tokenizer
    )
    together = sample(tiny_llama, prompts, seeds=seeds, **kwargs)
    lengths = together.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 2  # rows stopped at several different steps
    assert bool((together.response[together.response_mask == 0] == tokenizer.pad_token_id).all())
    for i, p in enumerate(prompts):
        alone = sample(tiny_llama, [p], seeds=[seeds[i]], **kwargs)
        assert together.response_ids(i) == alone.response_ids(0)
        assert bool(together.stopped[i]) == bool(alone.stopped[0]) and together.stop_text[i] == alone.stop_text[0]
        n = int(lengths[i])
        torch.testing.assert_close(together.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)
        assert bool((together.logprobs[i, n:] == 0).all())


def test_preallocated_kv_cache_equals_transformers_dynamic_cache(tiny_llama, tokenizer):
    """The decoding loop's KV cache (buffers written in place, `_PreallocatedLayer`) gives the logits
    transformers' own concatenating cache gives, step by step, and after dropping a row."""
    from transformers.cache_utils import DynamicCache

    from rlhfkit.generation import _preallocated_cache, position_ids_from_mask

    tiny_llama.eval()
    query, mask = left_pad(_prompts(tokenizer), tokenizer.pad_token_id)
    caches = [_preallocated_cache(tiny_llama, query.size(1) + 4), DynamicCache(config=tiny_llama.config)]
    assert type(caches[0]).__name__ == "_PreallocatedCache"
    ids, attention, positions, logits = [query, query], [mask, mask], [position_ids_from_mask(mask)] * 2, [None, None]
    with torch.no_grad():
        for step in range(4):
            for c in range(2):
                inputs = dict(input_ids=ids[c], attention_mask=attention[c], position_ids=positions[c])
                out = tiny_llama(**inputs, cache=caches[c], use_cache=True)
                logits[c] = out.logits[:, -1]
                if step == 1:  # drop the middle row
                    caches[c].batch_select_indices(torch.tensor([0, 2]))
                    logits[c], attention[c] = logits[c][[0, 2]], attention[c][[0, 2]]
                    positions[c] = positions[c][[0, 2]]
                ids[c] = logits[c].argmax(-1, keepdim=True)
                attention[c] = torch.cat([attention[c], torch.ones_like(attention[c][:, :1])], dim=1)
                positions[c] = positions[c][:, -1:] + 1
            torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
            assert caches[0].get_seq_length() == caches[1].get_seq_length()


def test_sliding_window_models_keep_their_own_cache(tokenizer):
    from rlhfkit.generation import _preallocated_cache
    from rlhfkit.testing import make_model

    model = make_model(tokenizer, arch="llama")
    model.config.sliding_window = 4
    assert _preallocated_cache(model, 16) is None

def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key -> output."""
    from rlhfkit.generation import philox4x32

    m = 0xFFFFFFFF
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((m, m, m, m), (m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        out = philox4x32([torch.tensor([c]) for c in counter], [torch.tensor([k]) for k in key])
        assert tuple(int(w) for w in out) == expected


def test_philox_uniforms_are_per_row_streams():
    """A row's uniforms depend on its seed alone (not on the other rows, nor on how many steps are
    drawn), lie in [0, 1), and look uniform (mean 1/2, variance 1/12)."""
    from rlhfkit.generation import philox_uniforms

    u = philox_uniforms([5, 2**62 + 7, 5], 6)
    assert u.shape == (3, 6) and u.dtype == torch.float32
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(philox_uniforms([2**62 + 7], 4)[0], u[1, :4])
    many = philox_uniforms(range(1000), 100).flatten()  # 100,000 draws
    assert 0 <= float(many.min()) and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 0.005 and abs(float(many.var()) - 1 / 12) < 0.002


def test_sample_from_probs_worked_example():
    """The docstring's example: probs [0.2, 0, 0.5, 0.3], cdf [0.2, 0.2, 0.7, 1.0]; a token of
    probability 0 is never drawn, not even at u just below 1 with trailing zeros."""
    from rlhfkit.generation import sample_from_probs

    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 4)
    assert sample_from_probs(probs, torch.tensor([0.1, 0.2, 0.7, 0.0])).tolist() == [0, 2, 3, 0]
    tail_zeros = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert sample_from_probs(tail_zeros, torch.tensor([1 - 2**-24])).tolist() == [1]
    assert sample_from_probs(tail_zeros * 3, torch.tensor([0.3])).tolist() == [1]  # unnormalised rows work too


def test_sampler_matches_softmax(tiny_llama, tokenizer):
    """Chi-square check that `sample` draws the first token from softmax(logits / T), T = 0.3: 20,000 rows of
    one prompt (one prefill, the cache shared by all) with seeds 0..19999; the vocabulary, sorted by
    probability, is cut into 20 bins of about 5% of the mass each (1,000 draws expected in each, the
    most likely tokens alone in theirs when they hold more). The statistic's p-value under chi-square with
    (bins − 1) degrees of freedom, P(X > s) = Q((bins − 1)/2, s/2) (the regularised upper incomplete
    gamma function), must be above 0.001 (fixed seeds: the same value every run)."""
    tiny_llama.eval()
    prompt = encode_prompt(tokenizer, "the dog")
    n, temperature = 20000, 0.3  # a spread-out distribution (the tiny model's logits are close to each other)
    r = sample(tiny_llama, [prompt] * n, max_new_tokens=1, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id,
               temperature=temperature, seeds=range(n))  # fmt: skip
    with torch.no_grad():
        probs = (tiny_llama(input_ids=torch.tensor([prompt])).logits[0, -1].double() / temperature).softmax(-1)  # (V,)
    sorted_probs, order = probs.sort(descending=True)
    bin_of = torch.empty_like(order)
    bin_of[order] = ((sorted_probs.cumsum(0) - sorted_probs) * 20).long().clamp(max=19)  # by the mass before a token
    expected = torch.zeros(20, dtype=torch.float64).index_add_(0, bin_of, probs * n)
    observed = torch.bincount(bin_of[r.response[:, 0]], minlength=20).double()
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    assert observed.numel() >= 10 and float(expected.min()) >= 300  # a test of the whole shape, every bin well filled
    statistic = ((observed - expected) ** 2 / expected).sum()
    p_value = float(torch.special.gammaincc(torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64), statistic / 2))
    assert p_value > 0.001, (float(statistic), observed.numel(), p_value)


def test_shared_prefill_rows_equal_their_decoding_alone(tiny_llama, tokenizer):
    """K samples of each prompt side by side (collect --k, eval --n-samples, rloo/grpo): the prompt is
    prefilled once and its KV cache expanded to its K rows; every row still equals its decoding alone
    (a batch of one prefills it itself), token for token, with its log-probs, stops and stop strings."""
    tiny_llama.eval()
    prompts = _prompts(tokenizer)
    rows = [p for p in prompts for _ in range(3)]  # K = 3, prompts of different lengths (left padding in the prefill)
    seeds = list(range(100, 100 + len(rows)))
    kwargs = dict(max_new_tokens=10, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id, stop_strings=["e"],
                  tokenizer=tokenizer, temperature=0.9)  # fmt: skip
    together = sample(tiny_llama, rows, seeds=seeds, **kwargs)
    assert len({tuple(together.response_ids(i)) for i in range(3)}) > 1  # the K samples of a prompt differ
    for i, p in enumerate(rows):
        alone = sample(tiny_llama, [p], seeds=[seeds[i]], **kwargs)
        n = int(alone.response_mask.sum())
        assert together.response_ids(i) == alone.response_ids(0)
        assert bool(together.stopped[i]) == bool(alone.stopped[0]) and together.stop_text[i] == alone.stop_text[0]
        torch.testing.assert_close(together.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)
    # and a row's sample is the same whatever shares its batch: other prompts, or copies of its own
    mixed = sample(tiny_llama, [prompts[2], prompts[0], prompts[2]], seeds=[seeds[7], seeds[0], seeds[8]], **kwargs)
    assert [mixed.response_ids(i) for i in range(3)] == [together.response_ids(i) for i in (7, 0, 8)]


def test_chunked_output_layer_equals_the_full_logits(tiny_llama):
    """`token_logprobs` in chunks of 1, 5 and 7 positions (checkpointed under autograd) gives the
    log-probs, entropies and gradients (of the hidden states and of the output layer's weight) of
    the full (B, T, V) logits through `logprobs_from_logits`, at temperature 1 and 0.7."""
    from rlhfkit.generation import token_logprobs
    from rlhfkit.losses import entropy_from_logits, logprobs_from_logits

    head = tiny_llama.get_output_embeddings()
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, head.in_features)
    tokens = torch.randint(0, head.out_features, (3, 6))
    weights = torch.randn(3, 6)  # a loss that weighs every position differently
    for temperature in (1.0, 0.7):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        logits = head(h)  # (B, T, V): what the chunks avoid
        expected = logprobs_from_logits(logits, tokens, temperature)
        (expected * weights).sum().backward()
        grad_h, grad_w = h.grad.clone(), head.weight.grad.clone()
        expected_entropy = entropy_from_logits(logits.detach() / temperature)
        for chunk in (1, 5, 7, None):
            h = hidden.clone().requires_grad_(True)
            head.zero_grad()
            logprobs, entropy = token_logprobs(h, head, tokens, temperature, with_entropy=True, chunk=chunk)
            (logprobs * weights).sum().backward()
            torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h.grad, grad_h, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(head.weight.grad, grad_w, atol=1e-5, rtol=1e-5)
            assert not entropy.requires_grad
            with torch.no_grad():  # the rollout pass: the same bits as the update's forward, chunk by chunk
                again, _ = token_logprobs(hidden, head, tokens, temperature, chunk=chunk)
            assert torch.equal(again, logprobs.detach())
    head.zero_grad(set_to_none=True)


def test_policy_logprobs_in_chunks_equal_the_models_logits(tiny_llama, tokenizer, monkeypatch):
    """policy_logprobs with the output layer in chunks of 4 logits rows equals log_softmax of the
    model's own logits at the positions that predict the response (Llama and GPT-2: both have a
    plain output layer), with and without gradient, bit for bit between the two."""
    import rlhfkit.generation as generation
    from rlhfkit.generation import join, output_layer, position_ids_from_mask
    from rlhfkit.testing import make_model

    for model in (tiny_llama.eval(), make_model(tokenizer, arch="gpt2").eval()):
        assert output_layer(model) is model.get_output_embeddings()
        r = sample(model, _prompts(tokenizer), max_new_tokens=5, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id,
                   seeds=[1, 2, 3])  # fmt: skip
        args = (r.query, r.query_mask, r.response, r.response_mask)
        ids, mask = join(*args)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        P = r.query.size(1)
        expected = torch.log_softmax(logits[:, P - 1 : -1].float() / 0.8, -1).gather(-1, r.response[..., None])[..., 0]
        monkeypatch.setattr(generation, "LOGITS_CHUNK", 4 * len(tokenizer))  # 4 positions per chunk: 15 positions, 4 chunks
        with torch.no_grad():
            lp, ent, _ = policy_logprobs(model, *args, temperature=0.8, with_entropy=True)
        lp_grad, _, _ = policy_logprobs(model, *args, temperature=0.8)
        assert lp_grad.requires_grad and torch.equal(lp_grad.detach(), lp)
        torch.testing.assert_close(lp, expected * r.response_mask, atol=1e-5, rtol=1e-5)
        assert (ent > 0).all()
        monkeypatch.undo()


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_tokens_with_unfiltered_logprobs(tiny_llama, tokenizer):
    """Filters change what is drawn, not how it is scored: top-k 1 and top-p 1e-6 leave the most
    likely token alone, so sampling gives greedy decoding's tokens, and each token's log-prob is
    still under the full softmax (as PPO scores it)."""
    tiny_llama.eval()
    kwargs = dict(max_new_tokens=6, stop_token_ids=[], pad_token_id=tokenizer.pad_token_id)
    greedy = sample(tiny_llama, _prompts(tokenizer), temperature=0, **kwargs)
    for filters in (dict(top_k=1), dict(top_p=1e-6)):
        r = sample(tiny_llama, _prompts(tokenizer), temperature=1.0, seeds=[1, 2, 3], **filters, **kwargs)
        assert torch.equal(r.response, greedy.response)
        torch.testing.assert_close(r.logprobs, greedy.logprobs, atol=1e-5, rtol=1e-5)
        assert (r.logprobs < 0).all()
