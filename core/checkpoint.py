"""Checkpoints: safetensors weights plus a JSON metadata file beside them, and resumable training state.

A checkpoint ``PATH`` (``.safetensors``) always comes with ``PATH.with_suffix(".json")`` holding the format version,
the architecture and its ``model_config`` (``build_model(**model_config)`` rebuilds the network), the charset, the
metrics, the training configuration, a summary of the training data, the creation time and the sha256 of the weights
file. Nothing here unpickles: weights are read with ``safetensors`` and everything else is JSON.

Files are published atomically (temporary file in the same folder, flush, fsync, ``os.replace``); the JSON is
written after the weights, so a reader that finds the JSON also finds the weights it describes.

Training state (the last epoch's weights, optimizer tensors, RNG state) lives in a second pair of files,
``PATH.state.safetensors`` + ``PATH.state.json``, so ``train --resume`` continues where a run stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.charset import CHARS
from core.signals import held_signals

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT_VERSION = 1
STATE_FORMAT_VERSION = 1
# how long load_checkpoint reads a mismatched pair again (a writer between replacing the weights and the metadata)
PAIR_WAIT_S = 1.0


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match this code (missing, corrupt, wrong charset, ...)."""


def default_checkpoint_path() -> Path:
    """The checkpoint shipped with the package: ``core/default_checkpoint/fast.safetensors``."""
    return Path(__file__).resolve().parent / "default_checkpoint" / "fast.safetensors"


def metadata_path(path: str | os.PathLike) -> Path:
    """The JSON file that describes the weights at ``path``."""
    return Path(path).with_suffix(".json")


def check_weights_path(path: str | os.PathLike) -> None:
    """Refuse (``CheckpointError``) a weights path whose JSON would be the same file (a name ending in ``.json``)."""
    if metadata_path(path) == Path(path):
        raise CheckpointError(f"{path}: a checkpoint's weights cannot end in .json (that is where its metadata goes); "
                              "use .safetensors")


def state_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The training-state files (tensors, JSON) kept beside the checkpoint at ``path``."""
    p = Path(path)
    stem = p.with_suffix("")
    return stem.with_name(stem.name + ".state.safetensors"), stem.with_name(stem.name + ".state.json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``): setting it to
    read it would, for that moment, make files that another thread creates world-writable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # elsewhere: briefly stricter, never looser
    os.umask(umask)
    return umask


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsync, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; published files get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses tensors that share storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    _write_atomic(path, save(_tensors_for_file(tensors), metadata={"format": "pt"}))


def _tensors_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {exc}") from None


def _load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {exc}") from None


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) and its description to ``path.with_suffix('.json')``.

    ``model.config`` (JSON-able, with ``"arch"``) is stored as ``model_config``. ``metadata`` may carry
    ``metrics``, ``train_config``, ``data_summary``, ``version`` and any other JSON-able keys; they are stored as
    given. Returns ``path``.
    """
    path = Path(path)
    check_weights_path(path)
    config = dict(getattr(model, "config", None) or {})
    if "arch" not in config:
        raise CheckpointError("model.config must be a dict with an 'arch' key so the network can be rebuilt")
    with held_signals():  # the weights and their JSON: both, or the old pair
        _save_pair(path, model, metadata, config)
    return path


def _save_pair(path: Path, model: nn.Module, metadata: dict | None, config: dict[str, Any]) -> None:
    _save_tensors(path, model.state_dict())
    extra = dict(metadata or {})
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": config["arch"],
        "model_config": config,
        "charset": CHARS,
        "metrics": extra.pop("metrics", {}),
        "train_config": extra.pop("train_config", {}),
        "data_summary": extra.pop("data_summary", {}),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256_file(path),
    }
    if extra.get("version") is None:
        extra.pop("version", None)
    meta.update(extra)
    _write_atomic(metadata_path(path), _json_bytes(meta))


