"""The same checks as on CPU, on GPUs over NCCL: data, fsdp, tensor, pipeline
and hybrid layouts exact against one process on one GPU, and memory events in
CUDA bytes. Marked ``gpu`` and skipped where there are too few CUDA devices
(``pytest -m gpu`` runs them on a GPU machine). They reuse the CPU tests'
helpers with ``device="cuda"``: the reference is the single-process run on a GPU."""

from __future__ import annotations

import pytest
import torch

from ddlkit import timeline

from .test_data_parallel import _train as train_data
from .test_model_parallel import _train, _worst_difference

pytestmark = pytest.mark.gpu


def gpus(n: int) -> pytest.MarkDecorator:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(count < n, reason=f"needs {n} CUDA device(s), {count} visible")


def _single(runs_dir, **changes) -> dict:
    return _train(runs_dir, strategy="single", world_size=1, device="cuda", **changes).result().state_dict


@gpus(2)
def test_data_over_nccl_equals_large_batch_training_on_one_gpu(runs_dir):
    data = train_data(runs_dir, strategy="data", world_size=2, batch_size=16, device="cuda").result().state_dict
    single = train_data(runs_dir, strategy="single", world_size=1, batch_size=32, device="cuda").result().state_dict
    assert all(v.device.type == "cpu" for v in data.values())  # run.result() is on CPU, wherever it trained
    assert _worst_difference(data, single) < 1e-5
    other_seed = train_data(runs_dir, strategy="single", world_size=1, batch_size=32, seed=1, device="cuda")
    assert _worst_difference(other_seed.result().state_dict, single) > 1e-2  # agreement means something


LAYOUTS = [
    (2, dict(strategy="fsdp", world_size=2, optimizer="adam", lr=3e-3), 32),
    (2, dict(strategy="tensor", world_size=2, tp=2), 16),
    (2, dict(strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule="1f1b"), 16),
    (4, dict(strategy="hybrid", world_size=4, dp=2, pp=2, micro_batches=2, batch_size=8), 16),
    (4, dict(strategy="hybrid", world_size=4, dp=2, tp=2, batch_size=8), 16),
]


@pytest.mark.parametrize(
    "layout, single_batch",
    [pytest.param(layout, batch, marks=gpus(n), id=layout["strategy"] + str(n)) for n, layout, batch in LAYOUTS],
)
def test_model_parallel_over_nccl_equals_one_gpu(runs_dir, layout, single_batch):
    """As tests/test_model_parallel.py's exactness check, every rank on its own GPU."""
    run = _train(runs_dir, device="cuda", **layout)
    reference = {k: v for k, v in layout.items() if k in ("optimizer", "lr")}
    single = _single(runs_dir, batch_size=single_batch, **reference)
    assert _worst_difference(run.result().state_dict, single) < 1e-5
    assert _worst_difference(_single(runs_dir, batch_size=single_batch, steps=1, **reference), single) > 1e-4


@gpus(1)
def test_memory_events_carry_cuda_bytes(runs_dir):
    """On a GPU the memory event has the allocator's high-water mark for the step, which holds at
    least the weights, gradients, optimizer state and activations counted tensor by tensor; the
    tensor counts are the same bytes as on CPU."""
    on_gpu = timeline.memory_table(_train(runs_dir, strategy="single", world_size=1, optimizer="adam", device="cuda"))
    on_cpu = timeline.memory_table(_train(runs_dir, strategy="single", world_size=1, optimizer="adam"))
    counted = ["param_bytes", "grad_bytes", "optimizer_bytes", "peak_activation_bytes"]
    assert on_gpu[counted].to_dict("records") == on_cpu[counted].to_dict("records")
    gpu = on_gpu.iloc[0]
    assert gpu["cuda_peak_bytes"] >= gpu["param_bytes"] + gpu["grad_bytes"] + gpu["optimizer_bytes"]
    assert gpu["cuda_reserved_bytes"] >= gpu["cuda_peak_bytes"]
    assert "cuda_peak_bytes" not in on_cpu  # a CPU run has no such figure
