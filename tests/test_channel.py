"""The channel listens on loopback and admits only holders of the run's token."""

from __future__ import annotations

import socket
import threading
import time

import pytest

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


def test_silent_peers_are_bounded_timed_out_and_delay_no_rank(monkeypatch):
    """More silent connections than the server keeps: the oldest are dropped
    at once, the rest closed at their deadline, and a rank that connects
    meanwhile is admitted at once."""
    monkeypatch.setattr(channel, "HANDSHAKE_TIMEOUT_S", 3.0)
    server = channel.ChannelServer(channel.new_token())
    opened = time.monotonic()
    silent = [socket.create_connection(server.address) for _ in range(channel.MAX_PENDING + 8)]
    for sock in silent:
        sock.settimeout(3.0)
        assert len(sock.recv(32)) == 32  # every one got its challenge: all were accepted
    started = time.monotonic()
    box = {}
    thread = _connect_in_thread(server.address, server.token, 1, box)
    rank, kernel_end = server.accept(timeout=5)
    thread.join()
    assert rank == 1 and time.monotonic() - started < 0.5
    assert time.monotonic() - opened < channel.HANDSHAKE_TIMEOUT_S  # what follows is before any deadline
    for sock in silent[:9]:  # dropped to keep at most MAX_PENDING (the rank's arrival made it 9)
        assert sock.recv(1) == b""
    silent[9].settimeout(0.1)
    with pytest.raises(TimeoutError):  # the others still wait for an answer
        silent[9].recv(1)
    for sock in silent[9:]:  # until their deadline
        sock.settimeout(channel.HANDSHAKE_TIMEOUT_S + 2)
        assert sock.recv(1) == b""
    assert time.monotonic() - opened < channel.HANDSHAKE_TIMEOUT_S + 2
    for end in (*silent, box["conn"], kernel_end):
        end.close()
    server.close()
