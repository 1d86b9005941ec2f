"""Configuration of rollouts (sampling, spawn/join limits, the Ray worker pool), the range check of every config
and ``to_dict`` (a config as plain data, for any floor that writes its resolved config).

Every numeric field of a config dataclass states its allowed values next to its
help text, ``metadata={"help": ..., "range": "> 0"}``. A range is ``finite``
(any finite number), a comparison (``> 0``, ``>= 1``, ``<= 1``) or an interval
(``[0, 1]``, ``(0, 1]``); NaN and infinities never fit. :func:`check_ranges`
enforces them: every config's ``__post_init__`` calls it, and the YAML loader
(``cluster.config``) calls it before building each section, so its message
names the full dotted key ("sft.learner.lr must be a finite number > 0, got nan").
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: environment defaults of every command that starts engines, learners or tracking (a user's values win):
#: vLLM on CPU refuses to start without a KV-cache size; quiet vLLM logs; no tokenizer thread pools
#: fighting the engines for cores; no MLflow telemetry. DeepSpeed's accelerator is set per learner rank
#: (``rl.learner``), from whether that rank has a GPU.
RUNTIME_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
                    "MLFLOW_DISABLE_TELEMETRY": "true"}


#: the ways weights go from the learner to the engines (``RolloutConfig.weight_transfer``)
WEIGHT_TRANSFERS = ("objects", "collective")


def set_runtime_defaults() -> None:
    """Put :data:`RUNTIME_DEFAULTS` into ``os.environ`` where the variable is not set yet."""
    for name, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(name, value)


def to_dict(cfg: Any, flat: bool = False) -> dict[str, Any]:
    """The config as plain Python data (tuples become lists, Paths strings).

    ``flat=True`` gives one level of dotted keys (``{"rl.lr": 1e-5}``), the
    shape experiment trackers such as MLflow take as parameters; lists and
    empty mappings stay values.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    nested = plain(cfg)
    if not flat:
        return nested
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(v, name + ".")
            else:
                out[name] = v
    walk(nested, "")
    return out


def plain(value: Any) -> Any:
    """``value`` as plain data: dataclasses become dicts, tuples lists, Paths strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_COMPARISON_RE = re.compile(r"(>=|>|<=|<) *(-?[0-9.]+)")
_INTERVAL_RE = re.compile(r"([\[(]) *(-?[0-9.]+) *, *(-?[0-9.]+) *([\])])")


def _fits(value: float, spec: str) -> bool:
    if spec == "finite":
        return True
    if m := _COMPARISON_RE.fullmatch(spec):
        return _COMPARISONS[m[1]](value, float(m[2]))
    if m := _INTERVAL_RE.fullmatch(spec):
        lo, hi = float(m[2]), float(m[3])
        return (lo <= value if m[1] == "[" else lo < value) and (value <= hi if m[4] == "]" else value < hi)
    raise ValueError(f"unknown range {spec!r} (use 'finite', '> 0', '>= 1', '[0, 1]', ...)")


def range_text(spec: str) -> str:
    """How a range reads in a sentence: '> 0', 'in [0, 1]', or '' for 'finite'."""
    return "" if spec == "finite" else spec if spec[0] in "<>" else f"in {spec}"


def range_problem(value: Any, spec: str) -> str | None:
    """What is wrong with ``value`` for range ``spec`` ('must be an integer >= 1, got 0'), or None if it fits."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = number and isinstance(value, int)  # never NaN; math.isfinite cannot take a 400-digit one
    if number and (integer or math.isfinite(value)) and _fits(value, spec):
        return None
    kind = "an integer" if integer else "a finite number"
    return f"must be {' '.join(filter(None, [kind, range_text(spec)]))}, got {value!r}"


def check_range(name: str, value: Any, spec: str) -> None:
    """ValueError '<name> must be ..., got ...' unless ``value`` fits ``spec`` (for command-line numbers)."""
    problem = range_problem(value, spec)
    if problem:
        raise ValueError(f"{name} {problem}")


def check_ranges(cfg: Any, values: Mapping[str, Any] | None = None, prefix: str = "") -> None:
    """ValueError naming the first field of ``cfg`` whose value is outside its ``range`` metadata.

    ``cfg`` is a config dataclass instance, or its class with the ``values``
    about to build it (the loader's case). None passes (optional fields);
    every item of a list is checked (``rho[1]``), and every value of a mapping,
    nested ones too (``role_resources.rollout.gpu_node``). ``prefix`` is
    prepended to the key ("sft.learner.").
    """
    cls = cfg if isinstance(cfg, type) else type(cfg)
    values = vars(cfg) if values is None else values
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("range")
        value = values.get(f.name)
        if spec is None or value is None:
            continue
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            for key, leaf in _leaves(item):
                problem = range_problem(leaf, spec)
                if problem:
                    raise ValueError(f"{prefix}{f.name}{'' if i is None else f'[{i}]'}{key} {problem}")


