"""Weight updates by broadcast over a collective group: learner rank 0 sends, every engine worker receives.

The second way of ``rollout.weight_transfer`` (the first, ``objects``, is
:mod:`rollout.weights`). For one update, learner rank 0 and every vLLM
worker process of every rollout engine form a process group of their own
(rank 0: the learner; ranks 1..: the engine workers, ``tensor_parallel_size``
per engine), with gloo when the weights live on the CPU and NCCL on GPUs.
The group is *stateless*: a ``TCPStore`` hosted by learner rank 0 at its
node's address and a free port (:class:`Rendezvous`, handed to both sides by
the driver) and a backend object built on it (``ProcessGroupGloo`` /
``ProcessGroupNCCL``); ``torch.distributed``'s default group, which DeepSpeed
(learner) and vLLM (engine worker) each initialised for themselves, is never
touched. The group lives for one update and is closed after it: a rebuilt
rollout pool needs nothing set up again.

Per bucket (the same buckets as the objects way, ``bucket_mb`` each), rank 0
writes the bucket's manifest (names, dtypes, shapes, byte offsets) into the
store under ``bucket/<i>`` and broadcasts the bucket as one flat byte tensor
(each tensor's bytes padded to :data:`ALIGN`); a manifest ``end`` closes the
update. An engine worker reads manifest ``i`` (waiting for it), receives the
bytes into one buffer and yields views of it as ``(name, tensor)`` to vLLM's
in-place ``reload_weights(weights_iterator=...)`` (Hugging Face names, the
model's own ``load_weights`` with vLLM's layer-wise post-processing), so the
buckets are loaded as they arrive, never written to disk, never through
Ray's object store. Each receiver confirms the end mark in the store
(``done/<rank>``), and rank 0 keeps the store up until all have.

Both sides must be in the group at the same time: the driver starts the
learner's send and the workers' receive as concurrent Ray calls and waits
for both. Every wait has the rendezvous's ``timeout_s``: joining (rank 0
waits that long for all ranks, the others retry connecting that long), each
manifest and each broadcast; a side that is missing or dies makes the others
fail with :class:`CollectiveError` instead of hanging. A receive that fails
part-way leaves the engine with some buckets of the new weights: the next
successful update (or the pool's rebuild) replaces them all.

Limits: tested with gloo on CPU only; the NCCL branch (CUDA tensors,
``ProcessGroupNCCL``) has not been run. The NCCL communicator is built for
every update (on GPUs a long-lived group would save its set-up time).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch

#: byte alignment of every tensor inside a bucket's flat buffer (so each view of it is aligned for its dtype)
ALIGN = 16
END = "end"


class CollectiveError(RuntimeError):
    """A weight broadcast that could not start or finish (a rank missing, unreachable or too slow)."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and how one update's group meets: learner rank 0's node address and a free port there."""

    host: str
    port: int
    world_size: int  # 1 (learner rank 0) + every engine worker process
    backend: str  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    timeout_s: float  # each wait: joining, a manifest, a broadcast (s)

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.world_size < 2:
            raise ValueError(f"a broadcast group needs a sender and a receiver, got world_size {self.world_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def as_dict(self) -> dict:
        """Plain values (what ``collective_rpc`` passes to the engine workers)."""
        return asdict(self)


def backend_for(device: torch.device | str) -> str:
    """gloo for weights on the CPU, NCCL for weights on CUDA devices."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class Group:
    """One update's process group as seen by one rank (from :func:`open_group`)."""

    rendezvous: Rendezvous
    rank: int
    store: object  # torch.distributed.TCPStore
    backend: object  # ProcessGroupGloo / ProcessGroupNCCL over a PrefixStore of ``store``

    def _where(self) -> str:
        r = self.rendezvous
        return f"rank {self.rank} of {r.world_size} at {r.host}:{r.port} ({r.backend})"

    def broadcast(self, flat: torch.Tensor, what: str) -> None:
        """Broadcast ``flat`` from rank 0 (in place on the other ranks)."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            self.backend.broadcast([flat], opts).wait()
        except Exception as e:  # noqa: BLE001 - c10d raises several types; one message names the group
            raise CollectiveError(f"weight broadcast: {what} failed for {self._where()} within "
                                  f"{self.rendezvous.timeout_s:g} s: {type(e).__name__}: {_first_line(e)}") from e

    def get(self, key: str) -> bytes:
        """The store's value of ``key``, waiting for it at most ``timeout_s``."""
        try:
            return self.store.get(key)
        except Exception as e:  # noqa: BLE001
            raise CollectiveError(f"weight broadcast: {self._where()} waited {self.rendezvous.timeout_s:g} s for "
                                  f"'{key}' from learner rank 0: {type(e).__name__}: {_first_line(e)}") from e

    def wait_done(self) -> None:
        """Rank 0: wait until every other rank has read the end mark (the store lives in this process: closing
        it earlier would fail a rank still loading the last bucket)."""
        ranks = range(1, self.rendezvous.world_size)
        try:
            self.store.wait([f"done/{r}" for r in ranks], timedelta(seconds=self.rendezvous.timeout_s))
        except Exception as e:  # noqa: BLE001
            missing = [r for r in ranks if not self.store.check([f"done/{r}"])]
            raise CollectiveError(f"weight broadcast: learner rank 0 at {self.rendezvous.host}:{self.rendezvous.port} "
                                  f"waited {self.rendezvous.timeout_s:g} s for ranks {missing} to read the end of the "
                                  f"update: {type(e).__name__}: {_first_line(e)}") from e

    def close(self) -> None:
        shutdown = getattr(self.backend, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - best effort: the update's result is already known
                pass
        self.backend = self.store = None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def open_group(rendezvous: Rendezvous, rank: int) -> Group:
    """Join the update's group as ``rank`` (0 hosts the store and waits for every rank); CollectiveError when the
    group does not form within ``timeout_s``."""
    import torch.distributed as dist

    r = rendezvous
    if not 0 <= rank < r.world_size:
        raise ValueError(f"rank {rank} outside a group of {r.world_size}")
    timeout = timedelta(seconds=r.timeout_s)
    try:
        store = dist.TCPStore(r.host, r.port, r.world_size, rank == 0, timeout=timeout, wait_for_workers=True)
    except Exception as e:  # noqa: BLE001 - DistNetworkError (cannot connect) or DistStoreError (ranks missing)
        role = (f"learner rank 0 hosting the store waited for all {r.world_size} ranks" if rank == 0
                else f"rank {rank} could not reach learner rank 0's store")
        raise CollectiveError(f"weight broadcast: {role} at {r.host}:{r.port} for {r.timeout_s:g} s: "
                              f"{type(e).__name__}: {_first_line(e)}") from e
    prefix = dist.PrefixStore("threadweaver-weights", store)
    if r.backend == "gloo":
        backend = dist.ProcessGroupGloo(prefix, rank, r.world_size, timeout)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        backend = dist.ProcessGroupNCCL(prefix, rank, r.world_size, options)
    return Group(r, rank, store, backend)


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def flatten(named: Iterable[tuple[str, torch.Tensor]], device: torch.device | str) -> tuple[torch.Tensor, list]:
    """One bucket as a flat byte tensor on ``device`` and its manifest ``[[name, dtype, shape, offset], ...]``."""
    parts, manifest, offset = [], [], 0
    for name, tensor in named:
        t = tensor.detach().to(device).contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        manifest.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        parts.append(raw)
        pad = _padded(raw.numel()) - raw.numel()
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=device))
        offset += raw.numel() + pad
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)
    return flat, manifest


