"""The memory plan of a training config before anything starts: bytes per device for each role.

Per learner rank (:class:`rl.learner_config.LearnerConfig`), in the ZeRO
paper's accounting with DeepSpeed's own buffers:

* parameters ``P x b`` (``b`` bytes of the training dtype), divided over the
  ranks by ZeRO-3, which then also holds a gathered working set
  (``STAGE3_LIVE_ELEMENTS`` plus a prefetch bucket);
* gradients ``P x b`` (stage 0-1; bf16 at stage 0 adds DeepSpeed's fp32
  gradient copy), one reduce bucket plus the rank's fp32 partition (stage 2-3);
* optimizer states: AdamW's two fp32 moments, plus fp32 master weights
  whenever DeepSpeed keeps them (bf16, or any ZeRO stage >= 1), divided over
  the ranks from stage 1 on, in host memory with ``offload_optimizer``;
* activations of one row of ``row_tokens`` tokens: per decoder layer the
  tensors autograd saves (counted on transformers' Qwen3 layer: ``6h + 6 q +
  2 kv + 4 I + 2 heads`` values per token, where ``q = heads x head_dim``,
  ``kv = kv_heads x head_dim``, the RMSNorm ones in fp32) plus the attention
  backend's mask (sdpa keeps a float ``[L, L]`` mask per layer, eager its
  scores and probabilities, flex a block mask); with gradient checkpointing
  only each layer's input is kept and one layer is recomputed at a time;
* the log-probabilities: with ``logprob_chunk_tokens`` one ``[chunk, vocab]``
  projection with its fp32 gradient, else the whole ``[L, vocab]`` logits
  with their fp32 copies. The backward runs the log-probabilities first, then
  the layers one by one, so the peak holds the larger of the log-prob buffers
  and one layer's activations (recomputed, with checkpointing) on top of what
  every layer keeps; the activation line holds that layer only where it is
  the larger.

Per rollout worker (vLLM): weights ``P x b / tp`` plus, per token of KV
cache, ``2 x layers x kv x b / tp``; the engine claims
``gpu_memory_utilization`` of its GPU and must fit the weights, a fixed
overhead (``ENGINE_OVERHEAD_GIB``: activations, CUDA graphs) and at least one
``max_context`` request; the plan reports how many full-context requests the
rest holds. The reference model (KL term): weights plus a no-grad forward.

What is measured and what is planned: ``scripts/bench_memory.py`` compares
the learner estimate with the measured peak of a real learner step on CPU
(fp32, random Qwen3-architecture models); bf16, ZeRO partitioning, offload
and the vLLM figures are planned from the formulas above, not measured here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rl.learner_config import BUCKET_ELEMENTS, STAGE3_LIVE_ELEMENTS, LearnerConfig
from rollout.config import RolloutConfig, check_ranges

GIB = 2**30
#: vLLM's memory outside weights and KV cache (activations of a step, CUDA graphs, sampler), per engine
ENGINE_OVERHEAD_GIB = 3.0
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "float16": 2, "half": 2, "auto": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer (a Qwen3/Llama-style ``config.json``)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @property
    def parameters(self) -> int:
        """Embedding (and untied head), attention with q/k norms, SwiGLU MLP, two RMSNorms per layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 2 * self.head_dim + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        """From a ``config.json`` dict; ValueError naming a missing key."""
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if not isinstance(cfg.get(k), int)]
        if missing:
            raise ValueError(f"the model's config.json lacks {missing}: cannot plan its memory")
        heads = cfg["num_attention_heads"]
        return cls(vocab=cfg["vocab_size"], hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate=cfg["intermediate_size"], tied=bool(cfg.get("tie_word_embeddings", False)))


#: Published shapes of the Qwen3 dense models (their config.json), for planning before a folder exists.
KNOWN_SHAPES = {
    "qwen3-0.6b": ModelShape(151936, 1024, 28, 16, 8, 128, 3072, True),
    "qwen3-1.7b": ModelShape(151936, 2048, 28, 16, 8, 128, 6144, True),
    "qwen3-4b": ModelShape(151936, 2560, 36, 32, 8, 128, 9728, True),
    "qwen3-8b": ModelShape(151936, 4096, 36, 32, 8, 128, 12288, False),
}


