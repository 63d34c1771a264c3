"""Bad input: every hostile or broken file becomes a ``failed`` row with its reason, the rest of the batch is
decoded, and the worker stays up. Unusual but valid images (grayscale, palette, 16-bit, RGBA, a non-UTF-8 name)
are decoded.

The decode function runs in-process on one message holding all the files; one test runs the same folder through
``captcha-queue enqueue`` and a real worker process.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.paths import is_allowed, path_to_text, resolve_roots, text_to_path
from test_worker import make_db, rows

NON_UTF8_NAME = b"caf\xe9-0.png"


@pytest.fixture(scope="module")
def captchas(tmp_path_factory) -> list[Path]:
    from core.synth import generate

    out = tmp_path_factory.mktemp("good")
    generate(out, 6, seed=5, workers=1, progress=False)
    return sorted((out / "images").glob("*.png"))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` but holds a few bytes of pixel data (a decompression bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip


def build_folder(root: Path, outside: Path, captchas: list[Path]) -> dict[str, tuple[Path, str | None]]:
    """The bad and the unusual files under ``root`` (plus targets in ``outside``).

    Returns name -> (path, expected reason fragment, or None for an image that must decode).
    """
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    good = captchas[0]
    files: dict[str, tuple[Path, str | None]] = {}

    def add(name: str, reason: str | None, path: Path | None = None) -> Path:
        path = path or root / f"{name}-0.png"
        files[name] = (path, reason)
        return path

    add("empty", "empty file").write_bytes(b"")
    add("truncated", "truncated").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    add("text", "not a recognised image").write_text("hello, I am not a picture\n")
    png_header_only(add("bomb", "decompression bomb"), 30_000, 30_000)  # 900 M pixels > 2 x Pillow's limit
    Image.new("RGB", (20_000, 80), "white").save(add("wide", "too wide"))
    Image.new("RGB", (2048, 2), "white").save(add("sliver", "too elongated"))  # a 64 x 65,536 network input
    Image.new("RGB", (60, 20), "white").save(add("tiff", "not a recognised image"), format="TIFF")  # named .png
    add("missing", "file not found")  # registered, then never written
    os.mkfifo(add("fifo", "not a regular file"))  # opening it would block the reader for ever
    files["nul"] = (root / "nul\x00byte-0.png", "NUL byte")  # a crafted message path
    secret = outside / "secret-0.png"
    secret.write_bytes(good.read_bytes())
    files["outside"] = (secret, "allowed roots")
    os.symlink(secret, add("escape", "allowed roots"))

    rgb = Image.open(good).convert("RGB")
    rgb.save(add("rgb", None))
    rgb.convert("L").save(add("gray", None))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(add("palette", None))
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    sixteen = Image.fromarray(gray16)
    assert sixteen.mode.startswith("I;16")
    sixteen.save(add("sixteen", None))
    # white pixels transparent and stored black: composited on white this is exactly the RGB image again
    arr = np.asarray(rgb).copy()
    white = (arr == 255).all(axis=2)
    arr[white] = 0
    alpha = np.where(white, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([arr, alpha])).save(add("rgba", None))
    # the one transparent colour of a grayscale and of an RGB PNG (tRNS): white pixels stored as the key colour
    gray = np.asarray(rgb.convert("L")).copy()
    gray[gray == 1] = 2  # the key colour marks only the transparent pixels
    Image.fromarray(gray).save(add("gray-opaque", None))
    keyed = np.where(gray == 255, 1, gray).astype(np.uint8)
    Image.fromarray(keyed).save(add("gray-keyed", None), transparency=1)
    colour = np.asarray(rgb).copy()
    colour[(colour == (1, 2, 3)).all(axis=2)] = (1, 2, 4)
    Image.fromarray(colour).save(add("rgb-opaque", None))
    keyed = colour.copy()
    keyed[(colour == 255).all(axis=2)] = (1, 2, 3)
    Image.fromarray(keyed).save(add("rgb-keyed", None), transparency=(1, 2, 3))
    name = os.fsdecode(os.fsencode(root) + b"/" + NON_UTF8_NAME)
    rgb.save(name, format="PNG")
    files["non-utf8"] = (Path(name), None)
    return files


def register(db: str, files: dict[str, tuple[Path, str | None]]) -> list[tuple[int, str]]:
    """One job holding every file by its text form (the missing one as if it vanished after enqueueing)."""
    from db.repository import create_job, register_images
    from db.session import session_factory, upgrade

    upgrade(db)
    entries = []
    for path, _ in files.values():
        st = os.stat(path) if os.path.exists(path) else None
        entries.append((path_to_text(path), st.st_size if st else 0, st.st_mtime_ns if st else 0))
    with session_factory(db)() as session:
        todo = register_images(session, create_job(session, "bad"), entries)
        session.commit()
    return todo


def by_name(files, got: dict[str, dict]) -> dict[str, dict]:
    return {name: got[path_to_text(path)] for name, (path, _) in files.items()}


# ---------------------------------------------------------------------------------------------------------------


def test_path_text_form_is_lossless_for_any_bytes():
    rng = random.Random(0)
    samples = [b"/data/ab12-0.png", b"/d/caf\xe9.png", b"/d/\xff\xfe\\x41\\\\", "/d/é€😀".encode(), b"/d/\\xe9"]
    samples += [b"/" + bytes(rng.randrange(1, 256) for _ in range(rng.randint(0, 30))) for _ in range(500)]
    for raw in samples:
        text = path_to_text(os.fsdecode(raw))
        text.encode("utf-8")  # storable and sendable as UTF-8 (raises on a lone surrogate)
        assert os.fsencode(text_to_path(text)) == raw
    assert path_to_text("/data/ab12-0.png") == "/data/ab12-0.png"  # ordinary paths are their own text form
    assert path_to_text(os.fsdecode(b"/d/\\xe9")) != path_to_text(os.fsdecode(b"/d/\xe9"))


def test_allowed_roots_resolve_links_and_dots(tmp_path):
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "other")
    roots = resolve_roots([tmp_path / "root"])
    assert is_allowed(tmp_path / "root" / "sub" / "a.png", roots)
    assert not is_allowed(tmp_path / "root" / "link" / "a.png", roots)
    assert not is_allowed(tmp_path / "root" / ".." / "other" / "a.png", roots)
    assert not is_allowed(tmp_path / "rootx" / "a.png", roots)  # a prefix is not a parent
    assert is_allowed("/anywhere/a.png", ())


def test_allowed_roots_setting_takes_a_json_list_or_commas(monkeypatch):
    from core.config import Settings

    monkeypatch.setenv("CAPTCHA_ALLOWED_ROOTS", "/data/a, /data/b")
    assert Settings().allowed_roots == [Path("/data/a"), Path("/data/b")]
    monkeypatch.setenv("CAPTCHA_ALLOWED_ROOTS", '["/data/with, comma"]')
    assert Settings().allowed_roots == [Path("/data/with, comma")]


def test_one_message_of_bad_files_fails_each_with_its_reason_and_decodes_the_rest(
    detector, captchas, tmp_path, sqlite_url
):
    from core.images import load_image
    from db.session import session_factory
    from worker.decode import decode_images

    files = build_folder(tmp_path / "root", tmp_path / "outside", captchas)
    todo = register(sqlite_url, files)
    assert len(todo) == len(files)
    summary = decode_images(
        todo, detector, session_factory(sqlite_url), 1, max_pixels=4_000_000, max_width=4096,
        allowed_roots=resolve_roots([tmp_path / "root"]),
    )  # fmt: skip
    bad = {name for name, (_, reason) in files.items() if reason}
    assert (summary.done, summary.failed) == (len(files) - len(bad), len(bad))

    got = by_name(files, rows(sqlite_url))
    for name, (path, reason) in files.items():
        if reason is None:
            assert got[name]["status"] == "done", (name, got[name]["error"])
            alone = detector.predict([load_image(text_to_path(path_to_text(path)))], batch_size=1)[0]
            assert got[name]["text"] == alone.text
        else:
            assert got[name]["status"] == "failed" and reason in got[name]["error"], (name, got[name]["error"])
    # transparency composited on white gives back the RGB image, so the same string
    assert np.array_equal(np.asarray(load_image(files["rgba"][0])), np.asarray(load_image(files["rgb"][0])))
    for keyed in ("gray", "rgb"):
        opaque = np.asarray(load_image(files[f"{keyed}-opaque"][0]))
        assert np.array_equal(np.asarray(load_image(files[f"{keyed}-keyed"][0])), opaque), keyed
        assert got[f"{keyed}-keyed"]["text"] == got[f"{keyed}-opaque"]["text"]
    assert got["rgba"]["text"] == got["rgb"]["text"] == got["non-utf8"]["text"]
    assert got["rgb"]["text"]  # the model emits characters, so equal strings mean something
    assert "\\xe9" in path_to_text(files["non-utf8"][0])


def test_a_palette_with_alpha_is_composited_on_white():
    """An in-memory palette image whose palette carries alpha (``quantize`` of an RGBA image) has no
    ``info["transparency"]``; its transparent pixels are white all the same."""
    from core.images import to_rgb

    arr = np.zeros((4, 6, 4), dtype=np.uint8)
    arr[:, :3] = (200, 10, 10, 255)  # opaque red on the left, transparent black on the right
    quantized = Image.fromarray(arr).quantize(colors=4)
    assert quantized.mode == "P" and quantized.palette.mode == "RGBA" and "transparency" not in quantized.info
    out = np.asarray(to_rgb(quantized))
    assert (out[:, 3:] == 255).all() and (out[:, :3, 0] > 150).all() and (out[:, :3, 1] < 60).all()


@pytest.mark.parametrize(
    "mode, fill, key",
    [("1", 1, 0), ("L", 40, 7), ("I;16", 3000, 1000), ("RGB", (9, 9, 9), (1, 2, 3))],
)
def test_the_transparent_value_of_any_keyed_png_is_white(tmp_path, mode, fill, key):
    """A PNG's tRNS value marks transparent pixels in 1-bit and 16-bit grayscale images too, not only in 8-bit
    grayscale and RGB: they come out white, and the other pixels keep their grey or colour."""
    from core.images import load_image

    img = Image.new(mode, (6, 4), fill)
    for x in range(3):
        for y in range(4):
            img.putpixel((x, y), key)  # the left half holds the key value
    if mode == "I;16":
        img.putpixel((5, 0), 6000)  # the brightest pixel, so the key value alone would not read as white
    img.save(tmp_path / "keyed.png", transparency=key)
    out = np.asarray(load_image(tmp_path / "keyed.png"))
    assert (out[:, :3] == 255).all(), out[:, :3, 0]
    assert (out[:, 3:] == np.asarray(load_image_opaque(img))[:, 3:]).all()
    assert (out[:, 3:] < 255).any() or mode == "1"  # a real colour on the right (1-bit "1" is white anyway)


def test_sixteen_bit_grey_is_scaled_by_its_depth_not_by_the_brightest_pixel(tmp_path):
    """A 16-bit grayscale PNG keeps its brightness: 0..65535 maps to 0..255 whatever the image's own range."""
    from core.images import load_image

    values = np.array([[20000, 200, 65535, 0]], dtype=np.uint16)  # mid grey, near black, white, black
    Image.fromarray(values).save(tmp_path / "grey16.png")
    out = np.asarray(load_image(tmp_path / "grey16.png"))[0, :, 0]
    assert out.tolist() == [78, 1, 255, 0]
    Image.fromarray(np.full((2, 3), 20000, dtype=np.uint16)).save(tmp_path / "flat16.png")  # no white pixel at all
    assert (np.asarray(load_image(tmp_path / "flat16.png")) == 78).all()
    from core.images import to_rgb  # a 32-bit image made in memory with 8-bit values keeps them

    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32))))[0, :, 0].tolist() == [0, 128, 255]


