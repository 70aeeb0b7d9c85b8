"""``collect``: K completions per prompt from one or more policies, written as samples JSONL for labelers.

1. read the prompts; skip those already in OUT or in its hidden partial file (resume);
2. load every policy (model + tokenizer; all stay loaded, so that each prompt's line can hold
   every policy's completions);
3. for each chunk of prompts and each policy, sample K completions per prompt with
   `rlhfkit.generation.sample` (KV cache, left padding). Row (prompt, policy, k) samples with its
   own seed, a hash of (seed, prompt id, policy, k), so a completion depends only on those and
   not on the batch it shared: the same seed gives the same file, interrupted or not;
4. per prompt: drop repeated texts (``--dedup``), shuffle all policies' completions together
   (blind labeling, deterministic given the seed), append the line to the partial file;
5. at the end, sort the lines in prompt order and write OUT atomically; remove the partial file;
6. ``--select N --select-by RM``: steps 1-5 write every prompt's line to the pool file
   (``OUT`` with ``.pool`` before its extension, resumable as OUT is); a reward-model ensemble
   scores every completion with each member, and OUT gets only the N prompts whose completions
   the members disagree on most (`disagreement`), each line as sampled (blind order unchanged),
   in prompt order. Labels spent there teach the reward model most (query by committee).

``--out -`` streams each line to stdout as soon as its prompt is done (no resume, no ``--select``).

A completion's ``num_tokens`` counts the generated tokens, the stop token included; ``logprob`` is
their summed log-probability under the sampling distribution (logits / temperature, before top-k/p).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rlhfkit.config import CollectConfig, named_path
from rlhfkit.data import files, records
from rlhfkit.data.records import Completion, Prompt, RecordError, Samples
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.seeds import digest, row_seed


@dataclass(frozen=True)
class PolicySpec:
    name: str
    path: str


def parse_policies(specs: Sequence[str]) -> list[PolicySpec]:
    """``NAME=PATH`` or ``PATH`` each (`config.named_path`; `CollectConfig.check` refuses a name given twice)."""
    return [PolicySpec(*named_path(spec)) for spec in specs]


def sampling_settings(config: CollectConfig, policies: Sequence[PolicySpec]) -> dict[str, Any]:
    """What made a line (recorded in it): resuming with other settings is refused."""
    return {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "stop": list(config.stop),
        "k": config.k,
        "seed": config.seed,
        "policies": [p.name for p in policies],
        "dedup": config.dedup,
        "chat_template": config.chat_template,
    }


def completion_id(prompt_id: str, policy: str, index: int, sampling: dict[str, Any]) -> str:
    """A stable id, ``<prompt id>-<8 hex>``: the same inputs, settings and seed give the same id."""
    settings = json.dumps(sampling, sort_keys=True)
    return f"{prompt_id}-{digest(prompt_id, policy, index, settings)[:8]}"


def blind_order(completions: list[Completion], seed: int, prompt_id: str) -> list[Completion]:
    """All policies' completions of one prompt in one shuffled order (deterministic given the seed)."""
    shuffled = list(completions)
    random.Random(row_seed(seed, prompt_id, "shuffle")).shuffle(shuffled)
    return shuffled


def dedup(completions: list[Completion]) -> list[Completion]:
    """Keep the first completion of each distinct text."""
    seen: set[str] = set()
    out = []
    for c in completions:
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out


def load_prompts(config: CollectConfig) -> records.Loaded:
    """The prompts (with their lines), checked as `rlhfkit validate --kind prompts` checks them."""
    loaded = records.load_kind(config.prompts, "prompts", skip_invalid=config.skip_invalid)
    if config.max_prompts:
        del loaded[config.max_prompts :], loaded.lines[config.max_prompts :]
    return loaded


# --- output: incremental, resumable, atomic at the end ------------------------------------------


