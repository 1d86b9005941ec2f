"""Weight updates in place: a state dict cut into buckets, loaded into a running vLLM engine.

The sender (:func:`to_buckets`) serialises a ``name -> tensor`` state dict into
safetensors byte strings of about ``bucket_bytes`` each (a tensor larger than
that travels alone), so an update is a handful of transfers, never one call
per tensor. The receiver writes each bucket as one shard of a fresh directory
(:func:`write_buckets`) and :func:`reload_in_place` has every engine worker
reload its weights from that directory (vLLM's in-place ``reload_weights``,
through ``rollout.engine.ReloadExtension`` which also re-prepares a tied
output head), then resets the prefix cache: cached KV blocks were computed
with the old weights and must not be reused.

This goes through the worker's local disk (one copy of the weights per
update, in a fresh temporary directory; the previous one is deleted). On a
GPU cluster these entry points would be replaced by vLLM's NCCL weight
transfer (``vllm.distributed.weight_transfer``: the learner's rank 0
broadcasts packed buckets straight into the engines' GPU memory), which skips
the disk and the host copies; the bucketing, the prefix cache reset and the
timing stay the same. That path is not implemented here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


def to_buckets(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[bytes]:
    """The state dict as safetensors-serialised buckets of at most ``bucket_bytes`` (or one tensor)."""
    from safetensors.torch import save

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[bytes] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        # a private contiguous CPU copy: safetensors refuses tensors that share storage (tied weights)
        t = tensor.detach().to("cpu").contiguous().clone()
        n = t.numel() * t.element_size()
        if current and size + n > bucket_bytes:
            buckets.append(save(current))
            current, size = {}, 0
        current[name] = t
        size += n
    if current:
        buckets.append(save(current))
    return buckets


def write_buckets(buckets: list[bytes], directory: str | Path) -> Path:
    """Write bucket ``i`` as ``directory/bucket-0000i.safetensors``; the directory must be new or empty."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise FileExistsError(f"{d} is not empty; every weight update needs a fresh directory")
    for i, data in enumerate(buckets):
        (d / f"bucket-{i:05d}.safetensors").write_bytes(data)
    return d


def reload_in_place(llm, directory: str | Path) -> None:
    """Load the safetensors files in ``directory`` into ``llm`` (made by ``rollout.engine.make_llm``).

    Resets the prefix cache afterwards; raises if vLLM refuses to (it does
    while requests are running).
    """
    llm.collective_rpc("threadweaver_reload", args=(str(directory),))
    if llm.reset_prefix_cache() is False:
        raise RuntimeError("vLLM refused to reset the prefix cache after a weight update")
