"""Pipeline parallelism: cut the model into stages, one per rank (two with the
interleaved schedule), and stream micro-batches through them.

Each step the batch is split into ``micro_batches`` equal parts. A stage runs
the forward of a micro-batch as soon as the previous stage sends its
activations, sends its output on, and later runs the backward when the next
stage sends back the gradient. The order is the *schedule*, from
``torch.distributed.pipelining``:

- ``gpipe``: every forward, then every backward. Simple, but each stage keeps
  all ``m`` micro-batches' activations alive until the backwards start.
- ``1f1b``: after a short warm-up each stage alternates one forward, one
  backward, so at most ``p`` micro-batches are in flight per stage.
- ``interleaved``: each rank holds two non-adjacent stages (rank r: stages r
  and r + p) and runs 1F1B over them: smaller bubbles for more messages.

Both fill and drain leave stages idle (the *bubble*): with ``p`` stages and
``m`` equal micro-batches a fraction (p-1)/(m+p-1) of the step.
``ddlkit.timeline`` measures it from the spans recorded here.

The loss is the mean over each micro-batch and the schedule divides the summed
gradients by ``m``, so a step equals one single-process step on the whole
batch. In the hybrid dp x pp layout, the stages' gradients are then averaged
over the data-parallel replicas of the same stage (``dp_mesh``).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..models import CharTransformer, loss_fn
from . import OptimizerFactory, StepStats
from .sharding import average_gradients

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


class Embed(nn.Module):
    """The lm's first pipeline layer: token plus position embeddings (the
    model's own modules, so parameter names and values are shared)."""

    def __init__(self, model: CharTransformer):
        super().__init__()
        self.tok, self.pos = model.tok, model.pos

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos[: ids.shape[1]]


