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
        # Accepted before, failing later (or never): each is refused here, saying what is valid.
        ({"world_size": 10**6}, ["world_size=1000000", "CPU core", "oversubscribe=True"]),
        ({"batch_size": 10**9}, ["batch_size=1000000000", "1797 samples", "valid 1..898"]),
        ({"seed": 2**70}, ["seed=1180591620717411303424", "0..2**63-1"]),
        ({"seed": -1}, ["seed=-1", "0..2**63-1"]),
        ({"strategy": "pipeline", "pp": 2, "stage_delay": float("nan")}, ["stage_delay=nan", "a number >= 0"]),
        ({"fault": {"rank": "1", "step": 1, "kind": "exit"}}, ["fault rank='1'", "0..1"]),
        ({"run_dir": 123}, ["run_dir=123", "a folder"]),
        ({"run_dir": ""}, ["run_dir=''", "a folder"]),
        ({"hidden": 10**7}, ["hidden=10000000", "1..4096"]),
        ({"threads": 1000}, ["threads=1000", "CPU core"]),
        ({"hang_timeout": 1e-9}, ["hang_timeout=1e-09", ">= 1"]),
        ({"oversubscribe": "yes"}, ["oversubscribe='yes'", "True or False"]),
        ({"model": "lm", "dataset": "sonnets", "seq_len": 4096, "batch_size": 2000}, ["batch_size=2000", "'sonnets'"]),
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


def test_world_size_is_bounded_by_cores_unless_oversubscribed_and_by_memory(monkeypatch):
    from ddlkit import limits

    monkeypatch.setattr(limits, "cpu_cores", lambda: 2)
    monkeypatch.setattr(limits, "available_memory", lambda: 16 * limits.RANK_BYTES)
    RunConfig(world_size=8, batch_size=8, device="cpu").validate()  # 4 ranks a core: fine
    with pytest.raises(ValueError, match=r"world_size=9 .* 2 CPU core.* valid: 1..8, or set oversubscribe=True"):
        RunConfig(world_size=9, batch_size=8, device="cpu").validate()
    RunConfig(world_size=9, batch_size=8, device="cpu", oversubscribe=True).validate()  # asked for explicitly
    with pytest.raises(ValueError, match=r"world_size=17 .* GiB of memory is available: valid 1..16"):
        RunConfig(world_size=17, batch_size=8, device="cpu", oversubscribe=True).validate()


def test_run_dir_may_be_a_path_and_stays_serialisable(tmp_path):
    cfg = RunConfig(run_dir=tmp_path / "runs")
    cfg.validate()
    assert cfg.run_dir == str(tmp_path / "runs")
    cfg.save(tmp_path / "exp.json")
    assert RunConfig.load(tmp_path / "exp.json") == cfg


def test_dataset_sizes_without_loading_match_the_datasets():
    from ddlkit.config import DATASETS
    from ddlkit.data import dataset_size, load_dataset

    for name in DATASETS:
        assert dataset_size(name, seq_len=16) == len(load_dataset(name, seq_len=16)), name


# ---- configs survive the trip to the workers ---------------------------------
# Every field, with values that are valid but awkward to carry: floats that JSON
# writes with an exponent (1e-05: PyYAML's YAML 1.1 reads it back as a string),
# seeds past 2**53, folder names a YAML reader would turn into numbers or
# booleans, rank keys that JSON makes strings, nested fault lists.
AWKWARD = dict(
    model="mlp",
    dataset="regression",
    steps=10**6,
    batch_size=16,
    lr=1e-05,
    optimizer="adamw",
    seed=2**63 - 1,
    device="cpu",
    log_every=3,
    hang_timeout=1e16,
    fault=[{"rank": 1, "step": 3, "kind": "hang", "attempt": 0}, {"rank": 0, "step": 7, "kind": "exit"}],
    keep_checkpoints=3,
    max_restarts=2,
    hidden=64,
    seq_len=16,
    threads=1,
    slowdown={1: 3e-05 + 1},
    delay_s={0: 5e-05},
    delay_jitter_s=1e-05,
)
PER_STRATEGY = [
    dict(strategy="single", world_size=1, checkpoint_every=7, fault=None, slowdown=None, delay_s={0: 3e-05}),
    dict(strategy="data", world_size=2, checkpoint_every=7, fault={"rank": 1, "step": 3, "kind": "sigstop"}),
    dict(strategy="ps", world_size=3, servers=2, sync="async", staleness_lr=True, max_staleness=0),
    dict(strategy="ps", world_size=3, sync="ssp", staleness_bound=5),
    dict(strategy="hogwild", world_size=2),
    dict(strategy="pipeline", world_size=2, pp=2, micro_batches=8, schedule="gpipe", cut_points=[2], stage_delay=3e-05),
    dict(strategy="tensor", world_size=2, tp=2),
    dict(strategy="fsdp", world_size=2),
    dict(strategy="hybrid", world_size=4, dp=2, pp=2, micro_batches=2, stage_delay=5e-05, oversubscribe=True),
]
AWKWARD_FOLDERS = ["1e-5", "yes", "null", "~", "0x10", "12:30", "runs/ünïcode dir", "-", "'quoted'"]


def _same_values(a, b):
    """Equal, and of the same type all the way down (1 == 1.0 == True would hide a change)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same_values(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_values(x, y)
    else:
        assert a == b or (a != a and b != b), (a, b)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("fields", PER_STRATEGY, ids=lambda f: f"{f['strategy']}-{f['world_size']}")
def test_every_valid_value_reaches_the_worker_unchanged(tmp_path, suffix, fields):
    """The kernel writes runs/<id>/config.json with save() and every worker reads
    it with load() and validates it again: what passed the kernel's validate()
    must arrive identical and pass the worker's."""
    for folder in AWKWARD_FOLDERS:
        cfg = RunConfig(**{**AWKWARD, "run_dir": folder, **fields})
        cfg.validate()
        cfg.save(tmp_path / f"config{suffix}")
        arrived = RunConfig.load(tmp_path / f"config{suffix}")
        arrived.validate()
        _same_values(arrived.to_dict(), cfg.to_dict())
        assert arrived == cfg


def test_yaml_written_by_hand_reads_exponents_as_numbers(tmp_path):
    (tmp_path / "exp.yaml").write_text("lr: 1e-5\nhang_timeout: 1E+2\ndelay_jitter_s: .5\nrun_dir: 1e-5x\n")
    cfg = RunConfig.load(tmp_path / "exp.yaml")
    assert (cfg.lr, cfg.hang_timeout, cfg.delay_jitter_s, cfg.run_dir) == (1e-5, 100.0, 0.5, "1e-5x")
    cfg.validate()
