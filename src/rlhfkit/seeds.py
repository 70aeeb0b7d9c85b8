"""Per-row sampling seeds: one home for the seed of one completion, so that a completion depends on
what it is (seed, prompt, policy, sample, step, ...) and never on the batch it shared.

Four schemes exist because runs recorded with them must stay reproducible: changing one would
change every completion that collect, eval or ppo writes for a given ``--seed`` (and the order in
which ``rlhfkit label`` showed the completions that its judgement logs refer to).

=========  ==================================================================  ======================
scheme     value                                                               used by
=========  ==================================================================  ======================
``hex60``  first 15 hex digits (60 bits) of sha256 of the parts joined by \\x1f  collect (rows, shuffle)
``sha63``  first 8 bytes of sha256 of the parts joined by ``/``, shifted to     eval (rows, judge order),
           63 bits                                                             ppo --judge (rows, order)
``poly``   ``((p0·M + p1)·M + p2)·… mod 2⁶³`` with M = 1 000 003 (integers)     ppo (seed, step, row)
``hex64``  first 16 hex digits (64 bits) of sha256 of the parts joined by \\0   label (order, k-max, export)
=========  ==================================================================  ======================

Worked example: ``row_seed(0, 0, 1, scheme="poly")`` = (0·M + 0)·M + 1 = 1, and
``row_seed(1, 2, 3, scheme="poly")`` = (1·M + 2)·M + 3 = 1 000 008 000 018.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Scheme = Literal["hex60", "sha63", "poly", "hex64"]
POLY_BASE = 1_000_003


def digest(*parts: object, sep: str = "\x1f") -> str:
    """The sha256 hex digest of the parts' strings joined by ``sep`` (also used for stable ids)."""
    return hashlib.sha256(sep.join(str(p) for p in parts).encode()).hexdigest()


def row_seed(*parts: object, scheme: Scheme = "hex60") -> int:
    """The sampling seed of one row, a function of ``parts`` only (see the table above)."""
    if scheme == "hex60":
        return int(digest(*parts)[:15], 16)
    if scheme == "sha63":
        return int.from_bytes(hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()[:8], "big") >> 1
    if scheme == "poly":
        value = 0
        for p in parts:
            value = value * POLY_BASE + int(p)  # type: ignore[call-overload]
        return value % (2**63)
    if scheme == "hex64":
        return int(digest(*parts, sep="\0")[:16], 16)
    raise ValueError(f"unknown seed scheme {scheme!r}")
