"""One dataclass per stage: the single home of every default. The CLI reads its defaults from here,
and the resolved config is recorded in every artifact's ``rlhfkit.json``."""

from __future__ import annotations

from dataclasses import dataclass, field  # noqa: F401  (field is used by stage configs)


@dataclass
class CommonConfig:
    """Options every command has."""

    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    skip_invalid: bool = False
    trust_remote_code: bool = False


@dataclass
class TrainConfig(CommonConfig):
    """Options every training stage has (sft, train-rm, ppo)."""

    out: str = ""
    resume: bool = False
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    keep_checkpoints: int = 2
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    save_adapter: bool = False


# --- stage configs (each stage appends its own below) -------------------------------------------