@dataclass
class PlanConfig:
    """What the memory plan checks against (``threadweaver plan``; sft and rl run the same check first)."""

    device_memory_gib: float = field(default=0.0, metadata={
        "help": "memory of one accelerator (GiB); 0: no check (CPU runs)", "range": ">= 0"})
    architecture: str | None = field(default=None, metadata={
        "help": f"shape to plan with when the model folder has no config.json yet, one of {sorted(KNOWN_SHAPES)} "
                "(the folder's config.json wins when it exists)"})
    headroom: float = field(default=0.0, metadata={
        "help": "share of device memory to keep free: a plan fits when total <= (1 - headroom) x memory",
        "range": "[0, 1)"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.architecture is not None and self.architecture not in KNOWN_SHAPES:
            raise ValueError(f"plan.architecture '{self.architecture}' is not one of {sorted(KNOWN_SHAPES)}")


def model_shape(model: str | Path | None, architecture: str | None) -> ModelShape:
    """The shape from ``model``'s ``config.json``, else the named ``architecture``; ValueError when neither."""
    if model is not None and (Path(model) / "config.json").is_file():
        try:
            config = json.loads((Path(model) / "config.json").read_text())
        except ValueError as e:
            raise ValueError(f"{Path(model) / 'config.json'} is not valid JSON: {e}") from None
        return ModelShape.from_config(config if isinstance(config, dict) else {})
    if architecture is not None:
        return KNOWN_SHAPES[architecture]
    raise ValueError(f"cannot plan memory: {model} holds no config.json and plan.architecture is not set "
                     f"(one of {sorted(KNOWN_SHAPES)})")


# --------------------------------------------------------------------------- the learner


def layer_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, attention: str) -> int:
    """Bytes one decoder layer keeps for the backward of a ``tokens``-long row (see module doc)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    fp32_values = 4 * h + 2 * q + 2 * kv + 2 * shape.heads  # RMSNorm inputs and outputs, attention statistics
    typed_values = 2 * h + 4 * q + 4 * shape.intermediate
    per_token = 4 * fp32_values + dtype_bytes * typed_values
    return tokens * per_token + attention_bytes(shape, tokens, dtype_bytes, attention)


def attention_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, attention: str) -> int:
    """What one layer's attention keeps beyond its inputs and output: the dense mask or the scores."""
    if attention == "flex":
        return 0
    if attention == "eager":
        return tokens * tokens * (2 * shape.heads * dtype_bytes + dtype_bytes)
    return 4 * tokens * tokens  # sdpa: the float mask it derives from the boolean one


def logprob_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, chunk_tokens: int) -> int:
    """Peak of the target log-probabilities: one chunk's projection and fp32 gradient, or the full logits."""
    if chunk_tokens > 0:
        n = min(chunk_tokens, tokens)
        upcast = 4 if dtype_bytes != 4 else 0  # logits, their fp32 copy (bf16) and logsumexp's fp32 buffer
        return n * shape.vocab * (dtype_bytes + 4 + upcast) + 2 * tokens * shape.hidden * 4
    return tokens * shape.vocab * (dtype_bytes + 3 * 4)



@dataclass
class Item:
    """One line of the plan: a role's component, its bytes per device, and the knob that changes it."""

    role: str
    what: str
    bytes: float
    knob: str = ""
    host: bool = False  # in host memory (offloaded), not on the device


