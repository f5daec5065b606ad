"""Dead-pixel fixing and the shared normalisation."""

import numpy as np
import pytest

from pipeline.models.preprocess import SATURATION, fix_dead_pixels, fix_dead_pixels_slow, prepare, to_model_input


def _frame_with_dead_pixels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frame = rng.poisson(5.0, size=(40, 60)).astype(np.int32)
    frame[rng.random(frame.shape) < 0.05] = -2
    frame[0, 0] = frame[0, 1] = frame[1, 0] = frame[1, 1] = -2  # a dead corner block
    frame[10:13, 10:13] = 0
    frame[11, 11] = -2  # dead pixel whose neighbours are all zero
    return frame


def test_vectorised_matches_dipid_loop() -> None:
    frame = _frame_with_dead_pixels()
    np.testing.assert_allclose(fix_dead_pixels(frame), fix_dead_pixels_slow(frame), rtol=1e-12)


def test_dead_pixel_gets_mean_of_positive_neighbours_or_zero() -> None:
    frame = np.array([[4, 0, 8], [2, -2, -2], [0, 6, 0]], dtype=np.int32)
    fixed = fix_dead_pixels(frame)
    assert fixed[1, 1] == pytest.approx((4 + 8 + 2 + 6) / 4)
    assert fixed[1, 2] == pytest.approx((8 + 6) / 2)
    isolated = np.zeros((3, 3), dtype=np.int32)
    isolated[1, 1] = -2
    assert fix_dead_pixels(isolated)[1, 1] == 0.0
    assert frame[1, 1] == -2  # input untouched


def test_non_finite_pixels_are_dead() -> None:
    frame = np.full((3, 3), 3.0)
    frame[1, 1] = np.nan
    frame[0, 0] = np.inf
    fixed = fix_dead_pixels(frame)
    assert np.isfinite(fixed).all()
    assert fixed[1, 1] == pytest.approx(3.0)


def test_model_input_is_log_scaled_and_safe() -> None:
    frame = np.array([[0, 1, SATURATION, 4 * SATURATION], [-5, np.nan, np.inf, -np.inf]], dtype=np.float64)
    x = to_model_input(frame)
    assert x.dtype == np.float32
    assert x[0, 0] == 0.0 and x[0, 2] == pytest.approx(1.0) and x[0, 3] == pytest.approx(1.0)
    assert 0 < x[0, 1] < 0.1
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert prepare(_frame_with_dead_pixels()).shape == (40, 60)


def test_local_background_follows_diffuse_scatter_but_not_peaks() -> None:
    from pipeline.models.preprocess import local_background

    rows, cols = np.mgrid[0:195, 0:487].astype(np.float64)
    diffuse = 3.0 + 20.0 * np.exp(-0.5 * (((rows - 90) / 60) ** 2 + ((cols - 250) / 120) ** 2))
    expected = diffuse.copy()
    expected[80:92, 240:256] += 5000.0  # a bright 12 x 16 peak on top of the hump
    frame = np.random.default_rng(1).poisson(expected).astype(np.float64)
    background = local_background(frame)
    assert background.shape == frame.shape
    assert np.abs(background - diffuse).mean() < 1.0  # the hump is followed to within a count
    assert background[80:92, 240:256].max() < diffuse[80:92, 240:256].max() + 3.0  # the peak is not


def test_significance_is_noise_units_above_background_and_safe() -> None:
    from pipeline.models.preprocess import SIGNIFICANCE_SCALE, prepare_significance, to_significance

    rows, cols = np.mgrid[0:195, 0:487].astype(np.float64)
    diffuse = 2.0 + 18.0 * np.exp(-0.5 * (((rows - 100) / 50) ** 2 + ((cols - 300) / 100) ** 2))
    frame = np.random.default_rng(2).poisson(diffuse).astype(np.int32)
    frame[50:56, 60:66] += 200  # ~ 200 / sqrt(3) ~ 100 sigma above a flat 2-count background
    frame[5, 5] = -2
    significance = prepare_significance(frame)
    assert significance.dtype == np.float32 and significance.shape == frame.shape
    sigma = np.sinh(significance.astype(np.float64) * SIGNIFICANCE_SCALE)  # back to noise units
    background_only = np.ones(frame.shape, dtype=bool)
    background_only[45:61, 55:71] = False
    assert abs(np.median(sigma[background_only])) < 0.5  # the hump is gone, flat or not
    assert 0.7 < np.std(sigma[background_only]) < 1.5  # Poisson noise comes out as ~1 sigma
    assert np.median(sigma[50:56, 60:66]) > 50
    odd = np.array(frame, dtype=np.float64)
    odd[0, 0], odd[0, 1], odd[0, 2] = np.nan, np.inf, -np.inf
    assert np.isfinite(to_significance(odd)).all()


