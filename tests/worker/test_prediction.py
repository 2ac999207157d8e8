"""The prediction type comes from the base model's scheduler unless the run names one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import ModelConfig
from dandelion_p2p.worker.model import load_components
from dandelion_p2p.worker.sampling import build_pipeline
from dandelion_p2p.worker.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_v_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 2.x model whose scheduler config says v_prediction."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2-v"), "sd2")


def test_a_v_prediction_model_trains_v_prediction_by_default(
    tiny_v_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dandelion_p2p.worker.model")
    c = load_components(ModelConfig(base=str(tiny_v_model), family="sd2"))
    assert c.prediction == "v_prediction"
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    # Sample images and the exported pipeline take their scheduler from the trained one.
    assert build_pipeline(c).scheduler.config.prediction_type == "v_prediction"  # type: ignore[attr-defined]
    assert "prediction type v_prediction (the model's scheduler)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_explicit_prediction_against_the_models_scheduler_is_kept_with_a_warning(
    tiny_v_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = load_components(ModelConfig(base=str(tiny_v_model), family="sd2",
                                    prediction="epsilon"))
    assert c.prediction == "epsilon"
    assert c.noise_scheduler.config.prediction_type == "epsilon"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("epsilon" in w and "v_prediction" in w for w in warnings), warnings


def test_an_epsilon_model_trains_epsilon_by_default(tiny_sd1: Path) -> None:
    c = load_components(ModelConfig(base=str(tiny_sd1)))
    assert c.prediction == "epsilon"
    assert c.noise_scheduler.config.prediction_type == "epsilon"


def test_an_sdxl_model_whose_scheduler_predicts_v_is_refused(tmp_path: Path) -> None:
    model = build_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"epsilon"', '"v_prediction"'))
    with pytest.raises(ConfigError, match="SDXL"):
        load_components(ModelConfig(base=str(model), family="sdxl"))
