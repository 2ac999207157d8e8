"""Run config keys of the worker: which weights are exported, the prediction type, and whether
a peer alone in a round takes the outer step."""

from __future__ import annotations

import pytest

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import loads

BASE = 'name = "keys"\n[model]\nbase = "m"\n'


def test_exported_weights_follow_the_ema_setting_unless_named() -> None:
    assert loads(BASE).exported_weights() == "raw"
    with_ema = loads(BASE + "[training]\nema = true\n")
    assert with_ema.export.weights == "auto" and with_ema.exported_weights() == "ema"
    raw = loads(BASE + '[training]\nema = true\n[export]\nweights = "raw"\n')
    assert raw.exported_weights() == "raw"
    assert loads(raw.to_toml()) == raw


def test_ema_weights_without_an_ema_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"export\.weights: .*training\.ema"):
        loads(BASE + '[export]\nweights = "ema"\n')
    with pytest.raises(ConfigError, match=r"export\.weights must be one of"):
        loads(BASE + '[export]\nweights = "average"\n')


def test_the_prediction_type_defaults_to_the_models_own() -> None:
    assert loads(BASE).model.prediction == "auto"
    sdxl = 'name = "keys"\n[model]\nbase = "m"\nfamily = "sdxl"\n'
    assert loads(sdxl).model.prediction == "auto"
    assert loads(sdxl + 'prediction = "epsilon"\n').model.prediction == "epsilon"
    with pytest.raises(ConfigError, match=r"model\.prediction: SDXL"):
        loads(sdxl + 'prediction = "v_prediction"\n')


def test_a_lone_peer_takes_no_outer_step_unless_the_run_says_so() -> None:
    assert loads(BASE).sync.outer_step_alone is False
    assert loads(BASE + "[sync]\nouter_step_alone = true\n").sync.outer_step_alone is True
    with pytest.raises(ConfigError, match=r"sync\.outer_step_alone must be true or false"):
        loads(BASE + '[sync]\nouter_step_alone = "yes"\n')