def test_background_interpolation_is_map_coordinates_bilinear_held_at_the_edges() -> None:
    """local_background interpolates between tile centres with two small matrix products; it must be what
    scipy's map_coordinates(order=1, mode="nearest") gives, which it replaced (4 ms a frame)."""
    from scipy import ndimage

    from pipeline.models.preprocess import _interpolation_weights

    grid = np.random.default_rng(3).random((9, 21)) * 50
    block, height, width = 24, 195, 487
    centre = (block - 1) / 2.0
    rows, cols = np.meshgrid((np.arange(height) - centre) / block, (np.arange(width) - centre) / block, indexing="ij")
    expected = ndimage.map_coordinates(grid, [rows, cols], order=1, mode="nearest")
    found = _interpolation_weights(height, 9, block) @ grid @ _interpolation_weights(width, 21, block).T
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-12)


def test_torch_preprocessing_equals_numpys() -> None:
    """The device version (pipeline.models.preprocess_torch) of every step against NumPy's, on simulator frames with
    dead, NaN and infinite pixels: the inputs the models see are the same (float32), the background within 1e-12."""
    import torch

    from pipeline.models import preprocess as reference
    from pipeline.models import preprocess_torch
    from pipeline.simulator.synth import RockingScan

    frames = np.stack([RockingScan(4, 5).frame(i)[0] for i in range(4)]).astype(np.float64)
    frames[0, 5, 7], frames[1, 0, 0], frames[2, 194, 486] = np.nan, -2.0, np.inf
    fixed = np.stack([reference.fix_dead_pixels(frame) for frame in frames])
    fixed_t = preprocess_torch.fix_dead_pixels(torch.from_numpy(frames))
    np.testing.assert_array_equal(fixed_t.numpy(), fixed)
    background = np.stack([reference.local_background(frame) for frame in fixed])
    np.testing.assert_allclose(preprocess_torch.local_background(fixed_t).numpy(), background, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(preprocess_torch.to_model_input(fixed_t).numpy(), np.stack([reference.to_model_input(f) for f in fixed]))
    np.testing.assert_allclose(preprocess_torch.to_significance(fixed_t).numpy(),
                               np.stack([reference.to_significance(f) for f in fixed]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(10, 10), (1, 487), (195, 1), (1, 1), (23, 30), (619, 487)])
def test_torch_preprocessing_equals_numpys_for_any_frame_shape(shape) -> None:
    """Frames narrower than a background block (24 pixels) failed on the device (torch's reflect pad must be smaller
    than the frame); NumPy reflects repeatedly. Both give the same inputs for every shape."""
    import torch

    from pipeline.models import preprocess as reference
    from pipeline.models import preprocess_torch

    frame = np.random.default_rng(sum(shape)).poisson(20.0, size=shape).astype(np.float64)
    frame.flat[::7] = -2.0
    fixed_t = preprocess_torch.fix_dead_pixels(torch.from_numpy(frame[None]))
    fixed = reference.fix_dead_pixels(frame)
    np.testing.assert_array_equal(fixed_t[0].numpy(), fixed)
    np.testing.assert_allclose(preprocess_torch.local_background(fixed_t)[0].numpy(), reference.local_background(fixed),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(preprocess_torch.to_significance(fixed_t)[0].numpy(), reference.to_significance(fixed), rtol=0, atol=1e-6)


def test_real_frames_with_module_gaps_preprocess_alike_on_numpy_and_torch() -> None:
    """Real Pilatus crops of 619 x 487 and 1065 x 1030 (dials/data-files thaumatin): the module gaps read -1 and dead
    pixels -2; no fixed dead-pixel list: whatever reads below 0 is mended from its neighbours, for any shape."""
    from pathlib import Path

    import torch

    from pipeline.models import preprocess as reference
    from pipeline.models import preprocess_torch
    from pipeline.models.real_frames import load_frames

    for name in ("pilatus_300k", "eiger_1m_shape"):
        frame = load_frames(Path(__file__).parent / "data" / "real_frames" / f"{name}.npz")[0][0]
        fixed = reference.fix_dead_pixels(frame)
        assert fixed.min() >= 0.0 and (fixed[frame >= 0] == frame[frame >= 0]).all()
        assert (fixed[200:207] == 0).all()  # inside a 17-row gap no pixel has a live neighbour
        fixed_t = preprocess_torch.fix_dead_pixels(torch.from_numpy(frame[None]))
        np.testing.assert_array_equal(fixed_t[0].numpy(), fixed)
        np.testing.assert_array_equal(preprocess_torch.to_model_input(fixed_t)[0].numpy(), reference.to_model_input(fixed))
        np.testing.assert_allclose(preprocess_torch.to_significance(fixed_t)[0].numpy(), reference.to_significance(fixed),
                                   rtol=0, atol=1e-6)
