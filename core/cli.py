"""The ``captcha-queue`` command line.

Each subcommand is a thin wrapper: it parses options and calls a plain function in the module named after the
concept (``core.synth``, ``core.train``, ``producer.enqueue``, ...). Heavy modules (torch, celery) are imported
inside the command bodies so that ``captcha-queue --help`` and the producer start in well under a second.
"""

from __future__ import annotations

import contextlib
import signal
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(
    name="captcha-queue",
    help="Read text CAPTCHAs at scale: enqueue image folders, decode them on Celery workers, query the results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

LOSS_NAMES = ("loss", "rpn_cls", "rpn_reg", "cls", "box_reg", "reader", "context")  # shown per epoch, where present


# --------------------------------------------------------------------------------------------------------------
# core: data, training, evaluation
# --------------------------------------------------------------------------------------------------------------


class TrainProgress:
    """``train``'s display of ``train_model`` events: a bar per epoch (steps, loss, time left), a line per epoch; in
    logs (no terminal) a line every 50 steps instead of the bar."""

    def __init__(self, console: Any, epochs: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.epochs = epochs
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=console,
        )  # fmt: skip
        # hidden until the run starts: a mistake found before then is an error line, not an empty bar above it
        self.task = self.progress.add_task("train", total=None, epoch="-", loss=0.0, visible=False)
        self.recent: list[float] = []

    def __call__(self, event: dict) -> None:
        console, progress, task = self.console, self.progress, self.task
        if event["event"] == "start":
            console.print(
                f"training {event['train_images']} images, validating on {event['val_images']}, "
                f"{event['steps_per_epoch']} steps/epoch on {event['device']} ({event['precision']})"
            )
            self._restart(event["start_epoch"], total=event["steps_per_epoch"],
                          visible=event["start_epoch"] <= self.epochs)  # fmt: skip
        elif event["event"] == "step":
            progress.update(task, advance=1, loss=event["loss"])
            self.recent.append(event["loss"])
            if not console.is_terminal and event["step"] % 50 == 0:  # logs: a line instead of a live bar
                console.print(
                    f"step {event['step']}/{event['steps']} epoch {event['epoch']} "
                    f"loss {sum(self.recent) / len(self.recent):.4f} lr {event['lr']:.2e}"
                )
                self.recent.clear()
        elif event["event"] == "epoch":
            losses = " ".join(f"{k} {event[k]:.4f}" for k in LOSS_NAMES if k in event)
            console.print(
                f"epoch {event['epoch']}: {losses} | val seq {event['val_sequence_accuracy']:.4f} "
                f"char {event['val_character_accuracy']:.4f} | {event['images_per_second']:.1f} img/s"
                + (" | saved" if event["best"] else "")
            )
            if event["epoch"] < self.epochs:
                self._restart(event["epoch"] + 1)
            else:  # the last epoch: no empty bar for an epoch that will not run
                progress.update(task, visible=False)

    def _restart(self, epoch: int, **options: Any) -> None:
        """The bar at 0 for ``epoch``. A reset, not an update: a bar that finished keeps its finish time (and shows
        0:00:00 left) until reset, and a reset replaces all the fields."""
        loss = self.progress.tasks[0].fields.get("loss", 0.0)
        self.progress.reset(self.task, epoch=epoch, loss=loss, **options)


@app.command()
def train(
    images: Path = typer.Option(..., help="Folder of <text>-<n>.png training images"),
    labels: Path = typer.Option(..., help="Folder of YOLO label files, one <stem>.txt per image"),
    out: Path = typer.Option(..., help="Checkpoint to write (.safetensors; the .json and training state go beside it)"),
    val_images: Optional[Path] = typer.Option(None, help="Validation images (default: hold out 5%, at most 500)"),
    val_labels: Optional[Path] = typer.Option(None, help="Validation labels"),
    arch: str = typer.Option("fast", help="Network: fast | seed"),
    epochs: int = typer.Option(10, min=1),
    epoch_size: Optional[int] = typer.Option(None, min=1, help="Training images per epoch (default: all of them)"),
    batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW, warmup then cosine)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N (default: CAPTCHA_DEVICE, auto)"),
    workers: int = typer.Option(1, min=0, help="DataLoader worker processes"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="Continue the run whose training state is beside --out"),
    init_from: Optional[Path] = typer.Option(None, help="Start from this checkpoint's weights"),
    version: Optional[str] = typer.Option(None, help="Version string stored in the checkpoint"),
    model_config: str = typer.Option("{}", help='JSON object of network settings, e.g. \'{"input_height": 64}\''),
    augment: bool = typer.Option(
        False, help="Randomly recolour, stretch, pad and cross out training images (for small real-image sets)"
    ),
    ema_decay: Optional[float] = typer.Option(
        None, min=0.0, max=0.99999, help="Validate and save a moving average of the weights with this decay (e.g. 0.998)"
    ),
    precision: str = typer.Option(
        "auto", help="fp32 | bf16 | auto: bf16 autocast where the CPU or GPU computes bf16 natively (about 2x faster)"
    ),
    train_parts: str = typer.Option(
        "all", help="all | reader: train only the glyph reader and context head on ground-truth boxes (detector frozen)"
    ),
) -> None:
    """Train a detector on a labelled folder; keep the best checkpoint by validation sequence accuracy."""
    import json

    from rich.console import Console

    from core.checkpoint import CheckpointError
    from core.train import TrainConfig, train_model

    console = Console(stderr=True)
    try:
        network = json.loads(model_config)
        if not isinstance(network, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        console.print(_line("error:", "red", f"--model-config: {exc}"))
        raise typer.Exit(2) from None
    if (val_images is None) != (val_labels is None):
        console.print("[red]error:[/red] give both --val-images and --val-labels, or neither (validation is then "
                      "held out of the training images)")  # fmt: skip
        raise typer.Exit(2)
    cfg = TrainConfig(
        images=images, labels=labels, out=out, val_images=val_images, val_labels=val_labels, arch=arch,
        model_config=network, epochs=epochs, epoch_size=epoch_size, batch_size=batch_size, lr=lr,
        device=device or _settings_device(), num_workers=workers,
        seed=seed, resume=resume, init_from=init_from, version=version, augment=augment, ema_decay=ema_decay,
        precision=precision, train_parts=train_parts,
    )  # fmt: skip
    on_progress = TrainProgress(console, cfg.epochs)
    try:
        with on_progress.progress:
            result = train_model(cfg, on_progress)
    except (CheckpointError, ValueError, OSError) as exc:
        console.print(_line("error:", "red", exc))
        raise typer.Exit(1) from None
    m = result.metrics
    typer.echo(
        f"best epoch {result.best_epoch}: val sequence accuracy {m['val_sequence_accuracy']:.4f}, "
        f"character accuracy {m['val_character_accuracy']:.4f} -> {result.checkpoint}"
    )


@app.command("eval")
def eval_command(
    images: Path = typer.Option(..., help="Folder of images named <text>-<n>.png (names without a text: decoded only)"),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (default: CAPTCHA_CHECKPOINT or the shipped one)"),
    batch_size: int = typer.Option(32, min=1),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N (default: CAPTCHA_DEVICE, auto)"),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else"),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images (sorted by name)"),
    confusions: int = typer.Option(10, min=0, help="How many top character confusions to show"),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 | auto (default: CAPTCHA_PRECISION, auto)"),
) -> None:
    """Measure sequence accuracy, character accuracy and throughput of a checkpoint on a folder."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from core.checkpoint import CheckpointError
    from core.detector import Detector
    from core.evaluate import evaluate

    err = Console(stderr=True)
    try:
        detector = Detector.load(checkpoint, device=device or _settings_device(), precision=precision)
        with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as progress:
            task = progress.add_task("eval", total=None)
            report = evaluate(
                detector, images, batch_size=batch_size, limit=limit,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )  # fmt: skip
    except (CheckpointError, NotADirectoryError, ValueError) as exc:
        err.print(_line("error:", "red", exc))
        raise typer.Exit(1) from None
    if report.images == 0 and not report.unreadable:
        raise _fail(f"no image files in {images} (.png, .jpg, .jpeg, .bmp, .webp: give the folder that holds them)")
    for path, reason in list(report.unreadable.items())[:20]:
        typer.echo(f"warning: unreadable {path}: {reason}", err=True)
    if len(report.unreadable) > 20:
        typer.echo(f"warning: ... and {len(report.unreadable) - 20} more unreadable images", err=True)
    gate = detector.both_gate if detector.box_source == "both" else None  # reported only where it applies
    summary = {
        "checkpoint": str(detector.checkpoint_path),
        "version": detector.version,
        "device": str(detector.device),
        "precision": detector.precision,
        "box_source": detector.box_source,
        **({"both_gate": gate} if gate is not None else {}),
        **report.as_dict(top_confusions=confusions),
    }
    if report.scored == 0:  # no file name carries a text: nothing was measured, which is not 0%
        summary["sequence_accuracy"] = summary["character_accuracy"] = None
    if json_output:
        typer.echo(json.dumps(summary))
        return
    table = Table(title=f"{images} ({detector.version})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("images decoded", str(report.images))
    table.add_row("images with a truth", str(report.scored))
    if report.scored:
        table.add_row("sequence accuracy", f"{report.sequence_accuracy:.4f}")
        table.add_row("character accuracy", f"{report.character_accuracy:.4f}")
    else:
        table.add_row("sequence accuracy", "n/a (no file name gives a text)")
    table.add_row("images/s", f"{report.images_per_second:.1f} ({detector.device}, {detector.precision})")
    gated = f", detector below {gate:g}" if gate is not None and gate < 1 else ""
    table.add_row("boxes from", detector.box_source + gated)
    table.add_row("unreadable", str(len(report.unreadable)))
    _stdout().print(table)
    if summary["top_confusions"]:
        conf = Table(title="top character confusions (∅ = missing / extra)")
        for col in ("truth", "predicted", "count"):
            conf.add_column(col)
        for truth, predicted, count in summary["top_confusions"]:
            conf.add_row(truth, predicted, str(count))
        _stdout().print(conf)


@app.command()
def reconfigure(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to start from (.safetensors)"),
    set_: str = typer.Option(..., "--set", help='JSON object of decode settings, e.g. \'{"reader_views": [0, 7, -7]}\''),
    out: Path = typer.Option(..., help="Checkpoint to write (the same weights, the new settings)"),
) -> None:
    """Change a checkpoint's decode settings (glyph reader views, score and NMS thresholds, box source) without training."""
    import json

    from core.checkpoint import CheckpointError, reconfigure_checkpoint

    try:
        changes = json.loads(set_)
    except json.JSONDecodeError as exc:
        raise _fail(f"--set is not JSON: {exc}") from None
    if not isinstance(changes, dict) or not changes:
        raise _fail("--set needs a non-empty JSON object")
    try:
        written = reconfigure_checkpoint(checkpoint, out, changes)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {written} ({', '.join(f'{k}={v}' for k, v in changes.items())})")


