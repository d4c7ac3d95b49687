"""RunConfig: every bad value becomes one clear ValueError before anything starts."""

from __future__ import annotations

import os

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