def _leaves(value: Any, key: str = "") -> list[tuple[str, Any]]:
    """``(".a.b", leaf)`` of every value in nested mappings; ``("", value)`` for anything else."""
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{key}.{k}")]
    return [(key, value)]


@dataclass
class RolloutConfig:
    """How trajectories are sampled (DESIGN section 3) and where the engines run (section 7)."""

    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 is greedy", "range": ">= 0"})
    top_p: float = field(default=1.0, metadata={
        "help": "nucleus sampling: smallest token set of this probability", "range": "(0, 1]"})
    max_tokens: int = field(default=2048, metadata={
        "help": "generated-token budget of one trajectory, threads included (tokens; L_total)", "range": ">= 1"})
    max_context: int = field(default=4096, metadata={
        "help": "per-request context limit: prompt plus completion of any one request; rollout workers "
                "start their engines with this max_model_len (tokens)", "range": ">= 1"})
    max_thread_tokens: int = field(default=512, metadata={
        "help": "length limit of one thread; a thread reaching it is closed with an inserted </Thread> (tokens)",
        "range": ">= 1"})
    max_threads: int = field(default=8, metadata={"help": "most threads (outlines) in one block", "range": ">= 1"})
    max_blocks: int = field(default=8, metadata={"help": "most parallel blocks in one trajectory", "range": ">= 0"})
    n: int = field(default=1, metadata={"help": "trajectories sampled per prompt", "range": ">= 1"})
    sequential: bool = field(default=False, metadata={
        "help": "decode as one sequence: the same state machine with spawning off (the baseline)"})
    seed: int | None = field(default=0, metadata={
        "help": "base seed; each request's seed derives from it and the request's place (null: unseeded)",
        "range": ">= 0"})
    workers: int = field(default=1, metadata={"help": "Ray rollout workers, each owning one engine", "range": ">= 1"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "Ray CPUs reserved by one worker", "range": ">= 0"})
    gpus_per_worker: float = field(default=0.0, metadata={
        "help": "Ray GPUs reserved by one worker actor: 1 on a GPU cluster with tensor_parallel_size 1; must be 0 "
                "with tensor_parallel_size > 1, whose shard workers vLLM starts as Ray actors of 1 GPU each in the "
                "engine's placement group", "range": ">= 0"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one engine is sharded over", "range": ">= 1"})
    dtype: str = field(default="float32", metadata={"help": "engine weight dtype (float32 on CPU, bfloat16 on GPU)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "share of each GPU's memory one engine claims for weights, activations and KV cache (vLLM's "
                "gpu_memory_utilization; lower it when a learner rank shares the GPU; unused on CPU)",
        "range": "(0, 1]"})
    enforce_eager: bool = field(default=True, metadata={
        "help": "skip torch.compile and CUDA graphs (fast start on CPU; set false on GPUs)"})
    weight_bucket_mb: float = field(default=16.0, metadata={
        "help": "size of one weight-update bucket (MiB)", "range": "> 0"})
    weight_transfer: str = field(default="objects", metadata={
        "help": "how the learner's new weights reach the engines: 'objects' (the learner ranks put the buckets in "
                "Ray's object store, every worker fetches them, writes them to its node's scratch and reloads; "
                "rollout.weights) or 'collective' (learner rank 0 broadcasts the buckets over a process group that "
                "every engine worker joins, gloo on CPU, NCCL on GPUs, loaded as they arrive; rollout.collective)"})
    weight_transfer_timeout_s: float = field(default=300.0, metadata={
        "help": "collective: longest wait for the group to form, for each bucket and for the other side; a "
                "missing, unreachable or dead rank fails the sync after this long (s)", "range": "> 0"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.weight_transfer not in WEIGHT_TRANSFERS:
            raise ValueError(f"weight_transfer must be one of {list(WEIGHT_TRANSFERS)}, got {self.weight_transfer!r}")
        if self.tensor_parallel_size > 1 and self.gpus_per_worker > 0:
            raise ValueError(f"rollout.gpus_per_worker must be 0 with tensor_parallel_size "
                             f"{self.tensor_parallel_size} (the engine's shard workers reserve its GPUs), got "
                             f"{self.gpus_per_worker:g}")
