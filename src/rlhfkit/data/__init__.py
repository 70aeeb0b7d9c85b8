"""Record schemas, readers and atomic writers for every file format of SPEC §4."""

from rlhfkit.data.files import atomic_open, read_records, write_json, write_jsonl
from rlhfkit.data.records import (
    Comparison,
    Completion,
    Conversation,
    Demonstration,
    Prompt,
    Samples,
    load,
    parse_comparison,
    parse_demonstration,
    parse_prompt,
    parse_samples,
)

__all__ = [
    "Comparison",
    "Completion",
    "Conversation",
    "Demonstration",
    "Prompt",
    "Samples",
    "atomic_open",
    "load",
    "parse_comparison",
    "parse_demonstration",
    "parse_prompt",
    "parse_samples",
    "read_records",
    "write_json",
    "write_jsonl",
]
