"""Where people read: the rich console on stderr and the progress bar every long loop shows.

Programs read stdout (one JSON result per command) and files; everything for people goes here, so
that every layer (stages, training, the CLI) can talk to the user without importing the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

console = Console(stderr=True)  # people read stderr; programs read stdout


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; ``bar.update(advance=1, info="loss 1.23 | 812 tok/s")``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        class Bar:
            def update(self, advance: int = 1, info: str | None = None) -> None:
                fields = {} if info is None else {"info": info}
                progress.update(task, advance=advance, **fields)

        yield Bar()
