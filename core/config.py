"""Configuration, read from the environment (prefix ``CAPTCHA_``) and an optional ``.env`` file.

Every setting has a documented default so a fresh checkout runs with no configuration at all:
SQLite in the working directory, Redis on localhost, the checkpoint shipped in the package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


BROKER_SCHEMES = ("redis", "rediss", "redis+socket")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # the devices a setting or an option may name


def is_device_name(name: object) -> bool:
    """Whether ``name`` is a device a setting or an option may name (``DEVICE_PATTERN``, the whole string)."""
    return isinstance(name, str) and re.fullmatch(DEVICE_PATTERN, name) is not None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPTCHA_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///captcha-queue.db",
        description="SQLAlchemy URL; sqlite:///FILE (default) or postgresql+psycopg://user:pw@host/db",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker, a redis:// URL")
    checkpoint: Path | None = Field(
        None, description="Checkpoint (.safetensors, with its .json beside it); default: the shipped one"
    )
    checkpoint_dir: Path = Field(Path("checkpoints"), description="Versioned checkpoint store for retraining")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Inference precision: bf16 autocast where the hardware has it natively (auto), or fixed"
    )
    batch_size: int = Field(32, ge=1, description="Images per inference batch in a worker")
    paths_per_message: int = Field(64, ge=1, le=10_000, description="Image paths carried by one broker message")
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories images may be read from (JSON list or comma-separated); empty = anywhere",
    )
    max_image_pixels: int = Field(4_000_000, ge=1, description="Images with more pixels are refused")
    max_image_width: int = Field(4096, ge=1, description="Images wider than this are refused")
    torch_threads: int | None = Field(None, description="Intra-op threads per worker process (default: cores/processes)")
    visibility_timeout: int = Field(
        3600, ge=1, description="Seconds before Redis hands an unacknowledged message to another worker"
    )

    @field_validator("broker_url")
    @classmethod
    def _redis_broker(cls, value: str) -> str:
        """Only Redis: the visibility timeout, the queue lengths that ``status`` reads and ``demo`` are Redis's."""
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in BROKER_SCHEMES:
            raise ValueError(f"the broker must be Redis ({', '.join(s + '://' for s in BROKER_SCHEMES)}...)")
        return value

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        """Accept a JSON list or a comma-separated string of directories."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


# variables that are not settings: read by the program (DEBUG) or by docker-compose.yml (DATA, the image folder)
NOT_SETTINGS = ("CAPTCHA_DEBUG", "CAPTCHA_DATA")
NOT_SETTINGS_PREFIXES = ("CAPTCHA_TEST_",)  # the test suite's own


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``CAPTCHA_*`` variables in ``environ`` that name no setting, each with the setting it most likely meant (or
    None): a mistyped one (``CAPTCHA_BROKER``) is otherwise ignored, and the default quietly used in its place."""
    import difflib

    known = [f"CAPTCHA_{name.upper()}" for name in Settings.model_fields]
    found = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches the names case-insensitively
        if not upper.startswith("CAPTCHA_") or upper in known or upper in NOT_SETTINGS or upper.startswith(
            NOT_SETTINGS_PREFIXES
        ):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        found.append((name, close[0] if close else None))
    return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` after changing the environment)."""
    return Settings()


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and CLI output): the one in its user part, also
    where it holds characters that a URL parser would take for the start of a path, a query or a fragment (``#``,
    ``/``, ``?``), and ``password=``-like query parameters. A list of URLs joined by ``;`` (a broker failover list)
    is masked URL by URL."""
    if ";" in url and url.count("://") > 1:
        return ";".join(mask_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if sep:
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        at = authority.rfind("@")
        if at < 0 and not rest.startswith("["):  # perhaps a password holding / ? or #: the last @ of it all
            at = rest.rfind("@")
        userinfo = rest[:at] if at >= 0 else ""
        if ":" in userinfo:
            rest = f"{userinfo[: userinfo.index(':')]}:***@{rest[at + 1:]}"
        url = f"{scheme}{sep}{rest}"
    else:  # not a URL, perhaps one with a typo ("postgresql//user:pw@host"): still no password shown
        url = _USER_PASSWORD.sub(r"\1:***@", url)
    return _PASSWORD_PARAMETER.sub(r"\1***", url)


_PASSWORD_PARAMETER = re.compile(r"(?i)(?<![a-z])((?:ssl)?(?:password|passwd|pwd)=)[^&#\s]*")
_USER_PASSWORD = re.compile(r"(//[^\s/:@]*):[^\s@]+@")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def mask_urls_in(text: str) -> str:
    """``text`` with every URL in it passed through ``mask_url`` (for error messages that quote a URL)."""
    masked = _USER_PASSWORD.sub(r"\1:***@", _URL.sub(lambda match: mask_url(match.group(0)), text))
    return _PASSWORD_PARAMETER.sub(r"\1***", masked)  # a libpq-style "password=..." too
