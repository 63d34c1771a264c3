"""The training loop behind ``captcha-queue train`` and the retraining task.

``train_model(cfg)`` trains a detector on a labelled folder (``core.formats.LabelledFolder``): batches of similar
widths (``WidthBucketSampler``), AdamW with linear warmup then cosine decay, gradient clipping. After every epoch it
validates (sequence and character accuracy, ``core.evaluate.score``), keeps the best checkpoint by validation
sequence accuracy at ``cfg.out`` and saves resumable training state beside it (``core.checkpoint.save_training_state``).
Progress goes to ``on_progress`` as plain dicts (``"event"``: ``start`` | ``step`` | ``epoch``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from core.augment import Augment, Augmented
from core.checkpoint import (
    MAX_GIVEN_VERSION_LENGTH,
    check_weights_path,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
    transfer_weights,
)
from core.detector import decode_arrays, resolve_device
from core.evaluate import score
from core.images import ImageError
from core.paths import resolve_roots
from core.precision import autocast, resolve_precision

log = logging.getLogger(__name__)

# what a run trains: "all" the network, or only the glyph "reader" and context head over a frozen detector
TRAIN_PARTS = ("all", "reader")


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoint's ``train_config``)."""

    images: Path
    labels: Path
    out: Path
    val_images: Path | None = None  # None: hold out val_fraction of the training set (at most val_max images)
    val_labels: Path | None = None
    arch: str = "fast"
    model_config: dict[str, Any] = field(default_factory=dict)  # extra build_model keyword arguments
    epochs: int = 10
    epoch_size: int | None = None  # training samples per epoch (default: the whole set)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200  # at most a tenth of all steps
    min_lr_ratio: float = 0.02  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 5.0
    device: str = "auto"
    num_workers: int = 1
    seed: int = 0
    resume: bool = False
    init_from: Path | None = None  # start from this checkpoint's weights (and architecture)
    val_fraction: float = 0.05
    val_max: int = 500
    val_batch_size: int = 32
    ema_decay: float | None = None  # validate and save an exponential moving average of the weights (e.g. 0.998)
    augment: bool = False  # random colours, widths, margins and lines on training samples (core.augment.Augment)
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 where native, see core.precision): training and validation
    version: str | None = None  # stored as the checkpoint's "version"
    train_parts: str = "all"  # all | reader: only the glyph reader and context head learn, the detector is frozen
    allowed_roots: list[str] = field(default_factory=list)  # when set, images and labels outside them are skipped

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (its data, schedule, length and seed;
        folders as absolute paths): anything else would silently train a different run (more epochs would stretch
        the cosine and raise the learning rate again). The device, precision and loader processes may change."""
        key = {}
        for name in RESUME_SETTINGS:
            value = getattr(self, name)
            key[name] = os.path.abspath(value) if name in PATH_SETTINGS and value is not None else value
        return key


PATH_SETTINGS = ("images", "labels", "val_images", "val_labels", "init_from")
RESUME_SETTINGS = PATH_SETTINGS + (
    "arch", "epochs", "epoch_size", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "seed",
    "val_fraction", "val_max", "ema_decay", "augment", "train_parts",
)


@dataclass
class TrainResult:
    checkpoint: Path  # the best checkpoint (by validation sequence accuracy)
    best_epoch: int
    metrics: dict[str, Any]  # the best epoch's record
    history: list[dict[str, Any]]  # one record per epoch: losses, validation accuracy, images/s, lr
    epochs_run: int  # epochs trained by this call (0 when a resumed run was already complete)


class WidthBucketSampler(Sampler[list[int]]):
    """Batches of similar widths: take the epoch's samples in random order, cut them into pools of ``pool`` batches,
    sort each pool by width, batch it, shuffle the batches.

    ``epoch_size`` (default: all samples) is the number of samples per epoch: epochs walk through an endless stream
    of reshuffled passes over the data, so a large set can be trained in short epochs. Deterministic for a given
    ``seed`` and ``set_epoch(epoch)`` (epochs count from 1).
    """

    def __init__(
        self,
        widths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        pool: int = 50,
        epoch_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.widths = list(widths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool = pool
        self.epoch_size = len(self.widths) if epoch_size is None else epoch_size
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pass(self, number: int) -> list[int]:
        """The order of pass ``number`` over the data (a fresh permutation per pass)."""
        n = len(self.widths)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + number)).tolist()

    def _samples(self) -> list[int]:
        n = len(self.widths)
        if n == 0:
            return []
        first = (self.epoch - 1) * self.epoch_size
        out: list[int] = []
        while len(out) < self.epoch_size:
            number, offset = divmod(first + len(out), n)
            out.extend(self._pass(number)[offset : offset + self.epoch_size - len(out)])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        samples = self._samples()
        size = self.batch_size * self.pool
        batches: list[list[int]] = []
        for start in range(0, len(samples), size):
            pool = sorted(samples[start : start + size], key=lambda i: self.widths[i])
            batches.extend(pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 - self.epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)

    def __len__(self) -> int:
        if not self.widths:
            return 0
        size = self.batch_size * self.pool
        full, rest = divmod(self.epoch_size, size)
        return full * math.ceil(size / self.batch_size) + math.ceil(rest / self.batch_size)


class _Tolerant(Dataset):
    """Wraps a dataset so that an image that fails to decode becomes ``{"error", "index"}`` instead of an exception."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except ImageError as exc:
            return {"error": str(exc), "index": index}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> ``{"images": [Tensor[3,H,W]], "targets": [{"boxes", "labels"}], "texts", "errors"}``."""
    good = [b for b in batch if "error" not in b]
    return {
        "images": [b["image"] for b in good],
        "targets": [{"boxes": b["boxes"], "labels": b["labels"]} for b in good],
        "texts": [b["text"] for b in good],
        "errors": [b["error"] for b in batch if "error" in b],
    }


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``base`` to ``base * min_ratio`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _widths(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Augmented):
        return dataset.widths if dataset.widths is not None else _widths(dataset.dataset)
    if isinstance(dataset, Subset):
        parent = _widths(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return list(dataset.widths)  # type: ignore[attr-defined]


def _extents(dataset: Dataset) -> list[tuple[int, int, float, float]] | None:
    """Per sample ``(width, height, x1, x2)`` of a labelled folder or a subset of one; None when unknown."""
    if isinstance(dataset, Subset):
        parent = _extents(dataset.dataset)
        return None if parent is None else [parent[i] for i in dataset.indices]
    return getattr(dataset, "extents", None)


def hold_out(dataset: Dataset, cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """Hold out ``val_fraction`` (at least 1, at most ``val_max``) with a seeded permutation."""
    n = len(dataset)  # type: ignore[arg-type]
    n_val = min(cfg.val_max, max(1, round(n * cfg.val_fraction))) if n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return Subset(dataset, sorted(perm[n_val:])), Subset(dataset, sorted(perm[:n_val]))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate(
    model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Decode ``dataset`` (width-sorted batches) as ``Detector.predict`` would, the model's ``box_source``
    included, and score it: ``val_images``, ``val_sequence_accuracy``, ``val_character_accuracy``. The model is left
    in eval mode."""
    model.eval()
    loader = DataLoader(
        _Tolerant(dataset),
        batch_sampler=WidthBucketSampler(_widths(dataset), batch_size, shuffle=False, pool=10**9),
        collate_fn=collate,
        num_workers=num_workers,
    )
    predictions: list[str] = []
    truths: list[str | None] = []
    for batch in loader:
        arrays = [img.mul(255).round_().to(torch.uint8).permute(1, 2, 0).numpy() for img in batch["images"]]
        found = decode_arrays(model, arrays, batch_size=max(1, len(arrays)), device=device, precision=precision,
                              tensors=batch["images"])
        predictions.extend(p.text for p in found)
        truths.extend(batch["texts"])
    s = score(predictions, truths)
    return {
        "val_images": s.scored,
        "val_sequence_accuracy": s.sequence_accuracy,
        "val_character_accuracy": s.character_accuracy,
    }


