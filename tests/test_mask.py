"""The annotation mask's pixels and its logged state (:mod:`dtl.model.mask`).

The mode/kind decision and the dict round trip are in ``test_data.py``; here: which pixels the box
covers at any size, that the input is never modified, and the ``on``/``off`` tag for every setting.
"""

import numpy as np
import pytest

from dtl.model.mask import DARK_FILL, LIGHT_FILL, AnnotationMask, annotation_mask, apply_mask, mask_state


@pytest.mark.parametrize("h, w, rows, cols", [
    (224, 224, 32, 44),  # the measured Aria stamp: bottom 32 rows, right 44 columns
    (448, 448, 64, 88),  # the same shares at twice the size
    (112, 200, 16, 39),  # 44/224 * 200 = 39.3 -> 39 columns
    (7, 7, 1, 1),        # 32/224 * 7 = 1.0, 44/224 * 7 = 1.375 -> 1
])
def test_apply_mask_fills_exactly_the_bottom_right_share_of_the_image(h, w, rows, cols):
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 200, (h, w, 3), dtype=np.uint8)
    before = rgb.copy()
    out = apply_mask(rgb, AnnotationMask())
    assert AnnotationMask().box(h, w) == (h - rows, w - cols)
    expected = before.copy()
    expected[h - rows:, w - cols:] = LIGHT_FILL
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(rgb, before)  # a copy: the caller's image keeps its stamp


def test_apply_mask_without_a_mask_returns_the_image_itself():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    assert apply_mask(rgb, None) is rgb


def test_apply_mask_uses_the_masks_own_box_and_colour_on_float_images():
    rgb = np.full((10, 20, 3), 0.5)
    out = apply_mask(rgb, AnnotationMask(height=0.3, width=0.25, fill=DARK_FILL))
    assert out.dtype == np.float64
    assert (out[7:, 15:] == 0).all() and (out[:7] == 0.5).all() and (out[:, :15] == 0.5).all()


def test_apply_mask_refuses_a_fill_the_image_cannot_hold_instead_of_wrapping_it():
    # a spec with fill 256 must not silently paint the box black (256 wraps to 0 in uint8)
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(OverflowError):
        apply_mask(rgb, AnnotationMask(fill=(256, 0, 0)))
    with pytest.raises(OverflowError):
        apply_mask(rgb, AnnotationMask(fill=(0, -1, 0)))


# oracle: the documented rule, written out as a table (on/off: always; auto: on for Aria and its demo only)
@pytest.mark.parametrize("mode, kind, expected", [
    ("on", "aria", "on"), ("on", "cnmc", "on"), ("on", "imagefolder", "on"),
    ("off", "aria", "off"), ("off", "demo-aria", "off"), ("off", "cnmc", "off"),
    ("auto", "aria", "on"), ("auto", "demo-aria", "on"),
    ("auto", "cnmc", "off"), ("auto", "demo-cnmc", "off"), ("auto", "imagefolder", "off"),
])
@pytest.mark.parametrize("variant", ["original", "segmented"])
def test_mask_state_is_the_logged_on_off_of_every_setting(mode, kind, expected, variant):
    assert mask_state(mode, kind, variant) == expected
    assert mask_state(mode, kind) == expected
    mask = annotation_mask(mode, kind, variant)
    assert (mask is not None) == (expected == "on")
    if mask is not None:
        assert mask.fill == (DARK_FILL if variant == "segmented" else LIGHT_FILL)
