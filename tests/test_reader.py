"""The glyph reader: square ink crops, training it alone with the detector frozen, and learning to name glyphs that
the detector only finds."""

from __future__ import annotations

import pytest
import torch

from core.models import build_model
from core.models.reader import GlyphReader, random_warps, rotations
from core.models.transform import IMAGENET_MEAN, IMAGENET_STD
from tests.sample_models import TINY
from tests.test_models import captchas

READER = {**TINY, "reader_width": 32, "context_layers": 1, "context_width": 16, "context_heads": 2}


def _normalised(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image - mean) / std).unsqueeze(0)


def test_crops_are_square_ink_centred_on_the_box_and_white_outside_the_image() -> None:
    image = torch.ones(3, 64, 200)
    image[:, 20:44, 100:104] = 0.0  # a black bar 4 px wide, 24 px tall
    image[:, 0:10, 0:6] = 0.2  # a dark block in the top-left corner
    reader = GlyphReader(width=8, crop=32, margin=0.15)
    boxes = torch.tensor([[100.0, 20.0, 104.0, 44.0], [0.0, 0.0, 6.0, 10.0]])
    crops = reader.crops(_normalised(image), boxes, torch.tensor([0, 0]))
    assert crops.shape == (2, 3, 32, 32)
    bar = crops[0, 0]
    # the square keeps the aspect ratio: the bar fills the middle columns and leaves the sides white
    assert float(bar[4:28, 15:17].min()) > 0.95
    assert float(bar[:, :8].max()) < 0.01 and float(bar[:, 24:].max()) < 0.01
    corner = crops[1, 0]
    # the block's crop reaches past the image's top and left edges: there it reads white (0), not grey
    assert float(corner[:4, :4].max()) < 0.01
    assert float(corner[16, 16]) == pytest.approx(0.8, abs=0.02)


def test_a_frozen_detector_trains_only_the_reader_and_context_head() -> None:
    torch.manual_seed(0)
    model = build_model("fast", **READER).train()
    model.freeze_detector()
    images, targets, _ = captchas(3, seed=4, max_width=300)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = model(images, targets)
    assert set(losses) == {"reader", "context"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(losses.values()).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("reader.", "context.")) for k in changed)
    assert any(k.startswith("reader.") for k in changed)
    with pytest.raises(ValueError, match="reader"):
        build_model("fast", **TINY).freeze_detector()


