#!/usr/bin/env python3
"""Create a tiny randomly initialised Llama + tokenizer from scratch (no download), for
``make demo-tiny``: python examples/make_tiny_model.py OUT_DIR"""

import sys

from rlhfkit.testing import save_tiny_model

if __name__ == "__main__":
    print(save_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-base", arch="llama"))
