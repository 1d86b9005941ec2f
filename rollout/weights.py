"""Weight updates in place: buckets published to Ray's object store by their holder, loaded by the engines.

Sender. Whoever holds the weights cuts them into buckets of about
``bucket_bytes`` (a tensor larger than that travels alone), serialises each
bucket with safetensors (:func:`pack_bucket`) and puts it in Ray's object
store *in its own process*: in training that is the learner
(``rl.learner.Learner.publish_weights``, each rank putting its share of the
buckets), so the refs it returns are all the driver ever sees of the weights.
:class:`PublishedWeights` is that list of object references, in bucket
order, with the byte count and the seconds the publishing took.
:func:`publish_state_dict` does the same from a process that holds a state
dict itself (scripts and tests; the training loop never calls it).

Ownership: an object belongs to the process that put it, and lives while any
reference to it does. The driver keeps the :class:`PublishedWeights` until
every worker has loaded it, then drops it, which frees the buckets.

Receiver (:func:`fetch_to_dir`, run inside a rollout worker). The worker
waits on all the bucket references at once, so Ray fetches them in parallel,
and writes each bucket as one shard of a fresh directory as soon as it
arrives (one bucket at a time in the worker's Python heap); then
:func:`reload_in_place` has every engine worker reload its weights from that
directory (vLLM's in-place ``reload_weights``, through
``rollout.engine.ReloadExtension`` which also re-prepares a tied output head)
and resets the prefix cache: cached KV blocks were computed with the old
weights and must not be reused. vLLM's reload is one pass over all shards, so
the loading itself starts when the last bucket is written.

This goes through the worker's local disk (one copy of the weights per
update, in a fresh temporary directory; the previous one is deleted). The
other way, ``rollout.weight_transfer: collective`` (:mod:`rollout.collective`),
broadcasts the buckets from the learner's rank 0 over a process group that
the engine workers join (gloo on CPU, NCCL on GPUs), skipping the object
store and the disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch


@dataclass
class PublishedWeights:
    """Weights in Ray's object store: one reference per safetensors bucket, in bucket order.

    Holding this object keeps the buckets alive (see the module doc); drop it once every engine has loaded them.
    """

    refs: list = field(repr=False)  # ray.ObjectRef of each bucket's bytes
    n_bytes: int  # serialised size of all buckets
    publish_s: float  # cutting, serialising and putting the buckets (slowest publishing rank), s

    @property
    def n_buckets(self) -> int:
        return len(self.refs)


def split_named(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                nbytes=lambda t: t.numel() * t.element_size()) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` pairs grouped into buckets of at most ``bucket_bytes`` (a larger tensor alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        n = nbytes(tensor)
        if chunk and size + n > bucket_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += n
    if chunk:
        yield chunk


def pack_bucket(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One bucket as safetensors bytes (private contiguous CPU copies: safetensors refuses shared storage)."""
    from safetensors.torch import save

    tensors = {}
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return save(tensors)


def interleave(per_rank: Sequence[Sequence]) -> list:
    """Bucket order from each rank's share, where bucket ``i`` was published by rank ``i % len(per_rank)``."""
    world = len(per_rank)
    total = sum(len(share) for share in per_rank)
    expected = [len(range(r, total, world)) for r in range(world)]
    if [len(share) for share in per_rank] != expected:
        raise ValueError(f"rank shares of {[len(s) for s in per_rank]} buckets do not interleave "
                         f"(expected {expected}): did the ranks cut different buckets?")
    return [per_rank[i % world][i // world] for i in range(total)]


def publish_state_dict(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int) -> PublishedWeights:
    """Put ``state_dict`` in Ray's object store from this process, one bucket at a time (Ray must be started)."""
    import ray

    start = time.perf_counter()
    refs, n_bytes = [], 0
    for chunk in split_named(state_dict.items(), bucket_bytes):
        data = pack_bucket(chunk)
        refs.append(ray.put(data))
        n_bytes += len(data)
    return PublishedWeights(refs, n_bytes, time.perf_counter() - start)


def bucket_file(directory: str | Path, index: int) -> Path:
    """Where bucket ``index`` of an update goes in its directory (one safetensors shard)."""
    return Path(directory) / f"bucket-{index:05d}.safetensors"


def fetch_to_dir(refs: Sequence, directory: str | Path) -> Path:
    """Fetch the buckets behind ``refs`` and write bucket ``i`` as ``directory/bucket-0000i.safetensors`` as soon
    as it arrives; ``directory`` must be new or empty.

    All fetches start at once (``ray.wait`` pulls every object it waits on);
    only the bucket being written is held in this process.
    """
    import ray

    d = _fresh_dir(directory)
    index = {ref: i for i, ref in enumerate(refs)}
    if len(index) != len(refs):
        raise ValueError("the same bucket reference appears twice")
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            bucket_file(d, index[ref]).write_bytes(ray.get(ref))
    return d


def _fresh_dir(directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise FileExistsError(f"{d} is not empty; every weight update needs a fresh directory")
    return d


def same_architecture(*model_dirs: str | Path) -> bool:
    """Whether the models have the same ``config.json`` (one engine serves them all, weights reloaded in place)."""
    configs = [json.loads((Path(d) / "config.json").read_text()) for d in model_dirs]
    return all(c == configs[0] for c in configs)


def reload_in_place(llm, directory: str | Path) -> None:
    """Load the safetensors files in ``directory`` into ``llm`` (made by ``rollout.engine.make_llm``).

    Resets the prefix cache afterwards; raises if vLLM refuses to (it does
    while requests are running).
    """
    llm.collective_rpc("threadweaver_reload", args=(str(directory),))
    if llm.reset_prefix_cache() is False:
        raise RuntimeError("vLLM refused to reset the prefix cache after a weight update")