@app.command()
def autolabel(
    images: Path = typer.Argument(..., help="Folder of <text>-<n>.png images whose only label is their text."),
    out: Path = typer.Option(..., "--out", help="Labels folder to write (<stem>.txt, YOLO, the seed layout)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Detector that reads the images colour leaves unlabelled."),
    colour: bool = typer.Option(True, "--colour/--no-colour", help="Run the colour segmentation first."),
    workers: Optional[int] = typer.Option(None, min=1, help="Colour processes (default: CPU cores)."),
    batch_size: int = typer.Option(32, min=1, help="Detector batch size."),
    device: str = typer.Option("cpu", help="Detector device: cpu | auto | cuda | cuda:N."),
    render_dir: Optional[Path] = typer.Option(None, help="Also draw a sample of the labels into this folder."),
    render: int = typer.Option(12, min=0, help="How many labels to draw (spread over the sources)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout and nothing else."),
) -> None:
    """Write per-character boxes for images labelled only by their file name, checked against that text."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from core.autolabel import autolabel as run_autolabel, render_labels
    from core.checkpoint import CheckpointError

    err = Console(stderr=True)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                      transient=True) as progress:  # fmt: skip
            tasks: dict[str, int] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done, total=total)

            report = run_autolabel(
                images, out, checkpoint=checkpoint, colour=colour, workers=workers, batch_size=batch_size,
                device=device, on_progress=on_progress,
            )  # fmt: skip
    except (CheckpointError, ValueError, OSError) as exc:
        err.print(_line("error:", "red", exc))
        raise typer.Exit(1) from None
    summary = report.as_dict()
    if render_dir is not None and render:
        summary["rendered"] = [str(p) for p in render_labels(report.labels, render_dir, render)]
    if json_output:
        typer.echo(json.dumps(summary))
        return
    sources = ", ".join(f"{n} by {source}" for source, n in sorted(summary["by_source"].items())) or "none"
    typer.echo(
        f"labelled {summary['labelled']} of {summary['images']} images ({summary['share']:.1%}: {sources}) "
        f"in {summary['seconds']:.0f} s -> {out}"
    )
    for reason, n in sorted(summary["unlabelled"].items(), key=lambda item: -item[1]):
        typer.echo(f"  unlabelled, {reason}: {n}")
    if summary.get("rendered"):
        typer.echo(f"{len(summary['rendered'])} pictures in {render_dir}")


@app.command("synth")
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write images/ and labels/ into (created if missing)."),
    count: int = typer.Option(10_000, "--count", "-n", min=0, help="Number of CAPTCHAs to write."),
    seed: int = typer.Option(0, "--seed", "-s", help="Same seed, same files (byte for byte)."),
    start: int = typer.Option(0, "--start", min=0,
                              help="First image index: continue a set of this seed with images it does not have."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="Processes (default: CPU cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write synthetic CAPTCHAs with per-character YOLO boxes (images/<text>-<n>.png, labels/<text>-<n>.txt)."""
    import time

    from core.synth import generate

    began = time.perf_counter()
    written = generate(out_dir, count, seed=seed, workers=workers, progress=not quiet, start=start)
    elapsed = time.perf_counter() - began
    rate = written / max(elapsed, 1e-9)
    typer.echo(f"wrote {written} images to {out_dir} in {elapsed:.1f} s ({rate:.0f} images/s)")


