"""The SSLM: DiPID's layout, losses, peak channels, loading a DiPID state dict."""

import numpy as np
import pytest
import torch

from pipeline.config import ModelSettings, SSLMSettings, TLMSettings
from pipeline.models.joint import JointPredictor
from pipeline.models.sslm import SSLM, choose_peak_channels, clusters_and_mask, losses, total_loss


def test_state_dict_uses_dipid_keys() -> None:
    keys = {key.rsplit(".", 1)[0] for key in SSLM().state_dict()}
    assert keys == {"conv1", "norm1", "conv2.0", "norm2.0", "conv3", "norm3"}
    assert SSLM().state_dict()["conv2.0.weight"].shape == (100, 100, 3, 3)


def test_losses_are_finite_and_context_off_by_default() -> None:
    response = SSLM()(torch.rand(2, 1, 16, 20))
    assert response.shape == (2, 100, 16, 20)
    parts = losses(response)
    assert set(parts) == {"similarity", "continuity", "context"}
    loss = total_loss(parts)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, parts["similarity"] + parts["continuity"])


def test_clusters_and_mask() -> None:
    response = torch.zeros(1, 100, 2, 2)
    response[0, 5, 0, 0] = response[0, 9, 1, 1] = 1.0
    clusters, mask = clusters_and_mask(response, [9])
    assert clusters.dtype == np.uint8 and clusters[0, 0, 0] == 5 and clusters[0, 1, 1] == 9
    assert mask.tolist() == [[[0, 0], [0, 1]]]


def test_choose_peak_channels_is_greedy_on_mean_iou() -> None:
    truth = np.zeros(100, dtype=np.uint16)
    truth[:30] = 1
    clusters = np.zeros(100, dtype=np.int64)
    clusters[:20] = 66  # pure peak
    clusters[20:30] = 13  # the rim: peak too
    clusters[30:34] = 13  # ... with a little background
    clusters[34:40] = 4  # background only
    channels, iou = choose_peak_channels(clusters, truth)
    assert channels == [66, 13]
    assert iou == 30 / 34
    # per frame: a cluster that fires on an empty frame costs that frame its IoU of 1
    frames_clusters = np.stack([clusters, np.full(100, 4)]).reshape(2, 10, 10)
    frames_truth = np.stack([truth, np.zeros(100, dtype=np.uint16)]).reshape(2, 10, 10)
    channels, iou = choose_peak_channels(frames_clusters, frames_truth)
    assert channels == [66, 13] and iou == pytest.approx((30 / 34 + 1) / 2)


def test_dipid_state_dict_loads_with_dipid_peak_channels(tmp_path) -> None:
    path = tmp_path / "sslm_dipid.pth"
    torch.save(SSLM().state_dict(), path)
    settings = ModelSettings(tlm=TLMSettings(enabled=False), sslm=SSLMSettings(weights=path))
    predictor = JointPredictor.from_settings(settings)
    assert predictor.provenance()["sslm"]["settings"]["peak_channels"] == [66, 13]
    frame = np.random.default_rng(0).poisson(3, size=(195, 487)).astype(np.int32)
    prediction = predictor.predict_image(frame)
    assert prediction.ssl_clusters.shape == (195, 487) and prediction.ssl_clusters.dtype == np.uint8
    assert np.array_equal(prediction.ssl_mask, np.isin(prediction.ssl_clusters, [66, 13]).astype(np.uint8))
    assert not prediction.tlm_labels.any() and prediction.detections == []
    override = ModelSettings(tlm=TLMSettings(enabled=False), sslm=SSLMSettings(weights=path, peak_channels=[1]))
    assert JointPredictor.from_settings(override).provenance()["sslm"]["settings"]["peak_channels"] == [1]


def test_dipid_checkpoints_get_dipids_final_relu_and_the_shipped_card_keeps_its_own(tmp_path):
    from pipeline.config import SSLMSettings
    from pipeline.models.joint import load_sslm

    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 20)
    with_relu, without = SSLM(final_relu=True).eval(), SSLM(final_relu=False).eval()
    without.load_state_dict(with_relu.state_dict())
    assert (with_relu(x) >= 0).all() and (without(x) < 0).any()  # fresh BatchNorm in eval is ~identity
    path = tmp_path / "dipid_sslm.pt"
    torch.save(with_relu.state_dict(), path)
    model, loaded = load_sslm(SSLMSettings(weights=path))
    assert model.final_relu is True and loaded.card.peak_channels == [66, 13]
    shipped, card = load_sslm(SSLMSettings())
    assert shipped.final_relu is True and card.card.final_relu is True  # trained with DiPID's block
    assert card.card.input_transform == "significance"


def test_the_card_picks_the_sslm_input_and_an_unknown_one_is_one_line(tmp_path) -> None:
    from pipeline.models.card import ModelCard, WeightsError, save_weights
    from pipeline.models.preprocess import prepare, prepare_significance

    torch.manual_seed(3)
    model = SSLM().eval()
    frame = np.random.default_rng(4).poisson(4, size=(195, 487)).astype(np.int32)
    frame[60:70, 100:115] += 300
    tlm_off = TLMSettings(enabled=False)
    for transform, prepare_input in (("significance", prepare_significance), ("log", prepare), (None, prepare)):
        path = tmp_path / f"sslm-{transform}.safetensors"
        save_weights(path, model.state_dict(), ModelCard(architecture="sslm", peak_channels=[0], input_transform=transform))
        settings = ModelSettings(precision="float32", tlm=tlm_off, sslm=SSLMSettings(weights=path))
        predicted = JointPredictor.from_settings(settings).predict_image(frame)
        with torch.inference_mode():
            logits = model(torch.from_numpy(prepare_input(frame))[None, None])[0].numpy()
        # the predictor runs the same weights folded and channels-last: where two random-weight channels tie to float
        # rounding, either may win (a CI run's thread count changed which), so a pixel that differs must be such a tie
        differ = predicted.ssl_clusters != logits.argmax(axis=0)
        rows, columns = np.nonzero(differ)
        chosen = logits[predicted.ssl_clusters[rows, columns], rows, columns]
        assert np.all(logits.max(axis=0)[rows, columns] - chosen <= 1e-4 * np.abs(chosen).clip(1.0)), transform
        assert differ.mean() < 0.001, (transform, int(differ.sum()))
    bad = tmp_path / "sslm-odd.safetensors"
    save_weights(bad, model.state_dict(), ModelCard(architecture="sslm", peak_channels=[0], input_transform="sqrt"))
    with pytest.raises(WeightsError, match=r"sslm-odd.safetensors: unknown SSLM input_transform 'sqrt'") as error:
        JointPredictor.from_settings(ModelSettings(tlm=tlm_off, sslm=SSLMSettings(weights=bad)))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("n_conv, final_relu", [(2, True), (2, False), (1, True), (3, True)])
def test_fast_sslm_computes_the_same_response_as_the_sslm(n_conv, final_relu) -> None:
    from pipeline.models.sslm import FastSSLM

    torch.manual_seed(n_conv)
    model = SSLM(n_conv=n_conv, final_relu=final_relu)
    model.train()
    with torch.no_grad():  # give the norms real running statistics and affine parameters
        for _ in range(3):
            model(torch.rand(2, 1, 40, 56) * 3)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        FastSSLM(SSLM().train())
    x = torch.rand(1, 1, 40, 56) * 3
    with torch.inference_mode():
        expected, fast = model(x), FastSSLM(model)(x)
    assert fast.shape == expected.shape
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)
    assert (fast.argmax(1) == expected.argmax(1)).float().mean() > 0.999
