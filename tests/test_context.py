"""The context head: geometry features, a fresh head that changes nothing, learning what only the neighbours tell,
and growing a trained network by a context head."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, transfer_weights
from core.models import build_model
from core.models.context import GEOMETRY_FEATURES, ContextHead, box_geometry
from tests.sample_models import TINY
from tests.test_models import captchas, check_detections


def test_geometry_is_relative_to_the_image_and_its_median_character() -> None:
    boxes = torch.tensor([
        [[100.0, 10.0, 110.0, 30.0], [10.0, 20.0, 20.0, 40.0], [50.0, 0.0, 90.0, 40.0]],  # heights 20, 20, 40
        [[0.0, 0.0, 16.0, 32.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # one box, then padding
    ])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    sizes = torch.tensor([[64.0, 200.0], [64.0, 100.0]])
    g = box_geometry(boxes, mask, sizes)
    assert g.shape == (2, 3, GEOMETRY_FEATURES)
    # centre x / width, centre y / height, width / height, height / height
    torch.testing.assert_close(g[0, 0, :4], torch.tensor([105 / 200, 20 / 64, 10 / 64, 20 / 64]))
    # log of width and height over the median height (20 in image 0, 32 in image 1)
    torch.testing.assert_close(g[0, 2, 4:6], torch.log(torch.tensor([40 / 20, 40 / 20])))
    torch.testing.assert_close(g[1, 0, 4:6], torch.log(torch.tensor([16 / 32, 1.0])))
    # rank from the left over the number of boxes
    torch.testing.assert_close(g[0, :, 6], torch.tensor([2 / 3, 0.0, 1 / 3]))
    assert torch.equal(g[1, 1:], torch.zeros(2, GEOMETRY_FEATURES))


def test_a_fresh_head_changes_nothing_and_tolerates_images_without_boxes() -> None:
    head = ContextHead(in_features=8, width=16, layers=1, heads=2, num_classes=36)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = head(torch.randn(2, 3, 8), torch.randn(2, 3, GEOMETRY_FEATURES), mask)
    assert out.shape == (2, 3, 36) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero corrections: the box head's reading stands
    with torch.no_grad():
        head.cls.weight.normal_()
    assert torch.isfinite(head(torch.randn(2, 3, 8), torch.zeros(2, 3, GEOMETRY_FEATURES), mask)).all()


def _case_puzzles(count: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of 3-6 glyphs, all upper or all lower case. Appearance ids: letters a, b, c in either case (0-5) and a
    plain bar (6) that reads ``i`` (label 3: a capital I) in an upper-case image and ``l`` (label 4) in a lower-case
    one. Labels of letters: 0-2 whatever their case. Returns hidden ``[count, 6, 8]``, labels, mask."""
    hidden = torch.zeros(count, 6, 8)
    labels = torch.zeros(count, 6, dtype=torch.int64)
    mask = torch.zeros(count, 6, dtype=torch.bool)
    for n in range(count):
        upper = rng.random() < 0.5
        for k in range(rng.randint(3, 6)):
            if k == 0 or (k > 1 and rng.random() < 0.3):  # every image has a bar and a letter
                appearance, label = 6, 3 if upper else 4
            else:
                letter = rng.randrange(3)
                appearance, label = letter + (3 if upper else 0), letter
            hidden[n, k, appearance] = 1.0
            labels[n, k] = label
            mask[n, k] = True
    return hidden, labels, mask


def test_the_head_learns_what_only_the_neighbours_tell() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    head = ContextHead(in_features=8, width=32, layers=1, heads=2, num_classes=5)
    geometry = torch.zeros(256, 6, GEOMETRY_FEATURES)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        hidden, labels, mask = _case_puzzles(256, rng)
        loss = torch.nn.functional.cross_entropy(head(hidden, geometry, mask)[mask], labels[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    hidden, labels, mask = _case_puzzles(256, random.Random(1))
    with torch.no_grad():
        predicted = head(hidden, geometry, mask).argmax(-1)
    bars = mask & (hidden[..., 6] == 1)
    # alone, a bar is i or l by a coin flip; with its neighbours it is always read right
    assert bool((predicted[bars] == labels[bars]).all())
    assert bool((predicted[mask] == labels[mask]).all())


def test_a_trained_network_grows_a_context_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = build_model("fast", **TINY)
    grown = build_model("fast", **TINY, context_layers=1, context_width=16, context_heads=2)
    fresh = transfer_weights(grown, small.state_dict())
    assert fresh and all(name.startswith("context.") for name in fresh)
    assert torch.equal(grown.box_head.fc1.weight, small.box_head.fc1.weight)
    wider = build_model("fast", **{**TINY, "head_width": 48}, context_layers=1)
    with pytest.raises(CheckpointError, match="do not fit"):
        transfer_weights(wider, small.state_dict())


def test_a_network_with_context_keeps_the_contract_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("fast", **TINY, score_thresh=0.0, context_layers=1, context_width=16, context_heads=2)
    with torch.no_grad():
        model.box_head.cls.bias[-1] += 8.0  # objectness: the untrained network reports detections
        model.context.cls.weight.normal_(0.0, 1.0)  # and its context head changes their labels
    images, targets, _ = captchas(3, seed=5, max_width=300)
    model.train()
    losses = model(images, targets)
    assert {"rpn_cls", "rpn_reg", "cls", "box_reg", "context"} <= set(losses)
    assert float(losses["context"].detach()) > 0
    model.eval()
    with torch.inference_mode():
        out = model(images + [torch.ones(3, 80, 150)])
    check_detections(out, images + [torch.ones(3, 80, 150)])
    assert all(len(d["labels"]) > 0 for d in out[:3])
    path = save_checkpoint(model, tmp_path / "ctx.safetensors")
    loaded, meta = load_checkpoint(path)
    assert meta["model_config"]["context_layers"] == 1
    with torch.inference_mode():
        again = loaded(images)
    for a, b in zip(out, again):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
