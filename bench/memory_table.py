"""Memory per device of rlhfkit's training stages for SmolLM2-135M, a 1B and a 7B model, under
``--strategy ddp``, ``fsdp``, ``fsdp --cpu-offload`` and LoRA, computed from exact parameter counts
(each model is built from its published config on the meta device: no download, no memory).

What is counted (bytes per parameter, rlhfkit's defaults on a bf16 GPU, ``--dtype auto``):

* a trained model: float32 weights 4 + float32 gradients 4 + AdamW's two float32 moments 8 = 16
  (the bf16 compute copy is transient: autocast under DDP; under FSDP one or two units at a time);
* ppo's reference: float32 weights (4), as the policy's, so that equal weights give equal log-probs;
  ppo's reward model: loaded in ``--dtype`` (bf16: 2); both frozen, no gradients, no optimizer state;
* ``ddp``: everything on every device;
* ``fsdp`` over N devices: everything / N, plus the units FSDP holds gathered at a time (bf16 weights
  and float32 gradients of the largest unit, twice for prefetching); ppo's generation gathers the
  whole policy in bf16 (2 bytes per parameter) for its duration (`rlhfkit.sharding.gathered`);
* ``fsdp --cpu-offload``: shards, gradients and optimizer state live in CPU memory (16/N bytes per
  parameter per process there); the GPU holds the gathered units (and ppo's gathered policy);
* LoRA (r = 16 on every linear layer of the decoder, ``--dtype bfloat16`` base): the frozen base in
  bf16 (2) plus 16 bytes per adapter parameter; ppo's reference is then the policy itself with its
  adapter off (no copy), and its value model gets adapters of its own.

Activations and the KV cache are not counted: they grow with batch size × sequence length and
shrink to about one layer's with ``--gradient-checkpointing``. ppo is counted with a separate value
model the size of the policy (the default when the reward model is the policy's size); ``--value-head
policy`` drops that share.

    python bench/memory_table.py [--devices 8]       # a Markdown table on stdout
"""

from __future__ import annotations

import argparse
import json

# published configs (the fields that decide the parameter count)
MODELS = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}  # fmt: skip
GIB = 2**30


def counts(fields: dict) -> dict[str, int]:
    """Exact parameter counts of a Llama-architecture model: total, largest FSDP unit (a decoder
    layer, or the embedding + final norm + output layer group), and LoRA r=16 on every linear layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    rest = total - layer * fields["num_hidden_layers"]
    lora = sum(16 * (m.in_features + m.out_features) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return {"params": total, "unit": max(layer, rest), "lora": lora}


def per_device(c: dict[str, int], setup: str, stage: str, n: int) -> tuple[float, float]:
    """(GPU GiB, CPU GiB per process) of one stage (sft: one trained model; ppo: policy + value
    model trained, reference + reward frozen)."""
    p, unit, lora = c["params"], c["unit"], c["lora"]
    transient = 2 * unit * (2 + 4)  # two units gathered: bf16 weights + float32 gradients
    if setup == "lora":
        trained = 2 * p + 16 * lora  # frozen bf16 base + adapters with gradients and AdamW
        gpu = trained * (2 if stage == "ppo" else 1) + (2 * p if stage == "ppo" else 0)  # + reward (bf16); reference = policy
        return gpu / GIB, 0.0
    state = 16 * p * (2 if stage == "ppo" else 1) + ((4 + 2) * p if stage == "ppo" else 0)  # + reference (fp32), reward (bf16)
    generation = 2 * p if stage == "ppo" else 0  # the policy gathered in bf16 for sampling
    if setup == "ddp":
        return state / GIB, 0.0
    if setup == "fsdp":
        return (state / n + transient + generation) / GIB, 0.0
    return (transient + generation) / GIB, state / n / GIB  # fsdp + cpu offload


def table(n: int) -> str:
    rows = ["| model | parameters | setup | sft / train-rm: GPU per device | ppo: GPU per device | CPU per process (offload) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    data = {}
    for name, fields in MODELS.items():
        c = counts(fields)
        data[name] = c
        for setup, label in (("ddp", "ddp"), ("fsdp", f"fsdp × {n}"), ("offload", f"fsdp × {n} + --cpu-offload"),
                             ("lora", "LoRA r=16, ddp")):  # fmt: skip
            sft_gpu, sft_cpu = per_device(c, setup, "sft", n)
            ppo_gpu, ppo_cpu = per_device(c, setup, "ppo", n)
            cpu = f"{sft_cpu:.1f} / {ppo_cpu:.1f} GiB" if setup == "offload" else "—"
            rows.append(f"| {name} | {c['params'] / 1e9:.3f} B | {label} | {sft_gpu:.1f} GiB | {ppo_gpu:.1f} GiB | {cpu} |")
    return "\n".join(rows) + "\n\n" + json.dumps({k: v for k, v in data.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="devices FSDP shards over (default 8: one node)")
    print(table(parser.parse_args().devices))


if __name__ == "__main__":
    main()