def read_metadata_bytes(path: str | os.PathLike) -> bytes:
    """The raw bytes of the JSON metadata of the checkpoint at ``path`` (``CheckpointError`` when unreadable)."""
    meta_file = metadata_path(path)
    try:
        return meta_file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata not found: {meta_file} (expected beside {Path(path).name})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_file}: {exc.strerror or exc}") from None


def read_metadata(path: str | os.PathLike, data: bytes | None = None) -> dict:
    """The JSON metadata of the checkpoint at ``path``, parsed from ``data`` when given (the file's bytes, already
    read), else read from the file. Raises ``CheckpointError`` when missing or invalid."""
    meta_file = metadata_path(path)
    try:
        meta = json.loads(read_metadata_bytes(path) if data is None else data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_file}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt checkpoint metadata {meta_file}: not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: unsupported checkpoint format_version {version!r} (expected {FORMAT_VERSION})")
    for key in ("arch", "model_config", "charset", "sha256"):
        if key not in meta:
            raise CheckpointError(f"{meta_file}: missing key {key!r}")
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify_sha256: bool = True
) -> tuple[nn.Module, dict]:
    """Rebuild the network described by ``path``'s JSON, load its weights (strict) and return ``(model, metadata)``.

    The model is on ``device`` and in eval mode. Raises ``CheckpointError`` for a missing or corrupt file, a charset
    other than ``0-9a-z``, weights whose sha256 differs from the metadata (when ``verify_sha256``), or weights that
    do not fit the architecture.
    """
    from core.models import build_model

    path = Path(path)
    if metadata_path(path) == path:
        raise CheckpointError(f"{path} is a checkpoint's description; give its weights, "
                              f"{path.with_suffix('.safetensors')}")  # fmt: skip
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    # a writer replacing the pair (``save_checkpoint``: the weights, then their metadata) may be between the two:
    # a mismatch is read again for up to PAIR_WAIT_S before it counts
    deadline = time.monotonic() + PAIR_WAIT_S
    while True:
        meta = read_metadata(path)
        if meta["charset"] != CHARS:
            raise CheckpointError(f"{path}: trained for charset {meta['charset']!r}, this code reads {CHARS!r}")
        try:
            data = path.read_bytes()  # hashed and loaded from the same bytes, whatever replaces the file meanwhile
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        if not verify_sha256:
            break
        actual = hashlib.sha256(data).hexdigest()
        if actual == meta["sha256"]:
            break
        if time.monotonic() >= deadline:
            raise CheckpointError(
                f"{path}: sha256 mismatch (file {actual[:12]}..., metadata {str(meta['sha256'])[:12]}...); "
                "the weights were modified or belong to another checkpoint"
            )
        time.sleep(0.02)
    state = _tensors_from_bytes(data, path)
    try:
        model = build_model(**meta["model_config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot build model from model_config {meta['model_config']}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(
            f"{path}: weights do not match the {meta['arch']!r} architecture built from its model_config "
            f"({_state_mismatch(model.state_dict(), state)}); was the network changed since it was trained?"
        ) from None
    return model.to(device).eval(), meta


# model_config keys that change only how a trained network decodes, never its weights: ``reconfigure_checkpoint`` may
# set them on a checkpoint without training
DECODE_SETTINGS = frozenset({
    "reader_views", "reader_view_gate", "score_thresh", "nms_thresh", "cross_class_nms_thresh", "containment_thresh",
    "detections_per_img", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_source",
    "both_gate",
})


def reconfigure_checkpoint(path: str | os.PathLike, out: str | os.PathLike, changes: dict[str, Any]) -> Path:
    """Write the checkpoint ``path`` to ``out`` with decode settings changed (``changes``, keys from
    ``DECODE_SETTINGS``, e.g. ``{"reader_views": [0, 7, -7]}``): the same weights, its other metadata kept, plus
    ``reconfigured_from`` (the source, its sha256 and the changes). The network is rebuilt from the new model_config
    and loaded strictly, so a change that does not fit the weights is refused. Returns ``out``."""
    unknown = sorted(set(changes) - DECODE_SETTINGS)
    if unknown:
        raise CheckpointError(
            f"only decode settings can change without training ({', '.join(sorted(DECODE_SETTINGS))}); "
            f"not {', '.join(unknown)}"
        )
    for key, value in changes.items():
        problem = _decode_setting_problem(key, value)
        if problem:
            raise CheckpointError(f"{key} {value!r}: {problem}")
    from core.models import build_model

    model, meta = load_checkpoint(path)
    config = {**meta["model_config"], **changes}
    try:
        rebuilt = build_model(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build the network with {changes}: {exc}") from None
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    kept = {k: v for k, v in meta.items() if k not in ("format_version", "arch", "model_config", "charset",
                                                       "created_at", "sha256", "reconfigured_from")}
    kept["reconfigured_from"] = {"path": str(path), "sha256": meta["sha256"], "changes": changes}
    return save_checkpoint(rebuilt, out, kept)


_FRACTIONS = {"score_thresh", "nms_thresh", "cross_class_nms_thresh", "containment_thresh"}  # in [0, 1]
_GATES = {"reader_view_gate", "both_gate"}  # in (0, 1]
_COUNTS = {"detections_per_img", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"}  # whole numbers >= 1
_OPTIONAL = {"cross_class_nms_thresh", "containment_thresh"}  # None turns the step off


def _decode_setting_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be decode setting ``key`` (a type or a range), or None; the network checks the rest."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if value is None:
        return None if key in _OPTIONAL else "needs a value"
    if key in _FRACTIONS and not (number(value) and 0.0 <= value <= 1.0):
        return "expected a number from 0 to 1" + (" (or null: off)" if key in _OPTIONAL else "")
    if key in _GATES and not (number(value) and 0.0 < value <= 1.0):
        return "expected a number above 0, at most 1"
    if key in _COUNTS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return "expected a whole number of at least 1"
    if key == "reader_views" and not (isinstance(value, list) and all(number(v) for v in value)):
        return "expected a list of angles in degrees, e.g. [0, 7, -7]"
    if key == "box_source" and not isinstance(value, str):
        return "expected detector, colour or both"
    return None


MAX_VERSION_LENGTH = 64  # the version columns of the database (results, images, worker events)
MAX_GIVEN_VERSION_LENGTH = MAX_VERSION_LENGTH - len("+decode:12345678")  # room for a reconfigured copy's suffix


def checkpoint_version(meta: dict, path: str | os.PathLike | None = None) -> str:
    """The version results are recorded under: the metadata's ``version`` if it has one (set by the training task),
    else ``sha256:`` and the first 12 hex digits of the weights' sha256 (of the file at ``path`` where the metadata
    lacks it). A checkpoint written by ``reconfigure_checkpoint`` holds the same weights as its source but reads
    differently, so its version adds ``+decode:`` and 8 hex digits of its decode settings. A version longer than the
    database holds (64 characters, a hand-written one) is cut to its first 47 and ``~`` and 16 hex digits of it."""
    version = meta.get("version")
    if not version:
        digest = meta.get("sha256") or (sha256_file(path) if path is not None else None)
        if not digest:
            raise CheckpointError("checkpoint metadata has neither a version nor a sha256")
        version = "sha256:" + digest[:12]
    if "reconfigured_from" in meta:
        config = meta.get("model_config", {})
        decode = {k: config[k] for k in sorted(DECODE_SETTINGS) if k in config}
        version += "+decode:" + hashlib.sha256(json.dumps(decode, sort_keys=True).encode()).hexdigest()[:8]
    version = str(version)
    if len(version) > MAX_VERSION_LENGTH:  # the database's columns hold 64: the start and a digest of the whole
        version = version[: MAX_VERSION_LENGTH - 17] + "~" + hashlib.sha256(version.encode()).hexdigest()[:16]
    return version


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``state`` into ``model`` (same name, same shape) and return the names of ``model``'s
    tensors that ``state`` lacks, which keep their fresh initialisation: a network grown by a new part (say, a
    context head) starts from a checkpoint of the smaller one. Raises ``CheckpointError`` when a tensor of ``state``
    has no place in ``model`` or a different shape."""
    own = model.state_dict()
    clash = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if clash:
        raise CheckpointError(f"weights do not fit the network: {_state_mismatch(own, state)}")
    model.load_state_dict(state, strict=False)
    return sorted(k for k in own if k not in state)


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """A short account of how two state dicts differ (key counts and a few names)."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    parts = [f"{len(missing)} missing: {some(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected: {some(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} of another shape: {some(shapes)}"] if shapes else []
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# training state (resume)
# ----------------------------------------------------------------------------------------------------------------


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors (``optim.<param>.<name>``) and JSON-able rest."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, entry in info["scalars"].items():
        state.setdefault(int(param_id), {}).update(entry)
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(info["param_groups"]):
        raise CheckpointError("training state has a different number of optimizer parameter groups")
    groups = []
    for saved, now in zip(info["param_groups"], current):
        # JSON turns tuples (e.g. AdamW betas) into lists: restore the types the optimizer uses
        groups.append({k: (tuple(v) if isinstance(now.get(k), tuple) else v) for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    average: nn.Module | None = None,
) -> tuple[Path, Path]:
    """Save what ``train --resume`` needs beside checkpoint ``path``: the model's current weights, the optimizer
    tensors and hyperparameters, torch's (CPU, and each GPU's once CUDA is in use) and Python's RNG state, ``state``
    (epoch, step, history: JSON-able) and, when given, the moving average of the weights (``average``, a
    ``torch.optim.swa_utils.AveragedModel``). Returns the two files written.
    """
    import torch

    tensor_file, json_file = state_paths(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"average.{k}": v for k, v in average.state_dict().items()})
    optim_tensors, optim_info = _optimizer_to_files(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # training on a GPU draws from its generators too
        tensors.update({f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    py_version, py_state, py_gauss = random.getstate()
    with held_signals():  # the weights and their JSON: both, or the old pair
        _save_tensors(tensor_file, tensors)
        doc = {
            "format_version": STATE_FORMAT_VERSION,
            "model_config": dict(getattr(model, "config", {})),
            "optimizer": optim_info,
            "python_random": [py_version, list(py_state), py_gauss],
            "sha256": sha256_file(tensor_file),
            "state": state,
        }
        _write_atomic(json_file, _json_bytes(doc))
    return tensor_file, json_file


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    average: nn.Module | None = None,
) -> dict:
    """Restore model weights, optimizer and RNG state (and the weights' moving average into ``average``) saved by
    ``save_training_state``; return its ``state`` dict."""
    import torch

    tensor_file, json_file = state_paths(path)
    try:
        doc = json.loads(json_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no training state to resume from: {json_file} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt training state {json_file}: {exc}") from None
    if doc.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{json_file}: unsupported training-state format_version {doc.get('format_version')!r}")
    if doc.get("model_config") != dict(getattr(model, "config", {})):
        raise CheckpointError(
            f"{json_file}: saved for model_config {doc.get('model_config')}, not {getattr(model, 'config', None)}"
        )
    if sha256_file(tensor_file) != doc.get("sha256"):
        raise CheckpointError(f"{tensor_file}: sha256 mismatch with {json_file.name}")
    tensors = _load_tensors(tensor_file)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{tensor_file}: weights do not match the model: {exc}") from None
    if average is not None:
        average_state = {k[len("average.") :]: v for k, v in tensors.items() if k.startswith("average.")}
        if not average_state:
            raise CheckpointError(f"{tensor_file}: the run kept no moving average of its weights to resume")
        try:
            average.load_state_dict(average_state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{tensor_file}: moving average does not match the model: {exc}") from None
    _optimizer_from_files(optimizer, tensors, doc["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)
    py_version, py_state, py_gauss = doc["python_random"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    return doc["state"]
