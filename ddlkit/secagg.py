"""Secure aggregation (Bonawitz et al. 2017), simulated: the server learns the
sum of a round's client updates and nothing else about them.

Each client turns its update into fixed-point integers (``SCALE_BITS``
fractional bits) and adds, modulo 2^64, one pseudo-random mask per other
client of the round: ``+PRG(s_ij)`` toward a higher client id, ``-PRG(s_ij)``
toward a lower one. The seed ``s_ij`` is shared by the two clients and not by
the server: here it is derived from a secret that the client ranks agree on
among themselves, standing in for the protocol's Diffie-Hellman key
agreement. In the sum of all masked updates every mask appears once with
``+`` and once with ``-``: the sum of the masked integers is exactly the sum
of the integers, and a single masked update is uniform noise to the server.

A client that drops after the masks were agreed leaves its pairs' masks in
the sum. The survivors then reveal their masks with the dropped clients (in
the protocol: the secret shares of the dropped client's key) and the server
subtracts them; it still never sees one survivor's update alone, as long as
two survivors remain.

Not simulated: the self-masks that protect against a server lying about who
dropped, threshold secret sharing, signatures. The masks cost O(clients²)
pseudo-random vectors per round.

>>> secret = b"shared by the clients only"
>>> updates = {3: torch.tensor([0.5, -1.25]), 7: torch.tensor([2.0, 0.125]), 9: torch.tensor([1.0, 1.0])}
>>> sent = {c: masked(u, c, [3, 7, 9], secret, round_=0) for c, u in updates.items()}
>>> aggregate([sent[3], sent[7]], [reveal(c, [9], secret, 0, 2) for c in (3, 7)]).tolist()  # 9 dropped
[2.5, -1.125]
>>> bool(abs(decode(sent[3])[0]) > 1000)  # one masked update alone says nothing
True
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

SCALE_BITS = 24  # fixed point: 2^-24 ~ 6e-8 resolution
LIMIT = 2.0 ** (62 - SCALE_BITS)  # |value| below this: a sum of a few hundred cannot wrap around


def encode(values: torch.Tensor) -> np.ndarray:
    """Fixed-point integers, as unsigned 64-bit (arithmetic modulo 2^64)."""
    scaled = values.double().numpy() * 2.0**SCALE_BITS
    if not np.all(np.abs(scaled) < 2.0**62):
        raise ValueError(f"secure aggregation: a value of magnitude >= {LIMIT:.3g} does not fit the fixed point")
    return np.rint(scaled).astype(np.int64).view(np.uint64)


def decode(integers: np.ndarray) -> torch.Tensor:
    """Back from fixed point (float64)."""
    return torch.from_numpy(integers.view(np.int64).astype(np.float64) / 2.0**SCALE_BITS)


def pair_mask(secret: bytes, round_: int, a: int, b: int, size: int) -> np.ndarray:
    """The mask clients ``a`` and ``b`` share in this round: uniform over 64-bit integers."""
    low, high = min(a, b), max(a, b)
    seed = hashlib.sha256(secret + f"|{round_}|{low}|{high}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
    return rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)


def masks_with(client: int, peers: list[int], secret: bytes, round_: int, size: int) -> np.ndarray:
    """Sum of ``client``'s signed masks with ``peers`` (itself excluded), modulo 2^64."""
    total = np.zeros(size, dtype=np.uint64)
    for peer in peers:
        if peer > client:
            total += pair_mask(secret, round_, client, peer, size)
        elif peer < client:
            total -= pair_mask(secret, round_, client, peer, size)
    return total


def masked(values: torch.Tensor, client: int, peers: list[int], secret: bytes, round_: int) -> np.ndarray:
    """What ``client`` sends: its fixed-point values plus its masks with every peer of the round."""
    return encode(values) + masks_with(client, peers, secret, round_, values.numel())


def reveal(client: int, dropped: list[int], secret: bytes, round_: int, size: int) -> np.ndarray:
    """What a survivor reveals after ``dropped`` vanished: its masks with them."""
    return masks_with(client, dropped, secret, round_, size)


def aggregate(masked_updates: list[np.ndarray], reveals: list[np.ndarray]) -> torch.Tensor:
    """The exact sum of the survivors' values (to the fixed point's resolution)."""
    total = np.asarray(np.sum(masked_updates, axis=0, dtype=np.uint64))
    if reveals:
        total = total - np.asarray(np.sum(reveals, axis=0, dtype=np.uint64))
    return decode(total)
