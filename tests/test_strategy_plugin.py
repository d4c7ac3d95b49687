"""A strategy is one file: this one is defined here, in the test file alone,
and runs end to end like a built-in one (launch, events, its knob in the
ControlPanel, its knob validated), without touching any ddlkit module.

The workers import this module by name (the config records it), so it must
import nothing relative."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ddlkit
from ddlkit import registry
from ddlkit.knobs import number
from ddlkit.models import loss_fn
from ddlkit.rank.strategy import OptimizerFactory, StepStats, Strategy
from ddlkit.registry import StrategySpec, register


class NoisyAverage(Strategy):
    """Every rank the whole model; gradients averaged by one all-reduce per
    parameter, plus seeded Gaussian noise (the same on every rank, so the
    replicas stay equal)."""

    def __init__(
        self,
        cfg: ddlkit.RunConfig,
        accelerator: Any,
        model: torch.nn.Module,
        task: str,
        make_optimizer: OptimizerFactory,
    ):
        self.model, self.task, self.noise = model, task, cfg.gradient_noise
        self.optimizer = make_optimizer(model.parameters())
        self.dp_rank, self.dp_size = accelerator.process_index, accelerator.num_processes
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start = time.perf_counter()
        loss = loss_fn(self.task, self.model(inputs), targets)
        loss.backward()
        comm_s = 0.0
        for p in self.model.parameters():
            assert p.grad is not None
            sent = time.perf_counter()
            dist.all_reduce(p.grad)
            comm_s += time.perf_counter() - sent
            p.grad /= self.dp_size
            p.grad += self.noise * torch.randn(p.shape, generator=self.generator)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(
            loss.detach(),
            compute_s=time.perf_counter() - start - comm_s,
            comm_s=comm_s,
            row={"gradient_noise": self.noise},
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def on_knobs(self, changed: dict[str, Any]) -> None:
        self.noise = changed.get("gradient_noise", self.noise)  # live, at the step every rank agreed on


NOISE = number("gradient_noise", 0.0, 0.0, "gradient noise", "std of Gaussian noise on averaged gradients", live=True)
register(
    StrategySpec(
        "noisy",
        NoisyAverage,
        "data parallel with Gaussian gradient noise (a test's strategy)",
        knobs=(NOISE,),
        position=50,
    )
)


def test_the_registry_finds_it_with_its_module():
    spec = registry.get("noisy")
    assert spec.module == __name__ and not registry.is_built_in(spec)
    assert "noisy" in registry.names() and registry.readers("gradient_noise") == ["noisy"]


def test_a_bad_knob_is_refused_by_validate_with_what_is_valid():
    with pytest.raises(ValueError, match=r"gradient_noise=-1 is invalid: it must be a number >= 0"):
        ddlkit.RunConfig(strategy="noisy", gradient_noise=-1).validate()
    with pytest.raises(
        ValueError, match=r"gradient_noise=0.5 is invalid for strategy='data': it is read by \['noisy'\]"
    ):
        ddlkit.RunConfig(strategy="data", gradient_noise=0.5).validate()


def test_the_control_panel_shows_its_knob_only_for_it():
    panel = ddlkit.ControlPanel(ddlkit.RunConfig(strategy="single", world_size=1, device="cpu"))
    assert "noisy" in panel.fields["strategy"].options
    panel.fields["strategy"].value, panel.fields["world_size"].value = "noisy", 2
    (knob,) = panel.knob_box.children
    assert knob.description == "gradient noise"
    knob.value = 0.25
    assert panel.config().gradient_noise == 0.25 and panel.check() is None
    panel.fields["strategy"].value = "data"
    assert knob not in panel.knob_box.children and "gradient_noise" not in panel.config().knobs


def test_it_runs_end_to_end_and_without_noise_equals_data_parallel(runs_dir):
    base = ddlkit.RunConfig(world_size=2, steps=8, batch_size=16, device="cpu", run_dir=runs_dir)
    noisy = ddlkit.launch(base.replace(strategy="noisy", gradient_noise=0.0), echo=False)
    data = ddlkit.launch(base.replace(strategy="data"), echo=False)
    noisy.wait(120)
    data.wait(120)
    assert (noisy.path / "config.json").read_text().count(__name__) == 1  # how the workers found this file
    rows = noisy.metrics
    assert sorted(set(rows["rank"])) == [0, 1] and len(rows) == 16 and (rows["gradient_noise"] == 0.0).all()
    assert {"memory", "comm"} <= {e["type"] for e in noisy.events}  # the loop measured it like any strategy
    mine, theirs = noisy.result().state_dict, data.result().state_dict
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 1e-6


def test_its_live_knob_changes_at_the_same_step_on_every_rank(runs_dir):
    cfg = ddlkit.RunConfig(
        strategy="noisy", world_size=2, steps=100_000, batch_size=8, device="cpu", run_dir=runs_dir, hang_timeout=60
    )
    run = ddlkit.launch(cfg, echo=False)
    deadline = time.time() + 60
    while run.steps_done < 5 and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ValueError, match=r"control gradient_noise=-1 is invalid: it must be a number >= 0"):
        run.control(gradient_noise=-1)
    with pytest.raises(ValueError, match=r"valid controls are \[.*'gradient_noise'.*\]"):
        run.control(gradient_nois=0.5)
    run.control(gradient_noise=0.5)
    while not any(e["type"] == "control" for e in run.events) and time.time() < deadline:
        time.sleep(0.05)
    run.stop()
    (applied,) = [e for e in run.events if e["type"] == "control" and "knobs" in e]
    assert applied["knobs"] == {"gradient_noise": 0.5}
    rows = run.metrics
    for rank in (0, 1):  # every rank switched at the step rank 0 reported
        mine = rows[rows["rank"] == rank].set_index("step")["gradient_noise"]
        assert (mine.loc[: applied["step"] - 1] == 0.0).all() and (mine.loc[applied["step"] :] == 0.5).all()
