"""One dataclass per stage: the single home of every default and of every option check. The CLI
reads its defaults and its choices from here, and the resolved config is recorded in every
artifact's ``rlhfkit.json``.

Each config's ``check()`` looks at every option before anything is loaded and raises
`ConfigError` naming the option (``--batch-size: must be at least 1, got 0``). Choices are
``Literal`` types (``Schedule``, ``ValueHead``, ...): the CLI turns them into its choices, the
checks read them with ``typing.get_args``, so a choice is written once.

Below every other module but ``errors``: it imports nothing from rlhfkit besides errors.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from rlhfkit.errors import ConfigError

# --- choices ----------------------------------------------------------------------------------------

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Schedule = Literal["linear", "cosine", "constant"]  # learning-rate decay after warmup
ValueHead = Literal["separate", "policy"]  # ppo's critic: a value model, or a head on the policy
KLEstimator = Literal["k1", "k2", "k3"]  # Schulman's estimators of KL(π‖π_ref) per token
Interval = Literal["wilson", "bootstrap"]  # eval's win-rate interval
RankingsFormat = Literal["auto", "native", "scores", "best-of-k", "pairwise", "label-studio", "argilla", "csv"]
Aggregate = Literal["none", "majority"]  # rank-import: every annotator's pairs, or one by vote
Pooling = Literal["last", "last+mean"]  # what a reward model's head reads (`scoring.pooled_hidden`)
HeadInit = Literal["probe", "random"]  # train-rm's score head: fitted on frozen features first (LP-FT), or random
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]  # --report-to: experiment trackers (rlhfkit.tracking)
Algo = Literal["ppo", "a2c", "rloo", "grpo"]  # rlhfkit ppo --algo: the advantage estimator and the loss
DPOLoss = Literal["sigmoid", "ipo"]  # rlhfkit dpo --loss: DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023)
ChatTemplate = Literal["auto", "always", "never"]  # string prompts as user turns: when the model has a template, always, never
Strategy = Literal["ddp", "fsdp"]  # training stages: a replica per process (DDP), or weights/gradients/optimizer sharded (FSDP2)

GROUP_ALGOS = ("rloo", "grpo")  # the --algo choices that sample K responses per prompt and learn no critic
DEFAULT_GROUP_SIZE = 4  # their K when --k is not given

SCRIPT_PREFIX = "python:"  # a reward given as python:MODULE:FUNCTION
SERVED_PREFIX = "openai:"  # a policy served by an OpenAI-compatible server: openai:http://HOST:PORT/v1[#MODEL]


def report_to_names(value: str | Sequence[str] | None) -> list[str]:
    """``--report-to``: ``"none"`` (or empty) -> []; ``"tensorboard,wandb"`` (or a list) -> the
    trackers in order, each once; an unknown name, or ``none`` with others, is a ConfigError."""
    items = [] if value is None else [value] if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(n.strip().lower() for item in items for n in str(item).split(",") if n.strip()))
    if "none" in names and len(names) > 1:
        raise ConfigError(f"--report-to: 'none' cannot be combined with trackers, got {','.join(names)}")
    unknown = [n for n in names if n != "none" and n not in choices(Tracker)]
    if unknown:
        raise ConfigError(
            f"--report-to: unknown tracker {unknown[0]!r} (expected none, or {', '.join(choices(Tracker))}, comma-separated)"
        )
    return [n for n in names if n != "none"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` choice type: ``choices(Schedule) == ("linear", "cosine", "constant")``."""
    return get_args(literal)


# --- option values that are parsed, not just compared ------------------------------------------------


