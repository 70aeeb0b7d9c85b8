"""``rlhfkit label``: the human ranking step as a small local web app, and exports to labeling tools.

A labeler opens the page, reads a prompt and its K completions (in an order shuffled for them, with
no policy names), ranks them, and submits; each submission is one line of rank-import's native
format appended to RANKINGS.jsonl, so ``collect → label → rank-import`` needs no conversion.

Modules, bottom up:

=============== ==========================================================================================
``tasks``       what there is to judge: one task per prompt (one per couple in pairwise mode), the
                ``--k-max`` subset, the per-annotator blind order, the ``--overlap`` assignment
``store``       RANKINGS.jsonl: read and repair on start (a torn last line is cut off), append with
                fsync, undo by an atomic rewrite
``labeler``     the app's state and rules: next task, a submission checked and turned into a record,
                undo, progress; a bad request raises `RequestError` (-> a 4xx)
``guidelines``  the guidelines Markdown as safe HTML (everything escaped first)
``server``      the Starlette app (page, static files, JSON API), the host/token guard, uvicorn
``export``      Label Studio tasks + labeling config, Argilla records + settings
``static/``     the page: plain HTML, CSS and JS, no build step
=============== ==========================================================================================

Choices:

- **One writer.** Submissions and undos run one at a time under an asyncio lock; a record is one
  ``os.write`` of a whole line, then ``fsync``, before the page hears 200. On start a last line
  without its newline (a power loss mid-write) is cut off, so rank-import never meets a torn line.
- **Undo rewrites the file.** Undo removes the annotator's latest record by writing the file anew
  (temporary file + fsync + rename, under the lock), so RANKINGS.jsonl only ever holds live
  judgements and rank-import reads it as it is. Undo can be repeated, one record at a time.
- **Can't judge** is recorded as ``{"ranking": [], "flag": REASON, ...}``: rank-import counts it as
  an abstention and makes no pairs from it, and resume treats the prompt as done.
- **Blind.** The page only sees positions (A, B, C, ...); completion ids and policies stay on the
  server, which maps positions back with the same seeded shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhfkit.config import CommonConfig, check_outputs
from rlhfkit.errors import ConfigError

Mode = Literal["rank", "best-of-k", "scores", "pairwise"]  # what a labeler gives per task
Export = Literal["label-studio", "argilla"]  # labeling tools --export writes tasks for


@dataclass
class LabelConfig(CommonConfig):
    """``rlhfkit label``: serve the ranking page, or ``--export`` tasks for a labeling tool."""

    samples: str = ""  # collect output: one line per prompt with its K completions
    out: str = ""  # RANKINGS.jsonl (served) or TASKS.json (--export)
    annotator: list[str] = field(default_factory=list)  # the labelers' names; empty = anyone who gives a name
    overlap: int = 0  # each prompt goes to this many of the named annotators (0 = to every one)
    mode: Mode = "rank"  # rank (ties allowed), best-of-k, scores (Likert 1-7) or pairwise (every couple)
    guidelines: str = ""  # a Markdown file shown beside the task
    k_max: int = 0  # show at most this many completions of a prompt (0 = all)
    host: str = "127.0.0.1"
    port: int = 8765  # 0 = any free port
    token: str = ""  # required on every request when set; "auto" = generate one; required off loopback
    export: Export | None = None  # write tasks for this tool instead of serving

    def check(self) -> None:
        super().check()
        if not self.samples:
            raise ConfigError("SAMPLES is required (the collect output to label)")
        self.require("out")
        if self.out == "-":
            raise ConfigError(
                "--out: a file name is needed (the page appends to it and resumes from it; --export writes two files)"
            )
        self.one_of("mode", Mode)
        if self.export is not None:
            self.one_of("export", Export)
        self.non_negative("overlap", "k_max")
        if self.k_max == 1:
            raise ConfigError("--k-max: must be 0 (all completions) or at least 2, got 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: must be in [0, 65535] (0 = any free port), got {self.port}")
        if self.export == "argilla" and self.mode != "rank":
            raise ConfigError("--export argilla writes a ranking question: use --mode rank")
        if self.export == "label-studio" and self.mode not in ("rank", "pairwise"):
            raise ConfigError("--export label-studio writes a Ranker (--mode rank) or a Pairwise (--mode pairwise) interface")
        if self.export == "label-studio" and self.guidelines:
            raise ConfigError(
                "--guidelines with --export label-studio: Label Studio keeps instructions in the project's settings "
                "(Settings > Instructions), not in the labeling config; paste the file there"
            )
        check_outputs([("--out", self.out, "file")], [("SAMPLES", self.samples), ("--guidelines", self.guidelines)])


def run(config: LabelConfig) -> dict:
    """Export tasks (``--export``), or serve the page until Ctrl-C and return what was labeled."""
    import secrets
    from pathlib import Path
    from urllib.parse import quote

    from rlhfkit.console import console
    from rlhfkit.data import records
    from rlhfkit.errors import DataError
    from rlhfkit.rankings import SampleIndex

    config.check()
    samples = records.load_kind(config.samples, "samples", skip_invalid=config.skip_invalid)  # as validate --kind samples
    SampleIndex(samples, samples.lines, config.samples)  # no prompt id twice, no completion id in two prompts
    if config.export is not None:
        from rlhfkit.label import export

        return export.write(config, samples)

    try:
        from rlhfkit.label.server import bind, create_app, is_loopback, serve
    except ImportError as e:
        raise ConfigError(f"rlhfkit label needs its web stack ({e.name} is missing): pip install 'rlhfkit[label]'") from None
    from rlhfkit.label.guidelines import DEFAULT, render_markdown
    from rlhfkit.label.labeler import Labeler
    from rlhfkit.label.store import RankingsStore

    # 1. the options that keep the app private
    token = secrets.token_urlsafe(18) if config.token == "auto" else config.token or None
    loopback = is_loopback(config.host)
    if not loopback and token is None:
        raise ConfigError(
            f"--host {config.host} is reachable from other machines: give --token SECRET "
            "(or --token auto to generate one), which every request must then carry"
        )
    if config.guidelines:
        try:
            guide = Path(config.guidelines).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(config.guidelines, None, None, f"cannot read the guidelines ({e.__class__.__name__})") from None
    else:
        guide = DEFAULT[config.mode]

    # 2. the rankings so far (a torn last line cut off), the tasks, who has done what
    store = RankingsStore(config.out)
    if store.torn_bytes:
        console.print(
            f"{config.out}: cut off a torn last line ({store.torn_bytes} bytes, never acknowledged)",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    labeler = Labeler(
        samples,
        store,
        mode=config.mode,
        annotators=config.annotator,
        overlap=config.overlap,
        k_max=config.k_max,
        seed=config.seed,
    )

    # 3. serve
    app = create_app(labeler, guidelines_html=render_markdown(guide), token=token, check_host=loopback and token is None)
    try:
        sock = bind(config.host, config.port)
    except OSError as e:
        raise ConfigError(
            f"--host {config.host} --port {config.port}: cannot listen ({e.strerror}); --port 0 picks a free port"
        ) from None
    port = sock.getsockname()[1]
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)  # the first submission creates the file
    host = f"[{config.host}]" if ":" in config.host else config.host
    names = labeler.assignment.annotators

    def ready() -> None:
        what = f"{len(labeler.tasks)} tasks from {len(samples)} prompts, --mode {config.mode}"
        if labeler.too_few:
            what += f" ({labeler.too_few} prompts with fewer than 2 completions left out)"
        console.print(
            f"rlhfkit label: {what}; {len(store.records)} judgements already in {config.out}", highlight=False, soft_wrap=True
        )
        query = f"token={token}" if token else ""  # printed once: the only place the generated token appears
        for name in names or [""]:
            params = "&".join(p for p in (f"annotator={quote(name)}" if name else "", query) if p)
            progress = labeler.progress(name) if name else None
            done = f"   ({progress['done']}/{progress['total']} done)" if progress else ""
            console.print(f"  open http://{host}:{port}/{'?' + params if params else ''}{done}", highlight=False, soft_wrap=True)
        console.print("  Ctrl-C stops the server; every acknowledged judgement is already on disk.", highlight=False)

    serve(app, sock, ready)
    by_annotator: dict[str, int] = {}
    for record in store.records:
        by_annotator[record["annotator"]] = by_annotator.get(record["annotator"], 0) + 1
    return {"out": config.out, "records": len(store.records), "annotators": dict(sorted(by_annotator.items()))}
