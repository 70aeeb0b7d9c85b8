"""Demonstrations -> token ids and labels: which tokens are trained, token by token, for the three
shapes; truncation; packing; collation. The test tokenizer has pad == EOS == <|im_end|>, which also
closes every chat turn, so any mask derived from token ids would be wrong here."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.data.records import Demonstration, load, parse_demonstration
from rlhfkit.demonstrations import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_dataset,
    encode_demonstration,
    encode_messages,
    encode_prompt_response,
    encode_text,
    pack,
)
from rlhfkit.errors import DataError
from rlhfkit.losses import lm_loss

T = True  # trained
F = False  # not trained


def tokens(tokenizer, ids, labels):
    """[(token text, trained?)] — the token-by-token view the assertions below spell out."""
    assert len(ids) == len(labels)
    for i, label in zip(ids, labels):
        assert label in (i, IGNORE_INDEX)  # a label is the token itself or ignored, never another id
    return [(tokenizer.decode([i]), label != IGNORE_INDEX) for i, label in zip(ids, labels)]


def test_tokenizer_is_the_hard_case(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_text_trains_every_token_and_an_appended_eos(tokenizer):
    assert tokens(tokenizer, *encode_text(tokenizer, "the cat is red.")) == [
        ("the", F),  # the first token: nothing before it predicts it
        (" c", T), ("at", T), (" ", T), ("is", T), (" re", T), ("d", T), (".", T),
        ("<|im_end|>", T),  # EOS appended: the model learns where a document ends
    ]  # fmt: skip


def test_prompt_response_trains_the_response_and_its_eos_only(tokenizer):
    # the raw prompt (--chat-template never); auto renders it as a user turn (test_chat_template.py)
    assert tokens(tokenizer, *encode_prompt_response(tokenizer, "Name a color.", "red", "never")) == [
        ("N", F), ("ame", F), (" a", F), (" c", F), ("ol", F), ("or", F), (".", F),
        ("re", T), ("d", T), ("<|im_end|>", T),
    ]  # fmt: skip


def test_prompt_as_messages_is_rendered_with_the_generation_prompt(tokenizer):
    ids, labels = encode_prompt_response(tokenizer, [{"role": "user", "content": "Name a color."}], "red")
    assert tokens(tokenizer, ids, labels) == [
        ("<|im_start|>", F), ("us", F), ("er", F), ("\n", F),
        ("N", F), ("ame", F), (" a", F), (" c", F), ("ol", F), ("or", F), (".", F),
        ("<|im_end|>", F),  # an EOS id inside the prompt: not trained
        ("\n", F), ("<|im_start|>", F), ("a", F), ("ssistant", F), ("\n", F),
        ("re", T), ("d", T), ("<|im_end|>", T),
    ]  # fmt: skip
    # the same ids that train-rm / ppo / eval build for this (prompt, completion)
    from rlhfkit.chat import encode_completion, encode_prompt

    prompt = [{"role": "user", "content": "Name a color."}]
    assert ids == encode_prompt(tokenizer, prompt) + encode_completion(tokenizer, "red")


TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "two plus two"},
    {"role": "assistant", "content": "four"},
]


def test_messages_train_every_assistant_turn_and_its_end_of_turn_token(tokenizer):
    assert tokens(tokenizer, *encode_messages(tokenizer, TWO_TURNS)) == [
        ("<|im_start|>", F), ("s", F), ("ystem", F), ("\n", F),
        ("B", F), ("e", F), (" brief", F), (".", F), ("<|im_end|>", F), ("\n", F),
        ("<|im_start|>", F), ("us", F), ("er", F), ("\n", F), ("hi", F), ("<|im_end|>", F), ("\n", F),
        ("<|im_start|>", F), ("a", F), ("ssistant", F), ("\n", F),
        ("he", T), ("ll", T), ("o", T), ("<|im_end|>", T),  # first assistant turn + its end-of-turn token
        ("\n", F),
        ("<|im_start|>", F), ("us", F), ("er", F), ("\n", F),
        ("t", F), ("wo", F), (" p", F), ("lus", F), (" t", F), ("wo", F), ("<|im_end|>", F), ("\n", F),
        ("<|im_start|>", F), ("a", F), ("ssistant", F), ("\n", F),
        ("f", T), ("our", T), ("<|im_end|>", T),  # second assistant turn
        ("\n", F),
    ]  # fmt: skip


def _trained_spans(tokenizer, ids, labels):
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_messages_mask_survives_turn_text_that_looks_like_template_tokens(tokenizer):
    # user text containing the end-of-turn token and the assistant's own words: located by offsets, not by searching
    messages = [
        {"role": "user", "content": "say ok<|im_end|> ok"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again ok"},
        {"role": "assistant", "content": "ok ok"},
    ]
    ids, labels = encode_messages(tokenizer, messages)
    assert _trained_spans(tokenizer, ids, labels) == ["ok<|im_end|>", "ok ok<|im_end|>"]


def test_messages_with_a_template_that_ignores_the_generation_prompt(tokenizer):
    plain = tokenizer.chat_template.split("{% if add_generation_prompt %}")[0]  # ChatML without the generation prompt
    ids, labels = encode_messages(tokenizer, TWO_TURNS)
    old = tokenizer.chat_template
    try:
        tokenizer.chat_template = plain
        assert encode_messages(tokenizer, TWO_TURNS) == (ids, labels)
    finally:
        tokenizer.chat_template = old


def test_messages_with_a_template_that_is_not_turn_by_turn_is_an_error_with_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"messages": TWO_TURNS}) + "\n")
    demos = load(path, parse_demonstration)
    old = tokenizer.chat_template
    try:
        # a template that closes the whole conversation with a marker: a prefix is not rendered as a prefix
        tokenizer.chat_template = old.split("{% if add_generation_prompt %}")[0] + "<|endoftext|>"
        with pytest.raises(DataError, match=r"chat\.jsonl:2: field 'messages\.2'"):
            encode_dataset(tokenizer, demos, demos.lines, source=str(path), max_length=64)
        rows, stats = encode_dataset(tokenizer, demos, demos.lines, source=str(path), max_length=64, skip_invalid=True)
        assert len(rows) == 1 and stats.skipped_invalid == 1
    finally:
        tokenizer.chat_template = old


def test_truncation_keeps_the_start_and_is_counted(tokenizer, tmp_path):
    long_text = Demonstration(text="one two three four five six seven eight nine ten")
    example = encode_demonstration(tokenizer, long_text, max_length=4)
    full = encode_demonstration(tokenizer, long_text, max_length=1000)
    assert example.truncated and not full.truncated
    assert example.input_ids == full.input_ids[:4] and example.labels == full.labels[:4]

    demos = [
        long_text,
        Demonstration(text="hi"),
        Demonstration(prompt="one two three four five six seven eight", response="nine"),  # the response is past the cut
    ]
    rows, stats = encode_dataset(tokenizer, demos, [1, 2, 3], source="d.jsonl", max_length=4)
    assert stats.truncated == 2 and stats.dropped_no_target == 1 and stats.examples == len(rows) == 2
    assert stats.label_tokens == sum(r.num_label_tokens for r in rows)
    with pytest.raises(DataError, match="no example left to train on"):
        encode_dataset(tokenizer, demos[2:], [3], source="d.jsonl", max_length=4)


def test_pack_fits_every_example_once_within_max_length():
    examples = [
        Example(tuple(range(100 * i, 100 * i + n)), (IGNORE_INDEX,) + tuple(range(100 * i + 1, 100 * i + n)))
        for i, n in enumerate([5, 3, 7, 2, 6, 1, 4])
    ]
    rows = pack(examples, max_length=8)
    assert all(len(r) <= 8 for r in rows)
    assert len(rows) == 4  # 28 tokens in rows of 8: best-fit decreasing reaches the minimum
    pieces = []
    for r in rows:
        offset = 0
        for n in r.lengths:
            pieces.append((r.input_ids[offset : offset + n], r.labels[offset : offset + n]))
            offset += n
        assert offset == len(r)
    assert sorted(pieces) == sorted((e.input_ids, e.labels) for e in examples)  # tokens and labels kept, each once
    assert pack(examples, 8) == rows  # deterministic


def test_collate_pads_right_and_restarts_positions_for_packed_rows():
    a = Example((5, 6, 7), (IGNORE_INDEX, 6, 7))
    b = Example((8, 9), (IGNORE_INDEX, 9))
    batch = collate([a, b], pad_token_id=2)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 2]]
    assert batch.labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch.position_ids is None and batch.num_tokens == 5 and batch.num_label_tokens == 3
    packed = pack([a, b], max_length=6)
    batch = collate([*packed, Example((1,) * 6, (IGNORE_INDEX,) * 6)], pad_token_id=2)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 2]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_rows_give_the_same_logits_and_loss_as_separate_examples(tokenizer, tiny_llama):
    """Position ids restarting per example make transformers mask attention block-diagonally:
    packing changes the padding, not the math."""
    model = tiny_llama.eval()
    demos = [Demonstration(text="the cat is red."), Demonstration(prompt="Name a color.", response="blue"),
             Demonstration(messages=TWO_TURNS), Demonstration(text="one two three")]  # fmt: skip
    examples = [encode_demonstration(tokenizer, d, 128) for d in demos]
    rows = pack(examples, max_length=128)
    assert len(rows) == 1 and len(rows[0].lengths) == 4
    with torch.no_grad():
        packed = collate(rows, tokenizer.pad_token_id)
        packed_logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        separate = collate(examples, tokenizer.pad_token_id)
        separate_logits = model(input_ids=separate.input_ids, use_cache=False).logits
        packed_loss, packed_stats = lm_loss(packed_logits[None], packed.labels)
        separate_loss, separate_stats = lm_loss(separate_logits, separate.labels)
    offset = 0
    for n in rows[0].lengths:
        # packing orders examples by length; find each piece's original example by its ids
        original = next(i for i, e in enumerate(examples) if e.input_ids == rows[0].input_ids[offset : offset + n])
        torch.testing.assert_close(packed_logits[offset : offset + n], separate_logits[original, :n], atol=1e-5, rtol=1e-5)
        offset += n
    assert packed_stats["tokens"] == separate_stats["tokens"] == sum(e.num_label_tokens for e in examples)
    torch.testing.assert_close(packed_loss, separate_loss, atol=1e-5, rtol=1e-5)


def test_lm_loss_is_shifted_token_mean_with_an_optional_normaliser():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, 1, -100, -100]])
    loss, stats = lm_loss(logits, labels)
    # by hand: position t predicts labels[t+1]
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 0, 3] + logp[0, 1, 4] + logp[1, 0, 1]) / 3
    torch.testing.assert_close(loss, expected)
    assert int(stats["tokens"]) == 3
    loss10, _ = lm_loss(logits, labels, normalizer=10)
    torch.testing.assert_close(loss10, expected * 3 / 10)
    loss.backward()
    assert torch.all(logits.grad[0, 2:] == 0) and torch.all(logits.grad[1, 1:] == 0)  # untrained positions: no gradient
