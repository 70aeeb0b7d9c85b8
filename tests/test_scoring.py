"""Scores are read at the last real token by position, never by comparing ids with the pad id; a
``last+mean`` reward model also reads the mean hidden state over the completion."""

from __future__ import annotations

import pytest
import torch

from rlhfkit import models
from rlhfkit.scoring import (
    add_mean_head,
    head_scores,
    last_index,
    last_token_scores,
    load_mean_head,
    mean_head,
    pooled_hidden,
    pop_mean_head,
    save_mean_head,
)


def test_last_index():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    assert last_index(mask).tolist() == [2, 3, 2]


def test_padding_and_eos_inside_the_text_do_not_move_the_score(tiny_llama_dir, tokenizer):
    rm = models.load_model(str(tiny_llama_dir), kind="reward").eval()
    eos = tokenizer.eos_token_id  # == pad id; it also occurs inside the sequence
    seq = [1, 40, eos, 41, 42, eos]
    alone = last_token_scores(rm, torch.tensor([seq]), torch.ones(1, 6, dtype=torch.long))
    # left pad 2 + right pad 3, with pad == EOS
    ids = torch.tensor([[eos, eos] + seq + [eos, eos, eos]])
    mask = torch.tensor([[0, 0] + [1] * 6 + [0, 0, 0]])
    padded = last_token_scores(rm, ids, mask)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


# --- --pooling last+mean ----------------------------------------------------------------------------


def test_pooled_hidden_is_last_and_completion_mean_by_hand(tiny_llama_dir):
    """[h_last ⊕ mean of h over the completion's tokens], whatever the padding; an empty completion
    uses the last token; the score is w·h_last + u·mean."""
    rm = models.load_model(str(tiny_llama_dir), kind="reward").eval()
    hidden_size = rm.config.hidden_size
    assert pooled_hidden(rm, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)).shape == (1, hidden_size)
    torch.manual_seed(0)
    u = torch.randn(1, hidden_size)
    add_mean_head(rm, u)
    prompt, completion = [1, 40, 41], [42, 43, 44, 2]
    seq = prompt + completion
    with torch.no_grad():
        h = rm.model(input_ids=torch.tensor([seq])).last_hidden_state[0]  # (7, H), no padding at all
        expected = torch.cat([h[-1], h[3:].mean(0)])  # the completion is positions 3..6, EOS included
        # row 0: left pad 2, right pad 1 (start moves with the left padding); row 1: prompt only, empty completion
        ids = torch.tensor([[0, 0, *seq, 0], [0, 0, *prompt, 0, 0, 0, 0, 0]])
        mask = torch.tensor([[0, 0, *[1] * 7, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]])
        got = pooled_hidden(rm, ids, mask, torch.tensor([5, 5]))
        alone = rm.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        scores = head_scores(rm, got)
    assert got.shape == (2, 2 * hidden_size)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], torch.cat([alone, alone]), atol=1e-5, rtol=1e-5)
    w = rm.score.weight[0]
    torch.testing.assert_close(scores[0], w @ expected[:hidden_size] + u[0] @ expected[hidden_size:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="completion start"):
        pooled_hidden(rm, ids, mask)


def test_mean_head_saves_beside_the_model_and_loads_back(tiny_llama_dir, tmp_path):
    rm = models.load_model(str(tiny_llama_dir), kind="reward")
    assert not load_mean_head(rm, tmp_path) and mean_head(rm) is None  # no file: a plain last-token model
    u = torch.arange(rm.config.hidden_size, dtype=torch.float32)[None] / 100
    add_mean_head(rm, u)
    weight = pop_mean_head(rm)
    assert mean_head(rm) is None and "mean_score.weight" not in rm.state_dict()  # save_pretrained sees a plain classifier
    save_mean_head(weight, tmp_path)
    again = models.load_model(str(tiny_llama_dir), kind="reward")
    assert load_mean_head(again, tmp_path)
    torch.testing.assert_close(mean_head(again).weight, u)