class Head(nn.Module):
    """The lm's last pipeline layer: final norm and the vocabulary projection."""

    def __init__(self, model: CharTransformer):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def pipeline_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a flat list of layers, the units a cut falls between.

    >>> pipeline_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))[1]
    ReLU()
    """
    if isinstance(model, CharTransformer):
        return [Embed(model), *model.blocks, Head(model)]
    if isinstance(model, nn.Sequential):
        return list(model)
    raise ValueError(f"{type(model).__name__} cannot be pipelined: give an nn.Sequential or a CharTransformer")


def balanced_cuts(sizes: list[int], stages: int) -> list[int]:
    """Cut points (index of each stage's first layer, after the first stage)
    that make the largest stage's parameter count as small as possible; each
    stage gets at least one layer.

    >>> balanced_cuts([10, 0, 10, 0, 10, 10], 2)
    [3]
    """
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[s][i]: (largest stage, cuts) for layers i.. split into s stages
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(1, i): (prefix[n] - prefix[i], []) for i in range(n)}
    for s in range(2, stages + 1):
        for i in range(n - s + 1):
            best[s, i] = min(
                ((max(prefix[j] - prefix[i], best[s - 1, j][0]), [j] + best[s - 1, j][1])
                 for j in range(i + 1, n - s + 2)),
                key=lambda choice: (choice[0], choice[1]))
    return best[stages, 0][1]


class PipelineParallel:
    def __init__(self, cfg, pp_mesh: DeviceMesh, model: nn.Module, task: str, make_optimizer: OptimizerFactory,
                 device: torch.device, dp_mesh: DeviceMesh | None = None):
        self.model, self.task = model, task
        self.delay = cfg.stage_delay
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None else None
        self.dp_rank, self.dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh is not None else (0, 1)
        self.pp_group, self.pp_size, pp_rank = pp_mesh.get_group(), pp_mesh.size(), pp_mesh.get_local_rank()

        # Cut the layers into stages; this rank keeps its own (one, or two when interleaved).
        layers = pipeline_layers(model)
        per_rank = 2 if cfg.schedule == "interleaved" else 1
        num_stages = self.pp_size * per_rank
        cuts = cfg.cut_points or balanced_cuts([sum(p.numel() for p in layer.parameters()) for layer in layers],
                                               num_stages)
        bounds = [0, *cuts, len(layers)]
        self.stage_ids = [pp_rank + k * self.pp_size for k in range(per_rank)]
        self.stages = [PipelineStage(nn.Sequential(*layers[bounds[i]:bounds[i + 1]]), i, num_stages, device,
                                     group=self.pp_group) for i in self.stage_ids]
        self.last_stage_rank = dist.get_global_rank(self.pp_group, (num_stages - 1) % self.pp_size)
        self.params = [p for stage in self.stages for p in stage.submod.parameters()]
        self.optimizer = make_optimizer(self.params)

        self.spans: list[dict[str, Any]] = []
        for stage in self.stages:
            self._record_spans(stage)
        schedule = SCHEDULES[cfg.schedule]
        loss = lambda output, target: loss_fn(task, output, target)  # noqa: E731 (the mean over one micro-batch)
        self.schedule = (schedule(self.stages, cfg.micro_batches, loss_fn=loss) if per_rank > 1
                         else schedule(self.stages[0], cfg.micro_batches, loss_fn=loss))

    def _record_spans(self, stage: PipelineStage) -> None:
        """Time every micro-batch's forward and backward on this stage (the
        schedules call these two methods once per micro-batch)."""
        for method, phase, delay in (("forward_one_chunk", "forward", self.delay),
                                     ("backward_one_chunk", "backward", 2 * self.delay)):
            run = getattr(stage, method)

            def timed(chunk: int, *args: Any, _run=run, _phase=phase, _delay=delay, **kwargs: Any) -> Any:
                start = time.time()
                if _delay:  # teaching mode: stand-in for a stage with real work (backward ~ 2x forward)
                    time.sleep(_delay)
                out = _run(chunk, *args, **kwargs)
                self.spans.append({"type": "span", "stage": stage.stage_index, "micro_batch": chunk,
                                   "phase": _phase, "start": start, "end": time.time()})
                return out

            setattr(stage, method, timed)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start = time.perf_counter()
        self.spans = []
        losses: list[torch.Tensor] = []
        # Phase 1: the schedule. The first stage splits `inputs` into
        # micro-batches, the last splits `targets` and computes the losses;
        # activations and their gradients travel between stages by send/recv.
        holds_first, holds_last = 0 in self.stage_ids, dist.get_rank() == self.last_stage_rank
        args = (inputs,) if holds_first else ()
        # return_outputs=False: merging the last stage's outputs would keep every
        # micro-batch's output (and its autograd graph) alive to the end of the step.
        self.schedule.step(*args, target=targets if holds_last else None, losses=losses, return_outputs=False)
        # Phase 2: hybrid dp x pp: average each stage's gradients over its replicas.
        comm_s = average_gradients(self.params, self.dp_group)
        # Phase 3: every stage updates its own parameters.
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Only the last stage knows the loss: it tells the other stages.
        loss = torch.stack(losses).mean().detach() if holds_last else torch.zeros(())
        dist.broadcast(loss, src=self.last_stage_rank, group=self.pp_group)
        elapsed = time.perf_counter() - start
        busy = sum(span["end"] - span["start"] for span in self.spans)
        # Time outside this stage's own forward/backward: sends, receives, the bubble.
        waiting = max(elapsed - busy - comm_s, 0.0)
        return StepStats(loss, compute_s=busy, comm_s=comm_s + waiting, events=self.spans)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Each stage owns some of the model's parameters; the first pipeline
        rank gathers them under the single-process names."""
        owned = {id(p) for p in self.params}
        mine = {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if id(p) in owned}
        gathered: list[dict[str, torch.Tensor] | None] = [None] * self.pp_size
        dist.all_gather_object(gathered, mine, group=self.pp_group)
        merged = {name: t for part in gathered for name, t in part.items()}
        return {name: merged[name] for name in self.model.state_dict()}
