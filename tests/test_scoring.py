"""Scores are read at the last real token by position, never by comparing ids with the pad id."""

from __future__ import annotations

import torch

from rlhfkit import models
from rlhfkit.scoring import last_index, last_token_scores


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