class SamplesWriter:
    """Writes each prompt's line as soon as it is done.

    To a file: lines go to a hidden partial file beside OUT (``.NAME.partial``); at the end they are
    sorted in prompt order and written to OUT atomically, and the partial file is removed. A run
    that is killed leaves OUT as it was (absent, or the previous complete file) plus the partial
    file; the next run with the same OUT reads both and skips the prompts they hold.
    To ``-``: lines go to stdout in prompt order; nothing is resumed. The partial file is created
    with the first new line: a run that fails before sampling anything leaves no file behind.
    """

    def __init__(self, out: str, sampling: dict[str, Any]):
        self.out = out
        self.sampling = sampling
        self.lines: dict[str, dict[str, Any]] = {}  # prompt id -> line, everything done so far
        self.stream: IO[str]
        if out == files.STDIO:
            self.stream = sys.stdout
            return
        path = Path(out)
        self.partial = path.with_name(f".{path.name}.partial")
        previous = self._read(path) if path.exists() else {}
        partial = self._read(self.partial, cut_half_line=True) if self.partial.exists() else {}
        self.lines = {**previous, **partial}
        self.carried = [line for pid, line in previous.items() if pid not in partial]  # OUT's lines, for the partial file
        self.stream = None  # type: ignore[assignment]  # opened by the first write

    def _open(self) -> IO[str]:
        """The partial file, opened for the rest of the run (closed by finish/close); OUT's lines
        join it first, so that it holds everything."""
        if self.stream is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115
            self.stream.writelines(files.dumps(line) + "\n" for line in self.carried)
        return self.stream

    def _read(self, path: Path, cut_half_line: bool = False) -> dict[str, dict[str, Any]]:
        """The lines of a previous run by prompt id. A partial file may end in a half-written line
        (the run was killed while writing it): that line is cut off the file."""
        raw = path.read_bytes()
        if cut_half_line and raw and not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]
            os.truncate(path, len(raw))
        lines: dict[str, dict[str, Any]] = {}
        for number, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                sample = records.parse_samples(record)
            except json.JSONDecodeError as e:
                raise DataError(path, number, None, f"invalid JSON: {e.msg} (delete the file to start over)") from None
            except RecordError as e:
                raise DataError(path, number, e.field, e.reason) from None
            self._check_settings(path, number, sample)
            lines.setdefault(sample.prompt_id, record)
        return lines

    def _check_settings(self, path: Path, number: int, sample: Samples) -> None:
        old = sample.sampling
        if not old:
            return
        for key, value in self.sampling.items():
            if key in old and old[key] != value:
                raise ConfigError(
                    f"{path}:{number}: collected with {key} = {json.dumps(old[key])}, this run has {json.dumps(value)}; "
                    "give the same options to resume, or another --out"
                )

    @property
    def done(self) -> set[str]:
        return set(self.lines)

    def write(self, line: dict[str, Any]) -> None:
        self.lines[line["prompt_id"]] = line
        stream = self._open()
        stream.write(files.dumps(line) + "\n")
        stream.flush()

    def sync(self) -> None:
        if self.out != files.STDIO and self.stream is not None:
            os.fsync(self.stream.fileno())

    def finish(self, order: Sequence[str]) -> int:
        """Write OUT in prompt order (lines of prompts not in ``order`` last); return the line count."""
        if self.out == files.STDIO:
            return len(self.lines)
        self.close()
        rank = {pid: i for i, pid in enumerate(order)}
        ordered = sorted(self.lines.values(), key=lambda line: rank.get(line["prompt_id"], len(rank)))
        files.write_jsonl(self.out, ordered)
        self.partial.unlink(missing_ok=True)
        return len(ordered)

    def close(self) -> None:
        if self.out != files.STDIO and self.stream is not None and not self.stream.closed:
            self.stream.close()


# --- sampling -----------------------------------------------------------------------------------


@dataclass
class Policy:
    spec: PolicySpec
    model: Any  # a local model, or a `served.Client` (``NAME=openai:URL``: no tokenizer here)
    tokenizer: Any
    stop_ids: list[int]

    @property
    def served(self) -> bool:
        return self.tokenizer is None


