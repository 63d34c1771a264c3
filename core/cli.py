"""The ``captcha-queue`` command line.

Each subcommand is a thin wrapper: it parses options and calls a plain function in the module named after the
concept (``core.synth``, ``core.train``, ``producer.enqueue``, ...). Heavy modules (torch, celery) are imported
inside the command bodies so that ``captcha-queue --help`` and the producer start in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="captcha-queue",
    help="Read text CAPTCHAs at scale: enqueue image folders, decode them on Celery workers, query the results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# --------------------------------------------------------------------------------------------------------------
# core: data, training, evaluation
# --------------------------------------------------------------------------------------------------------------


@app.command("synth")
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write images/ and labels/ into (created if missing)."),
    count: int = typer.Option(10_000, "--count", "-n", min=0, help="Number of CAPTCHAs to write."),
    seed: int = typer.Option(0, "--seed", "-s", help="Same seed, same files (byte for byte)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="Processes (default: CPU cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write synthetic CAPTCHAs with per-character YOLO boxes (images/<text>-<n>.png, labels/<text>-<n>.txt)."""
    import time

    from core.synth import generate

    start = time.perf_counter()
    written = generate(out_dir, count, seed=seed, workers=workers, progress=not quiet)
    elapsed = time.perf_counter() - start
    typer.echo(f"wrote {written} images to {out_dir} in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.0f} images/s)")


# --------------------------------------------------------------------------------------------------------------
# queue: database, producer, worker, queries
# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