def test_the_transparent_colour_of_a_sixteen_bit_rgb_png_is_white(tmp_path):
    """Pillow decodes a 16-bit RGB PNG to 8 bits a channel while its tRNS colour stays in 16 bits: the key is matched
    at 8 bits, so the keyed pixel turns white, and an opaque pixel whose 8-bit value equals the key's low byte
    does not."""
    import struct
    import zlib

    from core.images import load_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = [(25700, 0, 0), (65535, 0, 0), (0, 0, 0)]  # opaque dark red, the key (bright red), opaque black
    raw = b"\x00" + b"".join(struct.pack(">HHH", *px) for px in pixels)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 1, 16, 2, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">HHH", 65535, 0, 0)) + chunk(b"IDAT", zlib.compress(raw))
           + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    out = np.asarray(load_image(tmp_path / "rgb16.png"))[0]
    assert out.tolist() == [[100, 0, 0], [255, 255, 255], [0, 0, 0]]


def load_image_opaque(img: Image.Image) -> Image.Image:
    """``img`` read without its transparency."""
    from core.images import to_rgb

    img.info.pop("transparency", None)
    return to_rgb(img)


def test_a_string_too_long_to_store_fails_its_image_alone(detector, captchas, sqlite_url):
    """A model set to emit more characters than a result holds (64) fails that image, not the batch's write."""
    import dataclasses

    from db.session import session_factory
    from worker.decode import decode_images

    class Overlong:
        version = detector.version

        def predict(self, images, batch_size):
            preds = detector.predict(images, batch_size=batch_size)
            return [dataclasses.replace(preds[0], text="a" * 65)] + list(preds[1:])

    todo = make_db(sqlite_url, [str(p) for p in captchas[:3]])
    summary = decode_images(todo, Overlong(), session_factory(sqlite_url), 8, max_pixels=4_000_000, max_width=4096)
    assert (summary.done, summary.failed) == (2, 1)
    failed = [r for r in rows(sqlite_url).values() if r["status"] == "failed"]
    assert len(failed) == 1 and "65 characters decoded, more than the 64 a result holds" in failed[0]["error"]