def load_policies(specs: Sequence[PolicySpec], config: CollectConfig) -> list[Policy]:
    from rlhfkit.chat import stop_token_ids
    from rlhfkit.ilql_heads import for_sampling
    from rlhfkit.models import load_model, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    from rlhfkit.config import is_served
    from rlhfkit.served import Client

    out = []
    for spec in specs:
        if is_served(spec.path):  # sampled by an OpenAI-compatible server: reached (and its model named) before any sampling
            client = Client(spec.path, name=spec.name, concurrency=config.concurrency)
            client.check()
            out.append(Policy(spec, client, None, []))
            continue
        tokenizer = load_tokenizer(spec.path, trust_remote_code=config.trust_remote_code)
        model = load_model(spec.path, "causal-lm", dtype=dtype, device=device, trust_remote_code=config.trust_remote_code)
        model = for_sampling(model, spec.path)  # an ILQL model samples from logits + β·(Q − V)
        out.append(Policy(spec, model, tokenizer, stop_token_ids(tokenizer, model.config)))
    return out


def check_policy_prompts(
    policies: Sequence[Policy], todo: Sequence[Prompt], prompts: records.Loaded, config: CollectConfig
) -> None:
    """`chat.check_prompts` for every policy: its tokenizer takes every prompt, and every prompt
    leaves room for ``--max-new-tokens`` in its context (else an error at FILE:LINE)."""
    from rlhfkit.chat import check_prompts
    from rlhfkit.models import context_length

    line_of = dict(zip((p.id for p in prompts), prompts.lines))
    source = "<stdin>" if config.prompts == files.STDIO else config.prompts
    for policy in policies:
        if policy.served:
            continue  # the server knows its model's context; a prompt too long is its error, naming the policy
        lines = [line_of[p.id] for p in todo]
        check_prompts(policy.tokenizer, [p.prompt for p in todo], source=source, lines=lines, mode=config.chat_template,
                      context=context_length(policy.model), max_new_tokens=config.max_new_tokens)  # fmt: skip


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sample_policy(
    policy: Policy, prompts: Sequence[Prompt], config: CollectConfig, sampling: dict[str, Any], meter: Throughput
) -> dict[str, list[Completion]]:
    """K completions of every prompt from one policy, ``batch_size`` sequences at a time."""
    from rlhfkit.chat import encode_prompt
    from rlhfkit.generation import sample

    if policy.served:
        return sample_served(policy, prompts, config, sampling, meter)
    name = policy.spec.name
    rows = [(p, k) for p in prompts for k in range(config.k)]
    ids = {p.id: encode_prompt(policy.tokenizer, p.prompt, config.chat_template) for p in prompts}
    out: dict[str, list[Completion]] = {p.id: [] for p in prompts}
    for batch in _chunks(rows, config.batch_size):
        start = time.perf_counter()
        rollout = sample(
            policy.model,
            [ids[p.id] for p, _ in batch],
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            stop_token_ids=policy.stop_ids,
            pad_token_id=policy.tokenizer.pad_token_id,
            stop_strings=config.stop,
            tokenizer=policy.tokenizer,
            seeds=[row_seed(config.seed, p.id, name, k) for p, k in batch],  # the completion's own seed
        )
        lengths = rollout.response_lengths.tolist()  # one device sync per batch
        logprobs = rollout.logprobs.sum(1).tolist()
        stopped = rollout.stopped.tolist()
        meter.seconds += time.perf_counter() - start
        meter.tokens += sum(lengths)
        for i, (p, k) in enumerate(batch):
            out[p.id].append(
                Completion(
                    id=completion_id(p.id, name, k, sampling),
                    text=rollout.completion_text(i, policy.tokenizer, policy.stop_ids),
                    policy=name,
                    finish_reason="stop" if stopped[i] else "length",
                    num_tokens=int(lengths[i]),
                    logprob=round(float(logprobs[i]), 4),
                )
            )
    return out


