"""The learner's knobs (:class:`LearnerConfig`) and the DeepSpeed config they give (:func:`deepspeed_config`).

Kept apart from :mod:`rl.learner` (which needs DeepSpeed and Ray at run
time) so that the memory planner (:mod:`rl.memory_plan`) and the GPU smoke
script read the same knobs and bucket sizes with only PyTorch installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rollout.config import check_ranges

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LearnerConfig:
    """Data-parallel learner: ranks, precision, optimizer and schedule."""

    ranks: int = field(default=1, metadata={
        "help": "data-parallel DeepSpeed ranks, one Ray actor each (count)", "range": ">= 1"})
    cpus_per_rank: float = field(default=1.0, metadata={
        "help": "Ray CPUs reserved by each rank (count)", "range": ">= 0"})
    gpus_per_rank: float = field(default=0.0, metadata={"help": "Ray GPUs per rank; > 0 trains on CUDA with NCCL, "
                                                                 "0 on CPU with gloo (count)", "range": ">= 0"})
    threads_per_rank: int = field(default=0, metadata={"help": "torch intra-op threads per rank; 0 = cpus_per_rank "
                                                               "rounded down, at least 1 (count)", "range": ">= 0"})
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage, 0-3", "range": "[0, 3]"})
    dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "training precision (bf16 keeps fp32 "
                                                                            "master weights)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of AdamW", "range": "> 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay, on matrices only", "range": ">= 0"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "range": "[0, 1)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "range": "[0, 1)"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon", "range": "> 0"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "clip the global gradient norm to this (0 = off)", "range": ">= 0"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up length (optimizer steps)", "range": ">= 0"})
    schedule: Literal["constant", "cosine"] = field(default="cosine", metadata={"help": "learning rate after "
                                                                                       "warm-up"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor, as a fraction of lr", "range": "[0, 1]"})
    row_tokens: int = field(default=1024, metadata={
        "help": "longest packed row, one micro-batch (tokens)", "range": ">= 2"})
    attention: Literal["sdpa", "eager", "flex"] = field(default="sdpa", metadata={"help": "tree attention backend "
                                                                                         "(rl.attention)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer in the backward instead of keeping its activations (about a third "
                "more compute, activation memory of one layer plus one hidden state per layer)"})
    logprob_chunk_tokens: int = field(default=1024, metadata={
        "help": "log-probabilities from the last hidden states this many positions at a time, never the full "
                "[row, vocab] logits (0: full logits, the old path) (tokens)", "range": ">= 0"})
    offload_optimizer: bool = field(default=False, metadata={
        "help": "keep the fp32 master weights and AdamW states in host memory (DeepSpeed offload_optimizer to "
                "cpu, needs zero_stage >= 1; torch's AdamW then steps on the CPU)"})
    seed: int = field(default=0, metadata={"help": "seed of every rank's random generators", "range": ">= 0"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (DeepSpeed offloads ZeRO's optimizer "
                             f"partitions), got zero_stage={self.zero_stage}")

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_rank > 0


#: ZeRO communication buckets (elements): gradient reduction and parameter all-gather (stages 1-3), and the
#: stage-3 parameter working set (DeepSpeed's own defaults are 5e8 and 1e9: gigabytes per rank). ``rl.memory_plan``
#: plans with these numbers.
BUCKET_ELEMENTS = 50_000_000
STAGE3_LIVE_ELEMENTS = 100_000_000


def deepspeed_config(cfg: LearnerConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for ``cfg``.

    One micro-batch per engine step: the learner sets the accumulation
    boundary itself (a rank's rows vary in number from step to step). With
    ZeRO stage 0 in fp32 DeepSpeed keeps no gradient norm, so the learner
    clips itself and clipping is off here. With ``offload_optimizer`` the
    client optimizer (torch's AdamW) is allowed to step on the offloaded CPU
    partitions (DeepSpeed refuses that by default, preferring its compiled
    CPU Adam).
    """
    clip_here = cfg.zero_stage == 0 and cfg.dtype == "fp32"
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    if cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_max_live_parameters=STAGE3_LIVE_ELEMENTS,
                    stage3_max_reuse_distance=STAGE3_LIVE_ELEMENTS)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.on_gpu}
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": 0.0 if clip_here else cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        out["zero_force_ds_cpu_optimizer"] = False
    return out