def test_the_reader_learns_to_name_the_glyphs_of_its_training_images() -> None:
    torch.manual_seed(0)
    model = build_model("fast", **{**READER, "context_layers": 0, "context_jitter": 0.0}).train()
    model.freeze_detector()
    images, targets, _ = captchas(12, seed=5, max_width=400, alphabet="abcdef012")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        loss = model(images, targets)["reader"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logits = model.eval().read_boxes(images, [t["boxes"] for t in targets])  # the true boxes, original pixels
    assert [len(x) for x in logits] == [len(t["labels"]) for t in targets]
    truth = torch.cat([t["labels"] for t in targets])
    assert torch.equal(torch.cat(logits).argmax(dim=1), truth)


@pytest.mark.parametrize("config", [READER, {**READER, "context_layers": 0}, {**TINY, "context_layers": 1,
                                                                           "context_width": 16, "context_heads": 2},
                                    {**READER, "reader_resolution": "original"}],
                         ids=["reader+context", "reader", "context", "reader at the original size"])
def test_read_boxes_gives_back_the_labels_of_evals_own_detections(config) -> None:
    torch.manual_seed(0)
    model = build_model("fast", **config, score_thresh=0.0, reader_views=[0, 6, -6] if "reader_width" in config
                        else [0]).eval()
    images, _, _ = captchas(3, seed=6, max_width=300)
    with torch.no_grad():
        detections = model(images)
    assert sum(len(d["boxes"]) for d in detections) > 0
    logits = model.read_boxes(images, [d["boxes"] for d in detections])
    for d, x in zip(detections, logits):
        assert x.shape == (len(d["boxes"]), 36) and x.dtype == torch.float32
        assert torch.equal(x.argmax(dim=1), d["labels"])
    assert [len(x) for x in model.read_boxes(images[:1], [torch.zeros(0, 4)])] == [0]  # an image without boxes
    with pytest.raises(ValueError, match="box lists"):
        model.read_boxes(images, [])


def test_reader_channels_set_its_cnn_and_a_new_reader_starts_fresh_with_its_context_head() -> None:
    from core.models.fast import FastRCNN

    narrow = build_model("fast", **READER)
    wide = build_model("fast", **READER, reader_channels=[8, 16, 24, 40])
    assert wide.config["reader_channels"] == [8, 16, 24, 40]
    assert wide.reader.fc.in_features == 40 * 4
    count = lambda m: sum(p.numel() for p in m.reader.parameters())  # noqa: E731
    assert count(wide) != count(narrow)
    images, _, _ = captchas(2, seed=5, max_width=300)
    assert len(wide.eval()(images)) == 2
    # a checkpoint's reader carries over only to a reader of the same width and channels; the crop changes no weight
    stale = FastRCNN.stale_prefixes
    assert stale(narrow.config, wide.config) == ("reader.", "context.")
    assert stale(narrow.config, {**narrow.config, "reader_crop": 32}) == ()
    old = {k: v for k, v in narrow.config.items() if k != "reader_channels"}  # written before the setting existed
    assert stale(old, {**old, "reader_crop": 32}) == ()
    assert stale(build_model("fast", **TINY, context_layers=1).config, narrow.config) == ("context.",)
    with pytest.raises(ValueError, match="4 entries"):
        GlyphReader(channels=(8, 16, 24))


def test_crops_sample_as_roi_align_does_and_a_warp_turns_the_glyph() -> None:
    from torchvision.ops import roi_align

    image = torch.ones(3, 64, 200)
    image[:, 20:44, 100:104] = 0.0  # a vertical bar, 4 x 24 px
    image[:, 10:30, 30:50] = torch.linspace(0.0, 1.0, 20)  # a horizontal ramp, to compare sampling
    image[1, 40:60, 150:170] = torch.rand(20, 20)
    reader = GlyphReader(width=8, crop=32, margin=0.15)
    batch = _normalised(image).repeat(2, 1, 1, 1)
    boxes = torch.tensor([[100.0, 20.0, 104.0, 44.0], [32.0, 12.0, 48.0, 28.0], [33.5, 12.0, 47.0, 27.0],
                          [151.0, 42.0, 168.0, 58.0]])
    image_index = torch.tensor([0, 1, 0, 1])  # crops of both images, interleaved
    crops = reader.crops(batch, boxes, image_index)
    # the same square, through torchvision's RoIAlign (2 x 2 samples per output pixel): equal for crops inside
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) * (0.5 + 0.5 * reader.margin)
    rois = torch.cat((image_index.unsqueeze(1).float(), centre - half, centre + half), dim=1)
    ink = 1.0 - image.unsqueeze(0).repeat(2, 1, 1, 1)
    torch.testing.assert_close(crops, roi_align(ink, rois, 32, 1.0, 2, aligned=True), atol=1e-4, rtol=0)
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]]).expand(4, 2, 2)  # a 90-degree turn: the bar lies flat
    turned = reader._sample(ink, centre, half, image_index, quarter)[0, 0]
    assert float(turned[15:17, 4:28].min()) > 0.95 and float(turned[:8].max()) < 0.01
    warps = random_warps(500, 1.0)
    angles = torch.atan2(warps[:, 1, 0], warps[:, 0, 0]).abs()
    assert 0.2 < float(angles.max()) < 0.45 and float(warps.det().min()) > 0.6  # up to ~20 degrees, no flips
    torch.manual_seed(1)
    warped = reader.crops(batch, boxes, image_index, warp=1.0)
    assert warped.shape == crops.shape and not torch.allclose(warped, crops, atol=0.05)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the warp's arithmetic stays float32 under bf16 training
        warped_bf16 = reader.crops(batch, boxes, image_index, warp=1.0)
    torch.testing.assert_close(warped_bf16, warped, atol=1e-5, rtol=0)
    assert reader.crops(batch, boxes[:0], image_index[:0]).shape == (0, 3, 32, 32)


