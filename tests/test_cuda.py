"""The same code on a GPU: the shipped checkpoint reads there as on the CPU (bfloat16 too), training runs there with
DataLoader processes forked after CUDA started, its checkpoint reads the same on the CPU, and the worker's decoding
writes the GPU's readings to a real database.

Every test needs CUDA and is skipped without it (CI has no GPU): run them on a GPU machine with ``pytest -m cuda``.
``CAPTCHA_TEST_CUDA_DEVICE`` picks the device (default ``cuda``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core.detector import Detector
from core.formats import text_from_filename
from core.synth import generate

from sample_models import TINY

DEVICE = os.environ.get("CAPTCHA_TEST_CUDA_DEVICE", "cuda")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> list[Path]:
    """64 synthetic CAPTCHAs the shipped checkpoint never saw (seed 21)."""
    root = tmp_path_factory.mktemp("cuda")
    generate(root, 64, seed=21, workers=1, progress=False)
    return sorted((root / "images").glob("*.png"))


def right(predictions, paths) -> int:
    return sum(p.text == text_from_filename(path).lower() for p, path in zip(predictions, paths))


def test_the_shipped_checkpoint_reads_on_the_gpu_as_on_the_cpu(fresh):
    cpu = Detector.load(None, device="cpu", precision="fp32").predict(fresh)
    gpu = Detector.load(None, device=DEVICE, precision="fp32")
    assert gpu.device.type == "cuda"
    on_gpu = gpu.predict(fresh)
    agree = [(a, b) for a, b in zip(cpu, on_gpu) if a.text == b.text]
    assert len(agree) >= len(fresh) - 1  # float32 on both: at most one borderline glyph may turn
    for a, b in agree:
        for ca, cb in zip(a.chars, b.chars):
            assert max(abs(x - y) for x, y in zip(ca.box, cb.box)) < 0.5
            assert abs(ca.score - cb.score) < 1e-2
    assert right(on_gpu, fresh) >= 0.8 * len(fresh)


def test_bf16_on_the_gpu_reads_like_fp32(fresh):
    fp32 = Detector.load(None, device=DEVICE, precision="fp32").predict(fresh)
    bf16 = Detector.load(None, device=DEVICE, precision="bf16")
    assert bf16.precision == "bf16"
    half = bf16.predict(fresh)
    assert sum(a.text == b.text for a, b in zip(fp32, half)) >= 0.9 * len(fresh)
    assert right(half, fresh) >= 0.8 * len(fresh)


def test_training_on_the_gpu_learns_and_its_checkpoint_reads_the_same_on_the_cpu(tmp_path):
    from core.checkpoint import read_metadata
    from core.train import TrainConfig, train_model

    generate(tmp_path / "train", 16, seed=0, workers=1, progress=False)
    generate(tmp_path / "val", 4, seed=1, workers=1, progress=False)
    out = tmp_path / "gpu.safetensors"
    cfg = TrainConfig(
        images=tmp_path / "train" / "images", labels=tmp_path / "train" / "labels",
        val_images=tmp_path / "val" / "images", val_labels=tmp_path / "val" / "labels",
        out=out, model_config=TINY, epochs=4, batch_size=8, num_workers=2, seed=3, device=DEVICE, precision="bf16",
    )  # fmt: skip
    result = train_model(cfg)
    losses = [record["loss"] for record in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert read_metadata(out)["data_summary"]["precision"] == "bf16"

    images = sorted((tmp_path / "train" / "images").glob("*.png"))
    on_gpu = Detector.load(out, device=DEVICE, precision="fp32").predict(images)
    on_cpu = Detector.load(out, device="cpu", precision="fp32").predict(images)
    assert sum(a.text == b.text for a, b in zip(on_gpu, on_cpu)) >= len(images) - 1


def test_worker_decoding_on_the_gpu_writes_every_reading(fresh, tmp_path, sqlite_url):
    from db.session import session_factory
    from test_worker import make_db, reference_texts, rows
    from worker.decode import decode_images

    broken = tmp_path / "truncated-0.png"
    broken.write_bytes(fresh[0].read_bytes()[:200])
    items = make_db(sqlite_url, [str(p) for p in fresh[:24]] + [str(broken)])
    detector = Detector.load(None, device=DEVICE)
    expected = reference_texts(detector, items, batch_size=8)

    summary = decode_images(items, detector, session_factory(sqlite_url), 8, max_pixels=4_000_000, max_width=4096)

    assert (summary.done, summary.failed) == (24, 1)
    got = rows(sqlite_url)
    assert got[str(broken)]["status"] == "failed" and "truncated" in got[str(broken)]["error"]
    texts = {path: row["text"] for path, row in got.items() if row["status"] == "done"}
    assert texts == expected
    assert sum(text == text_from_filename(path).lower() for path, text in texts.items()) >= 0.8 * 24