def test_unexpected_decoder_errors_fail_the_image_not_the_batch(detector, captchas, monkeypatch, sqlite_url):
    from db.session import session_factory
    from worker import decode as decode_module

    real = decode_module.load_image

    def flaky(path, **kwargs):
        if path == str(captchas[1]):
            raise IndexError("tile index out of range")
        return real(path, **kwargs)

    monkeypatch.setattr(decode_module, "load_image", flaky)
    todo = make_db(sqlite_url, [str(p) for p in captchas[:3]])
    summary = decode_module.decode_images(todo, detector, session_factory(sqlite_url), 8, max_pixels=4_000_000,
                                          max_width=4096)  # fmt: skip
    assert (summary.done, summary.failed) == (2, 1)
    row = rows(sqlite_url)[str(captchas[1])]
    assert row["status"] == "failed" and "IndexError: tile index out of range" in row["error"]


def test_task_records_an_unexpected_error_instead_of_leaving_images_pending(
    monkeypatch, checkpoint, captchas, sqlite_url
):
    from core.config import get_settings
    from worker import tasks

    monkeypatch.setenv("CAPTCHA_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("CAPTCHA_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CAPTCHA_DEVICE", "cpu")
    get_settings.cache_clear()
    tasks.decode._runtime = None
    todo = make_db(sqlite_url, [str(p) for p in captchas[:2]])

    def broken(*args, **kwargs):
        raise RuntimeError("out of file descriptors")

    monkeypatch.setattr(tasks, "decode_images", broken)
    try:
        result = tasks.decode.apply(kwargs={"job_id": 1, "images": [list(x) for x in todo]})
    finally:
        tasks.decode._runtime = None
        get_settings.cache_clear()
    assert result.failed()
    got = rows(sqlite_url)
    assert {r["status"] for r in got.values()} == {"failed"}
    assert all("worker error: RuntimeError: out of file descriptors" in r["error"] for r in got.values())


def test_producer_refuses_paths_outside_the_allowed_roots(tmp_path, monkeypatch, sqlite_url, captchas):
    import sqlalchemy as sa

    from core.config import get_settings
    from db.models import Image
    from db.session import session_factory, upgrade
    from producer.enqueue import EnqueueError, enqueue

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ok-0.png").write_bytes(captchas[0].read_bytes())
    (tmp_path / "root" / "escape-0.png").symlink_to(captchas[1])
    upgrade(sqlite_url)
    monkeypatch.setenv("CAPTCHA_ALLOWED_ROOTS", str(tmp_path / "root"))
    get_settings.cache_clear()
    try:
        with pytest.raises(EnqueueError, match=r"1 of 2 images lie outside the allowed roots.*escape-0\.png ->"):
            enqueue([tmp_path / "root"], database_url=sqlite_url, broker_url="redis://127.0.0.1:1/0")
        with pytest.raises(EnqueueError, match="outside the allowed roots"):
            enqueue([captchas[2]], database_url=sqlite_url, broker_url="redis://127.0.0.1:1/0")
    finally:
        get_settings.cache_clear()
    with session_factory(sqlite_url)() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Image)) == 0


