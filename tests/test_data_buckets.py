"""Bucket math: exact values worked out by hand from the sd-scripts algorithm (see library/data/buckets.py)."""

import random

import pytest

from library.data import buckets as bk

# max area 512*512 = 262144, step 64, sides 256..1024: for width w the height is min(1024, (262144 // w) // 64 * 64)
# 256 -> 1024, 320 -> 768 (819 // 64 = 12), 384 -> 640 (682), 448 -> 576 (585), 512 -> 512, 576 -> 448 (455),
# 640 -> 384 (409), 704 -> 320 (372), 768 -> 320 (341), 832 -> 256 (315), 896 -> 256 (292), 960 -> 256, 1024 -> 256.
LADDER_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
              (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
              (1024, 256)]


def test_ladder_sd1_default():
    assert bk.make_bucket_resolutions((512, 512), 256, 1024, 64) == LADDER_512


def test_ladder_step32_small():
    # area 4096; square 64; w=32 -> min(128, 128) = 128; w=64 -> 64; w=96 -> 42 -> 32; w=128 -> 32.
    assert bk.make_bucket_resolutions((64, 64), 32, 128, 32) == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]


def test_ladder_drops_heights_below_min():
    # area 16384 (128x128), step 32, min 96: w=96 -> 170 -> 160; w=128 -> 128; w=160 -> 102 -> 96;
    # w=192 -> 85 -> 64 < 96: dropped.
    assert bk.make_bucket_resolutions((128, 128), 96, 192, 32) == [(96, 160), (128, 128), (160, 96)]


@pytest.mark.parametrize("image, bucket, resized, crop", [
    ((1000, 1000), (512, 512), (512, 512), (0, 0)),
    # aspect 1.778: 640x384 (1.667) is nearest; cover scale = max(640/1920, 384/1080) = 0.3556 -> 682.7 -> 683
    ((1920, 1080), (640, 384), (683, 384), (21, 0)),
    # aspect 0.75: 448x576 (0.778) beats 384x640 (0.6); scale = max(448/600, 576/800) = 0.7467 -> 597.3 -> 597
    ((600, 800), (448, 576), (448, 597), (0, 10)),
    ((300, 1200), (256, 1024), (256, 1024), (0, 0)),  # exact aspect 0.25
    ((512, 768), (384, 640), (427, 640), (21, 0)),  # 0.667: 0.6 (err 0.067) beats 0.778 (err 0.111)
    ((640, 384), (640, 384), (640, 384), (0, 0)),  # the image size is a bucket: used as is
])
def test_select_bucket_table(image, bucket, resized, crop):
    p = bk.select_bucket(image, LADDER_512)
    assert (p.bucket, p.resized) == (bucket, resized)
    assert bk.crop_offset(p.resized, p.bucket, None) == crop
    assert p.ar_error == pytest.approx(bucket[0] / bucket[1] - image[0] / image[1])


def test_select_bucket_tie_takes_first_in_ladder_order():
    ladder = [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]
    # 64x96 has aspect 2/3: 32x96 (1/3) and 64x64 (1) are equally far; sd-scripts' argmin takes the first.
    assert bk.select_bucket((64, 96), ladder).bucket == (32, 96)


@pytest.mark.parametrize("image, bucket, resized", [
    ((300, 200), (256, 192), (300, 200)),  # smaller than max area: no resize, bucket rounded down to the step
    # 1024x768 > 512^2: shrunk to 591.2 x 443.4; width-first snaps to 576 x 384 (aspect 1.5), height-first to
    # 512 x 384 (1.333 = exact): height-first wins, resized (512, 384)
    ((1024, 768), (512, 384), (512, 384)),
    ((2000, 500), (1024, 256), (1024, 256)),  # both ways exact: sd-scripts takes height-first on a tie
    ((100, 100), (64, 64), (100, 100)),
])
def test_no_upscale_table(image, bucket, resized):
    p = bk.select_bucket_no_upscale(image, 512 * 512, 64)
    assert (p.bucket, p.resized) == (bucket, resized)
    assert p.bucket[0] <= p.resized[0] and p.bucket[1] <= p.resized[1]


def test_cover_size_covers_and_keeps_aspect():
    assert bk.cover_size((100, 50), (64, 64)) == (128, 64)
    assert bk.cover_size((50, 100), (64, 32)) == (64, 128)


def test_random_crop_in_range_and_seeded():
    offsets = {bk.crop_offset((100, 80), (64, 64), random.Random(i)) for i in range(200)}
    assert all(0 <= l <= 36 and 0 <= t <= 16 for l, t in offsets)
    assert len(offsets) > 50
    assert bk.crop_offset((100, 80), (64, 64), random.Random(3)) == bk.crop_offset((100, 80), (64, 64), random.Random(3))


def test_sequence_batch_sizes():
    # tokens: 512x512 -> 64*64 = 4096; 256x1024 -> 32*128 = 4096; 1024x1024 -> 16384; 256x256 -> 1024
    sizes = bk.sequence_batch_sizes([(512, 512), (256, 1024), (1024, 1024), (256, 256)], 4 * 4096)
    assert sizes == {(512, 512): 4, (256, 1024): 4, (1024, 1024): 1, (256, 256): 16}
    assert bk.sequence_batch_sizes([(1024, 1024)], 100) == {(1024, 1024): 1}  # never 0


def test_bucket_report():
    text = bk.bucket_report([((512, 512), 0.0), ((512, 512), 0.1), ((640, 384), -0.2)])
    assert text.splitlines() == ["buckets: 2 for 3 images", "  512x512: 2", "  640x384: 1",
                                 "  mean aspect-ratio error: 0.1000"]
    assert "(batch 3)" in bk.bucket_report([((512, 512), 0.0)], {(512, 512): 3})