# --------------------------------------------------------------------------------------------------------------
# queue: database, producer, worker, queries
# --------------------------------------------------------------------------------------------------------------


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


class ImageStatus(str, Enum):
    pending = "pending"
    done = "done"
    failed = "failed"


RESULT_FIELDS = (
    "job", "image_id", "path", "status", "text", "score", "error", "model_version", "width", "height",
    "load_ms", "infer_ms", "finished_at", "chars",
)  # fmt: skip
DATABASE_URL_HELP = "Database URL (default: CAPTCHA_DATABASE_URL)."

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@contextlib.contextmanager
def _sigterm_as_exit():
    """Within the block SIGTERM raises ``SystemExit(143)`` in this (main) thread, so the cleanup that Ctrl-C gets
    (``finally`` blocks, context managers: children stopped, unsent images marked) runs on SIGTERM too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _settings_device() -> str:
    from core.config import get_settings

    return get_settings().device


def _clean(value: object) -> str:
    """``value`` as one line of text: line breaks and tabs become spaces, other control characters (terminal escape
    sequences) U+FFFD."""
    return "".join(c if c.isprintable() else " " if c in "\n\r\t" else "\ufffd" for c in str(value))


def _cell(value: object) -> Any:
    """A value from the database or a file name as a table cell of literal text: its ``[...]`` never taken for rich
    markup (a path ``a[/b].png`` raised MarkupError, ``[bold]x.png`` printed as ``x.png``)."""
    from rich.text import Text

    return Text(_clean(value))


def _line(label: str, style: str, value: object) -> Any:
    """``label`` in ``style``, then ``value`` as literal text (an error or a warning that quotes paths)."""
    from rich.text import Text

    return Text.assemble((label, style), " ", _clean(value))


def _stdout() -> Any:
    """The console for tables on stdout: the terminal's width, or 200 columns when piped or captured (rich's 80
    would cut a table's paths and headers to "versi…" in a file or a pipe)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _version_number(text: str) -> int:
    """A model version as the tables print it (``v3``) or as its number (``3``)."""
    digits = text[1:] if text[:1] in ("v", "V") else text
    if not digits.isascii() or not digits.isdigit():
        raise typer.BadParameter(f"{text!r} is not a version (v3, or 3)")
    return int(digits)


def _fail(message: str, code: int = 1) -> typer.Exit:
    from core.config import mask_urls_in

    typer.echo(f"error: {mask_urls_in(message)}", err=True)
    return typer.Exit(code)


