"""rlhfkit: the RLHF recipe (SFT, rankings, reward model, PPO, eval) as composable commands.

Importing this package does not import torch; the stages import it when they run.
"""

__version__ = "0.1.0"
