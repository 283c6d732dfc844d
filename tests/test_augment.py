import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from busgen_lib.data.augment import AugmentConfig, augment, flip_boxes, get_augmentation, jitter_intensity, prepare
from busgen_lib.data.dataset import boxes_to_mask

SOURCE_HW = (48, 64)  # non-square on purpose: crop and resize scale the axes differently
OUT = 32
BIG = 64  # output size for the pixel-accuracy test
GEOMETRY_ONLY = AugmentConfig(brightness=(1.0, 1.0), contrast=(1.0, 1.0), gamma=(1.0, 1.0))


@st.composite
def box(draw):
    x0 = draw(st.floats(0.0, 0.85))
    y0 = draw(st.floats(0.0, 0.85))
    return [x0, y0, draw(st.floats(x0 + 0.12, 1.0)), draw(st.floats(y0 + 0.12, 1.0))]


box_lists = st.lists(box(), min_size=0, max_size=3).map(lambda b: torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
seeds = st.integers(0, 2**31 - 1)
configs = st.builds(AugmentConfig, min_crop_scale=st.floats(0.3, 1.0), flip_p=st.sampled_from([0.0, 0.5, 1.0]))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bright_bbox(image: torch.Tensor) -> list[int]:
    """[c0, r0, c1, r1] (exclusive ends) of pixels above half intensity."""
    rows, cols = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


@settings(max_examples=60, deadline=None)
@given(boxes=box_lists, seed=seeds, config=configs)
def test_augmented_boxes_stay_valid_and_inside_the_image(boxes, seed, config):
    image, out = augment(torch.rand(1, *SOURCE_HW), boxes, OUT, config, _gen(seed))
    assert image.shape == (1, OUT, OUT)  # its range [0, 1] is a clamp in augment(): not a property to test
    assert out.shape == boxes.shape
    assert ((out >= 0) & (out <= 1)).all()
    assert (out[:, 0] < out[:, 2]).all() and (out[:, 1] < out[:, 3]).all()


def _snap_to_pixels(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes on the source pixel grid, so the drawn rectangle is exactly the box."""
    scale = torch.tensor([SOURCE_HW[1], SOURCE_HW[0]] * 2)
    return (boxes * scale).round() / scale


@settings(max_examples=60, deadline=None)
@given(boxes=box_lists.filter(len).map(_snap_to_pixels), seed=seeds, config=configs)
def test_each_box_follows_its_bright_rectangle_through_crop_resize_and_flip(boxes, seed, config):
    # The crop depends only on the boxes and image shape, so equal seeds give equal geometry:
    # draw one box at a time, pass all boxes, and the k-th output box must frame the k-th rectangle.
    # At BIG >= source size a one-source-pixel misplacement is >= 1 output pixel, beyond the tolerance.
    config = AugmentConfig(min_crop_scale=config.min_crop_scale, flip_p=config.flip_p,
                           brightness=(1.0, 1.0), contrast=(1.0, 1.0), gamma=(1.0, 1.0))
    for k in range(len(boxes)):
        drawn = boxes_to_mask(boxes[k : k + 1], SOURCE_HW)[None]
        image, out = augment(drawn, boxes, BIG, config, _gen(seed))
        assert _bright_bbox(image) == pytest.approx((out[k] * BIG).tolist(), abs=0.75)


@settings(max_examples=30, deadline=None)
@given(boxes=box_lists, seed=seeds)
def test_flip_p_one_mirrors_image_and_boxes_of_the_no_flip_draw(boxes, seed):
    source = torch.rand(1, *SOURCE_HW)
    plain_img, plain = augment(source, boxes, OUT, AugmentConfig(flip_p=0.0), _gen(seed))
    flip_img, flipped = augment(source, boxes, OUT, AugmentConfig(flip_p=1.0), _gen(seed))
    torch.testing.assert_close(flipped, flip_boxes(plain), rtol=0, atol=0)
    torch.testing.assert_close(flip_img, plain_img.flip(-1))


def test_flip_boxes_follows_the_documented_formula_and_is_an_involution():
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.5, 0.0, 1.0, 0.25]])
    flipped = flip_boxes(boxes)
    torch.testing.assert_close(flipped, torch.tensor([[0.6, 0.2, 0.9, 0.9], [0.0, 0.0, 0.5, 0.25]]))
    torch.testing.assert_close(flip_boxes(flipped), boxes)


@settings(max_examples=30, deadline=None)
@given(boxes=box_lists, seed=seeds)
def test_intensity_jitter_never_moves_boxes(boxes, seed):
    strong = AugmentConfig(brightness=(0.5, 1.5), contrast=(0.5, 1.5), gamma=(0.5, 2.0))
    _, jittered = augment(torch.rand(1, *SOURCE_HW), boxes, OUT, strong, _gen(seed))
    _, plain = augment(torch.rand(1, *SOURCE_HW), boxes, OUT, GEOMETRY_ONLY, _gen(seed))
    torch.testing.assert_close(jittered, plain, rtol=0, atol=0)


def test_intensity_jitter_changes_pixels_and_keeps_the_unit_range():
    image = torch.rand(1, 16, 16)
    out = jitter_intensity(image, AugmentConfig(brightness=(1.5, 1.5), contrast=(1.0, 1.0), gamma=(1.0, 1.0)), _gen(0))
    torch.testing.assert_close(out, (image * 1.5).clamp(0, 1))
    out = jitter_intensity(image, AugmentConfig(brightness=(1.0, 1.0), contrast=(1.0, 1.0), gamma=(2.0, 2.0)), _gen(0))
    torch.testing.assert_close(out, image**2)


def test_boxes_spanning_the_whole_image_forbid_any_crop():
    image = torch.rand(1, *SOURCE_HW)
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.7, 0.7, 1.0, 1.0]])
    out_img, out = augment(image, boxes, OUT, AugmentConfig(flip_p=0.0, brightness=(1.0, 1.0), contrast=(1.0, 1.0),
                                                            gamma=(1.0, 1.0)), _gen(5))
    torch.testing.assert_close(out, boxes)
    torch.testing.assert_close(out_img, prepare(image, boxes, OUT)[0])


def test_augment_is_reproducible_from_the_generator_and_varies_across_seeds():
    image, boxes = torch.rand(1, *SOURCE_HW), torch.tensor([[0.4, 0.4, 0.6, 0.6]])
    a = augment(image, boxes, OUT, AugmentConfig(), _gen(1))
    b = augment(image, boxes, OUT, AugmentConfig(), _gen(1))
    c = augment(image, boxes, OUT, AugmentConfig(), _gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])


def test_prepare_resizes_without_touching_boxes():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    image, out = prepare(torch.rand(1, *SOURCE_HW), boxes, OUT)
    assert image.shape == (1, OUT, OUT)
    torch.testing.assert_close(out, boxes, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"min_crop_scale": 0.0}, {"flip_p": 1.5}, {"gamma": (1.2, 0.8)}])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_device_preset_keeps_orientation_and_grey_levels_while_strong_does_not():
    """Pretraining's "device" preset must not touch the cues that identify a scanner (grey map, overlay side)."""
    image = torch.cat([torch.full((1, 32, 16), 0.2), torch.full((1, 32, 16), 0.7)], dim=2)  # dark left, bright right
    no_boxes = torch.zeros(0, 4)

    def views(name):
        return [augment(image, no_boxes, OUT, get_augmentation(name), _gen(seed))[0] for seed in range(20)]

    def keeps(view):
        half = view.shape[-1] // 2
        return view[..., :half].mean() < view[..., half:].mean() and abs(view.mean() - image.mean()) < 0.03

    assert all(keeps(v) for v in views("device"))
    assert not all(keeps(v) for v in views("strong"))
    with pytest.raises(ValueError, match="unknown augmentation"):
        get_augmentation("heavy")
