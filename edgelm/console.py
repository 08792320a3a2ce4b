"""Terminal output for the CLI: tables that stay whole at any width and progress that reads in a log.

- :func:`print_table` never cuts a header or a cell to ``…``: columns are given most important first, and
  those that do not fit the console's width (80 in a pipe or a log) are left out and named, with where to
  find them (report.md has them all).
- :func:`console` makes a console whose plain lines are never broken at the width (soft wrap): a long line
  stays one line in a log, and a terminal wraps it without splitting words; tables still fit the width.
- :class:`StageProgress` draws a rich progress bar on a terminal, and writes one plain line per stage
  (``[3/7] exporting onnx int8_dynamic``) when the output is a log or a pipe; the bar ends at its total.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table


def console(**kwargs) -> Console:
    """A rich Console for the CLI's output (``kwargs`` as for :class:`rich.console.Console`) with soft wrap on."""
    return Console(soft_wrap=True, **kwargs)


#: Columns a table may wrap instead of dropping (long text such as gate lists); at least this wide.
WRAP_MIN = 24


def print_table(
    console: Console,
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[str] = (),
    wrap: Sequence[str] = (),
    style: Callable[[str, str], str | None] | None = None,
    rest: str = "report.md has every column",
) -> list[str]:
    """Print ``rows`` under ``header`` (columns most important first) in the console's width; columns that
    do not fit are left out and named on one line after the table, with ``rest`` (where to find them).

    Args:
        right: columns aligned right (numbers).
        wrap: columns whose text may wrap over lines (kept at least :data:`WRAP_MIN` wide).
        style: ``(column, cell) -> rich style or None`` (e.g. green for PASS).
    Returns:
        The columns left out because they did not fit (empty when all fit).
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def need(cols: list[int]) -> int:
        return 1 + sum((min(widths[i], WRAP_MIN) if header[i] in wrap else widths[i]) + 3 for i in cols)

    cols = list(range(len(header)))
    while len(cols) > 1 and need(cols) > console.width:
        cols.pop()
    table = Table(title=escape(title), title_justify="left")
    for i in cols:
        table.add_column(
            escape(header[i]),
            justify="right" if header[i] in right else "left",
            no_wrap=header[i] not in wrap,
            overflow="fold",
        )
    for r in rows:
        cells = []
        for i in cols:
            cell = escape(r[i])
            s = style(header[i], r[i]) if style else None
            cells.append(f"[{s}]{cell}[/]" if s else cell)
        table.add_row(*cells)
    console.print(table)
    left_out = [header[i] for i in range(len(header)) if i not in cols]
    if left_out:
        console.print(f"(not shown at this width: {', '.join(left_out)}; {rest})", markup=False, highlight=False)
    return left_out


class StageProgress:
    """The ``(description, done, total)`` callback of a long command, drawn for a terminal or a log.

    Use as a context manager; on a clean exit the bar is completed (done = total). On a terminal: a rich
    progress bar with the elapsed time. Elsewhere: one line per new description, ``[done/total] description``,
    and, in a stage of 20 steps or more, one more at each tenth of it, so a log shows a long stage moving.
    """

    def __init__(self, console: Console, unit: str = "steps"):
        self.console = console
        self._last: str | None = None
        self._tenth = 0
        self._task = None
        self._bar = None
        if console.is_terminal:
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._task = self._bar.add_task("starting", total=None)

    def __enter__(self) -> StageProgress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            if exc_type is None:
                total = self._bar.tasks[0].total or self._bar.tasks[0].completed
                self._bar.update(self._task, completed=total, total=total)
            self._bar.__exit__(exc_type, exc, tb)

    def __call__(self, description: str, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description, completed=done, total=total)
        elif description != self._last:
            step = f"{total}/{total}" if done >= total else f"{done + 1}/{total}"
            self.console.print(f"[{step}] {description}", markup=False, highlight=False)
            self._last, self._tenth = description, (done + 1) * 10 // max(total, 1)
        elif total >= 20 and done * 10 // total > self._tenth:
            self._tenth = done * 10 // total
            self.console.print(f"[{done}/{total}] {description}", markup=False, highlight=False)
