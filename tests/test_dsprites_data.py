"""dSprites: the official factor ordering, the regenerated images against the real preview
frames, and clear errors for bad archives and factors."""

import numpy as np
import pytest

from keras_vae_attn.data import DataError, dsprites

PREVIEW = "dsprites/dsprites_gif_frames_320x64x64_uint8.npy"


def test_index_follows_the_official_nested_order():
    # The archive enumerates color, shape, scale, orientation, pos_x, pos_y as nested
    # loops with pos_y innermost: row i is the i-th combination in that order.
    every = np.indices(dsprites.FACTOR_SIZES).reshape(6, -1).T
    assert len(every) == dsprites.NUM_IMAGES == 737_280
    assert np.array_equal(dsprites.index_from_factors(every), np.arange(len(every)))
    assert np.array_equal(dsprites.factors_from_index(np.arange(len(every))), every)
    assert dsprites.INDEX_BASES.tolist() == [737280, 245760, 40960, 1024, 32, 1]
    ellipse = dsprites.factors_from_index(np.array([245760]))[0]
    assert ellipse.tolist() == [0, 1, 0, 0, 0, 0]


def test_factor_values_match_the_official_metadata():
    values = dsprites.factor_values()
    assert [len(values[n]) for n in dsprites.FACTOR_NAMES] == list(dsprites.FACTOR_SIZES)
    assert values["orientation"][0] == 0 and np.isclose(values["orientation"][-1], 2 * np.pi)
    assert np.allclose(values["scale"], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])


def _iou_per_shape(frames):
    factors = dsprites.preview_factors()
    drawn = dsprites.render(factors).astype(bool)
    real = frames > 0
    result = {}
    for shape_class, name in enumerate(dsprites.SHAPES):
        rows = factors[:, 1] == shape_class
        result[name] = np.count_nonzero(drawn[rows] & real[rows]) / np.count_nonzero(
            drawn[rows] | real[rows]
        )
    return result


def test_generator_matches_the_real_preview_frames(shared_data):
    frames = np.load(shared_data / PREVIEW)
    assert frames.shape == (320, 64, 64)
    iou = _iou_per_shape(frames)
    # Square and ellipse are exact up to a few edge pixels; the heart's outline is a fit.
    assert iou["square"] > 0.99 and iou["ellipse"] > 0.99 and iou["heart"] > 0.95, iou


def test_position_moves_the_sprite_right_and_down_by_32_pixels():
    factors = np.array([[0, 0, 5, 0, 0, 0], [0, 0, 5, 0, 31, 0], [0, 0, 5, 0, 0, 31]])
    images = dsprites.render(factors).astype(bool)
    centres = [np.argwhere(image).mean(axis=0) for image in images]  # (row, col)
    assert np.allclose(centres[0], [15.5, 15.5])
    assert np.allclose(centres[1] - centres[0], [0, 32])
    assert np.allclose(centres[2] - centres[0], [32, 0])


def test_sampling_is_seeded_and_images_are_binary_float():
    data = dsprites.load(source="generate")
    first = data.sample_factors(50, np.random.default_rng(3))
    again = data.sample_factors(50, np.random.default_rng(3))
    assert np.array_equal(first, again)
    assert (first >= 0).all() and (first < np.array(dsprites.FACTOR_SIZES)).all()
    images = data.images_from_factors(first)
    assert images.shape == (50, 64, 64, 1) and images.dtype == np.float32
    assert set(np.unique(images)) == {0.0, 1.0}
    batch = next(data.batches(8, seed=1))
    assert batch.shape == (8, 64, 64, 1)


def test_bad_factors_name_the_factor():
    with pytest.raises(ValueError, match="orientation"):
        dsprites.render(np.array([[0, 0, 0, 40, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        dsprites.index_from_factors(np.zeros((2, 5), np.int64))


def test_missing_and_malformed_archives_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        dsprites.load(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=dsprites.ARCHIVE_NAME):
        dsprites.load(str(tmp_path))
    path = tmp_path / dsprites.ARCHIVE_NAME
    np.savez(path, imgs=np.zeros((10, 64, 64), np.uint8))
    with pytest.raises(DataError, match=r"shape \(10, 64, 64\)"):
        dsprites.load(str(tmp_path))
    np.savez(path, pictures=np.zeros(3))
    with pytest.raises(DataError, match="no 'imgs'"):
        dsprites.load(str(path))
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot read"):
        dsprites.load(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dSprites source"):
        dsprites.load(source="internet")