# ---------------------------------------------------------------------------------------------------------------
# the whole folder through the producer and a real worker process


def test_a_real_worker_survives_a_folder_of_bad_files(tmp_path, captchas, checkpoint, redis_url, sqlite_url):
    import uuid

    import redis

    from producer.enqueue import enqueue, wait_for_job
    from worker.process import WorkerProcess

    files = build_folder(tmp_path / "root", tmp_path / "outside", captchas)
    (tmp_path / "root" / "sub").mkdir()
    (tmp_path / "root" / "sub" / "loop").symlink_to(tmp_path / "root")  # a directory loop for --recursive
    queue = f"bad-{uuid.uuid4().hex[:8]}"
    env = {"CAPTCHA_BROKER_URL": redis_url, "CAPTCHA_DATABASE_URL": sqlite_url, "CAPTCHA_CHECKPOINT": str(checkpoint),
           "CAPTCHA_ALLOWED_ROOTS": str(tmp_path / "root")}  # fmt: skip
    from db.session import upgrade

    upgrade(sqlite_url)
    warnings: list[str] = []
    try:
        with WorkerProcess(tmp_path / "worker.log", queues=queue, batch_size=4, env=env) as worker:
            # the producer here has no allowed roots: the worker must not trust the message
            report = enqueue([tmp_path / "root", files["outside"][0]], recursive=True, queue=queue,
                             database_url=sqlite_url, broker_url=redis_url, warn=warnings.append)  # fmt: skip
            # the scan lists regular files only: not the missing one, the crafted NUL path or the FIFO
            unlisted = {n for n, (p, _) in files.items() if not os.path.lexists(p)} | {"fifo"}
            assert unlisted == {"missing", "nul", "fifo"}
            assert report.enqueued == len(files) - len(unlisted)  # the loop added nothing twice
            assert any("loop" in w for w in warnings)
            waited = wait_for_job(report.job_id, database_url=sqlite_url, timeout_s=120)
            assert waited.pending == 0, worker.log()[-3000:]
            got = rows(sqlite_url)
            for name, (path, reason) in files.items():
                if name in unlisted:
                    assert path_to_text(path) not in got
                    continue
                row = got[path_to_text(path)]
                if reason is None:
                    assert row["status"] == "done", (name, row["error"])
                else:
                    assert row["status"] == "failed" and reason in row["error"], (name, row["error"])
            assert worker.process.poll() is None  # still up
        assert "Traceback" not in worker.log()
    finally:
        client = redis.Redis.from_url(redis_url)
        client.delete(queue)
        client.close()
