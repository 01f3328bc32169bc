"""Data-parallel GRPO across processes, through MLX's distributed layer.

`mlx.launch --hosts 10.0.0.1,10.0.0.2 -- grpo-mlx train ...` starts one process per rank and
`mx.distributed.init()` connects them (ring over TCP or Thunderbolt, MPI, JACCL). Without a
launcher `init()` returns a world of one rank and every helper here returns its input: a
single-machine run pays nothing.

How the trainer uses the ranks:
1. Each step's B prompts are drawn from the data stream exactly as one process would draw
   them; rank r keeps prompts r*B/R .. (r+1)*B/R-1 and generates and scores its groups whole.
2. Losses are normalised by the global batch's counts (sequences, completion tokens), so the
   sum of the ranks' gradients is the one-process gradient; `sum_gradients` forms it on
   every rank, and every rank applies the same update: adapters stay identical.
3. Metrics are reduced from every rank's rows or from (weighted sum, weight) pairs, so the
   numbers shown equal the one-process numbers.
4. Rank 0 alone writes the run directory and draws the dashboard; on resume it reads the
   checkpoint and `broadcast_from_main` hands it to the other ranks (which may be other
   machines, without the run directory).

Metric vectors are reduced in float64 on the CPU stream (Metal has no float64).

A rank that fails alone leaves the others waiting in their next collective, where MLX's ring
backend can block for good. Where user code can fail (reward functions), `agree_on_failure`
makes every rank raise together; for a crash, the launcher's SIGTERM must be able to end a
rank blocked in a collective (the trainer leaves SIGTERM at its default with several ranks).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..core.errors import UserError

_world = None


def world() -> mx.distributed.Group:
    """All ranks (an mx.distributed.Group), initialised once; one rank without a launcher."""
    global _world
    if _world is None:
        _world = mx.distributed.init()
    return _world


def is_main() -> bool:
    """Rank 0 writes files and draws the dashboard."""
    return world().rank() == 0


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Prompts per rank: the global batch split evenly, whole groups per rank."""
    if batch_size % world_size != 0:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly across {world_size} ranks: "
            f"use a multiple of {world_size}"
        )
    return batch_size // world_size


def sum_across(values) -> np.ndarray:
    """Element-wise sum over ranks of a small float vector, in float64."""
    values = np.asarray(values, dtype=np.float64)
    ranks = world()
    if ranks.size() == 1:
        return values
    total = mx.distributed.all_sum(mx.array(values, dtype=mx.float64), group=ranks, stream=mx.cpu)
    return np.array(total)


def gather_counts(count: int) -> list[int]:
    """Every rank's `count`, in rank order."""
    ranks = world()
    if ranks.size() == 1:
        return [int(count)]
    counts = mx.distributed.all_gather(mx.array([int(count)], dtype=mx.int32), group=ranks, stream=mx.cpu)
    return [int(c) for c in np.array(counts)]


def gather_rows(table: np.ndarray, capacity: int) -> np.ndarray:
    """Stack every rank's rows ([n_r, k] float64, n_r <= capacity) in rank order.

    all_gather needs equal shapes, so each rank pads to `capacity` rows and sends a
    leading column that marks its real rows.
    """
    table = np.asarray(table, dtype=np.float64)
    ranks = world()
    if ranks.size() == 1:
        return table
    padded = np.zeros((capacity, 1 + table.shape[1]))
    padded[: len(table), 0] = 1.0
    padded[: len(table), 1:] = table
    gathered = np.array(mx.distributed.all_gather(mx.array(padded, dtype=mx.float64), group=ranks, stream=mx.cpu))
    return gathered[gathered[:, 0] == 1.0, 1:]


def sum_gradients(grads):
    """The sum over ranks of a gradient tree, on every rank.

    MLX's `average_gradients` batches small arrays into few messages; our losses are
    normalised by global counts, so the ranks' gradients add up rather than average.
    Multiplying the mean back by R is exact for R a power of two.
    """
    ranks = world()
    if ranks.size() == 1:
        return grads
    size = ranks.size()
    return tree_map(lambda g: g * size, nn.average_gradients(grads, ranks))


def broadcast_from_main(tree):
    """Rank 0's values of an array tree, on every rank (other ranks send zeros).

    Arrays go in key order: trees built differently (an optimizer state loaded from
    a checkpoint vs one initialised here) may list the same keys in another order.
    """
    ranks = world()
    if ranks.size() == 1:
        return tree
    keep = ranks.rank() == 0
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
    flat = [(k, mx.distributed.all_sum(x if keep else mx.zeros_like(x), group=ranks, stream=mx.cpu)) for k, x in flat]
    mx.eval([x for _, x in flat])
    return tree_unflatten(flat)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: ranks stop at the same step."""
    return bool(sum_across([float(flag)])[0] > 0)


FAILURE_MESSAGE_BYTES = 2048  # a failing rank's message, as the other ranks see it


def agree_on_failure(error: Exception | None, error_type: type[Exception] = UserError) -> None:
    """Raise on every rank when any rank brings an error; return when none does.

    Every rank calls it at the same point (it is a collective). With several ranks all
    raise `error_type` with the first failing rank's message, named by its rank, so
    they stop together instead of waiting on the one that gave up.
    """
    ranks = world()
    if ranks.size() == 1:
        if error is not None:
            raise error
        return
    message = b"" if error is None else str(error).encode()[: FAILURE_MESSAGE_BYTES - 1]
    mine = np.zeros(FAILURE_MESSAGE_BYTES, dtype=np.uint8)
    mine[0] = error is not None
    mine[1 : 1 + len(message)] = np.frombuffer(message, dtype=np.uint8)
    every = np.array(mx.distributed.all_gather(mx.array(mine), group=ranks, stream=mx.cpu)).reshape(ranks.size(), -1)
    failed = np.flatnonzero(every[:, 0])
    if len(failed) > 0:
        rank = int(failed[0])
        text = every[rank, 1:].tobytes().rstrip(b"\0").decode(errors="replace")
        raise error_type(f"rank {rank}: {text}") from error


def barrier() -> None:
    """Return once every rank gets here."""
    sum_across([0.0])
