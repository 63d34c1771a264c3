"""The whole pipeline on one machine with nothing installed but Python (``captcha-queue demo``).

Synthesise labelled CAPTCHAs, make sure a Redis answers (the configured one, else a private server started for the
run), create a fresh SQLite database, start a worker subprocess, enqueue the folder, wait for every image with a
progress bar, and report the decoded strings against the labels in the file names. Everything started is stopped
again, on success or failure.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.config import get_settings, mask_url


class DemoError(RuntimeError):
    """The demo cannot run here (no checkpoint to decode with)."""


@dataclass(frozen=True)
class DemoReport:
    job_id: int
    images: int
    done: int
    failed: int
    correct: int  # decoded text equal to the file name's label
    images_per_s: float
    rows: list[dict]

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0


# what a run writes in its folder: the next run may delete a folder that holds nothing else
DEMO_FILES = frozenset({"captchas", "demo.db", "demo.db-wal", "demo.db-shm", "demo.db-journal", "worker.log",
                        ".DS_Store"})  # and what a file browser leaves behind


def prepare_workdir(workdir: Path) -> Path:
    """``workdir`` (resolved) emptied for a new run, or ``DemoError`` when emptying it could delete anything but an
    earlier demo's files: a folder holding other files, a file, or the current directory or one above it."""
    workdir = Path(workdir).resolve()
    if workdir.exists():
        if not workdir.is_dir():
            raise DemoError(f"--workdir {workdir} is a file, not a folder")
        if workdir == Path.cwd().resolve() or workdir in Path.cwd().resolve().parents:
            raise DemoError(f"--workdir {workdir} is the current folder or holds it: give a folder of its own")
        others = sorted(entry.name for entry in workdir.iterdir() if entry.name not in DEMO_FILES)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise DemoError(
                f"--workdir {workdir} holds files that the demo did not write ({shown}); it is emptied on every run, "
                "so give a new or empty folder"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    return workdir


def run_demo(
    workdir: Path,
    count: int = 200,
    seed: int = 0,
    concurrency: int = 1,
    device: str = "cpu",
    console: Console | None = None,
) -> DemoReport:
    """Run the demo in ``workdir`` (recreated) and print a results table; see the module docstring."""
    from core.formats import text_from_filename
    from core.synth import generate
    from db.queries import query_results
    from db.session import session_factory, upgrade
    from producer.enqueue import enqueue, wait_for_job
    from producer.local_redis import local_redis
    from worker.process import WorkerProcess

    from core.checkpoint import default_checkpoint_path

    from worker.main import WorkerConfigError, worker_argv

    try:  # the worker would refuse these options only after the images are made
        worker_argv(concurrency=concurrency, device=device)
    except WorkerConfigError as exc:
        raise DemoError(str(exc)) from None
    console = console or Console(stderr=True)
    settings = get_settings()
    checkpoint = settings.checkpoint or default_checkpoint_path()
    if not Path(checkpoint).exists():
        raise DemoError(f"no checkpoint at {checkpoint}: set CAPTCHA_CHECKPOINT or train one (captcha-queue train)")
    workdir = prepare_workdir(workdir)
    database_url = f"sqlite:///{workdir / 'demo.db'}"

    console.print(f"[bold]1/4[/] synthesising {count} CAPTCHAs into {workdir / 'captchas'}")
    generate(workdir / "captchas", count, seed=seed, progress=True)
    upgrade(database_url)

    with local_redis(settings.broker_url) as broker_url:
        where = "configured" if broker_url == settings.broker_url else "private, stopped at the end"
        console.print(f"[bold]2/4[/] broker {mask_url(broker_url)} ({where}); database {mask_url(database_url)}")
        queue = f"demo-{uuid.uuid4().hex[:8]}"
        env = {"CAPTCHA_BROKER_URL": broker_url, "CAPTCHA_DATABASE_URL": database_url,
               "CAPTCHA_CHECKPOINT": str(checkpoint)}  # fmt: skip
        log_path = workdir / "worker.log"
        console.print(f"[bold]3/4[/] starting a worker ({concurrency} process(es), {device}); log: {log_path}")
        with _dropped_at_exit(broker_url, queue), WorkerProcess(
            log_path, queues=queue, concurrency=concurrency, device=device, env=env
        ) as worker:
            console.print("[bold]4/4[/] enqueueing and waiting for the results")
            sent = enqueue(
                [workdir / "captchas" / "images"],
                job_name="demo",
                queue=queue,
                database_url=database_url,
                broker_url=broker_url,
                progress=True,
            )
            waited = wait_for_job(sent.job_id, database_url=database_url, progress=True,
                                  alive=lambda: worker.process.poll() is None)  # fmt: skip
            if waited.pending:
                raise DemoError(
                    f"the worker exited (status {worker.process.returncode}) with {waited.pending} images still "
                    f"pending; its log, {log_path}, ends:\n{worker.log()[-2000:]}"
                )

    with session_factory(database_url)() as session:
        rows = query_results(session, job=sent.job_id)
    correct = sum(1 for row in rows if row["text"] is not None and row["text"] == text_from_filename(Path(row["path"]).name))
    report = DemoReport(
        job_id=sent.job_id,
        images=len(rows),
        done=waited.done,
        failed=waited.failed,
        correct=correct,
        images_per_s=waited.images_per_s,
        rows=rows,
    )
    print_report(report, console)
    return report


@contextlib.contextmanager
def _dropped_at_exit(broker_url: str, queue: str) -> Iterator[None]:
    """Delete the demo's own queue from the broker on leaving (its list, its priority lists and its binding), also
    after an error or an interrupt, so a configured Redis keeps no trace of the run. The worker is stopped first."""
    try:
        yield
    finally:
        import redis

        client = redis.Redis.from_url(broker_url)
        try:
            keys = list(client.scan_iter(match=f"*{queue}*"))  # the name is the demo's own: demo-<random hex>
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass  # the broker went away: nothing to clean
        finally:
            client.close()


def print_report(report: DemoReport, console: Console, shown: int = 20) -> None:
    """The first ``shown`` rows as a table, then the totals and the sequence accuracy."""
    from core.formats import text_from_filename

    table = Table(title=f"job {report.job_id}: first {min(shown, len(report.rows))} of {len(report.rows)} images")
    for column in ("file", "label", "decoded", "score", ""):
        table.add_column(column)
    for row in report.rows[:shown]:
        name = escape(Path(row["path"]).name)
        label = text_from_filename(Path(row["path"]).name) or ""
        decoded = row["text"] if row["status"] == "done" else f"[red]{row['status']}: {escape(row['error'] or '')}[/]"
        score = f"{row['score']:.2f}" if row["score"] is not None else ""
        mark = "[green]✓[/]" if row["text"] == label else "[red]✗[/]"
        table.add_row(name, label, decoded, score, mark)
    console.print(table)
    console.print(
        f"{report.done} done, {report.failed} failed, {report.images_per_s:.1f} images/s; "
        f"sequence accuracy {report.correct}/{report.images} = {report.accuracy:.1%}"
    )
