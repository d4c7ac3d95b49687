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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from .. import events
from ..config import RunConfig
from ..knobs import Knob, choice, integer, number, optional
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, StepStats, Strategy
from ..registry import StrategySpec, register
from .sharding import average_gradients
from .stages import LAYERS, balanced_cuts, pipeline_layers
from .state import gathered, load_whole_state

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


class PipelineParallel(Strategy):
    def __init__(
        self,
        cfg: RunConfig,
        pp_mesh: DeviceMesh,
        model: nn.Module,
        task: str,
        make_optimizer: OptimizerFactory,
        device: torch.device,
        dp_mesh: DeviceMesh | None = None,
    ):
        self.model, self.task = model, task
        self.delay = cfg.stage_delay
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None else None
        self.dp_rank, self.dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh is not None else (0, 1)
        self.pp_group, self.pp_size, pp_rank = pp_mesh.get_group(), pp_mesh.size(), pp_mesh.get_local_rank()

        # Cut the layers into stages; this rank keeps its own (one, or two when interleaved).
        layers = pipeline_layers(model)
        per_rank = 2 if cfg.schedule == "interleaved" else 1
        num_stages = self.pp_size * per_rank
        cuts = cfg.cut_points or balanced_cuts(
            [sum(p.numel() for p in layer.parameters()) for layer in layers], num_stages
        )
        bounds = [0, *cuts, len(layers)]
        self.stage_ids = [pp_rank + k * self.pp_size for k in range(per_rank)]
        self.stages = [
            PipelineStage(nn.Sequential(*layers[bounds[i] : bounds[i + 1]]), i, num_stages, device, group=self.pp_group)
            for i in self.stage_ids
        ]
        self.last_stage_rank = dist.get_global_rank(self.pp_group, (num_stages - 1) % self.pp_size)
        self.params = [p for stage in self.stages for p in stage.submod.parameters()]
        # A stage of parameter-free layers only (e.g. the cnn's first, a reshape) passes
        # activations and gradients on and has nothing to update.
        self.optimizer = make_optimizer(self.params) if self.params else None

        self.spans: list[events.Span] = []
        for stage in self.stages:
            self._record_spans(stage)
        schedule = SCHEDULES[cfg.schedule]

        def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # the mean over one micro-batch
            return loss_fn(task, output, target)

        self.schedule = (
            schedule(self.stages, cfg.micro_batches, loss_fn=loss)
            if per_rank > 1
            else schedule(self.stages[0], cfg.micro_batches, loss_fn=loss)
        )

    def _record_spans(self, stage: PipelineStage) -> None:
        """Time every micro-batch's forward and backward on this stage (the
        schedules call these two methods once per micro-batch)."""
        for method, phase, delay in (
            ("forward_one_chunk", "forward", self.delay),
            ("backward_one_chunk", "backward", 2 * self.delay),
        ):
            run = getattr(stage, method)

            def timed(chunk: int, *args: Any, _run=run, _phase=phase, _delay=delay, **kwargs: Any) -> Any:
                start = time.time()
                if _delay:  # teaching mode: stand-in for a stage with real work (backward ~ 2x forward)
                    time.sleep(_delay)
                out = _run(chunk, *args, **kwargs)
                self.spans.append(
                    events.Span(
                        type="span",
                        stage=stage.stage_index,
                        micro_batch=chunk,
                        phase=_phase,
                        start=start,
                        end=time.time(),
                    )
                )
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
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Only the last stage knows the loss: it tells the other stages.
        loss = torch.stack(losses).mean().detach() if holds_last else torch.zeros(())
        dist.broadcast(loss, src=self.last_stage_rank, group=self.pp_group)
        elapsed = time.perf_counter() - start
        busy = sum(span["end"] - span["start"] for span in self.spans)
        # Time outside this stage's own forward/backward: sends, receives, the bubble.
        waiting = max(elapsed - busy - comm_s, 0.0)
        return StepStats(loss, compute_s=busy, comm_s=comm_s + waiting, events=list(self.spans))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Each stage owns some of the model's parameters; the first pipeline
        rank gathers them under the single-process names."""
        owned = {id(p) for p in self.params}
        mine = {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if id(p) in owned}
        gathered: list[dict[str, torch.Tensor] | None] = [None] * self.pp_size
        dist.all_gather_object(gathered, mine, group=self.pp_group)
        merged = {name: t for part in gathered for name, t in (part or {}).items()}
        return {name: merged[name] for name in self.model.state_dict()}

    def checkpoint_state(self) -> dict[str, Any]:
        """The stages' parameters and optimizer state gathered under the
        single-process names (``strategies/state.py``): any strategy goes on from it."""
        return gathered(self.model, self.optimizer, self.pp_group)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        load_whole_state(self.model, self.optimizer, state)  # the optimizer takes its stages' part


def build(
    cfg: RunConfig, accelerator: Any, model: nn.Module, task: str, make_optimizer: OptimizerFactory
) -> PipelineParallel:
    """One stage per rank (two, interleaved) over a 1-D ``pp`` mesh."""
    mesh = init_device_mesh(accelerator.device.type, (cfg.world_size,), mesh_dim_names=("pp",))
    return PipelineParallel(cfg, mesh["pp"], model, task, make_optimizer, accelerator.device)


def check_stages(cfg: RunConfig) -> None:
    """Rules of any pipeline (here and in the hybrid dp x pp): enough layers,
    micro-batches and valid cuts for the stages."""
    stages = cfg.pp * (2 if cfg.schedule == "interleaved" else 1)
    layers = LAYERS[cfg.model]
    if stages > layers:
        raise ValueError(
            f"pp={cfg.pp} with schedule={cfg.schedule!r} needs {stages} stages but model={cfg.model!r} has "
            f"only {layers} layers: valid pp for it is 2..{layers // (stages // cfg.pp)}"
        )
    if cfg.micro_batches < cfg.pp or cfg.batch_size % cfg.micro_batches:
        raise ValueError(
            f"micro_batches={cfg.micro_batches} is invalid for pp={cfg.pp}: a pipeline needs at least as many "
            f"micro-batches as stages (valid: {cfg.pp} or more dividing batch_size={cfg.batch_size})"
        )
    if cfg.schedule == "interleaved" and cfg.micro_batches % cfg.pp:
        raise ValueError(
            f"micro_batches={cfg.micro_batches} is invalid for schedule='interleaved' with pp={cfg.pp}: "
            f"it must be a multiple of pp"
        )
    cuts = cfg.cut_points
    if cuts is not None and not (
        len(cuts) == stages - 1 and list(cuts) == sorted(set(cuts)) and all(0 < c < layers for c in cuts)
    ):
        raise ValueError(
            f"cut_points={cuts!r} is invalid: give {stages - 1} increasing layer indices "
            f"in 1..{layers - 1} (where stages 2..{stages} start), or None to balance by parameters"
        )


def layout(cfg: RunConfig) -> None:
    if cfg.world_size < 2:
        raise ValueError(
            f"world_size={cfg.world_size} is invalid for strategy='pipeline': one stage per rank, "
            "and a pipeline has at least 2 stages (strategy='single' for one process)"
        )
    if cfg.pp != cfg.world_size:
        raise ValueError(
            f"pp={cfg.pp} is invalid for strategy='pipeline' with world_size={cfg.world_size}: "
            f"one stage per rank, so pp must equal world_size (>= 2) "
            f"(strategy='hybrid' combines pp with dp)"
        )
    check_stages(cfg)


def _cuts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in value)


PP = integer("pp", 1, 1, "pp", "pipeline stages (pipeline: = world_size)", up_to=64)
PIPELINE_KNOBS = (
    integer("micro_batches", 4, 1, "micro-batches", "micro-batches per step and pipeline; must divide batch_size"),
    choice("schedule", "1f1b", tuple(SCHEDULES), "schedule", "pipeline schedule; interleaved: two stages per rank"),
    Knob(
        "cut_points",
        None,
        optional(_cuts),
        "None or a list of layer indices",
        None,
        "first layer of every stage but the first, e.g. [2]; None balances stages by parameters",
    ),
    number("stage_delay", 0.0, 0.0, None, "teaching: seconds a stage sleeps per forward (2x per backward)"),
)

register(
    StrategySpec(
        "pipeline",
        build,
        "pipeline parallel: the model cut into stages, micro-batches streamed "
        "through them (torch.distributed.pipelining)",
        knobs=(PP, *PIPELINE_KNOBS),
        layout=layout,
        dp_size=lambda cfg: 1,
        derived=lambda cfg: {"pp": cfg.world_size},  # one stage per rank
        checkpoint="consolidated",  # whole, by single-process names: any layout goes on from it
        portable=True,
        position=4,
    )
)
