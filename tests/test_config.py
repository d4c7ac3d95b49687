"""RunConfig: every bad value becomes one clear ValueError before anything starts."""

from __future__ import annotations

import os
import re

import pytest

import ddlkit
from ddlkit import RunConfig

from .conftest import children_of


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"strategy": "magic"}, ["strategy='magic'", "'data'", "'single'"]),
        ({"world_size": 0}, ["world_size=0", "positive integer"]),
        ({"world_size": 2.5}, ["world_size=2.5", "positive integer"]),
        ({"batch_size": -4}, ["batch_size=-4", "positive integer"]),
        ({"steps": 0}, ["steps=0", "positive integer"]),
        ({"lr": 0}, ["lr=0", "positive number"]),
        ({"model": "resnet"}, ["model='resnet'", "'mlp'", "'cnn'", "'lm'"]),
        ({"dataset": "imagenet"}, ["dataset='imagenet'", "'digits'"]),
        ({"optimizer": "lion"}, ["optimizer='lion'", "'adamw'"]),
        ({"device": "tpu"}, ["device='tpu'", "'cpu'"]),
        ({"model": "cnn", "dataset": "regression"}, ["model='cnn'", "dataset='regression'", "['digits']"]),
        ({"model": "lm", "dataset": "digits"}, ["model='lm'", "['sonnets']"]),
        ({"strategy": "single", "world_size": 2}, ["world_size=2", "strategy='single'", "must be 1"]),
        ({"fault": {"rank": 5, "step": 1, "kind": "exit"}}, ["fault rank=5", "0..1"]),
        ({"fault": {"rank": 0, "step": 1, "kind": "boom"}}, ["fault kind='boom'", "'sigkill'"]),
        ({"fault": {"rank": 0}}, ["fault=", "'kind'"]),
        ({"hang_timeout": -1}, ["hang_timeout=-1"]),
    ],
)
def test_bad_values_name_field_value_and_what_is_valid(changes, words):
    with pytest.raises(ValueError) as info:
        RunConfig(**changes).validate()
    for word in words:
        assert word in str(info.value)


def test_cuda_on_a_machine_without_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="device='cuda' is invalid"):
        RunConfig(device="cuda").validate()


def test_more_processes_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"world_size=4 .* only 2 GPU\(s\) .* valid: 1..2"):
        RunConfig(world_size=4, device="auto").validate()


def test_bad_config_raises_before_any_process_or_folder(runs_dir):
    before = children_of(os.getpid())
    with pytest.raises(ValueError, match="batch_size=0"):
        ddlkit.launch(RunConfig(batch_size=0, run_dir=runs_dir))
    with pytest.raises(ValueError, match="world_size=0"):
        ddlkit.launch(lambda: None, num_processes=0, run_dir=runs_dir)
    assert children_of(os.getpid()) == before
    assert not os.path.exists(runs_dir)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    cfg = RunConfig(strategy="data", world_size=2, lr=0.1, fault={"rank": 1, "step": 3, "kind": "hang"})
    cfg.save(tmp_path / f"exp{suffix}")
    assert RunConfig.load(tmp_path / f"exp{suffix}") == cfg


def test_unknown_field_in_a_file_is_named(tmp_path):
    (tmp_path / "exp.yaml").write_text("strategy: data\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rate'\]"):
        RunConfig.load(tmp_path / "exp.yaml")


@pytest.mark.parametrize(
    "field, typo, nearest",
    [
        ("strategy", "pipline", "pipeline"),
        ("model", "mpl", "mlp"),
        ("schedule", "gpipee", "gpipe"),
        ("sync", "ssb", "ssp"),
    ],
)
def test_a_typo_is_refused_on_construction_with_the_nearest_value(field, typo, nearest):
    with pytest.raises(ValueError) as info:
        RunConfig(**{field: typo})  # no validate(): at once
    assert f"{field}={typo!r} is invalid" in str(info.value)
    assert str(info.value).endswith(f"(did you mean {nearest!r}?)")


@pytest.mark.parametrize(
    "changes, words",
    [({"world_size": 0}, "world_size=0"), ({"lr": "1e-05"}, "lr='1e-05'"), ({"slowdown": {1: 0.5}}, "slowdown=")],
)
def test_a_bad_value_is_refused_when_set_not_only_at_launch(changes, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        RunConfig(**changes)
    cfg = RunConfig()
    name, value = next(iter(changes.items()))
    with pytest.raises(ValueError, match=re.escape(words)):
        setattr(cfg, name, value)
    assert getattr(cfg, name) == getattr(RunConfig(), name)  # the refused value was not kept


def test_single_dimension_strategies_derive_their_degree_from_world_size():
    pipe = RunConfig(strategy="pipeline", world_size=2)
    pipe.validate()
    assert pipe.pp == 2 and "pp" not in pipe.to_dict()  # not written: it follows world_size
    assert pipe.replace(world_size=4).pp == 4
    assert RunConfig.from_dict(pipe.to_dict()).replace(world_size=3).pp == 3
    assert RunConfig(strategy="tensor", world_size=4).tp == 4
    assert RunConfig(strategy="data", world_size=4).pp == 1  # the knob's default elsewhere
    with pytest.raises(ValueError, match="pp=2 is invalid for strategy='pipeline' with world_size=4"):
        RunConfig(strategy="pipeline", world_size=4, pp=2).validate()  # set explicitly: it must agree
    with pytest.raises(ValueError, match="world_size=1 is invalid for strategy='pipeline'"):
        RunConfig(strategy="pipeline", world_size=1).validate()


def test_every_common_field_is_described_once_by_a_knob():
    from ddlkit.common import COMMON
    from ddlkit.config import common_fields

    assert list(COMMON) == list(common_fields())
    cfg = RunConfig()
    for name, knob in COMMON.items():
        assert getattr(cfg, name) == knob.default and knob.help, name
        assert knob.problem(knob.default) is None, name
