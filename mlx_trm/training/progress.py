"""The training progress display: a rich bar with loss, lr, tokens/s, ETA and peak memory.

On a terminal it is a live bar; otherwise (a log file, CI) each logged step is one plain line.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
             f"{record['tokens_per_sec']:,.0f} tok/s", f"peak {record['peak_memory_gb']:.2f} GB"]
    if "moe_reg" in record:
        parts.insert(2, f"moe_reg {record['moe_reg']:.4f}")
    return " | ".join(parts)


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, disable=not self.live)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        if record is None:
            self.progress.update(self.task, completed=step)
            return
        line = format_record(record)
        self.progress.update(self.task, completed=step, info=line.split(" | ", 1)[1])
        if not self.live:
            self.console.print(line, highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