def learner_items(shape: ModelShape, cfg: LearnerConfig, role: str = "learner rank") -> list[Item]:
    """The per-rank lines of a learner (see module doc)."""
    p, n, b = shape.parameters, cfg.ranks, DTYPE_BYTES[cfg.dtype]
    stage = cfg.zero_stage
    weights = p * b / n + min(p, STAGE3_LIVE_ELEMENTS + BUCKET_ELEMENTS) * b if stage == 3 else p * b
    if stage <= 1:
        grads = p * b + (p * 4 if cfg.dtype == "bf16" and stage == 0 else 0) + (p * 4 / n if stage == 1 else 0)
    else:
        grads = min(p, BUCKET_ELEMENTS) * b + p * 4 / n
    master = 4 * p if stage >= 1 or cfg.dtype == "bf16" else 0
    states = (8 * p + master) / (n if stage >= 1 else 1)
    L, chunk = cfg.row_tokens, cfg.logprob_chunk_tokens
    layer = layer_activation_bytes(shape, L, b, cfg.attention)
    base = L * (2 * shape.hidden + 2 * shape.head_dim) * 4 + L * L  # embeddings, final norm, rotary, input mask
    logprobs = logprob_bytes(shape, L, b, chunk)
    # the log-prob backward and a layer's backward (recomputed with checkpointing) come one after the other: the
    # peak holds the larger of the two on top of what the layers keep
    beyond = max(0, layer - logprobs)
    if cfg.gradient_checkpointing:
        acts = shape.layers * L * shape.hidden * b + base + beyond
        act_what = f"activations, one {L}-token row, checkpointed ({shape.layers} layer inputs + 1 layer)"
    else:
        acts = shape.layers * layer + base + beyond
        act_what = f"activations, one {L}-token row, all {shape.layers} layers"
    logprob_what = f"log-probs, [{min(chunk, L)}, vocab] chunk" if chunk > 0 else f"log-probs, full [{L}, vocab]"
    return [
        Item(role, f"parameters ({p / 1e6:,.1f} M, {cfg.dtype}, ZeRO-{stage})", weights, "learner.zero_stage"),
        Item(role, "gradients", grads, "learner.zero_stage"),
        Item(role, "optimizer states (AdamW" + (" + fp32 master" if master else "") + ")", states,
             "learner.offload_optimizer", host=cfg.offload_optimizer),
        Item(role, act_what, acts, "learner.gradient_checkpointing" if not cfg.gradient_checkpointing
             else "learner.row_tokens"),
        Item(role, logprob_what, logprobs, "learner.logprob_chunk_tokens"),
    ]


def reference_items(shape: ModelShape, cfg: LearnerConfig) -> list[Item]:
    """The reference model (KL term): weights in the training dtype, a no-grad forward of one row."""
    b, L = DTYPE_BYTES[cfg.dtype], cfg.row_tokens
    forward = 2 * L * shape.hidden * b + layer_activation_bytes(shape, L, b, cfg.attention)
    chunk = cfg.logprob_chunk_tokens
    logits = min(chunk, L) * shape.vocab * (b + 4) if chunk > 0 else L * shape.vocab * (b + 4)
    return [Item("reference model", "parameters", shape.parameters * b, "grpo.kl_coef"),
            Item("reference model", "forward of one row (no grad)", forward + logits, "learner.row_tokens")]


