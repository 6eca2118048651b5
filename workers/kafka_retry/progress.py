"""A replay's progress on stderr: a live bar (rich) on a terminal; elsewhere (a log, CI) a
plain line every few seconds and at the end, so output that is kept stays readable."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 5.0


class ReplayProgress:
    """`update()` with the counts as they come, `note()` for a line of news; use it as a
    context manager so a terminal gets its cursor back whatever happens."""

    def __init__(self, stream: TextIO) -> None:
        self._console = Console(file=stream, stderr=True)
        self._out = stream
        self._started = time.monotonic()
        self._last_line = 0.0
        self._last_note = ""
        self._live: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ReplayProgress:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def update(
        self, replayed: int, skipped: int, total: int, phase: str, *, final: bool = False
    ) -> None:
        done = replayed + skipped
        rate = replayed / max(1e-6, time.monotonic() - self._started)
        if self._console.is_terminal:
            self._draw(done, max(total, done), phase, replayed, skipped, rate, final)
            return
        if final or time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._out.write(
                f"{done}/{total} examined: replayed {replayed}, skipped {skipped}, "
                f"{rate:.0f}/s  {phase}\n"
            )
            self._out.flush()
            self._last_line = time.monotonic()

    def note(self, text: str) -> None:
        if text == self._last_note:
            return
        self._last_note = text
        if self._live is not None:
            self._live.console.print(text)
        else:
            self._out.write(text + "\n")
            self._out.flush()

    def _draw(
        self,
        done: int,
        total: int,
        phase: str,
        replayed: int,
        skipped: int,
        rate: float,
        final: bool,
    ) -> None:
        if self._live is None:
            self._live = Progress(
                TextColumn("{task.description:<9}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("replayed {task.fields[replayed]} · skipped {task.fields[skipped]}"),
                TextColumn("{task.fields[rate]}/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._live.start()
            self._task = self._live.add_task(phase, total=total, replayed=0, skipped=0, rate=0)
        assert self._task is not None
        self._live.update(
            self._task,
            completed=done,
            total=total,
            description=phase,
            replayed=replayed,
            skipped=skipped,
            rate=f"{rate:.0f}",
        )
        if final:
            self._live.stop()
            self._live = None
