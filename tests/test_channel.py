"""The channel listens on loopback and admits only holders of the run's token."""

from __future__ import annotations

import threading

from ddlkit import channel


def _connect_in_thread(address, token, rank, box):
    def target():
        try:
            box["conn"] = channel.connect(address, token, rank)
        except OSError as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_right_token_is_admitted_and_messages_flow_both_ways():
    server = channel.ChannelServer(channel.new_token())
    assert server.address[0] == "127.0.0.1"
    box = {}
    thread = _connect_in_thread(server.address, server.token, 3, box)
    rank, kernel_end = server.accept(timeout=10)
    thread.join()
    assert rank == 3
    channel.send(box["conn"], {"type": "step", "loss": 0.5})
    assert channel.recv(kernel_end) == {"type": "step", "loss": 0.5}
    channel.send(kernel_end, {"type": "control", "lr": 0.1})
    assert channel.recv(box["conn"]) == {"type": "control", "lr": 0.1}
    for end in (box["conn"], kernel_end):
        end.close()
    server.close()


def test_wrong_token_is_refused():
    server = channel.ChannelServer(channel.new_token())
    box = {}
    thread = _connect_in_thread(server.address, channel.new_token(), 0, box)
    assert server.accept(timeout=1) is None
    thread.join()
    server.close()


def test_tensors_and_numpy_numbers_are_sent_as_numbers():
    import numpy as np
    import torch

    server = channel.ChannelServer(channel.new_token())
    box = {}
    thread = _connect_in_thread(server.address, server.token, 0, box)
    _, kernel_end = server.accept(timeout=10)
    thread.join()
    channel.send(box["conn"], {"loss": torch.tensor(1.5), "acc": np.float32(0.25)})
    assert channel.recv(kernel_end) == {"loss": 1.5, "acc": 0.25}
    box["conn"].close()
    kernel_end.close()
    server.close()
