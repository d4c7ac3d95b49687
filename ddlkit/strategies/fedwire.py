"""How the federated server and its client ranks talk (not a strategy): a
pickled header, then one tensor whose shape and dtype the header gives, over
torch.distributed point-to-point sends (gloo).

A header's ``kind`` is ``"round"`` (the server's jobs for a client rank, or a
client rank's results) or ``"done"`` (the server tells a client rank to stop).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ROUND, DONE = "round", "done"


def send(message: dict[str, Any], payload: torch.Tensor, dst: int) -> None:
    header = {**message, "shape": list(payload.shape), "dtype": str(payload.dtype).removeprefix("torch.")}
    dist.send_object_list([header], dst=dst)
    if payload.numel():
        dist.send(payload.contiguous(), dst=dst)


def receive(src: int) -> tuple[dict[str, Any], torch.Tensor]:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src)
    header = box[0]
    payload = torch.empty(header["shape"], dtype=getattr(torch, header["dtype"]))
    if payload.numel():
        dist.recv(payload, src=src)
    return header, payload
