"""Grounding answers: box text round trip, IoU against hand values, Acc@0.5, padded-square mapping."""

import numpy as np
import pytest
from PIL import Image

from mm import grounding as g
from mm.data.images import pad_to_square


def test_format_and_parse_round_trip():
    text = g.format_boxes([(0.1, 0.2, 0.5, 0.9), (0, 0, 1.2, 0.333)])
    assert text == "[0.10, 0.20, 0.50, 0.90]; [0.00, 0.00, 1.00, 0.33]"
    assert g.parse_boxes(text) == [(0.1, 0.2, 0.5, 0.9), (0.0, 0.0, 1.0, 0.33)]
    assert g.parse_boxes("the box is [0.1,0.2, 0.3 ,0.4] and [1, 2, 3]") == [(0.1, 0.2, 0.3, 0.4)]
    assert g.parse_boxes("no box") == []
    assert g.grounding_prompt("the red car").endswith("describes: the red car")


def test_iou_hand_values():
    assert g.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert g.iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert g.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert g.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_accuracy_at_half():
    preds = ["[0.0, 0.0, 0.5, 0.5]", "[0.0, 0.0, 0.2, 0.2]", "nothing", "[0.5, 0.5, 1, 1]; [0, 0, 1, 1]"]
    targets = [(0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5), (0, 0, 1, 1), (0.5, 0.5, 1, 1)]
    assert g.accuracy_at(preds, targets) == 0.5  # exact, too small (IoU 0.16), missing, first box right
    with pytest.raises(ValueError):
        g.accuracy_at(preds[:1], targets)


@pytest.mark.parametrize("size", [(300, 200), (201, 400), (128, 128)])
def test_padded_square_mapping_matches_the_padding(size):
    w, h = size
    box = (w * 0.25, h * 0.1, w * 0.75, h * 0.6)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    img.paste((255, 0, 0), tuple(int(round(v)) for v in box))
    sq = np.asarray(pad_to_square(img, (0, 0, 0)))
    ys, xs = np.nonzero((sq[..., 0] == 255) & (sq[..., 1] == 0))
    side = sq.shape[0]
    norm = g.to_padded_square(box, w, h)
    measured = (xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side)
    np.testing.assert_allclose(norm, measured, atol=1.0 / side)
    np.testing.assert_allclose(g.from_padded_square(norm, w, h), box, atol=1e-9)