def unflatten(flat: torch.Tensor, manifest: list) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views of ``flat`` as :func:`flatten` laid them out."""
    for name, dtype, shape, offset in manifest:
        dt = getattr(torch, dtype)
        numel = 1
        for s in shape:
            numel *= s
        n = numel * torch.empty((), dtype=dt).element_size()
        yield name, flat[offset:offset + n].view(dt).reshape(shape)


def send_buckets(group: Group, buckets: Iterable[list[tuple[str, torch.Tensor]]],
                 device: torch.device | str) -> tuple[int, int]:
    """Rank 0: broadcast every bucket (manifest through the store, bytes through the group), then the end mark.

    Returns ``(buckets, bytes)`` sent."""
    if group.rank != 0:
        raise ValueError("only rank 0 sends")
    n = n_bytes = 0
    for bucket in buckets:
        flat, manifest = flatten(bucket, device)
        group.store.set(f"bucket/{n}", json.dumps({"bytes": flat.numel(), "tensors": manifest}))
        group.broadcast(flat, f"bucket {n}")
        n += 1
        n_bytes += flat.numel()
    group.store.set(f"bucket/{n}", json.dumps(END))
    group.wait_done()
    return n, n_bytes


def receive_buckets(group: Group, device: torch.device | str, stats: dict | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks > 0: ``(name, tensor)`` of every bucket rank 0 sends, a bucket at a time, until its end mark.

    ``stats`` (when given) gets ``buckets`` and ``bytes`` received."""
    i = 0
    while True:
        header = json.loads(group.get(f"bucket/{i}"))
        if header == END:
            group.store.set(f"done/{group.rank}", "1")  # rank 0 keeps the store up until every rank got here
            break
        flat = torch.empty(header["bytes"], dtype=torch.uint8, device=device)
        group.broadcast(flat, f"bucket {i}")
        if stats is not None:
            stats["buckets"] = stats.get("buckets", 0) + 1
            stats["bytes"] = stats.get("bytes", 0) + flat.numel()
        yield from unflatten(flat, header["tensors"])
        i += 1


def receive_into(worker, rendezvous: dict, rank: int) -> dict:
    """Inside a vLLM worker (``rollout.engine.ReloadExtension``): join the group as ``rank``, load every bucket
    with vLLM's in-place ``reload_weights``; returns ``buckets``, ``bytes`` and ``seconds``."""
    start = time.perf_counter()
    rv = Rendezvous(**rendezvous)
    group = open_group(rv, rank)
    stats: dict = {"buckets": 0, "bytes": 0}
    try:  # gloo moves CPU tensors (vLLM's loaders copy them to the model's device); NCCL the model's device
        device = "cpu" if rv.backend == "gloo" else next(worker.model_runner.get_model().parameters()).device
        worker.reload_weights(weights_iterator=receive_buckets(group, device, stats))
    finally:
        group.close()
    return {**stats, "seconds": time.perf_counter() - start}


@dataclass
class Broadcast:
    """Weights that learner rank 0 broadcasts once the rollout pool names the group (the ``collective`` way).

    What ``RolloutPool.update_weights`` takes in place of ``rollout.weights.PublishedWeights``: nothing is
    sent until the pool asks, and every ask (a retry after a rebuilt pool too) forms a new group.
    """

    address: Callable[[], tuple[str, int]]  # the sender's node address and a free port there, asked afresh
    send: Callable[[Rendezvous], list]  # starts the send; Ray refs, each giving (buckets, bytes, seconds)
    backend: str  # "gloo" or "nccl": where the sender keeps its weights
    timeout_s: float  # see Rendezvous
