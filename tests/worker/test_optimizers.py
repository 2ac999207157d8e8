"""Optimisation as fine-tuners set it: rates per part of the model, cosine with restarts and
polynomial schedules (diffusers' functions), Prodigy and Adafactor from their packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.link import SoloLink
from dandelion_p2p.worker.optimizers import (
    apply_live_settings,
    build_optimizer,
    load_optimizer_state,
    set_learning_rates,
)
from dandelion_p2p.worker.schedule import lr_at, lr_factor
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run


def two_parts() -> list[tuple[str, nn.Parameter]]:
    torch.manual_seed(0)
    unet, text = nn.Linear(4, 4), nn.Linear(4, 4)
    return ([(f"unet.{n}", p) for n, p in unet.named_parameters()]
            + [(f"text_encoder_0.{n}", p) for n, p in text.named_parameters()])


def config_with(tmp_path: Path, **sections: dict[str, object]) -> RunConfig:
    return tiny_run(tmp_path, **sections)


def test_unet_and_text_encoders_take_their_own_rates(tmp_path: Path) -> None:
    config = config_with(tmp_path, training={"train_text_encoder": True, "max_steps": 100},
                         optimizer={"name": "adamw", "lr": 1e-3, "unet_lr": 2e-4,
                                    "text_encoder_lr": 5e-5},
                         schedule={"name": "linear", "warmup_steps": 10})
    optimizer = build_optimizer(two_parts(), config)
    assert [(g["role"], len(g["params"])) for g in optimizer.param_groups] == [
        ("unet", 2), ("text_encoder", 2)]
    set_learning_rates(optimizer, 4, config)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 2.5e-5])
    assert lr_at(4, config, "text_encoder") == pytest.approx(2.5e-5)
    unset = config_with(tmp_path, optimizer={"name": "adamw", "lr": 1e-3})
    set_learning_rates(optimizer, 50, unset)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3], "0: optimizer.lr"


def test_cosine_with_restarts_and_polynomial_are_diffusers_schedules(tmp_path: Path) -> None:
    from diffusers.optimization import (
        get_cosine_with_hard_restarts_schedule_with_warmup,
        get_polynomial_decay_schedule_with_warmup,
    )

    restarts = config_with(tmp_path, training={"max_steps": 35},
                           schedule={"name": "cosine_with_restarts", "warmup_steps": 5,
                                     "num_cycles": 3})
    poly = config_with(tmp_path, training={"max_steps": 35},
                       schedule={"name": "polynomial", "warmup_steps": 5, "power": 2.0,
                                 "min_lr_ratio": 0.1})
    for config, reference in (
        (restarts, lambda o: get_cosine_with_hard_restarts_schedule_with_warmup(
            o, 5, 35, num_cycles=3)),
        (poly, lambda o: get_polynomial_decay_schedule_with_warmup(
            o, 5, 35, lr_end=0.1 * 1e-3, power=2.0)),
    ):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = reference(optimizer)
        for step in range(40):
            assert lr_at(step, config) == pytest.approx(scheduler.get_last_lr()[0]), step
            optimizer.step()
            scheduler.step()
    s = restarts.schedule
    # Three cycles of 10 steps after the warmup, each starting at the full rate.
    assert [lr_factor(k, s, 35) for k in (5, 15, 25)] == pytest.approx([1.0, 1.0, 1.0])
    assert all(lr_factor(k, s, 35) < 0.03 for k in (14, 24, 34))
    assert lr_factor(35, poly.schedule, 35) == pytest.approx(0.1)
    assert lr_factor(20, poly.schedule, 35) == pytest.approx(0.1 + 0.9 * 0.25)


@pytest.mark.parametrize("name", ["prodigy", "adafactor"])
def test_prodigy_and_adafactor_come_from_their_packages_and_learn(tmp_path: Path,
                                                                  name: str) -> None:
    config = config_with(tmp_path, training={"train_text_encoder": True},
                         optimizer={"name": name, "lr": 1.0 if name == "prodigy" else 1e-2})
    params = two_parts()
    optimizer = build_optimizer(params, config)
    module = type(optimizer).__module__
    assert module.startswith("prodigyopt" if name == "prodigy" else "transformers")
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    target = x @ torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    unet_w, unet_b, text_w, text_b = (p for _, p in params)

    def loss() -> torch.Tensor:
        return ((x @ unet_w.T + unet_b) @ text_w.T + text_b - target).pow(2).mean()

    with torch.no_grad():
        before = float(loss())
    for step in range(30):
        set_learning_rates(optimizer, step, config)
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(loss()) < 0.7 * before
    apply_live_settings(optimizer, config)  # Adafactor keeps its own pair of eps
    if name == "adafactor":
        assert all(isinstance(g["eps"], tuple) for g in optimizer.param_groups)


def test_prodigy_refuses_different_rates_per_part(tmp_path: Path) -> None:
    config = config_with(tmp_path, training={"train_text_encoder": True},
                         optimizer={"name": "prodigy", "lr": 1.0, "text_encoder_lr": 0.5})
    with pytest.raises(ConfigError, match="one step size"):
        build_optimizer(two_parts(), config)


@pytest.mark.parametrize(("section", "values", "message"), [
    ("optimizer", {"unet_lr": 2.0}, "optimizer.unet_lr: must be in [0, 1]"),
    ("optimizer", {"text_encoder_lr": 1e-4}, "no text encoder trains"),
    ("optimizer", {"name": "lion"}, "optimizer.name must be one of"),
    ("optimizer", {"d_coef": 0.0}, "optimizer.d_coef"),
    ("schedule", {"name": "cosine_with_restarts", "num_cycles": 0}, "schedule.num_cycles"),
    ("schedule", {"name": "polynomial", "min_lr_ratio": 1.0}, "below 1 for the polynomial"),
    ("schedule", {"name": "polynomial", "power": -1.0}, "schedule.power"),
    ("data", {"max_token_length": 100}, "data.max_token_length: must be 75, 150 or 225"),
    ("data", {"clip_skip": 0}, "data.clip_skip"),
    ("data", {"tag_dropout": 1.0}, "data.tag_dropout"),
    ("data", {"subsets": [{"folder": "a/b"}]}, "data.subsets[0].folder"),
    ("data", {"subsets": [{"folder": "a"}, {"folder": "a"}]}, "listed twice"),
    ("data", {"subsets": [{"folder": "a", "caption_dropout": 2.0}]},
     "data.subsets[0].caption_dropout"),
    ("data", {"subsets": [{"folder": "a", "keep": 1}]}, "unknown key data.subsets[0].'keep'"),
])
def test_bad_settings_are_named(tmp_path: Path, section: str, values: dict[str, object],
                                message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_with(tmp_path, **{section: values})
    assert message in str(error.value)


def test_the_trainer_resumes_adafactor_with_rates_per_part(tiny_sd1: Path, images: Path,
                                                           tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"method": "lora", "train_text_encoder": True,
                                          "max_steps": 2, "lora_rank": 2},
                      optimizer={"name": "adafactor", "lr": 1e-3, "unet_lr": 4e-3,
                                 "text_encoder_lr": 1e-3},
                      schedule={"name": "polynomial", "warmup_steps": 0},
                      checkpoint={"every_steps": 1, "keep_last": 2})
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    work = tmp_path / "work"
    for stop_at in (1, 2):
        trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, stop_at=stop_at,
                                                export=False, gradient_checkpointing=False),
                          SoloLink(toml))
        trainer.resume()
        try:
            trainer.run()
        finally:
            trainer.close()
        assert type(trainer.optimizer).__name__ == "Adafactor"
        assert trainer.position.global_step == stop_at
    rates = {g["role"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert rates == pytest.approx({"unet": lr_at(1, config), "text_encoder":
                                   lr_at(1, config, "text_encoder")})
    assert rates["unet"] == pytest.approx(4 * rates["text_encoder"])
    logged = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2]


def test_a_one_group_checkpoint_loads_into_groups_by_role(tmp_path: Path) -> None:
    config = config_with(tmp_path, training={"train_text_encoder": True},
                         optimizer={"name": "adamw", "lr": 1e-3, "text_encoder_lr": 1e-4})
    params = two_parts()
    old = torch.optim.AdamW([p for _, p in params], lr=1e-3)
    for _, p in params:
        p.grad = torch.ones_like(p)
    old.step()
    optimizer = build_optimizer(params, config)
    load_optimizer_state(optimizer, old.state_dict())
    assert [g["role"] for g in optimizer.param_groups] == ["unet", "text_encoder"]
    for _, p in params:
        assert torch.equal(optimizer.state[p]["exp_avg"], old.state[p]["exp_avg"])
    set_learning_rates(optimizer, 0, config)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
