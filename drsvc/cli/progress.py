"""Progress of long CLI operations (restores, drills) on stderr.

1. ``ProgressReporter.for_cli(as_json=..., label=...)`` picks the mode: nothing with ``--json`` (stdout
   carries only the JSON document and stderr stays quiet), a rich progress bar (bytes, files, rate, ETA) when
   stderr is a terminal, else plain lines, at most one every ``interval`` seconds (journald, cron, CI logs).
2. The reporter is the ``progress`` callback of ``App.restore``: it takes the restore's progress objects
   (``files_total``, ``files_done``, ``bytes_total``, ``bytes_done``; a log restore's ``segments_total`` and
   ``segments_done``), or a dict with the same keys and an optional ``label``. A new label starts a new bar
   (the drill CLI labels each scenario, e.g. "hr-docs at jinan-dr (latest)").
3. Use it as a context manager (or call ``close()``): the bar is stopped, and in plain mode a last line is
   written for each step that printed one, before the command prints its result.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

from drsvc.cli.render import size

Mode = Literal["bar", "lines", "off"]
INTERVAL = 5.0  # seconds between two plain lines


@dataclass
class _State:
    label: str = ""
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    segments_total: int = 0
    segments_done: int = 0

    @classmethod
    def read(cls, update: object, label: str) -> _State:
        """The fields of a restore progress object or a dict; absent ones are 0."""

        def get(name: str) -> Any:
            return update.get(name) if isinstance(update, dict) else getattr(update, name, None)

        def num(name: str) -> int:
            v = get(name)
            return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0

        given = get("label")
        return cls(
            label=str(given) if given is not None else label,
            **{f: num(f) for f in ("files_total", "files_done", "bytes_total", "bytes_done")},
            segments_total=num("segments_total"),
            segments_done=num("segments_done"),
        )

    def counts(self) -> str:
        if self.segments_total or self.segments_done:
            return f"{self.segments_done}/{self.segments_total} segments"
        return f"{self.files_done}/{self.files_total} files"


class ProgressReporter:
    """A progress callback that draws a bar, writes plain lines or stays silent (module docstring)."""

    def __init__(
        self,
        mode: Mode,
        label: str = "",
        *,
        stream: TextIO | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self._label = label
        self._state: _State | None = None
        self._started = 0.0
        self._printed_at: float | None = None  # when this step last printed a plain line
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    @classmethod
    def for_cli(cls, *, as_json: bool, label: str = "", stream: TextIO | None = None) -> ProgressReporter:
        """Off with --json, a bar on a terminal, plain lines otherwise."""
        out = stream if stream is not None else sys.stderr
        if as_json:
            return cls("off", label, stream=out)
        return cls("bar" if out.isatty() else "lines", label, stream=out)

    # -- the callback ------------------------------------------------------------------------------------

    def __call__(self, update: object) -> None:
        if self.mode == "off":
            return
        state = _State.read(update, self._label)
        if self._state is None or state.label != self._state.label:
            self._finish_step()
            self._started = self.clock()
            self._printed_at = None
            self._task = None
        self._state = state
        if self.mode == "bar":
            self._draw(state)
        elif (
            self.clock() - (self._printed_at if self._printed_at is not None else self._started)
            >= self.interval
        ):
            self._line(state)

    def step(self, label: str) -> None:
        """Start a new step (a new bar) named `label`, before its first update."""
        self._label = label
        if self.mode != "off":
            self({"label": label})

    # -- plain lines -------------------------------------------------------------------------------------

    def _line(self, s: _State) -> None:
        now = self.clock()
        self._printed_at = now
        elapsed = max(now - self._started, 1e-9)
        rate = s.bytes_done / elapsed
        text = f"{s.label or 'progress'}: {s.counts()}, {size(s.bytes_done)}"
        if s.bytes_total:
            text += f" of {size(s.bytes_total)} ({100 * s.bytes_done / s.bytes_total:.0f}%)"
        text += f", {size(rate)}/s"
        if s.bytes_total and rate > 0 and s.bytes_done < s.bytes_total:
            text += f", ETA {_clock((s.bytes_total - s.bytes_done) / rate)}"
        print(text, file=self.stream, flush=True)

    # -- the bar -----------------------------------------------------------------------------------------

    def _draw(self, s: _State) -> None:
        if self._bar is None:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TextColumn("{task.fields[counts]}"),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
        total = s.bytes_total or None
        if self._task is None:
            self._task = self._bar.add_task(s.label or "progress", total=total, counts=s.counts())
        self._bar.update(self._task, total=total, completed=s.bytes_done, counts=s.counts())

    # -- the end -----------------------------------------------------------------------------------------

    def _finish_step(self) -> None:
        if self.mode == "lines" and self._state is not None and self._printed_at is not None:
            self._line(self._state)  # the step printed progress: say where it ended

    def close(self) -> None:
        self._finish_step()
        self._state = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
