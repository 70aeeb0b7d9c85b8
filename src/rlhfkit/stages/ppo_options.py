"""``rlhfkit ppo``'s batch sizes.

(every option itself is checked by `config.PPOConfig.check`; what ``--out`` holds by
`training.prepare_run_dir`)

* `sizes` — ``--batch-size`` rollouts per step, cut into ``--mini-batch-size`` rollouts per
  optimizer step and ``--grad-accum`` micro-batches per mini-batch, refusing to round
  (lm-human-preferences' ``exact_div``), and ``--ppo-epochs`` passes over them; ``--algo a2c``
  takes one gradient step per rollout batch (one mini-batch, one epoch). Batch sizes are per process.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config import PPOConfig, exact_div


@dataclass(frozen=True)
class Sizes:
    batch: int  # rollouts per step (per process)
    mini_batch: int  # rollouts per optimizer step
    micro_batch: int  # rollouts per forward/backward
    mini_batches: int  # optimizer steps per PPO epoch
    epochs: int = 1  # passes over the rollout batch (--ppo-epochs; 1 for a2c)


def sizes(config: PPOConfig) -> Sizes:
    """The batch sizes of ``config`` (a ConfigError when they do not divide)."""
    a2c = config.algo == "a2c"  # one gradient step per rollout batch (Mnih et al. 2016)
    mini = config.batch_size if a2c else config.mini_batch_size or config.batch_size
    mini_batches = exact_div(config.batch_size, mini, "--batch-size must be a multiple of --mini-batch-size")
    micro = exact_div(mini, config.grad_accum, "--mini-batch-size must be a multiple of --grad-accum")
    return Sizes(config.batch_size, mini, micro, mini_batches, epochs=1 if a2c else config.ppo_epochs)