def rollout_items(shape: ModelShape, cfg: RolloutConfig, device_bytes: float) -> tuple[list[Item], str, str]:
    """A rollout worker's lines, a note on its KV capacity (how many ``max_context`` requests fit) and a
    problem ("" when none): the engine's share must hold its weights, overhead and one full request."""
    b, tp = DTYPE_BYTES.get(cfg.dtype, 4), cfg.tensor_parallel_size
    weights = shape.parameters * b / tp
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * b / tp
    one_request = per_token * cfg.max_context
    items = [Item("rollout worker", f"weights ({cfg.dtype}, tensor parallel {tp})", weights, "rollout.dtype"),
             Item("rollout worker", "engine overhead (activations, CUDA graphs)", ENGINE_OVERHEAD_GIB * GIB),
             Item("rollout worker", f"KV cache of one {cfg.max_context}-token request", one_request,
                  "rollout.max_context")]
    if device_bytes <= 0:
        return items, "", ""
    claimed = cfg.gpu_memory_utilization * device_bytes
    kv = claimed - weights - ENGINE_OVERHEAD_GIB * GIB
    items.append(Item("rollout worker", "rest of its gpu_memory_utilization share (more KV cache)",
                      max(kv - one_request, 0.0), "rollout.gpu_memory_utilization"))
    note = (f"rollout KV cache: {max(kv, 0) / GIB:.1f} GiB = {int(max(kv, 0) // per_token)} tokens, "
            f"{max(kv, 0) / one_request:.1f} requests of max_context={cfg.max_context}")
    problem = ""
    if kv < one_request:
        problem = (f"rollout worker: weights {weights / GIB:.1f} GiB + overhead {ENGINE_OVERHEAD_GIB:.0f} GiB + one "
                   f"{cfg.max_context}-token request {one_request / GIB:.1f} GiB exceed the engine's share "
                   f"{claimed / GIB:.1f} GiB: turn rollout.gpu_memory_utilization (or rollout.max_context, "
                   f"rollout.tensor_parallel_size)")
    return items, note, problem


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Every line, the device memory and headroom it is checked against, and what does not fit."""

    items: list[Item]
    device_bytes: float
    headroom: float
    notes: list[str] = field(default_factory=list)
    shares: dict[str, list[str]] = field(default_factory=dict)  # device -> roles on it
    other_problems: list[str] = field(default_factory=list)

    def device_total(self, roles: list[str]) -> float:
        return sum(i.bytes for i in self.items if i.role in roles and not i.host)

    def problems(self) -> list[str]:
        """One line per device whose total exceeds ``(1 - headroom) x device``, naming the knob to turn."""
        if self.device_bytes <= 0:
            return []
        limit = (1 - self.headroom) * self.device_bytes
        out = list(self.other_problems)
        for device, roles in self.shares.items():
            total = self.device_total(roles)
            if total > limit:
                biggest = max((i for i in self.items if i.role in roles and not i.host and i.knob),
                              key=lambda i: i.bytes)
                out.append(f"{device}: {total / GIB:.1f} GiB planned, more than {limit / GIB:.1f} GiB "
                           f"({1 - self.headroom:.0%} of {self.device_bytes / GIB:.0f} GiB); the largest part is "
                           f"{biggest.role} {biggest.what} ({biggest.bytes / GIB:.1f} GiB): turn {biggest.knob}")
        return out

    def table(self) -> str:
        rows = [f"{'role':<16} {'component':<66} {'GiB':>8}  knob"]
        for i in self.items:
            where = " (host)" if i.host else ""
            rows.append(f"{i.role:<16} {(i.what + where)[:66]:<66} {i.bytes / GIB:>8.2f}  {i.knob}")
        for device, roles in self.shares.items():
            total = self.device_total(roles)
            against = (f" of {self.device_bytes / GIB:.0f} GiB ({total / self.device_bytes:.0%}, headroom "
                       f"{1 - total / self.device_bytes:.0%})" if self.device_bytes > 0 else "")
            rows.append(f"total per {device}: {total / GIB:.2f} GiB{against}")
        return "\n".join(rows + self.notes)


def make_plan(shape: ModelShape, learner: LearnerConfig, plan: PlanConfig, rollout: RolloutConfig | None = None,
              reference: bool = False) -> Plan:
    """The plan of one learner (and the rollout workers and reference model of an RL run).

    Roles whose GPU reservations add up to at most 1 share one device (the
    single-GPU recipe: learner and engine on one card); others get their own.
    """
    device = plan.device_memory_gib * GIB
    items = learner_items(shape, learner)
    notes: list[str] = []
    problems: list[str] = []
    learner_gpu = learner.gpus_per_rank
    devices = {"learner device": ["learner rank"]}
    if reference:
        items += reference_items(shape, learner)
        devices["reference device"] = ["reference model"]
    if rollout is not None:
        rollout_gpu = rollout.gpus_per_worker or (1.0 if rollout.tensor_parallel_size > 1 else 0.0)
        shared = 0 < learner_gpu + rollout_gpu <= 1.0 and learner_gpu > 0 and rollout_gpu > 0
        more, note, problem = rollout_items(shape, rollout, device)
        items += more
        notes += [note] if note else []
        problems += [problem] if problem else []
        if shared:
            devices = {"shared device": ["learner rank", "rollout worker"] + (["reference model"] if reference
                                                                              else [])}
        else:
            devices["rollout device"] = ["rollout worker"]
    return Plan(items, device, plan.headroom, notes, devices, problems)


def check_plan(plan: Plan) -> None:
    """ValueError naming every device that does not fit and the knob to turn (the training commands' check)."""
    problems = plan.problems()
    if problems:
        raise ValueError("the memory plan does not fit (threadweaver plan shows it): " + "; ".join(problems))