def _open_database(database_url: Optional[str]):
    """A session on a migrated database, or a readable error (never creates a SQLite file)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from core.config import mask_url
    from db.session import database_url as resolve_url, make_engine, schema_revisions, session_factory

    url = resolve_url(database_url)
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise _fail(f"not a database URL: {mask_url(url)}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        raise _fail(f"no database at {mask_url(url)}; run `captcha-queue db upgrade` or enqueue a folder first")
    try:
        if not sa.inspect(make_engine(url)).has_table("images"):
            raise _fail(f"{mask_url(url)} has no captcha-queue schema; run `captcha-queue db upgrade`")
        current, head, known = schema_revisions(url)
    except sa.exc.OperationalError as exc:
        raise _fail(f"cannot open {mask_url(url)}: {exc.orig}") from None
    if current != head and (current is None or current in known):  # older: newer revisions are not ours to judge
        raise _fail(f"{mask_url(url)} has schema revision {current}, this version uses {head}; "
                    "run `captcha-queue db upgrade`")  # fmt: skip
    return session_factory(url)(), url


def _require_job(session, url: str, job: Optional[str]) -> Optional[int]:
    """The id of ``job`` (an id or a name: the latest job of that name), None when no job was given; a readable error
    when there is no such job."""
    from core.config import mask_url
    from db.queries import resolve_job

    if job is None:
        return None
    job_id = resolve_job(session, job)
    if job_id is None:
        raise _fail(f"no job {job} in {mask_url(url)}")
    return job_id


@db_app.command("upgrade")
def db_upgrade(database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP)) -> None:
    """Create or migrate the database schema to the latest version."""
    import sqlalchemy as sa

    from core.config import mask_url
    from db.session import database_url as resolve_url, schema_revisions, upgrade

    url = resolve_url(database_url)
    try:
        before, head, _ = schema_revisions(url)
        upgrade(url)
    except (sa.exc.OperationalError, sa.exc.ArgumentError) as exc:
        raise _fail(f"cannot migrate {mask_url(url)}: {getattr(exc, 'orig', None) or exc}") from None
    if before is None:
        typer.echo(f"{mask_url(url)}: schema created (revision {head})")
    elif before != head:
        typer.echo(f"{mask_url(url)}: schema migrated from revision {before} to {head}")
    else:
        typer.echo(f"{mask_url(url)}: schema up to date (revision {head})")


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


@app.command()
def status(
    job: Optional[str] = typer.Argument(
        None, help="Job id or name (the latest job of that name); default: totals over all jobs and the latest jobs."
    ),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
    queue: str = typer.Option("decode", help="Broker queue whose depth is shown (the workers' --queues)."),
    jobs: int = typer.Option(10, min=0, help="Latest jobs listed when no JOB is given."),
) -> None:
    """Progress: images total, done, failed, pending, throughput, ETA, and the broker queue depth."""
    from rich.table import Table

    from core.config import get_settings, mask_url
    from db.queries import job_status, list_jobs, queue_depth

    session, url = _open_database(database_url)
    with session:
        job_id = _require_job(session, url, job)
        counts = job_status(session, job_id)
        recent = list_jobs(session, jobs) if job is None else []
    broker = get_settings().broker_url
    depth = queue_depth(broker, queue)

    console = _stdout()
    summary = Table(show_header=False, box=None, title=f"job {job_id}" if job_id is not None else "all jobs")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    rate = counts["images_per_s"]
    for name, value in (
        ("total", counts["total"]), ("done", counts["done"]), ("failed", counts["failed"]),
        ("pending", counts["pending"]), ("throughput", f"{rate:.1f} images/s" if rate else "-"),
        ("ETA", _duration(counts["eta_s"])),
        (f"queue '{queue}'", "unavailable" if depth is None else f"{depth} messages"),
    ):  # fmt: skip
        summary.add_row(name, str(value))
    console.print(f"database {mask_url(url)}, broker {mask_url(broker)}")
    console.print(summary)
    if recent:
        table = Table("job", "name", "created (UTC)", "total", "done", "failed", "pending", title="latest jobs")
        for row in recent:
            table.add_row(
                str(row["id"]), _cell(row["name"] or ""), f"{row['created_at']:%Y-%m-%d %H:%M:%S}", str(row["total"]),
                str(row["done"]), str(row["failed"]), str(row["pending"]),
            )  # fmt: skip
        console.print(table)


@app.command()
def results(
    job: Optional[str] = typer.Option(None, "--job", help="Job id or name."),
    status: Optional[ImageStatus] = typer.Option(None, "--status", help="Image status."),
    text: Optional[str] = typer.Option(None, "--text", help="Decoded text: exact, glob (a*7?) or LIKE (a%)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Minimum mean character score."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="Output format."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many rows."),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
) -> None:
    """Decoded results with their character boxes, as a table, CSV (characters as a JSON column), JSON or JSONL."""
    import csv
    import json
    import sys

    from db.queries import iter_results

    session, url = _open_database(database_url)
    with session:
        _require_job(session, url, job)
        rows = iter_results(
            session, job=job, status=status.value if status else None, text=text, min_score=min_score, limit=limit
        )
        if output_format is OutputFormat.jsonl:
            for row in rows:
                sys.stdout.write(json.dumps(row) + "\n")
        elif output_format is OutputFormat.json:
            sys.stdout.write("[")
            for n, row in enumerate(rows):
                sys.stdout.write(("," if n else "") + "\n" + json.dumps(row))
            sys.stdout.write("\n]\n")
        elif output_format is OutputFormat.csv:
            writer = csv.DictWriter(sys.stdout, fieldnames=RESULT_FIELDS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({**{k: row[k] for k in RESULT_FIELDS}, "chars": json.dumps(row["chars"])})
        else:
            from rich.table import Table

            table = Table("job", "path", "status", "text", "score", "chars", "model", "error")
            table.columns[1].overflow = "fold"
            for row in rows:
                table.add_row(
                    str(row["job"]), _cell(row["path"]), row["status"], _cell(row["text"] or ""),
                    "" if row["score"] is None else f"{row['score']:.3f}", str(len(row["chars"])),
                    _cell(row["model_version"] or ""), _cell(row["error"] or ""),
                )  # fmt: skip
            _stdout().print(table)


def _stored_result(database_url: Optional[str], path: str) -> Optional[dict]:
    """The latest stored result for ``path``, or None when there is none or no database to ask."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from core.config import mask_url
    from db.queries import latest_result
    from db.session import database_url as resolve_url, make_engine, session_factory

    url = resolve_url(database_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return None
    try:
        if not sa.inspect(make_engine(url)).has_table("images"):
            return None
        with session_factory(url)() as session:
            return latest_result(session, path)
    except sa.exc.OperationalError as exc:
        typer.echo(f"warning: cannot read {mask_url(url)} ({exc.orig}); running the model", err=True)
        return None


@app.command()
def render(
    image: Optional[Path] = typer.Argument(None, help="Image to draw (or use --job)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="PNG to write (default: <image stem>.render.png, in --out-dir when given)."
    ),
    checkpoint: Optional[Path] = typer.Option(None, help="Model used when there is no stored result."),
    run_model: bool = typer.Option(False, "--run-model", help="Decode with the model even if a result is stored."),
    job: Optional[str] = typer.Option(None, "--job", help="Render the decoded images of this job (id or name)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for the pictures (--job: renders)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many --job pictures."),
    scale: int = typer.Option(2, min=1, max=8, help="Image magnification."),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
) -> None:
    """Draw an image with its character boxes, scores and decoded string (green: matches the file name, red: not)."""
    import os

    from core.checkpoint import CheckpointError
    from core.images import ImageError, load_image
    from core.render import render_file, render_rows

    if (image is None) == (job is None):
        raise _fail("give either IMAGE or --job", code=2)
    if job is not None:
        from db.queries import iter_results

        session, url = _open_database(database_url)
        out_dir = out_dir or Path("renders")
        with session:
            _require_job(session, url, job)
            rows = iter_results(session, job=job, status="done", limit=limit)  # a page at a time, however many
            written, errors = render_rows(rows, out_dir, scale=scale)
        for path, reason in errors.items():
            typer.echo(f"warning: {path}: {reason}", err=True)
        typer.echo(f"{len(written)} pictures written to {out_dir}")
        return

    path = os.path.abspath(image)
    try:
        picture = load_image(path)
    except ImageError as exc:
        raise _fail(f"{path}: {exc}") from None
    from core.paths import path_to_text

    # stored paths are in the queue's text form (lossless for names that are not UTF-8)
    row = None if run_model else _stored_result(database_url, path_to_text(path))
    source = f"stored result of model {row['model_version']}" if row else None
    try:
        if row is None:
            from core.detector import Detector

            detector = Detector.load(checkpoint, device="cpu")
            [prediction] = detector.predict([picture])
            row = {
                "text": prediction.text, "score": prediction.score,
                "chars": [{"char": c.char, "box": list(c.box), "score": c.score} for c in prediction.chars],
            }  # fmt: skip
            source = f"model {detector.version}"
        written = render_file(path, out or (out_dir or Path()) / f"{Path(path).stem}.render.png", row, scale=scale)
    except (ImageError, CheckpointError, FileNotFoundError) as exc:
        raise _fail(f"{path}: {exc}") from None
    typer.echo(f"{written}: '{row['text']}' ({source})")


@app.command()
def enqueue(
    dirs: list[Path] = typer.Argument(..., help="Folders (or single image files) to decode."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders (symlink loops skipped)."),
    pattern: Optional[str] = typer.Option(
        None, help="Glob on file names, e.g. '*-0.png' (on paths relative to each folder when it contains '/')."
    ),
    job: Optional[str] = typer.Option(None, "--job", help="Name stored with the job."),
    force: bool = typer.Option(False, help="Decode again files already pending or done with the same size and mtime."),
    wait: bool = typer.Option(False, help="Show progress until every image is done or failed, then a summary."),
    queue: str = typer.Option("decode", help="Broker queue to send to (workers consume it with --queues)."),
) -> None:
    """Register the images of DIRS as a job and send their paths to the workers; prints the job id."""
    from rich.console import Console

    from core.config import mask_url
    from db.session import SchemaError, database_url, prepare_schema
    from producer.enqueue import EnqueueError, enqueue as enqueue_images, wait_for_job
    from producer.scan import ScanError

    console = Console(stderr=True)
    try:
        prepare_schema()  # a new database gets its schema: a fresh SQLite file works without `db upgrade`
    except SchemaError as exc:
        raise _fail(str(exc)) from None
    try:
        with _sigterm_as_exit():  # images registered but not yet sent are marked failed on SIGTERM as on Ctrl-C
            report = enqueue_images(
                dirs, recursive=recursive, pattern=pattern, job_name=job, force=force, queue=queue, progress=True,
                warn=lambda message: console.print(_line("warning:", "yellow", message)),
            )  # fmt: skip
    except (ScanError, EnqueueError) as exc:
        console.print(_line("error:", "red", exc))
        raise typer.Exit(1) from None
    if report.found == 0:
        hint = "" if recursive else " (sub-folders are searched with --recursive)"
        console.print(_line("warning:", "yellow", f"no image files found in {', '.join(map(str, dirs))}{hint}"))
    console.print(
        f"job {report.job_id}: {report.enqueued} images enqueued in {report.messages} messages "
        f"({report.skipped} unchanged skipped, {report.found} found) in {report.seconds:.1f} s"
    )
    if report.enqueued == 0 and report.skipped:
        console.print(
            f"[yellow]hint:[/] all {report.skipped} files are unchanged since an earlier job queued or decoded them "
            "(captcha-queue results shows those); --force sends them again"
        )
    typer.echo(report.job_id)
    if wait:
        try:
            waited = wait_for_job(report.job_id, progress=True, on_stall=lambda seconds: console.print(
                f"[yellow]hint:[/] no image of job {report.job_id} finished in {seconds:.0f} s. Is a worker consuming "
                f"the '{queue}' queue (captcha-queue worker --queues {queue}), with the same CAPTCHA_DATABASE_URL "
                f"({mask_url(database_url())})? Ctrl-C stops waiting; the job goes on."
            ))  # fmt: skip
        except KeyboardInterrupt:
            console.print(f"stopped waiting; job {report.job_id} goes on (captcha-queue status {report.job_id})")
            raise typer.Exit(130) from None
        console.print(
            f"job {report.job_id}: {waited.done} done, {waited.failed} failed of {waited.total}; "
            f"{waited.images_per_s:.1f} images/s"
        )


@app.command()
def requeue(
    job: Optional[str] = typer.Argument(None, help="Job id or name (the latest job of that name; default: every job)."),
    queue: str = typer.Option("decode", help="Broker queue to send to."),
) -> None:
    """Send the images still pending again (after queued messages were lost); prints how many were sent."""
    from producer.enqueue import EnqueueError
    from producer.requeue import requeue_pending

    session, url = _open_database(None)
    with session:
        job_id = _require_job(session, url, job)
    try:
        sent = requeue_pending(job_id, queue=queue)
    except EnqueueError as exc:
        raise _fail(str(exc)) from None
    if sent == 0:
        typer.echo(f"no pending images{f' in job {job}' if job is not None else ''}: nothing to send", err=True)
    typer.echo(sent)


@app.command()
def worker(
    queues: str = typer.Option("decode", help="Comma-separated queues to consume."),
    concurrency: int = typer.Option(1, min=1, help="Worker processes (CPU). A CUDA worker runs exactly one."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N (default: CAPTCHA_DEVICE)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images per inference batch (default: CAPTCHA_BATCH_SIZE)."),
    pool: str = typer.Option("auto", help="auto (solo for one process, else prefork) | solo | prefork | threads."),
    loglevel: str = typer.Option("info", help="debug | info | warning | error."),
    hostname: Optional[str] = typer.Option(None, help="Celery node name (default: decode-<pid>@<host>)."),
) -> None:
    """Start a Celery worker that decodes images from the queue (the detector loads on the first message)."""
    from worker.main import WorkerConfigError, start_worker

    try:
        start_worker(queues, concurrency, device, batch_size, pool, loglevel, hostname)
    except WorkerConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("out/demo"), help="Scratch folder, emptied on every run (refused if it holds files the demo did not write)."
    ),
    count: int = typer.Option(200, min=1, help="Synthetic CAPTCHAs to decode."),
    seed: int = typer.Option(0, help="Seed of the synthetic images."),
    concurrency: int = typer.Option(1, min=1, help="Worker processes."),
    device: str = typer.Option("cpu", help="Device of the worker: cpu | auto | cuda:N."),
) -> None:
    """Run the whole pipeline locally: synthesise CAPTCHAs, start Redis if needed and a worker, decode, report."""
    from producer.demo import DemoError, run_demo
    from producer.local_redis import RedisUnavailable
    from worker.process import WorkerStartError

    try:
        with _sigterm_as_exit():  # SIGTERM stops the worker and a private Redis as Ctrl-C does
            report = run_demo(workdir, count=count, seed=seed, concurrency=concurrency, device=device)
    except (DemoError, RedisUnavailable, WorkerStartError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM made an exit above: all stopped by now
        typer.echo("demo stopped: its worker, its queue and any Redis it started are gone", err=True)
        raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else exc.code) from None
    if report.done == 0:
        raise _fail(f"no image was decoded (see the errors above and {workdir / 'worker.log'})")


# --------------------------------------------------------------------------------------------------------------
# retraining: the train task and model versions
# --------------------------------------------------------------------------------------------------------------

models_app = typer.Typer(help="Model versions: list, show, promote, roll back; cancel a queued training run.", invoke_without_command=True)
app.add_typer(models_app, name="models")


@app.command()
def retrain(
    images: Path = typer.Option(..., help="Folder of <text>-<n>.png training images (as the workers see it)."),
    labels: Path = typer.Option(..., help="Folder of YOLO label files, one <stem>.txt per image."),
    val_images: Optional[Path] = typer.Option(None, help="Validation images (default: a seeded 5% hold-out)."),
    val_labels: Optional[Path] = typer.Option(None, help="Validation labels."),
    from_version: Optional[int] = typer.Option(
        None, "--from", parser=_version_number, metavar="VERSION", help="Start from this version, e.g. v3 (default: the champion)."
    ),
    scratch: bool = typer.Option(False, "--scratch", help="Start from random weights (--arch, --model-config)."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(2e-3, help="Peak learning rate."),
    seed: int = typer.Option(0),
    arch: str = typer.Option("fast", help="Network for --scratch: fast | seed."),
    model_config: str = typer.Option("{}", help="JSON object of network settings for --scratch."),
    device: Optional[str] = typer.Option(
        None, help="auto | cpu | cuda | cuda:N (default: the training worker's --device / CAPTCHA_DEVICE)."
    ),
    force: bool = typer.Option(False, "--force", help="Promote even if the champion is more accurate."),
    augment: bool = typer.Option(False, help="Randomly recolour, stretch, pad and cross out training images."),
    ema_decay: Optional[float] = typer.Option(None, help="Validate and publish a moving average of the weights."),
    train_parts: str = typer.Option("all", help="all | reader: train only the glyph reader and context head."),
    queue: str = typer.Option("train", help="Broker queue (train workers consume it with --queues train)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run until it finishes; exit 1 if it fails."),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
) -> None:
    """Send a retraining task to the train queue; prints its task id (progress: `captcha-queue models`)."""
    import json
    import uuid

    from core.celery_app import TRAIN_TASK, app as celery_app
    from core.registry import RegistryError, get_version
    from core.retrain import RetrainError, RetrainRequest, check_request, create_run
    from db.session import SchemaError, prepare_schema, session_factory

    try:
        network = json.loads(model_config)
    except ValueError as exc:
        raise _fail(f"--model-config: {exc}", code=2) from None
    if (val_images is None) != (val_labels is None):
        raise _fail("give both --val-images and --val-labels, or neither (validation is then held out)", code=2)
    try:
        request = RetrainRequest.from_json({
            "images": str(images.resolve()), "labels": str(labels.resolve()),
            "val_images": str(val_images.resolve()) if val_images else None,
            "val_labels": str(val_labels.resolve()) if val_labels else None,
            "from_version": from_version, "scratch": scratch, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "seed": seed, "arch": arch, "model_config": network, "device": device, "force": force,
            "augment": augment, "ema_decay": ema_decay, "train_parts": train_parts,
        })  # fmt: skip
    except (ValueError, RetrainError) as exc:
        raise _fail(str(exc), code=2) from None
    for folder in (images, labels, val_images, val_labels):
        if folder is not None and not folder.is_dir():
            raise _fail(f"not a folder: {folder}", code=2)
    task_id = str(uuid.uuid4())
    try:
        check_request(task_id, request)  # the workers check again, against their own CAPTCHA_ALLOWED_ROOTS
    except RetrainError as exc:
        raise _fail(str(exc), code=2) from None
    try:
        prepare_schema(database_url)
    except SchemaError as exc:
        raise _fail(str(exc)) from None
    sessions = session_factory(database_url)
    if from_version is not None:
        with sessions() as session:
            try:
                get_version(session, from_version)
            except RegistryError as exc:
                raise _fail(str(exc)) from None
    # SIGTERM is an exception from before the run is committed until its message is out: no moment leaves it queued
    with _sigterm_as_exit():
        try:
            with sessions() as session, session.begin():
                create_run(session, task_id, request)
            celery_app.send_task(TRAIN_TASK, kwargs={"request": request.as_json()}, task_id=task_id, queue=queue)
        except Exception as exc:  # the broker is unreachable: the run will never start
            _finish_unsent_run(sessions, task_id, f"not sent: {exc}")
            raise _fail(f"cannot send the training task: {exc}") from None
        except BaseException:  # Ctrl-C or SIGTERM while sending (a hung broker retries for up to a minute)
            _finish_unsent_run(sessions, task_id, "not sent: interrupted")
            raise
    typer.echo(task_id)
    if wait:
        _follow_run(sessions, task_id, queue=queue)


def _finish_unsent_run(sessions, task_id: str, reason: str) -> None:
    """Fail a run whose message did not go out, unless a worker already claimed it (the message went out after all;
    a failed run is never claimed, so one that arrives later does not train)."""
    import sqlalchemy as sa

    from db.models import TrainingRun, utcnow

    with sessions() as session, session.begin():
        session.execute(sa.update(TrainingRun).where(TrainingRun.task_id == task_id, TrainingRun.status == "queued")
                        .values(status="failed", error=reason, finished_at=utcnow()))  # fmt: skip


def _follow_run(sessions, task_id: str, poll: float = 1.0, queued_hint_s: float = 60.0, queue: str = "train",
                stale_hint_s: float = 1800.0) -> None:
    """Print each epoch of a run as it completes and its outcome; exit 1 when it fails, 130 on Ctrl-C (the run goes
    on). A run still queued after ``queued_hint_s``, or running without news for ``stale_hint_s``, gets a hint."""
    try:
        _follow_run_loop(sessions, task_id, poll, queued_hint_s, stale_hint_s, queue)
    except KeyboardInterrupt:
        typer.echo(f"stopped waiting; run {task_id[:8]} goes on (captcha-queue models)", err=True)
        raise typer.Exit(130) from None


def _follow_run_loop(
    sessions, task_id: str, poll: float, queued_hint_s: float, stale_hint_s: float, queue: str = "train"
) -> None:
    import time

    from db.models import TrainingRun, utcnow

    shown, status, started, hinted = 0, "", time.monotonic(), set()
    while True:
        with sessions() as session:
            run = session.query(TrainingRun).filter_by(task_id=task_id).one()
        if run.status == "queued" and "queued" not in hinted and time.monotonic() - started > queued_hint_s:
            hinted.add("queued")
            typer.echo(
                f"run {task_id[:8]} still queued after {queued_hint_s:.0f} s: is a worker consuming the '{queue}' "
                f"queue (captcha-queue worker --queues {queue}), with the same CAPTCHA_DATABASE_URL as this command? "
                f"(captcha-queue models cancel {task_id[:8]} withdraws it)",
                err=True,
            )
        quiet = (utcnow() - run.updated_at).total_seconds() if run.updated_at else 0.0
        if run.status == "running" and "stale" not in hinted and quiet > stale_hint_s:
            hinted.add("stale")
            typer.echo(
                f"run {task_id[:8]}: no news for {quiet / 60:.0f} min; if its worker died, the run stays 'running' "
                "(see captcha-queue models) and can be sent again",
                err=True,
            )
        if run.status != status:
            status = run.status
            typer.echo(f"run {task_id[:8]}: {status}" + (f" on {run.worker}" if run.worker else ""), err=True)
        if run.epoch > shown and run.status == "running":
            shown = run.epoch
            typer.echo(f"epoch {run.epoch}/{run.epochs}: {_progress_text(run.progress)}", err=True)
        if run.status == "succeeded":
            reason = run.progress.get("promotion", "")
            typer.echo(
                f"published v{run.version} after {run.epoch}/{run.epochs} epochs (best epoch: "
                f"{_progress_text(run.progress)}); {reason}",
                err=True,
            )
            return
        if run.status == "failed":
            raise _fail(f"training failed: {run.error}")
        time.sleep(poll)


def _progress_text(progress: dict) -> str:
    parts = [f"{k} {progress[k]:.4f}" for k in LOSS_NAMES if k in progress]
    if progress.get("val_sequence_accuracy") is not None:
        parts.append(f"val seq {progress['val_sequence_accuracy']:.4f}")
    return ", ".join(parts) or "-"


def _models_session(database_url: Optional[str]):
    import sqlalchemy as sa

    session, url = _open_database(database_url)
    if not sa.inspect(session.get_bind()).has_table("training_runs"):
        session.close()
        raise _fail("the database schema predates retraining; run `captcha-queue db upgrade`")
    return session


def _accuracy(value) -> str:
    return "-" if value is None else f"{value:.4f}"


@models_app.callback()
def models_callback(
    ctx: typer.Context, database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP)
) -> None:
    """Without a subcommand: the same as `models list`."""
    if ctx.invoked_subcommand is None:
        models_list(database_url=database_url, runs=5)


@models_app.command("list")
def models_list(
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
    runs: int = typer.Option(5, min=0, help="Latest training runs shown."),
) -> None:
    """Model versions (newest first) and the latest training runs with their progress."""
    import sqlalchemy as sa
    from rich.table import Table

    from core.registry import list_versions
    from db.models import TrainingRun, utcnow

    with _models_session(database_url) as session:
        versions = list_versions(session)
        latest = session.scalars(sa.select(TrainingRun).order_by(TrainingRun.id.desc()).limit(runs)).all()
    console = _stdout()
    table = Table("version", "status", "arch", "parent", "val seq acc", "baseline", "created (UTC)", "promoted (UTC)",
                  "sha256", title="model versions")  # fmt: skip
    for v in versions:
        table.add_row(
            _cell(v.version), v.status, _cell(v.arch), f"v{v.parent}" if v.parent else "-",
            _accuracy(v.metrics.get("val_sequence_accuracy")),
            _accuracy((v.metrics.get("baseline") or {}).get("val_sequence_accuracy")),
            f"{v.created_at:%Y-%m-%d %H:%M:%S}", f"{v.promoted_at:%Y-%m-%d %H:%M:%S}" if v.promoted_at else "-",
            v.sha256[:12],
        )  # fmt: skip
    console.print(table if versions else "no model versions yet: workers serve the configured checkpoint")
    if latest:
        now = utcnow()
        runs_table = Table("task", "status", "epoch", "progress", "version", "updated", "worker", title="training runs")
        for r in latest:
            updated = r.updated_at or r.created_at
            detail = _cell((r.error or "")[:80] if r.status == "failed" else _progress_text(r.progress))
            produced = f"v{r.version}" + (" (promoted)" if r.promoted else "") if r.version else "-"
            runs_table.add_row(
                r.task_id[:8], r.status, f"{r.epoch}/{r.epochs}", detail, produced,
                f"{(now - updated).total_seconds():.0f} s ago", _cell(r.worker or "-"),
            )  # fmt: skip
        console.print(runs_table)


@models_app.command("show")
def models_show(
    version: int = typer.Argument(..., parser=_version_number, help="Version, e.g. v3."),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
) -> None:
    """One version as JSON: its row, metrics, data summary and whether its file still matches its sha256."""
    import json

    from core.checkpoint import CheckpointError
    from core.registry import RegistryError, get_version, verify

    with _models_session(database_url) as session:
        try:
            row = get_version(session, version)
        except RegistryError as exc:
            raise _fail(str(exc)) from None
    try:
        verify(row)
        file_check = "ok"
    except CheckpointError as exc:
        file_check = str(exc)
    doc = {
        "version": row.version, "number": row.number, "status": row.status, "arch": row.arch, "parent": row.parent,
        "path": row.path, "sha256": row.sha256, "metadata_sha256": row.metadata_sha256, "file": file_check,
        "created_at": row.created_at.isoformat(),
        "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None, "task_id": row.task_id,
        "metrics": row.metrics, "data_summary": row.data_summary,
    }  # fmt: skip
    typer.echo(json.dumps(doc, indent=2, default=str))


@models_app.command("promote")
def models_promote(
    version: int = typer.Argument(..., parser=_version_number, help="Version to make champion, e.g. v3."),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
) -> None:
    """Make a version the champion (its file is checked first); workers switch to it within seconds."""
    from sqlalchemy.exc import IntegrityError

    from core.checkpoint import CheckpointError
    from core.registry import ChampionRace, RegistryError, champion, promote

    with _models_session(database_url) as session:
        before = champion(session)
        previous = before.version if before else "the configured checkpoint"
        try:
            row = promote(session, version)
            session.commit()
        except (RegistryError, CheckpointError) as exc:
            raise _fail(str(exc)) from None
        except IntegrityError:
            raise _fail(str(ChampionRace())) from None
        typer.echo(f"{row.version} is the champion (was {previous})")


@models_app.command("rollback")
def models_rollback(database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP)) -> None:
    """Retire the champion and restore the version that was champion before it."""
    from sqlalchemy.exc import IntegrityError

    from core.checkpoint import CheckpointError
    from core.registry import ChampionRace, RegistryError, rollback

    with _models_session(database_url) as session:
        try:
            retired, restored = rollback(session)
            session.commit()
        except (RegistryError, CheckpointError) as exc:
            raise _fail(str(exc)) from None
        except IntegrityError:
            raise _fail(str(ChampionRace())) from None
        now = restored.version if restored else "no champion: workers serve the configured checkpoint"
        typer.echo(f"{retired.version} retired; champion: {now}")


