"""What a run reports while it trains: ``metrics.csv``, TensorBoard, the progress bar and, for the
multi-process checks, per-process digests of the adapters and of the frozen base.

:class:`RunLog` opens them together and closes them together, also when training raises.
"""

from __future__ import annotations

import csv
import hashlib
import time
from contextlib import ExitStack

import torch

from wadi_analysis.atomic import atomic_write_text

from ..distill import FAKE, GENERATOR, Roles, TrainingError
from ..runs import RunFolder

METRIC_COLUMNS = ["step", "generator_loss", "fake_loss", "seconds", "skipped"]


def digest(named_tensors) -> str:
    """A short hash of (name, tensor) pairs: per-process checks that adapters agree and the base is untouched."""
    sha = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        sha.update(name.encode())
        # a copy: numpy's view of FSDP's gathered storage would keep it from being freed
        sha.update(tensor.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def metric_rows(path) -> list[list[str]]:
    """The rows of a run's ``metrics.csv`` (none when absent), refused unless they are this format's:
    the header, then rows whose first column is a step number."""
    if not path.is_file():
        return []
    try:
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines()) if r]
    except (UnicodeDecodeError, csv.Error):
        raise TrainingError(f"{path} is not a metrics file (CSV text)") from None
    if rows and rows[0] != METRIC_COLUMNS or any(not r[0].isdigit() for r in rows[1:]):
        raise TrainingError(f"{path} is not this run's metrics file (header {', '.join(METRIC_COLUMNS)}, "
                            "then one row per step)")
    return rows


def truncate_metrics(path, step: int) -> None:
    """On resume, drop metric rows after the checkpoint's step (they will be recomputed)."""
    if not path.is_file():
        return
    rows = metric_rows(path)
    kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step] if rows else []
    atomic_write_text(path, "".join(",".join(r) + "\n" for r in kept))


def _tensorboard(run: RunFolder):
    """A TensorBoard writer in RUN/tensorboard when tensorboard is installed (metrics.csv always)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run.tensorboard_dir))


def _progress_bar(total: int, done: int):
    """A rich progress bar on stderr with the latest losses and step time."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("G {task.fields[generator]:.3g}  fake {task.fields[fake]:.3g}  "
                              "{task.fields[seconds]:.2f} s/step"),
                   console=Console(stderr=True))
    bar.add_task("train", total=total, completed=done, generator=float("nan"), fake=float("nan"), seconds=0.0)
    return bar


class RunLog:
    """Metrics, TensorBoard and progress on the main process; adapter digests on every process when
    ``record_digests`` (the multi-process tests read them)."""

    def __init__(self, run: RunFolder, *, total_steps: int, start_step: int, is_main: bool, rank: int,
                 progress: bool, record_digests: bool) -> None:
        self.run, self.total_steps, self.start_step = run, total_steps, start_step
        self.is_main, self.rank, self.show_progress, self.record_digests = is_main, rank, progress, record_digests
        self._stack = ExitStack()
        self.writer = self.board = self.bar = self.digests = self.metrics = None
        self.started = time.perf_counter()

    def __enter__(self) -> RunLog:
        stack = self._stack
        if self.is_main:
            truncate_metrics(self.run.metrics_file, self.start_step)
            self.metrics = stack.enter_context(open(self.run.metrics_file, "a", newline=""))
            self.writer = csv.writer(self.metrics)
            if self.metrics.tell() == 0:
                self.writer.writerow(METRIC_COLUMNS)
            self.board = _tensorboard(self.run)
            if self.board is not None:
                stack.callback(self.board.close)
            if self.show_progress:
                self.bar = stack.enter_context(_progress_bar(self.total_steps, self.start_step))
        if self.record_digests:
            self.digests = stack.enter_context(open(self.run.digests(self.rank, "adapter"), "a"))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def step_started(self) -> None:
        self.started = time.perf_counter()

    def step_done(self, step: int, generator_loss: float, fake_losses: list[float], skipped: int, roles: Roles) -> None:
        """One row of metrics.csv (the mean of the step's fake-score losses), TensorBoard scalars and the
        bar (the last one), and (checks) the adapters' digests."""
        seconds = time.perf_counter() - self.started
        fake_loss = fake_losses[-1]
        if self.writer is not None:
            self.writer.writerow([step, generator_loss, sum(fake_losses) / len(fake_losses), round(seconds, 4), skipped])
            self.metrics.flush()
        if self.board is not None:
            self.board.add_scalar("loss/generator", generator_loss, step)
            self.board.add_scalar("loss/fake", fake_loss, step)
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], completed=step, generator=generator_loss, fake=fake_loss,
                            seconds=seconds)
        if self.digests is not None:
            self.digests.write(f"{step} {digest(roles.named_parameters(GENERATOR).items())} "
                               f"{digest(roles.named_parameters(FAKE).items())}\n")
            self.digests.flush()

    def base_digests(self, before: str, after: str) -> None:
        """The frozen base's digest at the start and at the end of training (checks)."""
        self.run.digests(self.rank, "base").write_text(f"start {before}\nend {after}\n")

