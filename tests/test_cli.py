"""The command line's handling of mistakes in the user's setup: one readable line and status 1, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args: str, cwd, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **env})  # fmt: skip


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["status"], {"CAPTCHA_MAX_IMAGE_WIDTH": "abc"}, "invalid setting CAPTCHA_MAX_IMAGE_WIDTH: Input should be"),
        (["status"], {"CAPTCHA_PRECISION": "fp16"}, "invalid setting CAPTCHA_PRECISION"),
        (["enqueue", "."], {"CAPTCHA_DATABASE_URL": "postgres://127.0.0.1/test"}, "unsupported database URL"),
        (["enqueue", "."], {"CAPTCHA_DATABASE_URL": "mysql://x@127.0.0.1/x"}, "no driver for this database URL"),
        (["enqueue", "."], {"CAPTCHA_DATABASE_URL": "notaurl"}, "not a database URL"),
        (
            ["enqueue", "."],
            {"CAPTCHA_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/x"},
            "cannot use the database: connection failed",
        ),
        (["synth", "/proc/no-such-folder", "--count", "1"], {}, "No such file or directory: '/proc/no-such-folder'"),
    ],
)
def test_setup_mistakes_are_one_line(tmp_path, args, env, expected):
    out = run(*args, cwd=tmp_path, **env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: ") and expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = run("status", cwd=tmp_path, CAPTCHA_PRECISION="fp16", CAPTCHA_DEBUG="1")
    assert out.returncode == 1 and "Traceback" in out.stderr and "ValidationError" in out.stderr