def named_path(spec: str, option: str = "--policy") -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` is named after its directory, or its file
    without ``.gguf``: ``named_path("runs/sft/") == ("sft", "runs/sft/")``,
    ``named_path("ppo=/x/y") == ("ppo", "/x/y")``, ``named_path("a/b.gguf") == ("b", "a/b.gguf")``.
    A ``=`` inside a path (a name with ``/``) does not count as a name."""
    name, sep, path = spec.partition("=")
    if not sep or not name or "/" in name:
        name, path = Path(spec.rstrip("/")).name.removesuffix(".gguf") or spec, spec
        if is_served(spec):  # openai:http://HOST:PORT/v1#MODEL: named after the model (or "served")
            name = spec.partition("#")[2] or "served"
    if not path:
        raise ConfigError(f"{option} {spec!r}: no model path")
    return name, path


def first_duplicate(names: Sequence[str]) -> str | None:
    """The first name that occurs twice, or None."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def is_served(spec: str) -> bool:
    """Whether a policy spec is ``openai:URL[#MODEL]`` (sampled from a server, `rlhfkit.served`)."""
    return spec.startswith(SERVED_PREFIX)


def parse_served_spec(spec: str) -> tuple[str, str | None]:
    """``openai:http://HOST:PORT/v1[#MODEL]`` -> (base URL without a trailing /, MODEL or None),
    checked for shape only: ``parse_served_spec("openai:http://127.0.0.1:8000/v1/#m") ==
    ("http://127.0.0.1:8000/v1", "m")``."""
    url, _, model = spec[len(SERVED_PREFIX) :].partition("#")
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ConfigError(f"{spec}: expected openai:http://HOST:PORT/v1 or openai:https://HOST/v1, optionally #MODEL")
    return url.rstrip("/"), model or None


def is_script(spec: str) -> bool:
    """Whether a reward spec is ``python:MODULE:FUNCTION`` (a scripted reward, not a model)."""
    return spec.startswith(SCRIPT_PREFIX)


def parse_script_spec(spec: str) -> tuple[str, str]:
    """``python:MODULE:FUNCTION`` -> (MODULE or path/to/file.py, FUNCTION), checked for shape only."""
    body = spec[len(SCRIPT_PREFIX) :]
    target, sep, function = body.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise ConfigError(f"{spec}: expected python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION")
    return target, function


def check_judge_command(command: str) -> None:
    """Refuse, before any sampling, a judge command whose program cannot be found."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise ConfigError(f"--judge {command!r}: cannot parse the command line ({e})") from None
    if not words:
        raise ConfigError("--judge: empty command")
    program = words[0]
    if "=" in program or program in ("(", "{", "exec", "env", "time"):  # shell syntax: let the shell judge it
        return
    if shutil.which(program) is None and not Path(program).is_file():
        raise ConfigError(f"--judge {command!r}: program {program!r} not found")


def exact_div(a: int, b: int, what: str) -> int:
    """a / b, refusing to round (lm-human-preferences' exact_div)."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not a multiple of {b}")
    return a // b


# --- output paths ----------------------------------------------------------------------------------

Output = tuple[str, str, str]  # (option, path, kind): kind "file", or "run" (a directory the run replaces as a whole)


def check_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, str]] = ()) -> None:
    """Refuse, before any work, outputs that would be lost or would destroy an input (one home for
    every command's outputs):

    * an output given twice (``--val-out`` = ``--out``), or equal to an input (``--out`` = ``--prompts``);
    * an input inside a ``run`` output (training's ``--out``: the final save replaces it);
    * an output that cannot be written: a parent that is a file, a directory where a file is meant
      (or the reverse), a directory that refuses a new entry (read-only, a pseudo-filesystem such
      as ``/proc``) — found by creating and removing an empty directory where the output will go.

    ``-`` (stdout/stdin) and ``""`` (not given) are skipped.
    """
    seen: dict[str, str] = {}
    given = [(option, path, kind) for option, path, kind in outputs if path and path != "-"]
    sources = [(option, os.path.realpath(os.path.expanduser(path))) for option, path in inputs if path and path != "-"]
    for option, path, kind in given:
        real = os.path.realpath(os.path.expanduser(path))
        if real in seen:
            raise ConfigError(f"{option} {path}: the same path as {seen[real]}; give each output its own path")
        seen[real] = option
        for source_option, source in sources:
            if source == real:
                raise ConfigError(f"{option} {path}: the same path as the input {source_option}; choose another output")
            if kind == "run" and source.startswith(real.rstrip(os.sep) + os.sep):
                raise ConfigError(f"{source_option} {source} is inside {option} {path}, which the run replaces; move it out")
        _check_writable(option, path, kind)


def _check_writable(option: str, path: str, kind: str) -> None:
    import tempfile

    target = Path(path).expanduser()
    if kind == "file" and target.is_dir():
        raise ConfigError(f"{option} {path}: is a directory (expected a file name)")
    if kind == "run" and target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a directory")
    # where something gets created: a file's directory; a run's directory, and beside it (its final save)
    places = [target.parent] if kind == "file" else [target.parent, target]
    for place in places:
        existing = place
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{option} {path}: {existing} is a file, not a directory")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".rlhfkit-write-test-", dir=existing))
        except OSError as e:
            raise ConfigError(f"{option} {path}: cannot create anything in {existing} ({e.strerror or e})") from None


# --- the checks every config shares ------------------------------------------------------------------


def flag(name: str) -> str:
    """The command-line option of a config field: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


class Checks:
    """Small checks with one message shape each; every ``check()`` is written with them."""

    def require(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name):
                raise ConfigError(f"{flag(name)} is required")

    def finite(self, *names: str) -> None:
        """A number, not ``nan`` or ``inf`` (None, an option that is off, passes). Every range check
        below starts with it; `CommonConfig.check` applies it to every number of every config."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag(name)}: must be a finite number, got {value}")

    def at_least(self, low: int, *names: str) -> None:
        self.finite(*names)
        for name in names:
            if getattr(self, name) < low:
                raise ConfigError(f"{flag(name)}: must be at least {low}, got {getattr(self, name)}")

    def non_negative(self, *names: str) -> None:
        self.finite(*names)
        for name in names:
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)}: must be >= 0, got {getattr(self, name)}")

    def positive(self, *names: str, optional: bool = False) -> None:
        """> 0; with ``optional``, None (off) passes too."""
        self.finite(*names)
        for name in names:
            value = getattr(self, name)
            if not (optional and value is None) and not value > 0:
                raise ConfigError(f"{flag(name)}: must be > 0, got {value}")

    def fraction(self, *names: str) -> None:
        """In [0, 1): a share held out."""
        self.finite(*names)
        for name in names:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)}: must be in [0, 1), got {getattr(self, name)}")

    def one_of(self, name: str, literal: Any) -> None:
        value = getattr(self, name)
        if value not in choices(literal):
            raise ConfigError(f"{flag(name)}: expected one of {', '.join(choices(literal))}, got {value!r}")

    def sampling(self) -> None:
        """Options every sampling stage has: ``max_new_tokens``, ``temperature``, ``top_p``."""
        self.at_least(1, "max_new_tokens")
        temperature, top_p = getattr(self, "temperature"), getattr(self, "top_p")  # noqa: B009  (fields of the sampling stages)
        if temperature < 0:
            raise ConfigError(f"--temperature: must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"--top-p: must be in (0, 1], got {top_p}")


@dataclass
class CommonConfig(Checks):
    """Options every command has."""

    seed: int = 0
    skip_invalid: bool = False

    def check(self) -> None:
        """Every option checked before anything is loaded (a stage's ``run`` calls this first).
        Here: every number of every config is finite (no ``nan``, no ``inf``), and the seed is one
        that every generator takes; each config adds its ranges."""
        self.finite(*(f.name for f in fields(self)))  # type: ignore[arg-type]
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed: must be in [0, 2^32), got {self.seed}")


@dataclass
class ModelConfig(CommonConfig):
    """Options every command that loads a model has (all but rank-import)."""

    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False
    chat_template: ChatTemplate = "auto"  # string prompts: one user turn of the model's chat template (auto: if it has one)

    def check(self) -> None:
        super().check()
        self.one_of("device", Device)
        self.one_of("dtype", DType)
        self.one_of("chat_template", ChatTemplate)


@dataclass
class TrainConfig(ModelConfig):
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
    report_to: str = "none"  # experiment trackers for metrics.jsonl's stream: none, or tensorboard,wandb,mlflow,trackio
    strategy: Strategy = "ddp"  # under torchrun: ddp (a replica per process) or fsdp (sharded; DCP checkpoints)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% more compute
    cpu_offload: bool = False  # with --strategy fsdp: weights, gradients and optimizer state in CPU memory
    compile: bool = False  # torch.compile each decoder layer (regional compilation); see README "Speed"

    def check(self) -> None:
        super().check()
        report_to_names(self.report_to)
        self.at_least(1, "lora_r")
        self.positive("lora_alpha")
        self.non_negative("save_every", "keep_checkpoints")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout: must be in [0, 1), got {self.lora_dropout}")
        self.one_of("strategy", Strategy)
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("--cpu-offload needs --strategy fsdp (DDP keeps a whole replica on every device)")
        if self.save_adapter and not self.lora:
            raise ConfigError("--save-adapter needs --lora (there is no adapter to save)")

    def check_offline(self, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
        """The checks the offline trainers (dpo, ilql: a --policy trained on --data for --epochs,
        held out by --val-fraction) share; ``positive`` and ``non_negative`` name their own numbers."""
        self.require("policy", "data", "out")
        self.at_least(1, "epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every")
        self.non_negative("max_steps", "warmup_steps", "eval_every", "weight_decay", "max_grad_norm", *non_negative)
        self.positive(*positive)
        self.fraction("val_fraction")
        self.at_least(2, "max_length")


# --- stage configs ---------------------------------------------------------------------------------


@dataclass
class EvalConfig(ModelConfig):
    """``rlhfkit eval``: compare policies with a baseline on held-out prompts."""

    policy: list[str] = field(default_factory=list)  # NAME=PATH or PATH (name = directory name)
    baseline: str = ""
    rm: str = ""  # reward-model directory, one-label classifier, or python:MODULE:FUNCTION
    judge: str = ""  # shell command: samples JSONL on stdin -> rankings JSONL on stdout
    prompts: str = ""
    out: str = ""  # report.md, plots and samples.jsonl go here ("" = JSON on stdout only)
    max_prompts: int = 0  # 0 = every prompt
    max_new_tokens: int = 64
    n_samples: int = 1  # completions per prompt per policy
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16
    best_of: int = 0  # best-of-n from the baseline by RM score (0 = off)
    demos: str = ""  # held-out demonstrations for perplexity
    checkpoints: str = ""  # a ppo run directory: evaluate RUN/checkpoints/step-*/
    interval: Interval = "wilson"  # win-rate interval: wilson or bootstrap (over prompts)
    confidence: float = 0.95
    bootstrap: int = 1000  # resamples for bootstrap intervals (Elo, and win-rates with --interval bootstrap)
    judge_timeout: float = 3600.0  # seconds
    report_to: str = "none"  # experiment trackers that get the report: none, or tensorboard,wandb,mlflow,trackio
    concurrency: int = 8  # requests in flight per served policy (--policy NAME=openai:URL)

    def check(self) -> None:
        super().check()
        report_to_names(self.report_to)
        if not self.policy and not self.checkpoints:
            raise ConfigError("--policy: at least one policy to evaluate (or --checkpoints RUN)")
        if not self.baseline:
            raise ConfigError("--baseline: required (the policy the others are compared with, usually the SFT model)")
        self.require("prompts")
        self.at_least(1, "n_samples", "batch_size")
        self.non_negative("max_prompts")
        self.sampling()
        if self.best_of < 0 or self.best_of == 1:
            raise ConfigError(f"--best-of: must be 0 (off) or at least 2, got {self.best_of}")
        if self.best_of and not self.rm:
            raise ConfigError("--best-of: needs --rm (the reward model picks the best of n)")
        self.one_of("interval", Interval)
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence: must be in (0, 1), got {self.confidence}")
        if self.bootstrap < 0 or (self.interval == "bootstrap" and self.bootstrap < 1):
            raise ConfigError(
                f"--bootstrap: must be at least 1 with --interval bootstrap (0 allowed otherwise), got {self.bootstrap}"
            )
        self.positive("judge_timeout")
        if self.judge:
            check_judge_command(self.judge)
        if self.rm and is_script(self.rm):
            parse_script_spec(self.rm)
        self.at_least(1, "concurrency")
        players = [("--baseline", self.baseline)] + [("--policy", p) for p in self.policy]
        if is_served(named_path(self.baseline, "--baseline")[1]):
            raise ConfigError(f"--baseline {self.baseline}: must be a local model (the KL reference); serve --policy models")
        for option, spec in players:
            path = named_path(spec, option)[1]
            if is_served(path):
                parse_served_spec(path)
            elif not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(".gguf")):
                raise ConfigError(f"{option} {spec}: no such model directory or file")
        names = [named_path(spec, option)[0] for option, spec in players] + ([f"best-of-{self.best_of}"] if self.best_of else [])
        duplicate = first_duplicate(names)
        if duplicate is not None:
            raise ConfigError(f"--policy: two models are called {duplicate!r}; name them with NAME=PATH")


@dataclass
class TrainRMConfig(TrainConfig):
    """``rlhfkit train-rm``: a Bradley–Terry reward model on comparisons (prompt/chosen/rejected)."""

    model: str = ""  # the initial model, usually the SFT model (a fresh one-label score head is added)
    data: str = ""  # comparisons (rank-import output or public prompt/chosen/rejected data)
    val_data: str = ""  # held-out comparisons ("" = split --val-fraction of the prompts off --data)
    val_fraction: float = 0.05  # share of prompts held out when --val-data is not given (0 = none)
    max_length: int = 1024  # pairs whose prompt+completion is longer are dropped (and counted)
    epochs: int | None = None  # None = from the data size: enough epochs for --min-steps optimizer steps
    min_steps: int = 40  # with --epochs unset: at least this many optimizer steps (small data needs several epochs)
    max_steps: int = 0  # stop after N optimizer steps (0 = run every epoch)
    batch_size: int = 8  # batch elements per micro-batch and device: groups (rankings), or pairs without 'group'
    grad_accum: int = 1
    lr: float = 1e-5
    pooling: Pooling = "last"  # the head reads the last token's hidden state, or also the completion's mean one
    feature_layers: int = 1  # the head reads the last layer and K-1 lower ones, evenly spaced (needs pooling last+mean)
    depth: str = "all"  # keep the bottom N decoder layers ("all"; "auto" = N by the probe's cross-validated loss)
    head_init: HeadInit = "probe"  # fit the head on frozen features before fine-tuning (Kumar et al. 2022)
    probe_l2: float | None = None  # the probe's L2 penalty on standardised features (None = chosen by 5-fold CV)
    head_lr: float | None = None  # the score head's own learning rate (None = --lr)
    trainable_layers: int = -1  # train only the top N decoder layers (+ final norm and head); 0 = the probe alone; -1 = all
    ensemble: int = 1  # M heads on one backbone, each on a bootstrap resample of the rankings: uncertainty
    early_stopping: bool = False  # keep the weights with the lowest held-out loss (evaluated every --eval-every steps)
    patience: int = 0  # with --early-stopping: stop after N evaluations without improvement (0 = run every step)
    schedule: Schedule = "linear"  # after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    use_margin: bool = False  # subtract each pair's 'margin' inside the loss (Llama 2)
    center_rewards_coef: float = 0.0  # adds coef * mean(r^2) (Eisenstein et al. 2023; TRL)
    eval_every: int = 0  # held-out evaluation every N optimizer steps (0 = only at the end)
    eval_batch_size: int = 16
    log_every: int = 1
    norm_samples: str = ""  # samples or comparisons whose completions set the normalisation ("" = training completions)

    def check(self) -> None:
        super().check()
        self.require("model", "data", "out")
        if self.epochs is not None:
            self.at_least(1, "epochs")
        self.at_least(1, "batch_size", "grad_accum", "eval_batch_size", "log_every", "ensemble", "min_steps")
        self.non_negative("max_steps", "warmup_steps", "eval_every", "weight_decay", "max_grad_norm", "center_rewards_coef")
        self.non_negative("patience")
        self.positive("lr")
        self.positive("probe_l2", "head_lr", optional=True)
        self.fraction("val_fraction")
        self.at_least(2, "max_length")
        self.one_of("schedule", Schedule)
        self.one_of("head_init", HeadInit)
        self.one_of("pooling", Pooling)
        self.at_least(-1, "trainable_layers")
        self.depth = str(self.depth).strip().lower()
        if self.depth not in ("all", "auto") and not (self.depth.isdigit() and int(self.depth) >= 1):
            raise ConfigError(f"--depth {self.depth}: expected all, auto or a number of layers (1 or more)")
        self.at_least(1, "feature_layers")
        if self.feature_layers > 1 and self.pooling != "last+mean":
            raise ConfigError("--feature-layers: reads [last ⊕ mean] of each layer; use it with --pooling last+mean")
        if self.depth == "auto" and self.head_init != "probe":
            raise ConfigError("--depth auto chooses the layer by the probe's cross-validated loss: use it with --head-init probe")
        if self.trainable_layers >= 0 and self.lora:
            raise ConfigError("--trainable-layers: not with --lora (LoRA already chooses what trains)")
        if self.trainable_layers == 0 and self.head_init != "probe":
            raise ConfigError("--trainable-layers 0 trains the head alone: use it with --head-init probe")
        if self.ensemble > 1 and self.use_margin:
            raise ConfigError("--ensemble: not with --use-margin")
        if self.patience and not self.early_stopping:
            raise ConfigError("--patience: needs --early-stopping")
        if self.early_stopping and not (self.val_data or self.val_fraction > 0):
            raise ConfigError("--early-stopping: needs a held-out set (--val-data or --val-fraction)")
        inputs = [("--model", self.model), ("--data", self.data), ("--val-data", self.val_data)]
        check_outputs([("--out", self.out, "run")], [*inputs, ("--norm-samples", self.norm_samples)])


@dataclass
class SFTConfig(TrainConfig):
    """``rlhfkit sft``: supervised fine-tuning (and continued pretraining) on demonstrations."""

    model: str = ""  # the pretrained causal LM (directory, hub id or .gguf file)
    data: str = ""  # demonstrations: text, prompt/response or messages records
    val_data: str = ""  # held-out demonstrations ("" = split --val-fraction off --data)
    val_fraction: float = 0.0  # share of --data held out when --val-data is not given (0 = no eval)
    epochs: int = 3
    max_steps: int = 0  # stop after N optimizer steps (0 = run every epoch); overrides --epochs
    lr: float = 2e-5
    schedule: Schedule = "cosine"  # after warmup
    warmup_steps: int = 0  # linear warmup steps; when 0, --warmup-ratio of the total steps
    warmup_ratio: float = 0.0
    batch_size: int = 8  # rows per micro-batch and device
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 1024  # longer examples are cut (and counted); the start is kept
    packing: bool = False  # pack short examples into rows of --max-length tokens
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    bf16: bool | None = None  # bfloat16 autocast; None = on with --dtype auto where models.auto_dtype is bf16
    eval_every: int = 0  # held-out evaluation every N optimizer steps (0 = before and after training only)
    eval_batch_size: int = 16
    log_every: int = 10  # optimizer steps per metrics.jsonl line

    def check(self) -> None:
        super().check()
        self.require("model", "data", "out")
        self.at_least(1, "batch_size", "grad_accum", "log_every", "eval_batch_size")
        self.non_negative("max_steps", "warmup_steps", "eval_every", "weight_decay", "max_grad_norm")
        if self.max_steps == 0 and self.epochs < 1:
            raise ConfigError(f"--epochs: must be at least 1 (or give --max-steps), got {self.epochs}")
        self.positive("lr")
        self.at_least(2, "max_length")
        self.fraction("val_fraction", "warmup_ratio")
        if self.val_data and self.val_fraction > 0:
            raise ConfigError("--val-data and --val-fraction: give one or the other")
        self.one_of("schedule", Schedule)
        inputs = [("--model", self.model), ("--data", self.data), ("--val-data", self.val_data)]
        check_outputs([("--out", self.out, "run")], inputs)


@dataclass
class CollectConfig(ModelConfig):
    """``rlhfkit collect``: K completions per prompt from one or more policies, for labelers."""

    policy: list[str] = field(default_factory=list)  # NAME=PATH or PATH (name = directory or file name)
    prompts: str = ""
    k: int = 4  # completions per prompt and policy
    out: str = ""  # samples JSONL, or - for stdout
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # stop strings (EOS always stops)
    batch_size: int = 64  # sequences per generation batch (decoding is memory-bound: wide batches amortise the weights)
    dedup: bool = False  # drop a completion whose text repeats one already kept for the prompt
    max_prompts: int = 0  # 0 = every prompt
    select: int = 0  # keep only the N prompts whose completions --select-by's members disagree on most (0 = every prompt)
    select_by: str = ""  # the reward-model ensemble (train-rm --ensemble M) whose disagreement --select uses
    concurrency: int = 8  # requests in flight per served policy (--policy NAME=openai:URL)

    def check(self) -> None:
        super().check()
        self.require("policy", "prompts", "out")
        self.at_least(1, "k", "batch_size", "concurrency")
        self.non_negative("top_k", "max_prompts", "select")
        for spec in self.policy:
            if is_served(named_path(spec)[1]):
                parse_served_spec(named_path(spec)[1])
        self.sampling()
        if bool(self.select) != bool(self.select_by):
            raise ConfigError("--select and --select-by: give both (N prompts to keep, and the reward ensemble that picks them)")
        if self.select and self.out == "-":
            raise ConfigError("--select: needs --out FILE (every prompt's samples are kept beside it, in FILE.pool)")
        if self.select_by and is_script(self.select_by):
            raise ConfigError(f"--select-by {self.select_by}: a scripted reward has no members; give a train-rm ensemble")
        if not all(self.stop):
            raise ConfigError("--stop: an empty stop string")
        duplicate = first_duplicate([named_path(spec)[0] for spec in self.policy])
        if duplicate is not None:
            raise ConfigError(f"--policy: the name {duplicate!r} is given twice; name them apart with NAME=PATH")
        policies = [("--policy", named_path(spec)[1]) for spec in self.policy]
        check_outputs([("--out", self.out, "file")], [("--prompts", self.prompts), *policies])


@dataclass
class RankImportConfig(CommonConfig):
    """``rlhfkit rank-import``: labelers' rankings -> validated comparison pairs, agreement, Elo."""

    rankings: str = ""  # rankings file, or - for stdin
    samples: str = ""  # the samples the rankings refer to (collect output)
    out: str = ""  # comparisons JSONL, or - for stdout
    format: RankingsFormat = "auto"  # auto = detected from the first record (or a .csv name)
    val_fraction: float = 0.0  # share of prompts (by hash of the prompt id) written to --val-out
    val_out: str = ""  # "" = OUT with ".val" before its extension (pairs.jsonl -> pairs.val.jsonl)
    stats: str = ""  # write the statistics as JSON here too
    tie_pairs: bool = False  # a tie gives a margin-0 pair (else no pair)
    score_margin: bool = False  # scores format: margin = score difference
    aggregate: Aggregate = "none"  # none (every annotator's pairs) or majority
    bootstrap: int = 200  # resamples of prompts for the Elo confidence intervals

    def check(self) -> None:
        super().check()
        if not self.rankings:
            raise ConfigError("RANKINGS is required (a rankings file, or - for stdin)")
        self.require("samples", "out")
        self.one_of("format", RankingsFormat)
        self.one_of("aggregate", Aggregate)
        self.fraction("val_fraction")
        if self.val_fraction > 0 and self.out == "-" and not self.val_out:
            raise ConfigError("--val-fraction with --out -: give --val-out FILE for the validation pairs")
        self.non_negative("bootstrap")
        if self.rankings == "-" and self.samples == "-":
            raise ConfigError("RANKINGS and --samples cannot both be stdin")


@dataclass
class PPOConfig(TrainConfig):
    """``rlhfkit ppo``: RLHF with PPO against a reward model and a KL penalty to the reference.

    Batch sizes are per process (under torchrun each rank samples its own ``batch_size`` rollouts).
    One PPO step = one rollout batch and its ``ppo_epochs`` passes of updates; ``steps``,
    ``save_every`` and ``sample_every`` count PPO steps.
    """

    policy: str = ""  # the initial policy, usually the SFT model; also the frozen reference
    ref: str = ""  # the KL reference when it is not --policy (iterated RLHF: continue from a PPO policy, stay close to SFT)
    rm: str = ""  # reward-model directory, one-label classifier, or python:MODULE:FUNCTION
    prompts: str = ""
    algo: Algo = "ppo"  # ppo; a2c (one step per batch, no clipping); rloo, grpo (K samples per prompt, no critic)
    k: int = 0  # rloo/grpo: samples per prompt, rollouts = prompts x K (0 = 4); ppo and a2c sample one per prompt
    kl_in_reward: bool = False  # grpo: the KL penalty in the reward (as ppo) instead of a k3 loss term
    value_head: ValueHead = "separate"  # separate (a value model) or policy (a linear head on the policy)
    value_model: str = ""  # "" = initialise the value model from --rm (from --policy for a scripted reward)
    steps: int = 100  # PPO steps (rollout + update)
    batch_size: int = 16  # rollouts per step (per process)
    mini_batch_size: int = 0  # rollouts per optimizer step (0 = batch_size: one mini-batch per epoch)
    grad_accum: int = 1  # micro-batches per mini-batch (micro-batch = mini_batch_size / grad_accum)
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    max_prompt_length: int = 0  # keep only the last N prompt tokens (0 = no limit)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (besides EOS)
    generation_batch_size: int = 0  # prompts per generation call (0 = the whole batch)
    lr: float = 1e-5
    schedule: Schedule = "linear"  # linear = annealed to 0 over --steps
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-5  # lm-human-preferences; PyTorch's 1e-8 differs
    max_grad_norm: float = 1.0  # 0 = no clipping
    kl_coef: float = 0.05  # β, the initial β when --target-kl is set
    target_kl: float | None = None  # adaptive β (Ziegler et al. 2019): per-sequence KL to aim at
    kl_horizon: int = 10000  # adaptive β horizon, in rollouts
    kl_estimator: KLEstimator = "k1"
    reward_clip: float | None = None  # clip normalised scores to [-c, c]
    missing_eos_penalty: float | None = None  # score given to a completion that never stopped
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    early_stop_kl: float | None = None  # stop this step's PPO epochs once approx-KL exceeds it
    ptx_data: str = ""  # demonstrations or text records for PPO-ptx
    ptx_coef: float = 0.0  # γ of InstructGPT's PPO-ptx (0 = off)
    ptx_batch_size: int = 0  # ptx sequences per micro-batch (0 = the micro-batch size)
    ptx_max_length: int = 512
    sample_every: int = 10  # print and record a few samples every N steps (0 = never)
    num_samples: int = 4  # rows in each sample table
    judge: str = ""  # judge monitor: a shell command, eval --judge's protocol (samples JSONL in, rankings out); "" = off
    judge_every: int = 0  # judge the policy against the starting one every N steps, and after the last (0 = after the last only)
    judge_prompts: str = ""  # the judge's prompts ("" = --prompts); the first --judge-samples distinct ones
    judge_samples: int = 32  # prompts judged each time (one completion of the policy and one of the start each)
    judge_timeout: float = 3600.0  # seconds one judge call may take
    keep_best: bool = True  # with --judge: OUT is the policy with the best win-rate (the starting one if none beat it)
    conservative_coef: float = 0.0  # λ: score = mean − λ·std over the reward ensemble's members (Coste et al. 2023); 0 = off

    @property
    def samples_per_prompt(self) -> int:
        """K: rollouts per prompt (rloo and grpo sample several, to compare them with each other)."""
        return (self.k or DEFAULT_GROUP_SIZE) if self.algo in GROUP_ALGOS else 1

    @property
    def has_critic(self) -> bool:
        """ppo and a2c learn a value function; rloo and grpo take their baseline from the group."""
        return self.algo not in GROUP_ALGOS

    def check(self) -> None:
        super().check()
        self.require("policy", "rm", "prompts", "out")
        self.check_algo()
        self.check_judge()
        self.at_least(1, "steps", "batch_size", "grad_accum", "ppo_epochs", "max_new_tokens", "kl_horizon", "num_samples")
        self.non_negative(
            "mini_batch_size",
            "max_prompt_length",
            "generation_batch_size",
            "ptx_batch_size",
            "sample_every",
            "warmup_steps",
            "top_k",
        )
        mini = self.mini_batch_size or self.batch_size
        exact_div(self.batch_size, mini, "--batch-size must be a multiple of --mini-batch-size")
        exact_div(mini, self.grad_accum, "--mini-batch-size must be a multiple of --grad-accum")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature: must be > 0 (PPO scores the sampling distribution), got {self.temperature}")
        self.sampling()
        self.one_of("kl_estimator", KLEstimator)
        self.one_of("value_head", ValueHead)
        self.one_of("schedule", Schedule)
        if self.ref and self.lora:
            raise ConfigError("--ref: not with --lora (the LoRA reference is the policy's own backbone with the adapter off)")
        if self.value_head == "policy" and self.value_model:
            raise ConfigError("--value-model: only with --value-head separate (a head on the policy has no model of its own)")
        self.non_negative("kl_coef", "vf_coef", "max_grad_norm", "weight_decay", "adam_eps", "ptx_coef")
        self.positive("target_kl", "reward_clip", "early_stop_kl", optional=True)
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name}: must be in [0, 1], got {getattr(self, name)}")
        self.positive("cliprange", "cliprange_value", "lr")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("--ptx-coef: needs --ptx-data (the demonstrations or text to keep modelling)")
        self.at_least(2, "ptx_max_length")
        if is_script(self.rm):
            parse_script_spec(self.rm)
        rm = parse_script_spec(self.rm)[0] if is_script(self.rm) else self.rm  # a script's file is an input too
        inputs = [("--policy", self.policy), ("--ref", self.ref), ("--prompts", self.prompts), ("--rm", rm)]
        check_outputs([("--out", self.out, "run")], [*inputs, ("--value-model", self.value_model), ("--ptx-data", self.ptx_data)])

    def check_judge(self) -> None:
        """The judge monitor's options (stages/ppo_judge.py) and the conservative reward's."""
        self.non_negative("judge_every", "conservative_coef")
        self.at_least(1, "judge_samples")
        self.positive("judge_timeout")
        if self.judge:
            check_judge_command(self.judge)
        elif self.judge_every or self.judge_prompts:
            raise ConfigError(f"{'--judge-every' if self.judge_every else '--judge-prompts'}: needs --judge (the judge command)")

    def check_algo(self) -> None:
        """The options that only some ``--algo`` take, or that one of them rules out."""
        self.one_of("algo", Algo)
        self.non_negative("k")
        if self.algo in GROUP_ALGOS:
            if self.k == 1:
                raise ConfigError(
                    f"--k: {self.algo} needs at least 2 samples per prompt (each one's baseline is the others), got 1"
                )
            K = self.samples_per_prompt
            exact_div(self.batch_size, K, f"--batch-size must be a multiple of --k (rollouts = prompts x K, K = {K})")
            if self.value_model:
                raise ConfigError(f"--value-model: {self.algo} has no critic")
        elif self.k > 1:
            raise ConfigError(f"--k: only with --algo rloo or grpo ({self.algo} samples one response per prompt)")
        if self.kl_in_reward and self.algo != "grpo":
            raise ConfigError("--kl-in-reward: only with --algo grpo (ppo, a2c and rloo always put the KL penalty in the reward)")
        if self.algo == "a2c":
            if self.mini_batch_size not in (0, self.batch_size):
                raise ConfigError("--mini-batch-size: a2c takes one gradient step per rollout batch (leave it at 0)")
            if self.early_stop_kl is not None:
                raise ConfigError("--early-stop-kl: a2c takes one gradient step per rollout batch; there is nothing to stop")


@dataclass
class DPOConfig(TrainConfig):
    """``rlhfkit dpo``: direct preference optimisation on comparisons (Rafailov et al. 2023), no
    reward model and no sampling. Reads the comparisons, ranking groups and validation split that
    train-rm reads; the frozen reference is the starting policy."""

    policy: str = ""  # the starting policy, usually the SFT model; also the frozen reference
    data: str = ""  # comparisons (rank-import output or public prompt/chosen/rejected data)
    val_data: str = ""  # held-out comparisons ("" = split --val-fraction of the prompts off --data, as train-rm)
    val_fraction: float = 0.05  # share of prompts held out when --val-data is not given (0 = none)
    max_length: int = 1024  # pairs whose prompt+completion is longer are dropped (and counted)
    loss: DPOLoss = "sigmoid"  # sigmoid (DPO) or ipo
    beta: float = 0.1  # β: the implicit reward's scale, i.e. how far from the reference the policy may go
    epochs: int = 1
    max_steps: int = 0  # stop after N optimizer steps (0 = run every epoch)
    batch_size: int = 8  # batch elements per micro-batch and device: groups (rankings), or pairs without 'group'
    grad_accum: int = 1
    lr: float = 1e-6  # TRL's default; small models tolerate more
    schedule: Schedule = "linear"  # after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    eval_every: int = 0  # held-out evaluation every N optimizer steps (0 = only at the end)
    eval_batch_size: int = 16
    log_every: int = 1

    def check(self) -> None:
        super().check()
        self.check_offline(positive=("lr", "beta"))
        self.one_of("loss", DPOLoss)
        self.one_of("schedule", Schedule)
        inputs = [("--policy", self.policy), ("--data", self.data), ("--val-data", self.val_data)]
        check_outputs([("--out", self.out, "run")], inputs)


@dataclass
class ILQLConfig(TrainConfig):
    """``rlhfkit ilql``: implicit language Q-learning (Snell et al. 2022), offline RL from scored
    samples or comparisons. The saved directory is the policy (a plain causal LM) plus its Q/V heads,
    which collect and eval use to shift its logits by β·(Q − V)."""

    policy: str = ""  # the starting policy, usually the SFT model: the backbone of the Q and V heads
    data: str = ""  # comparisons (chosen +1, rejected −1) or samples whose completions carry a 'score' or 'reward'
    val_data: str = ""  # held-out data of the same kind ("" = split --val-fraction of the prompts off --data)
    val_fraction: float = 0.05
    max_length: int = 1024  # longer prompt+completion sequences are dropped (and counted)
    epochs: int = 1
    max_steps: int = 0  # stop after N optimizer steps (0 = run every epoch)
    batch_size: int = 8  # sequences per micro-batch and device
    grad_accum: int = 1
    lr: float = 1e-5
    schedule: Schedule = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    gamma: float = 0.99  # discount of the Q target r + γ·V(s')
    tau: float = 0.7  # expectile of the value loss (0.5 = mean; nearer 1 = the best action seen)
    cql_coef: float = 0.1  # α of the conservative (CQL) term
    bc_coef: float = 1.0  # weight of the behaviour-cloning (language-model) loss that trains π_β
    polyak: float = 0.05  # the target Q moves this fraction of the way to Q after each optimizer step
    beta: float = 1.0  # sampling: logits = log π_β + β·(Q − V) (stored with the heads; 0 = π_β)
    eval_every: int = 0  # held-out evaluation every N optimizer steps (0 = only at the end)
    eval_batch_size: int = 16
    log_every: int = 1

    def check(self) -> None:
        super().check()
        self.check_offline(positive=("lr",), non_negative=("cql_coef", "bc_coef", "beta"))
        self.one_of("schedule", Schedule)
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"--gamma: must be in [0, 1], got {self.gamma}")
        if not 0 < self.tau < 1:
            raise ConfigError(f"--tau: must be in (0, 1), got {self.tau}")
        if not 0 < self.polyak <= 1:
            raise ConfigError(f"--polyak: must be in (0, 1], got {self.polyak}")
        inputs = [("--policy", self.policy), ("--data", self.data), ("--val-data", self.val_data)]
        check_outputs([("--out", self.out, "run")], inputs)