def test_reader_warp_changes_training_crops_only() -> None:
    images, targets, _ = captchas(3, seed=4, max_width=300)
    torch.manual_seed(0)
    plain = build_model("fast", **READER, context_jitter=0.0)
    torch.manual_seed(0)
    warped = build_model("fast", **READER, context_jitter=0.0, reader_warp=1.0)
    assert warped.config["reader_warp"] == 1.0 and plain.config["reader_warp"] == 0.0
    for model in (plain, warped):
        model.freeze_detector()
    torch.manual_seed(2)
    loss_plain = plain.train()(images, targets)["reader"]
    torch.manual_seed(2)
    loss_warped = warped.train()(images, targets)["reader"]
    assert not torch.allclose(loss_plain, loss_warped)
    with torch.no_grad():
        out_plain, out_warped = plain.eval()(images), warped.eval()(images)
    for a, b in zip(out_plain, out_warped):
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"])


def test_reader_views_average_the_turned_crops_in_eval_only(tmp_path) -> None:
    from core.checkpoint import load_checkpoint, save_checkpoint

    image = torch.ones(3, 64, 200)
    image[:, 20:44, 100:104] = 0.0
    image[:, 10:40, 30:50] = torch.rand(30, 20)
    batch = _normalised(image).repeat(2, 1, 1, 1)
    boxes = torch.tensor([[100.0, 20.0, 104.0, 44.0], [30.0, 10.0, 50.0, 40.0], [28.0, 8.0, 52.0, 42.0]])
    image_index = torch.tensor([1, 0, 1])
    torch.manual_seed(0)
    reader = GlyphReader(width=8, crop=16, views=(0.0, 10.0, -10.0)).eval()
    turns = rotations((10.0, -10.0))
    assert torch.allclose(turns[0] @ turns[1], torch.eye(2), atol=1e-6)  # opposite turns undo each other
    with torch.no_grad():
        read = reader.read(batch, boxes, image_index)
        views = [reader.embed(reader._crops(batch, boxes, image_index, None if t is None else t.expand(3, 2, 2)))
                 for t in (None, turns[0], turns[1])]
        torch.testing.assert_close(read, torch.stack(views).mean(dim=0), atol=1e-5, rtol=0)
        plain, turned = (reader._crops(batch, boxes, image_index, t) for t in (None, turns[:1].expand(3, 2, 2)))
        assert not torch.allclose(plain, turned, atol=0.05)  # the views see the glyphs turned
        assert not torch.equal(read, views[0])
        assert reader.read(batch, boxes[:0], image_index[:0]).shape == (0, 8)  # an image without characters
        reader.train()  # training reads one view (its own random warps do the turning there)
        torch.testing.assert_close(reader.read(batch, boxes, image_index), reader.embed(
            reader.crops(batch, boxes, image_index)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one angle"):
        GlyphReader(views=())
    # views are the reader's: a network without one refuses them rather than silently reading in one view
    with pytest.raises(ValueError, match="needs a glyph reader"):
        build_model("fast", **TINY, reader_views=[0, 6, -6])
    assert "reader_views" not in build_model("fast", **TINY, reader_views=[0]).config
    # the network records its views only when it has more than the plain one, so older checkpoints load unchanged
    assert "reader_views" not in build_model("fast", **READER).config
    torch.manual_seed(0)
    model = build_model("fast", **READER, reader_views=[0, 6, -6]).eval()
    assert model.config["reader_views"] == [0.0, 6.0, -6.0] and model.reader.views == (0.0, 6.0, -6.0)
    save_checkpoint(model, tmp_path / "views.safetensors")
    loaded, meta = load_checkpoint(tmp_path / "views.safetensors")
    assert loaded.reader.views == (0.0, 6.0, -6.0) and meta["model_config"]["reader_views"] == [0.0, 6.0, -6.0]
    images, _, _ = captchas(2, seed=5, max_width=300)
    with torch.no_grad():
        for a, b in zip(model(images), loaded.eval()(images)):
            assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"])


def test_a_view_gate_reads_only_the_unsure_glyphs_in_every_view() -> None:
    image = torch.ones(3, 64, 240)
    torch.manual_seed(1)
    boxes = []
    for i in range(8):  # eight glyph-like blobs of different shapes
        x, h = 10 + 28 * i, 14 + 3 * i
        image[:, 40 - h:40, x:x + 6 + i] = torch.rand(3, h, 6 + i) * 0.5
        boxes.append([x, 40 - h, x + 6 + i, 40])
    batch = _normalised(image).repeat(2, 1, 1, 1)
    boxes = torch.tensor(boxes, dtype=torch.float32).repeat(2, 1)
    index = torch.tensor([0] * 8 + [1] * 8)
    torch.manual_seed(0)
    every = GlyphReader(width=8, crop=16, views=(0.0, 10.0, -10.0)).eval()
    with torch.no_grad():
        one = every.embed(every.crops(batch, boxes, index))
        surest = every.predict(one).softmax(dim=1).amax(dim=1)
        gate = float(surest.median())
        gated = GlyphReader(width=8, crop=16, views=(0.0, 10.0, -10.0), view_gate=gate).eval()
        gated.load_state_dict(every.state_dict())
        seen = []
        embed = gated.embed
        gated.embed = lambda crops: seen.append(len(crops)) or embed(crops)
        full, read = every.read(batch, boxes, index), gated.read(batch, boxes, index)
    unsure = surest < gate
    assert 0 < int(unsure.sum()) < len(boxes)
    torch.testing.assert_close(read[unsure], full[unsure], atol=1e-5, rtol=0)  # the unsure: every view, averaged
    torch.testing.assert_close(read[~unsure], one[~unsure], atol=1e-5, rtol=0)  # the sure: the first view alone
    assert not torch.allclose(full[~unsure], one[~unsure], atol=1e-6, rtol=1e-3)  # (reading them in all differs)
    assert seen == [len(boxes), 2 * int(unsure.sum())]  # the other views cropped and read only the unsure glyphs
    with pytest.raises(ValueError, match="view gate"):
        GlyphReader(views=(0.0, 5.0), view_gate=0.0)
    # the network records a gate only when it has one, and only a network with a reader takes it
    gated_net = build_model("fast", **READER, reader_views=[0, 6, -6], reader_view_gate=0.9)
    assert gated_net.config["reader_view_gate"] == 0.9
    assert "reader_view_gate" not in build_model("fast", **READER, reader_views=[0, 6, -6]).config
    with pytest.raises(ValueError, match="needs a glyph reader"):
        build_model("fast", **TINY, reader_view_gate=0.9)


def test_reader_resolution_original_crops_the_images_at_their_own_size() -> None:
    images, targets, _ = captchas(2, seed=4, max_width=300)  # 80 px high, the network's input 64 px
    assert all(image.shape[1] == 80 for image in images)
    boxes = [t["boxes"] for t in targets]
    seen: list[torch.Tensor] = []
    models = {}
    for resolution in ("input", "original"):
        torch.manual_seed(0)
        model = build_model("fast", **READER, context_jitter=0.0, reader_resolution=resolution)
        model.reader.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        models[resolution] = model
    original = models["original"]
    assert original.config["reader_resolution"] == "original" and "reader_resolution" not in models["input"].config
    # the crops the reader sees, taken from each image at its own 80 px, whether reading given boxes in eval or the
    # ground truth in training
    expected = torch.cat([original.reader.crops(_normalised(image), b, torch.zeros(len(b), dtype=torch.long))
                          for image, b in zip(images, boxes)])
    with torch.no_grad():
        original.eval().read_boxes(images, boxes)
        models["input"].eval().read_boxes(images, boxes)
    original.train().freeze_detector()
    original(images, targets)
    read_original, read_input, trained = seen
    torch.testing.assert_close(read_original, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=0)
    # the default crops the rescaled input: the same squares, fewer source pixels
    assert read_input.shape == expected.shape and not torch.allclose(read_input, expected, atol=0.02)
    with pytest.raises(ValueError, match="reader_resolution"):
        build_model("fast", **READER, reader_resolution="full")
    with pytest.raises(ValueError, match="glyph reader"):
        build_model("fast", **TINY, reader_resolution="original")
