"""Pipeline parallelism: cut the model into stages, one per rank (two with the
interleaved, looped and V schedules), and stream micro-batches through them.

Each step the batch is split into ``micro_batches`` equal parts. A stage runs
the forward of a micro-batch as soon as the previous stage sends its
activations, sends its output on, and later runs the backward when the next
stage sends back the gradient. The order is the *schedule*, from
``torch.distributed.pipelining`` (every one torch 2.13 ships; the table and
each one's layout in ``strategies/schedules.py``):

- ``gpipe``: every forward, then every backward. Simple, but each stage keeps
  all ``m`` micro-batches' activations alive until the backwards start.
- ``1f1b``: after a short warm-up each stage alternates one forward, one
  backward, so at most ``p`` micro-batches are in flight per stage.
- ``interleaved``: each rank holds two non-adjacent stages (rank r: stages r
  and r + p) and runs 1F1B over them: smaller bubbles for more messages.
- ``looped_bfs``: the same two looped stages, breadth first.
- ``interleaved_zb``, ``zbv``, ``dualpipev``: zero-bubble schedules. The
  backward splits into the input gradient (I) and the weight gradient (W);
  W's fill the bubble. ``zbv`` and ``dualpipev`` place stages in a V (rank r:
  stages r and 2p-1-r).

Both fill and drain leave stages idle (the *bubble*): with ``p`` stages and
``m`` equal micro-batches a fraction (p-1)/(m+p-1) of the step for GPipe and
1F1B. ``ddlkit.timeline`` measures it from the spans recorded here and puts
each schedule's formula beside it.

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

from .. import events
from ..config import RunConfig
from ..knobs import Knob, choice, integer, number, optional
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, RankContext, StepStats, Strategy
from ..registry import StrategySpec, register
from .compression import averager_for
from .schedules import (
    SCHEDULES,
    VIEW_LAYERS,
    TimedStage,
    check_micro_batches,
    check_split_backward,
    default_cuts,
    last_stage_rank,
    stage_costs_valid,
    stage_ids,
)
from .sharding import average_gradients
from .stages import LAYERS, choose_cuts, pipeline_layers
from .state import gathered, load_whole_state


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
        self.averager = averager_for(cfg, self.dp_group)  # hybrid dp x pp with compression
        self.pp_group, self.pp_size, pp_rank = pp_mesh.get_group(), pp_mesh.size(), pp_mesh.get_local_rank()

        # Cut the layers into stages; this rank keeps its own (one, or two: looped or in a V).
        layers = pipeline_layers(model)
        schedule = SCHEDULES[cfg.schedule]
        num_stages = self.pp_size * schedule.stages_per_rank
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        by_params = default_cuts(sizes, num_stages, cfg.schedule, VIEW_LAYERS[cfg.model])
        cuts, self.cut_report = choose_cuts(cfg, layers, num_stages, by_params)
        bounds = [0, *cuts, len(layers)]
        self.stage_ids = stage_ids(pp_rank, self.pp_size, cfg.schedule)
        self.spans: list[events.Span] = []
        costs = cfg.stage_costs or (1.0, 1.0, 1.0)
        self.stages = [
            TimedStage(
                nn.Sequential(*layers[bounds[i] : bounds[i + 1]]),
                i,
                num_stages,
                device,
                group=self.pp_group,
                spans=self.spans,
                delay=cfg.stage_delay,
                costs=costs,
            )
            for i in self.stage_ids
        ]
        self.last_stage_rank = dist.get_global_rank(self.pp_group, last_stage_rank(self.pp_size, cfg.schedule))
        self.params = [p for stage in self.stages for p in stage.submod.parameters()]
        # A stage of parameter-free layers only (e.g. the cnn's first, a reshape) passes
        # activations and gradients on and has nothing to update.
        self.optimizer = make_optimizer(self.params) if self.params else None

        def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # the mean over one micro-batch
            return loss_fn(task, output, target)

        self.schedule = schedule.cls(
            self.stages if schedule.stages_per_rank > 1 else self.stages[0], cfg.micro_batches, loss_fn=loss
        )

    def setup(self, ctx: RankContext) -> None:
        if self.cut_report is not None and ctx.rank == 0:  # cut_points="auto": the cuts and their stage times
            ctx.reporter.send(self.cut_report)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start = time.perf_counter()
        self.spans.clear()  # the stages append to this list
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
        comm_s = average_gradients(self.params, self.dp_group, self.averager)
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
    """One stage per rank (two for the looped and V schedules) over a 1-D ``pp`` mesh."""
    mesh = init_device_mesh(accelerator.device.type, (cfg.world_size,), mesh_dim_names=("pp",))
    return PipelineParallel(cfg, mesh["pp"], model, task, make_optimizer, accelerator.device)


def check_stages(cfg: RunConfig) -> None:
    """Rules of any pipeline (here and in the hybrid dp x pp): enough layers,
    micro-batches and valid cuts for the stages."""
    per_rank = SCHEDULES[cfg.schedule].stages_per_rank
    stages = cfg.pp * per_rank
    layers = LAYERS[cfg.model]
    if stages > layers:
        raise ValueError(
            f"pp={cfg.pp} with schedule={cfg.schedule!r} needs {stages} stages ({per_rank} per rank) but "
            f"model={cfg.model!r} has only {layers} layers: valid pp for it is 2..{layers // per_rank}"
        )
    check_micro_batches(cfg)
    cuts = cfg.cut_points
    if (
        cuts is not None
        and cuts != "auto"
        and not (len(cuts) == stages - 1 and list(cuts) == sorted(set(cuts)) and all(0 < c < layers for c in cuts))
    ):
        raise ValueError(
            f"cut_points={cuts!r} is invalid: give {stages - 1} increasing layer indices "
            f"in 1..{layers - 1} (where stages 2..{stages} start), None to balance by parameters, "
            "or 'auto' to balance by measured layer time"
        )
    check_split_backward(cfg)


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
    return (
        value == "auto"
        or isinstance(value, list)
        and all(isinstance(c, int) and not isinstance(c, bool) for c in value)
    )


PP = integer("pp", 1, 1, "pp", "pipeline stages (pipeline: = world_size)", up_to=64)
PIPELINE_KNOBS = (
    integer("micro_batches", 4, 1, "micro-batches", "micro-batches per step and pipeline; must divide batch_size"),
    choice(
        "schedule",
        "1f1b",
        tuple(SCHEDULES),
        "schedule",
        "pipeline schedule (torch.distributed.pipelining); all but gpipe and 1f1b hold two stages per rank",
    ),
    Knob(
        "cut_points",
        None,
        optional(_cuts),
        "None, 'auto' or a list of layer indices",
        None,
        "first layer of every stage but the first, e.g. [2]; None balances stages by parameters, "
        "'auto' by each layer's measured forward+backward time",
    ),
    number("stage_delay", 0.0, 0.0, None, "teaching: seconds a stage sleeps per unit of work (stage_costs)"),
    Knob(
        "stage_costs",
        None,
        stage_costs_valid,
        "None or [F, I, W]: three numbers >= 0, F above 0",
        None,
        "teaching: units of stage_delay per forward (F), input-gradient (I) and weight-gradient (W) backward; "
        "a whole backward costs I+W; None: [1, 1, 1]",
    ),
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
