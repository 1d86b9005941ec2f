"""Configuration of rollouts: sampling, spawn/join limits and the Ray worker pool."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: environment defaults of every command that starts engines, learners or tracking (a user's values win):
#: vLLM on CPU refuses to start without a KV-cache size; quiet vLLM logs; no tokenizer thread pools
#: fighting the engines for cores; no MLflow telemetry. DeepSpeed's accelerator is set per learner rank
#: (``rl.learner``), from whether that rank has a GPU.
RUNTIME_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
                    "MLFLOW_DISABLE_TELEMETRY": "true"}


def set_runtime_defaults() -> None:
    """Put :data:`RUNTIME_DEFAULTS` into ``os.environ`` where the variable is not set yet."""
    for name, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(name, value)


@dataclass
class RolloutConfig:
    """How trajectories are sampled (DESIGN section 3) and where the engines run (section 7)."""

    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: smallest token set of this probability"})
    max_tokens: int = field(default=2048, metadata={
        "help": "generated-token budget of one trajectory, threads included (tokens; L_total)"})
    max_context: int = field(default=4096, metadata={
        "help": "per-request context limit: prompt plus completion of any one request; rollout workers "
                "start their engines with this max_model_len (tokens)"})
    max_thread_tokens: int = field(default=512, metadata={
        "help": "length limit of one thread; a thread reaching it is closed with an inserted </Thread> (tokens)"})
    max_threads: int = field(default=8, metadata={"help": "most threads (outlines) in one block"})
    max_blocks: int = field(default=8, metadata={"help": "most parallel blocks in one trajectory"})
    n: int = field(default=1, metadata={"help": "trajectories sampled per prompt"})
    sequential: bool = field(default=False, metadata={
        "help": "decode as one sequence: the same state machine with spawning off (the baseline)"})
    seed: int | None = field(default=0, metadata={
        "help": "base seed; each request's seed derives from it and the request's place (null: unseeded)"})
    workers: int = field(default=1, metadata={"help": "Ray rollout workers, each owning one engine"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "Ray CPUs reserved by one worker"})
    gpus_per_worker: float = field(default=0.0, metadata={
        "help": "Ray GPUs reserved by one worker actor: 1 on a GPU cluster with tensor_parallel_size 1; 0 with "
                "tensor_parallel_size > 1, whose shard workers vLLM places as Ray actors itself"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one engine is sharded over"})
    dtype: str = field(default="float32", metadata={"help": "engine weight dtype (float32 on CPU, bfloat16 on GPU)"})
    enforce_eager: bool = field(default=True, metadata={
        "help": "skip torch.compile and CUDA graphs (fast start on CPU; set false on GPUs)"})
    weight_bucket_mb: float = field(default=16.0, metadata={"help": "size of one weight-update bucket (MiB)"})

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_tokens", "max_context", "max_thread_tokens", "max_threads", "n", "workers",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_blocks", "cpus_per_worker", "gpus_per_worker"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_bucket_mb <= 0:
            problems.append(f"weight_bucket_mb must be > 0, got {self.weight_bucket_mb}")
        if problems:
            raise ValueError("RolloutConfig: " + "; ".join(problems))