def sample_served(
    policy: Policy, prompts: Sequence[Prompt], config: CollectConfig, sampling: dict[str, Any], meter: Throughput
) -> dict[str, list[Completion]]:
    """`sample_policy` for a served policy (`rlhfkit.served`): one request per completion, with the
    seed a local model would use, ``--concurrency`` in flight; ids as for a local model."""
    from rlhfkit.served import Request, Sampling

    name = policy.spec.name
    rows = [(p, k) for p in prompts for k in range(config.k)]
    options = Sampling(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                       top_k=config.top_k, stop=tuple(config.stop), chat_template=config.chat_template)  # fmt: skip
    start = time.perf_counter()
    answers = policy.model.sample([Request(p.prompt, row_seed(config.seed, p.id, name, k)) for p, k in rows], options)
    meter.seconds += time.perf_counter() - start
    meter.tokens += sum(a.num_tokens for a in answers)
    out: dict[str, list[Completion]] = {p.id: [] for p in prompts}
    for (p, k), a in zip(rows, answers):
        out[p.id].append(Completion(id=completion_id(p.id, name, k, sampling), text=a.text, policy=name,
                                    finish_reason=a.finish_reason, num_tokens=a.num_tokens, logprob=None))  # fmt: skip
    return out


def run(config: CollectConfig) -> dict[str, Any]:
    from rlhfkit.console import progress_bar

    config.check()
    specs = parse_policies(config.policy)
    prompts = load_prompts(config)
    sampling = sampling_settings(config, specs)
    if config.select:
        check_select_by(config)  # before any sampling
    writer = SamplesWriter(pool_path(config.out) if config.select else config.out, sampling)
    try:
        resumed = len(writer.done & {p.id for p in prompts})
        todo = [p for p in prompts if p.id not in writer.done]
        meter = Throughput()
        completions = dropped = 0
        finish = {"stop": 0, "length": 0}
        if todo:
            policies = load_policies(specs, config)
            check_policy_prompts(policies, todo, prompts, config)  # every prompt fits every policy, before any sampling
            # enough prompts per chunk to fill a batch with their K completions
            per_chunk = max(1, config.batch_size // config.k)
            with progress_bar("collect", total=len(todo)) as bar:
                for chunk in _chunks(todo, per_chunk):
                    by_policy = [sample_policy(policy, chunk, config, sampling, meter) for policy in policies]
                    for p in chunk:
                        line = [c for sampled in by_policy for c in sampled[p.id]]
                        kept = dedup(line) if config.dedup else line
                        dropped += len(line) - len(kept)
                        kept = blind_order(kept, config.seed, p.id)
                        completions += len(kept)
                        for c in kept:
                            finish[c.finish_reason] += 1
                        writer.write(Samples(p.id, p.prompt, tuple(kept), sampling).to_dict())
                    writer.sync()
                    bar.update(len(chunk), info=f"{meter.tokens_per_s:.1f} tokens/s")
        lines = writer.finish([p.id for p in prompts])
    finally:
        writer.close()
    selection = None
    if config.select:  # 6. OUT gets the prompts the ensemble disagrees on most
        selection = select_prompts(config, [writer.lines[p.id] for p in prompts if p.id in writer.lines])
        lines = selection["selected"]
    return {
        "out": config.out,
        "prompts": len(prompts),
        "collected": len(todo),
        "resumed": resumed,
        "lines": lines,
        **({"select": selection} if selection is not None else {}),
        "completions": completions,
        "duplicates_dropped": dropped,
        "finish_reason": finish,
        "policies": [s.name for s in specs],
        "tokens": meter.tokens,
        "seconds": round(meter.seconds, 3),
        "tokens_per_s": round(meter.tokens_per_s, 1),
    }


# --- 6. the prompts worth labelling (--select) ----------------------------------------------------


def pool_path(out: str) -> str:
    """Where ``--select`` keeps every prompt's line: ``.pool`` before OUT's extension.

    ``samples.jsonl`` -> ``samples.pool.jsonl``, ``s.jsonl.gz`` -> ``s.pool.jsonl.gz``, ``s`` -> ``s.pool``.
    """
    path = Path(out)
    for ext in (".jsonl.gz", ".jsonl", ".json"):
        if path.name.endswith(ext):
            return str(path.with_name(path.name[: -len(ext)] + ".pool" + ext))
    return str(path.with_name(path.name + ".pool"))


def check_select_by(config: CollectConfig) -> None:
    """``--select-by`` must be a reward-model ensemble (its members' disagreement is what selects)."""
    from rlhfkit.scoring import ENSEMBLE_FILE

    if not (Path(config.select_by) / ENSEMBLE_FILE).is_file():
        raise ConfigError(
            f"--select-by {config.select_by}: not a reward-model ensemble (no {ENSEMBLE_FILE}); one model has no "
            "disagreement to select by: train-rm --ensemble M makes one"
        )


def disagreement(member_scores: Any) -> float | None:
    """How much the members of a reward ensemble disagree about one prompt's completions.

    For every pair (i, j) of the prompt's K completions, each member m prefers one by
    d_m = s_{m,i} − s_{m,j} (its normalised scores); the pair's disagreement is the std over the
    members of d_m (population std), and the prompt's is the mean over its K·(K−1)/2 pairs. It is
    large where the members would order the completions differently — the comparisons a labeller's
    ranking resolves — and it ignores what the members agree on (a shift of every score by the same
    member-specific constant cancels in d_m). None for fewer than two completions (nothing to rank).

    Example, K = 2 completions, M = 2 members: scores (1, 3) and (0, 0) give d = (1, 3), std 1.0;
    K = 3 with member scores (0, 0), (1, −1), (2, 2): pairs d = (−1, 1), (−2, −2), (−1, −3) with stds
    1, 0, 1, so the prompt's disagreement is 2/3.

    Shapes: ``member_scores`` (K, M).
    """
    import torch

    K = member_scores.size(0)
    if K < 2:
        return None
    d = member_scores[:, None, :] - member_scores[None, :, :]  # (K, K, M): d_m for every ordered pair
    i, j = torch.triu_indices(K, K, offset=1)
    return float(d[i, j].std(-1, unbiased=False).mean())


def select_prompts(config: CollectConfig, lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Score every completion of ``lines`` (the pool, in prompt order) with each ensemble member,
    write the ``--select`` prompts with the highest `disagreement` to OUT (the first of equal ones;
    prompts with fewer than two completions last), and return the selection's statistics."""
    import torch

    from rlhfkit.console import console
    from rlhfkit.models import resolve_device, resolve_dtype
    from rlhfkit.reward import load_reward

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    reward = load_reward(config.select_by, None, device, dtype, trust_remote_code=config.trust_remote_code,
                         batch_size=config.batch_size, chat_template=config.chat_template)  # fmt: skip
    if reward.members < 2:
        raise ConfigError(f"--select-by {config.select_by}: {reward.members} member; an ensemble has several")
    rows = [(n, c) for n, line in enumerate(lines) for c in line["completions"]]
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start : start + config.batch_size]
            scores.append(
                reward.member_scores(
                    [lines[n]["prompt"] for n, _ in chunk], [c["text"] for _, c in chunk],
                    stopped=[c.get("finish_reason") != "length" for _, c in chunk],
                ).float().cpu()
            )  # fmt: skip
    members = torch.cat(scores) if scores else torch.zeros(0, reward.members)  # (completions, M)
    per_line: list[float | None] = []
    first = 0
    for line in lines:
        k = len(line["completions"])
        per_line.append(disagreement(members[first : first + k]))
        first += k
    order = sorted(range(len(lines)), key=lambda n: (per_line[n] is None, -(per_line[n] or 0.0), n))
    chosen = sorted(order[: config.select])
    files.write_jsonl(config.out, [lines[n] for n in chosen])
    known = [v for v in per_line if v is not None]
    kept = [per_line[n] for n in chosen if per_line[n] is not None]
    stats = {
        "by": config.select_by,
        "members": reward.members,
        "pool": len(lines),
        "pool_out": pool_path(config.out),
        "selected": len(chosen),
        "disagreement": {
            "selected_mean": sum(kept) / len(kept) if kept else None,
            "pool_mean": sum(known) / len(known) if known else None,
            "cutoff": min(kept) if kept else None,
        },
        "prompts": [{"prompt_id": lines[n]["prompt_id"], "disagreement": per_line[n]} for n in chosen],
    }
    d = stats["disagreement"]
    if kept:
        console.print(
            f"select: {len(chosen)} of {len(lines)} prompts by the disagreement of {reward.members} reward models "
            f"(mean {d['selected_mean']:.4g}, cut-off {d['cutoff']:.4g}; {d['pool_mean']:.4g} over all); "
            f"every prompt's samples are in {stats['pool_out']}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    return stats