def _build(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network to train and where its weights come from."""
    from core.models import build_model

    if cfg.init_from is not None:
        model, meta = load_checkpoint(cfg.init_from, device=device)
        if meta["arch"] != cfg.arch:
            log.info("init_from %s: using its architecture %r", cfg.init_from, meta["arch"])
        source = {"init_from": str(cfg.init_from), "init_sha256": meta["sha256"]}
        if cfg.model_config:  # the checkpoint's network with these settings changed or parts added
            config = {**meta["model_config"], **cfg.model_config}
            grown = build_model(**config).to(device)
            stale = getattr(type(grown), "stale_prefixes", lambda old, new: ())(meta["model_config"], config)
            state = {k: v for k, v in model.state_dict().items() if not k.startswith(stale)}
            fresh = transfer_weights(grown, state)
            if fresh:
                log.info("init_from %s: %d tensors start fresh (%s ...)", cfg.init_from, len(fresh), fresh[0])
            return grown, {**source, "fresh_tensors": len(fresh)}
        return model, source
    return build_model(arch=cfg.arch, **cfg.model_config).to(device), {}


def train_model(cfg: TrainConfig, on_progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train per ``cfg``; write the best checkpoint to ``cfg.out`` (plus training state beside it); return the result.

    With ``cfg.resume`` the run continues after the last completed epoch recorded in the training state.
    """
    from core.formats import LabelledFolder

    check_weights_path(cfg.out)
    for key, where in (("arch", "--arch"), ("num_classes", "the charset (36 classes)")):
        if key in cfg.model_config:
            raise ValueError(f"model_config cannot set {key}: it comes from {where}")
    if cfg.version is not None and len(cfg.version) > MAX_GIVEN_VERSION_LENGTH:
        raise ValueError(f"version {cfg.version!r} is longer than {MAX_GIVEN_VERSION_LENGTH} characters")
    if cfg.epoch_size is not None and cfg.epoch_size < 1:
        raise ValueError(f"epoch_size must be at least 1, got {cfg.epoch_size}")
    emit = on_progress or (lambda event: None)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)

    roots = resolve_roots(cfg.allowed_roots)
    train_set: Dataset = LabelledFolder(cfg.images, cfg.labels, roots)
    skipped = dict(train_set.skipped)  # type: ignore[attr-defined]
    if cfg.val_images is not None:
        if cfg.val_labels is None:
            raise ValueError("val_images needs val_labels")
        val_set: Dataset = LabelledFolder(cfg.val_images, cfg.val_labels, roots)
        val_source = str(cfg.val_images)
    elif cfg.val_labels is not None:
        raise ValueError("val_labels needs val_images (without both, validation is held out from the images)")
    else:
        train_set, val_set = hold_out(train_set, cfg)
        val_source = f"held out from {cfg.images}"
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"no usable training samples in {cfg.images} (skipped: {skipped or 'none'})")
    if len(val_set) == 0:  # type: ignore[arg-type]
        # every epoch would score 0 and count as the best, and a retraining run would compare 0 with 0
        val_skipped = dict(getattr(val_set, "skipped", {})) if cfg.val_images is not None else {}
        raise ValueError(
            f"no usable validation samples in {cfg.val_images} (skipped: {val_skipped or 'none'})"
            if cfg.val_images is not None
            else f"no sample to validate on: nothing held out of {cfg.images} (val_max {cfg.val_max}, "
            f"{len(train_set)} usable samples); give validation images"
        )
    augment = Augment() if cfg.augment else None
    if augment is not None:
        train_set = Augmented(train_set, augment, _extents(train_set))

    model, origin = _build(cfg, device)
    if cfg.train_parts not in TRAIN_PARTS:
        raise ValueError(f"train_parts must be one of {', '.join(TRAIN_PARTS)}, got {cfg.train_parts!r}")
    if cfg.train_parts == "reader":
        if not hasattr(model, "freeze_detector"):
            raise ValueError(f"train_parts 'reader' needs the fast architecture, not {cfg.arch!r}")
        model.freeze_detector()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    average = None
    if cfg.ema_decay is not None:
        if not 0.0 < cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1, got {cfg.ema_decay}")
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    evaluated = model if average is None else average.module  # what is validated and saved
    sampler = WidthBucketSampler(
        _widths(train_set), cfg.batch_size, shuffle=True, seed=cfg.seed, epoch_size=cfg.epoch_size
    )
    loader = DataLoader(
        _Tolerant(train_set),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        # new workers every epoch, each epoch's seeded from torch's generator as it stands then: a run resumed at
        # epoch N draws exactly what the uninterrupted run drew (persistent workers draw once, in a process's first
        # epoch, which a resumed run moves)
        persistent_workers=False,
    )
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))

    history: list[dict[str, Any]] = []
    start_epoch, step = 1, 0
    best_key: tuple[float, float] | None = None
    best_epoch = 0
    if cfg.resume:
        state = load_training_state(out, model, optimizer, average)
        saved = state.get("resume_key") or {}  # empty: a state saved before runs recorded it
        now = cfg.resume_key()
        changed = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k])
        if changed:
            raise ValueError(f"--resume continues the run saved at {out} with its own settings; changed: {changed}")
        history, step = state["history"], state["step"]
        start_epoch = state["epoch"] + 1
        best_epoch = state["best_epoch"]
        best_key = tuple(state["best_key"]) if state["best_key"] is not None else None  # type: ignore[assignment]
        log.info("resuming %s after epoch %d (step %d)", out, state["epoch"], step)

    data_summary = {
        "train_images": len(train_set),  # type: ignore[arg-type]
        "val_images": len(val_set),  # type: ignore[arg-type]
        "images_dir": str(cfg.images),
        "labels_dir": str(cfg.labels),
        "val_source": val_source,
        "skipped": skipped,
        "augment": augment.as_json() if augment is not None else None,
        "precision": precision,
        **origin,
    }
    emit(
        {
            "event": "start",
            "epochs": cfg.epochs,
            "start_epoch": start_epoch,
            "steps_per_epoch": steps_per_epoch,
            "train_images": data_summary["train_images"],
            "val_images": data_summary["val_images"],
            "device": str(device),
            "precision": precision,
        }
    )

    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        batches = images_seen = nonfinite = 0
        errors: list[str] = []
        t0 = time.perf_counter()
        for batch in loader:
            errors.extend(batch["errors"])
            if not batch["images"]:
                continue
            lr = lr_at(step, total_steps, cfg.lr, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [img.to(device, non_blocking=True) for img in batch["images"]]
            targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
            with autocast(precision, device):
                losses = model(images, targets)
            loss = sum(losses.values())
            step += 1
            # One read-back per step, before backward: on a GPU the backward pass and the optimiser step then run
            # while the host already loads and launches the next batch (a read-back per loss term after the step
            # would wait for them).
            values = torch.stack([loss.detach().float(), *(v.detach().float() for v in losses.values())]).tolist()
            if not math.isfinite(values[0]):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if average is not None:
                average.update_parameters(model)
            for k, v in zip(losses, values[1:]):
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + values[0]
            batches += 1
            images_seen += len(images)
            emit({"event": "step", "epoch": epoch, "step": step, "steps": total_steps, "loss": values[0], "lr": lr})
        train_seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"epoch": epoch}
        record.update({k: v / max(1, batches) for k, v in sums.items()})
        record["images_per_second"] = images_seen / train_seconds if train_seconds > 0 else 0.0
        record["lr"] = optimizer.param_groups[0]["lr"]
        if nonfinite:
            record["nonfinite_steps"] = nonfinite
        if errors:
            record["unreadable_images"] = len(errors)
            log.warning("epoch %d: %d unreadable images skipped (first: %s)", epoch, len(errors), errors[0])
        record.update(validate(evaluated, val_set, cfg.val_batch_size, device, cfg.num_workers, precision))
        if record["val_images"] == 0:
            raise ValueError(f"epoch {epoch}: no validation image could be read ({val_source})")
        record["seconds"] = time.perf_counter() - t0
        key = (record["val_sequence_accuracy"], record["val_character_accuracy"])
        record["best"] = best_key is None or key >= best_key
        history.append(record)
        if record["best"]:
            best_key, best_epoch = key, epoch
            metadata = {
                "metrics": record,
                "train_config": cfg.as_json(),
                "data_summary": data_summary,
                "history": history,
                "version": cfg.version,
            }
            save_checkpoint(evaluated, out, metadata)
        save_training_state(
            out,
            model,
            optimizer,
            {"epoch": epoch, "step": step, "best_epoch": best_epoch, "best_key": best_key, "history": history,
             "resume_key": cfg.resume_key()},
            average,
        )
        epochs_run += 1
        emit({"event": "epoch", **record})

    if best_epoch == 0:
        raise ValueError(f"nothing trained: {out} has no completed epoch (epochs={cfg.epochs})")
    return TrainResult(
        checkpoint=out,
        best_epoch=best_epoch,
        metrics=next(r for r in history if r["epoch"] == best_epoch),
        history=history,
        epochs_run=epochs_run,
    )

