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


# --------------------------------------------------------------------------------------------------------------
# queue: database, producer, worker, queries
# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