@models_app.command("cancel")
def models_cancel(
    task: str = typer.Argument(..., help="Task id of a queued run, or its first characters as `models` shows them."),
    database_url: Optional[str] = typer.Option(None, help=DATABASE_URL_HELP),
) -> None:
    """Cancel a training run that no worker has taken yet (sent to a queue nobody reads, say)."""
    from core.retrain import RetrainError, cancel_run

    with _models_session(database_url) as session:
        try:
            run = cancel_run(session, task)
            session.commit()
        except RetrainError as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"run {run.task_id[:8]} cancelled")


def _user_error(exc: Exception) -> str | None:
    """A one-line message for an error that a user's input or setup caused (a setting, a database URL, a path), or
    None for anything else, which keeps its traceback."""
    import pydantic
    import sqlalchemy as sa

    if isinstance(exc, pydantic.ValidationError):
        problems = [f"CAPTCHA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        return "invalid setting " + "; ".join(problems)
    if isinstance(exc, sa.exc.NoSuchModuleError):
        return f"unsupported database URL ({exc}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    if isinstance(exc, sa.exc.ArgumentError):
        return f"not a database URL: {exc}"
    if isinstance(exc, sa.exc.OperationalError):  # a database out of reach or read-only; other errors are bugs
        reason = str(exc.orig or exc).strip().splitlines()[0]
        if reason.startswith(_UNREACHABLE):
            return f"cannot use the database: {reason}"
    if isinstance(exc, ModuleNotFoundError) and exc.name in _DB_DRIVERS:
        return f"no driver for this database URL ({exc}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    if isinstance(exc, OSError) and exc.filename is not None:
        return str(exc)
    return None


# how PostgreSQL (psycopg) and SQLite say that the database itself is out of reach or cannot take writes
_UNREACHABLE = ("connection failed", "connection to server", "could not connect", "unable to open database file",
                "attempt to write a readonly database", "database is locked")
_DB_DRIVERS = {"MySQLdb", "pymysql", "mysql", "psycopg2", "asyncpg", "pg8000", "pyodbc", "cx_Oracle", "oracledb"}


def main() -> None:
    """The ``captcha-queue`` entry point: errors of the user's input or setup are one line, not a traceback
    (``CAPTCHA_DEBUG=1`` shows the traceback all the same)."""
    import os

    from core.config import mask_urls_in, unknown_variables

    for name, meant in unknown_variables(os.environ):
        hint = f"; did you mean {meant}?" if meant else " (the README's Configuration lists the settings)"
        typer.echo(f"warning: {name} is not a setting and is ignored{hint}", err=True)
    try:
        app()
    except Exception as exc:
        message = _user_error(exc)
        if message is None or os.environ.get("CAPTCHA_DEBUG"):
            raise
        typer.echo(f"error: {mask_urls_in(message)}", err=True)  # a driver's message may quote the URL whole
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
