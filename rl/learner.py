"""The learner: data-parallel DeepSpeed ranks as Ray actors (DESIGN section 7).

Each rank is a :class:`Learner` Ray actor holding a full copy of the model (or
its ZeRO partition) in a DeepSpeed engine: ZeRO stage 0-3 from the config,
gloo on CPU and NCCL on GPU, torch's AdamW (DeepSpeed's fused Adam compiles
for minutes on CPU), fp32 or bf16, gradient clipping, linear warm-up then
constant or cosine learning rate (:mod:`rl.schedule`).

Memory (what :mod:`rl.memory_plan` plans; the knobs are in :mod:`rl.learner_config`): weights are loaded in the training
dtype; with ``dtype: bf16`` DeepSpeed keeps its own fp32 master weights (in
its optimizer wrapper, partitioned from ZeRO stage 1 on);
``offload_optimizer`` moves the master weights and the AdamW states to host
memory (ZeRO 1-3; torch's AdamW then steps on the CPU). Optional gradient
checkpointing recomputes each decoder layer in the backward, and the
per-token log-probabilities come from the last hidden states a chunk of
positions at a time (``logprob_chunk_tokens``; :func:`rl.logprobs.chunked_predictions`),
so neither the activations of every layer nor the ``[L, vocab]`` logits of a
long row are kept at once.

:class:`LearnerGroup` is the driver-side handle. ``train_step(rows, loss)``
takes ONE global batch of packed rows (:class:`rl.trie.PackedRow`, each at most
``row_tokens`` long: one micro-batch), spreads the rows over the ranks
balanced by tokens, and every rank accumulates gradients over its rows before
one optimizer step. The global batch is therefore set by a token budget, not a
fixed number of sequences. The row losses are normalised by the number of
target occurrences of the whole global batch and scaled by the world size
(DeepSpeed averages gradients over ranks), so the update does not depend on
the number of ranks. Ranks that get fewer rows than others run two-token
dummy rows without any target, so that every rank takes part in the same
number of collective reductions (ZeRO-2/3 reduce at every backward); a row
without targets adds nothing to any loss term, normaliser or metric.

Losses are looked up by name in :mod:`rl.losses` (``"sft"`` is built in).

Weights leave the learner in buckets (lists of ``(name, tensor)`` of at most
``bucket_mb`` MB, gathered from ZeRO-3 partitions where needed): for the
rollout engines, ``publish_weights`` has the ranks serialise and put the
buckets in Ray's object store themselves (bucket ``i`` by rank
``i % ranks``, :mod:`rollout.weights`) and returns only their references, so
the weights never pass through the driver, or (``rollout.weight_transfer:
collective``) ``broadcast`` has rank 0 broadcast the buckets over a process
group that the engine workers join (:mod:`rollout.collective`; ``weights``
picks the way from the rollout config); and as Hugging Face checkpoints
that vLLM loads; :mod:`rl.checkpoint` adds the optimizer, scheduler, RNG and
data position for exact resumption. Checkpoint targets are storage locations
(``rollout.storage``): into a local folder every rank writes in place and
syncs its files to disk before returning; into a URI every rank writes into
its node's scratch and uploads its own files, and reads back (on resume) only
the files it needs. The model comes as a folder, a URI or a folder the driver
shipped (``rollout.storage.fetch_folder``).

Limits: ZeRO-3 first loads the full model on every rank, then partitions it
(fine up to a model that fits a rank's memory); pipeline and tensor
parallelism are not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from rl import durable, losses
from rl.attention import IMPLEMENTATION, tree_predictions
from rl.learner_config import TORCH_DTYPES, LearnerConfig, deepspeed_config
from rl.logprobs import TokenPredictions
from rl.schedule import make_scheduler
from rl.trie import PackedRow, build_trie, make_row
from rollout.collective import Broadcast, CollectiveError, Rendezvous, open_group, send_buckets
from rollout.config import RolloutConfig
from rollout.storage import ShippedFolder, Storage, fetch_folder
from rollout.units import Unit
from rollout.weights import PublishedWeights, interleave, pack_bucket, split_named

Bucket = list[tuple[str, torch.Tensor]]
#: Key of the caller's state inside DeepSpeed's client state.
CLIENT_KEY = "threadweaver"


class PackedCausalLM(torch.nn.Module):
    """A transformers causal LM as the DeepSpeed engine sees it: ``forward(row)`` gives a packed row's predictions.

    It holds the LM's own child modules under their own names, so its
    parameters, ``state_dict`` keys and ZeRO-3 hooks are exactly the LM's;
    the LM object itself stays reachable as :attr:`lm` (for its config and
    ``save_pretrained``). The forward runs through the engine (ZeRO's
    backward hooks) and returns ``(logprob, greedy)`` of
    :func:`rl.attention.tree_predictions`.
    """

    def __init__(self, lm: torch.nn.Module, backend: str, chunk_tokens: int, row_tokens: int):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.__dict__["lm"] = lm  # not a child: its modules are already ours
        self.backend = backend
        self.chunk_tokens = chunk_tokens
        self.row_tokens = row_tokens

    def forward(self, row: PackedRow) -> tuple[torch.Tensor, torch.Tensor]:
        pred = tree_predictions(self.lm, row, self.backend, self.chunk_tokens,
                                max_dense_tokens=max(self.row_tokens, len(row)))
        return pred.logprob, pred.greedy


def dummy_row(token_id: int) -> PackedRow:
    """A two-token row without targets (context only): a micro-batch that adds nothing to the gradients.

    Not even a zero-weight target: the KL term counts every target, whatever
    its weight, and this row has no reference log-probabilities.
    """
    return make_row([build_trie([Unit([token_id, token_id], [])])])


def strip_row(row: PackedRow) -> PackedRow:
    """``row`` without its tries (not needed to train; spares pickling them to every rank)."""
    return dataclasses.replace(row, tries=[])


def split_rows(rows: Sequence[PackedRow], world_size: int) -> list[list[PackedRow]]:
    """Rows per rank, longest first to the least loaded rank (by tokens); order kept within a rank."""
    load = [0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i])):
        r = min(range(world_size), key=lambda r: (load[r], len(assigned[r])))
        assigned[r].append(i)
        load[r] += len(rows[i])
    return [[rows[i] for i in sorted(idx)] for idx in assigned]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random generator states."""
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Learner:
    """One data-parallel rank (use through :class:`LearnerGroup`, as a Ray actor).

    Construction is light; :meth:`setup` joins the process group and builds
    the engine (every rank must call it at the same time).
    """

    def __init__(self, cfg: LearnerConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.engine = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port (asked of rank 0 for the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, model_dir: "str | ShippedFolder", master_addr: str, master_port: int, total_steps: int) -> dict:
        """Join the process group and build the engine on the model ``model_dir`` (a folder this node sees, a
        storage URI or a folder the driver shipped: ``rollout.storage.fetch_folder``)."""
        cfg = self.cfg
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        os.environ["DS_ACCELERATOR"] = "cuda" if cfg.on_gpu else "cpu"
        threads = cfg.threads_per_rank or max(1, int(cfg.cpus_per_rank))
        torch.set_num_threads(threads)
        import deepspeed
        from transformers import AutoModelForCausalLM

        _seed_all(cfg.seed)
        deepspeed.init_distributed(dist_backend="nccl" if cfg.on_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
        self.model_dir = str(fetch_folder(model_dir))
        lm = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=TORCH_DTYPES[cfg.dtype],
                                                  attn_implementation=IMPLEMENTATION[cfg.attention])
        lm.config.use_cache = False
        if cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()  # from_pretrained gives eval mode, where transformers skips gradient checkpointing
        self.lm = lm
        model = PackedCausalLM(lm, cfg.attention, cfg.logprob_chunk_tokens, cfg.row_tokens)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        scheduler = make_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world_size))
        self.device = self.engine.device
        self.dtype = next(self.engine.module.parameters()).dtype
        self.dummy = dummy_row(0)  # any token id: the row has no target
        return {"rank": self.rank, "threads": threads, "device": str(self.device), "dtype": str(self.dtype),
                "parameters": sum(p.numel() for p in model.parameters())}

    # ------------------------------------------------------------------ training

    def train_step(self, rows: list[PackedRow], n_micro: int, loss: str, denominator: float,
                   options: dict[str, Any]) -> dict[str, float]:
        """Accumulate gradients over ``rows`` (padded with dummy rows to ``n_micro``), then one optimizer step.

        Returns metrics summed over all ranks (identical on every rank).
        """
        import deepspeed.comm as dist

        if len(rows) > n_micro:
            raise ValueError(f"rank {self.rank} got {len(rows)} rows for {n_micro} micro-steps")
        fn = losses.get(loss)
        engine = self.engine
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        sums: dict[str, float] = {"loss": 0.0, "tokens": 0.0, "targets": 0.0}
        micro = list(rows) + [self.dummy] * (n_micro - len(rows))
        for i, row in enumerate(micro):
            engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            row_loss, metrics = fn(TokenPredictions(*engine(row)), row, denominator, **options)
            engine.backward(row_loss * self.world_size)
            for k, v in metrics.items():  # 0 for a dummy row, but every rank must reduce the same keys below
                sums[k] = sums.get(k, 0.0) + float(v)
            if i < len(rows):
                sums["loss"] += float(row_loss.detach())
                sums["tokens"] += len(row)
                sums["targets"] += float(row.n_targets.sum())
        grad_norm = None
        if self.cfg.zero_stage == 0 and self.cfg.dtype == "fp32":
            # DeepSpeed reduced the gradients in the boundary backward; clip them here (see deepspeed_config).
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(engine.module.parameters(), max_norm))
        engine.step()
        if grad_norm is None:
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        keys = sorted(sums)
        total = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            total = total.to(self.device)
            dist.all_reduce(total)
        out = {k: float(v) for k, v in zip(keys, total.cpu().tolist())}
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        out.update(grad_norm=grad_norm, lr=lr, seconds=float(seconds.item()), step=float(engine.global_steps))
        return out

    # ------------------------------------------------------------------ weights out

    def _named_tensors(self) -> list[tuple[str, torch.nn.Parameter | torch.Tensor]]:
        """Parameters (shared ones once, under their first name) and persistent buffers."""
        module = self.engine.module
        named = list(module.named_parameters())
        persistent = set(module.state_dict().keys())
        named += [(n, b) for n, b in module.named_buffers() if n in persistent]
        return named

    def _buckets(self, bucket_mb: float, mine, device: torch.device | str = "cpu") -> Iterator[tuple[int, Bucket]]:
        """``(i, bucket)`` for the buckets ``i`` with ``mine(i)``: copies on ``device`` of at most ``bucket_mb`` MB
        each.

        Every rank cuts the same buckets (ZeRO-3 sizes count whole tensors) and
        must run this at the same time under ZeRO-3, where each bucket's
        parameters are gathered on every rank; ZeRO 0-2 keep full weights on
        every rank, so nothing is gathered.
        """
        import deepspeed

        stage3 = self.cfg.zero_stage == 3

        def nbytes(t: torch.Tensor) -> int:
            return (t.ds_numel if hasattr(t, "ds_numel") else t.numel()) * t.element_size()

        for i, items in enumerate(split_named(self._named_tensors(), max(1, int(bucket_mb * 2**20)), nbytes)):
            params = [t for _, t in items if isinstance(t, torch.nn.Parameter)]
            with deepspeed.zero.GatheredParameters(params, enabled=stage3 and bool(params)):
                if mine(i):
                    bucket = [(n, t.detach().to(device, copy=True)) for n, t in items]
            if mine(i):
                yield i, bucket

    def weight_buckets(self, bucket_mb: float) -> Iterator[Bucket]:
        """Full weights in buckets of at most ``bucket_mb`` MB (a tensor larger than that is a bucket alone).

        Collective under ZeRO-3 (see :meth:`_buckets`); only rank 0 yields, CPU copies.
        """
        for _, bucket in self._buckets(bucket_mb, lambda i: self.rank == 0):
            yield bucket

    def publish_weights(self, bucket_mb: float) -> tuple[list, int, float]:
        """Put this rank's share of the weight buckets in Ray's object store: bucket ``i`` is this rank's when
        ``i % world_size == rank``. Returns the references (in bucket order), their bytes and the seconds.

        The objects belong to this actor (it put them) and live while the
        references do (``rollout.weights``). Collective under ZeRO-3.
        """
        import ray

        start = time.perf_counter()
        refs, n_bytes = [], 0
        for _, bucket in self._buckets(bucket_mb, lambda i: i % self.world_size == self.rank):
            data = pack_bucket(bucket)
            del bucket
            refs.append(ray.put(data))
            n_bytes += len(data)
        return refs, n_bytes, time.perf_counter() - start

    def broadcast_weights(self, rendezvous: Rendezvous, bucket_mb: float) -> tuple[int, int, float]:
        """Rank 0: broadcast the full weights, bucket by bucket, to the engine workers of ``rendezvous``
        (``rollout.collective``); the other ranks only take part in the ZeRO-3 gathers. Returns the buckets and
        bytes sent (0 on other ranks) and the seconds."""
        start = time.perf_counter()
        if self.rank != 0:
            for _ in self._buckets(bucket_mb, lambda i: False):
                pass
            return 0, 0, time.perf_counter() - start
        device = self.device if rendezvous.backend == "nccl" else "cpu"
        buckets = (b for _, b in self._buckets(bucket_mb, lambda i: True, device))
        try:
            group = open_group(rendezvous, 0)
            try:
                sent = send_buckets(group, buckets, device)
            finally:
                group.close()
        except CollectiveError:
            if self.cfg.zero_stage == 3:  # the other ranks wait in the gathers of the buckets not sent yet
                for _ in buckets:
                    pass
            raise
        return (*sent, time.perf_counter() - start)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights (rank 0; empty elsewhere). Collective under ZeRO-3."""
        return {n: t for bucket in self.weight_buckets(256) for n, t in bucket}

    def save_hf(self, out_dir: str) -> None:
        """Write the weights, config and tokenizer in Hugging Face format to ``out_dir`` (a folder or a storage
        URI; rank 0 writes, locally synced, remotely staged in the node's scratch and uploaded; collective)."""
        from transformers import AutoTokenizer

        weights = self.state_dict()
        if self.rank != 0:
            return
        dest = Storage.of(out_dir)
        out = dest.stage()
        self.lm.save_pretrained(out, state_dict=weights)
        AutoTokenizer.from_pretrained(self.model_dir).save_pretrained(out)
        for extra in ("generation_config.json",):
            if (Path(self.model_dir) / extra).exists() and not (out / extra).exists():
                shutil.copy(Path(self.model_dir) / extra, out / extra)
        if dest.is_local:
            durable.fsync_tree(out)
        dest.commit(out)

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, out_dir: str, client_state: dict) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler) plus this rank's RNG states (collective), into
        ``out_dir``: a folder (synced to disk before returning) or a storage URI (this rank writes into its
        node's scratch and uploads what it wrote: its own shard)."""
        dest = Storage.of(out_dir)
        out = dest.stage()
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state",
                                    client_state={CLIENT_KEY: client_state}, save_latest=False)
        rng_file = out / "rng" / f"rank_{self.rank}.pt"
        rng_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_file)
        if dest.is_local:
            durable.fsync_tree(out / "deepspeed")  # every rank's files: DeepSpeed ends the save with a barrier
            durable.fsync_path(rng_file)
            durable.fsync_path(rng_file.parent)
        dest.commit(out)

    def _own_file(self, name: str) -> bool:
        """Whether checkpoint file ``name`` is one this rank reads (not another rank's shard or RNG state; DeepSpeed
        reads only its own ZeRO partition unless ``elastic_checkpoint``, which this project never sets)."""
        shard = re.search(r"zero_pp_rank_(\d+)_", name)
        rng = re.fullmatch(r"rng/rank_(\d+)\.pt", name)
        other = shard if shard is not None else rng
        return not name.startswith("hf/") and (other is None or int(other.group(1)) == self.rank)

    def load_state(self, in_dir: str) -> dict:
        """Restore what :meth:`save_state` wrote (a folder, or a storage URI: this rank's files are downloaded
        into its node's scratch first); returns the client state (collective)."""
        source = Storage.of(in_dir)
        path = source.fetch(keep=self._own_file)
        try:
            return self._load_state(path)
        finally:
            source.release(path)

    def _load_state(self, path: Path) -> dict:
        rng_file = path / "rng" / f"rank_{self.rank}.pt"
        if not rng_file.exists():
            raise FileNotFoundError(f"{rng_file} missing: was the checkpoint written with {self.world_size} ranks?")
        load_path, client_state = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state",
                                                              load_optimizer_states=True,
                                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / 'deepspeed'}")
        set_rng_state(torch.load(rng_file, weights_only=False))
        if CLIENT_KEY not in client_state:
            raise ValueError(f"{path}: the DeepSpeed checkpoint holds no '{CLIENT_KEY}' client state")
        return client_state[CLIENT_KEY]

    def global_step(self) -> int:
        return int(self.engine.global_steps)


class LearnerGroup:
    """Driver-side handle of ``cfg.ranks`` :class:`Learner` actors (Ray must be initialised).

    ``total_steps`` sets the length of the learning-rate schedule; ``actor_options[rank]`` (when given) are
    extra Ray ``.options`` of that rank (its placement group bundle).
    """

    def __init__(self, cfg: LearnerConfig, model_dir: "str | Path | ShippedFolder", total_steps: int,
                 actor_options: Sequence[Mapping] = ()):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("LearnerGroup needs Ray: call ray.init(...) first")
        self.cfg = cfg
        self.model_dir = model_dir if isinstance(model_dir, ShippedFolder) else str(model_dir)
        actor_cls = ray.remote(Learner)
        options = list(actor_options) or [{}] * cfg.ranks
        self.actors = [
            actor_cls.options(num_cpus=cfg.cpus_per_rank, num_gpus=cfg.gpus_per_rank,
                              name=None, **options[rank]).remote(cfg, rank, cfg.ranks)
            for rank in range(cfg.ranks)
        ]
        try:
            addr, port = ray.get(self.actors[0].address.remote())
            self.info = ray.get([a.setup.remote(self.model_dir, addr, port, total_steps) for a in self.actors])
        except Exception:
            self.shutdown()
            raise

    def train_step(self, rows: Sequence[PackedRow], loss: str = "sft", denominator: float | None = None,
                   **options) -> dict[str, float]:
        """One optimizer step on the global batch ``rows``; metrics summed over ranks.

        ``denominator`` defaults to the number of target occurrences in
        ``rows``. Metrics: ``loss`` (the batch loss), ``tokens`` (row tokens),
        ``targets``, the loss's own sums, ``grad_norm`` (before clipping),
        ``lr`` (used by this step), ``seconds`` (slowest rank), ``tokens_per_s``.
        """
        import ray

        if not rows:
            raise ValueError("train_step needs at least one row")
        too_long = [len(r) for r in rows if len(r) > self.cfg.row_tokens]
        if too_long:
            raise ValueError(f"rows of {too_long} tokens exceed row_tokens={self.cfg.row_tokens}")
        if denominator is None:
            denominator = float(sum(int(r.n_targets.sum()) for r in rows))
        per_rank = split_rows([strip_row(r) for r in rows], len(self.actors))
        n_micro = max(len(r) for r in per_rank)
        out = ray.get([a.train_step.remote(r, n_micro, loss, float(denominator), options)
                       for a, r in zip(self.actors, per_rank)])[0]
        out["tokens_per_s"] = out["tokens"] / out["seconds"] if out["seconds"] > 0 else float("nan")
        return out

    def weight_buckets(self, bucket_mb: float = 64) -> Iterator[Bucket]:
        """The full weights, one bucket (list of ``(name, tensor)``, at most ``bucket_mb`` MB) at a time."""
        import ray

        streams = [a.weight_buckets.remote(bucket_mb) for a in self.actors]
        for ref in streams[0]:
            yield ray.get(ref)
        for stream in streams[1:]:  # other ranks only take part in ZeRO-3 gathers
            for ref in stream:
                ray.get(ref)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights in this (the calling) process: for tests and tools, never the training loop's sync."""
        return {n: t for bucket in self.weight_buckets() for n, t in bucket}

    def publish_weights(self, bucket_mb: float) -> PublishedWeights:
        """The weights in Ray's object store, put by the ranks themselves (bucket ``i`` by rank ``i % ranks``):
        only the references come back to this process. Keep the result until every reader has loaded it."""
        import ray

        shares = ray.get([a.publish_weights.remote(bucket_mb) for a in self.actors])
        return PublishedWeights(interleave([refs for refs, _, _ in shares]), sum(n for _, n, _ in shares),
                                max(s for _, _, s in shares))

    def broadcast(self, bucket_mb: float, timeout_s: float, lock: "threading.Lock | None" = None) -> Broadcast:
        """The weights as rank 0 will broadcast them to the rollout engines when the pool joins
        (``rollout.collective``): gloo from CPU ranks, NCCL from GPU ranks. ``lock`` (when given) is held while
        the send is handed to the ranks, so that it queues on every rank in the same order against the driver's
        other learner calls."""
        import ray

        def send(rendezvous: Rendezvous) -> list:
            with lock if lock is not None else contextlib.nullcontext():
                return [a.broadcast_weights.remote(rendezvous, bucket_mb) for a in self.actors]

        return Broadcast(lambda: tuple(ray.get(self.actors[0].address.remote())), send,
                         "nccl" if self.cfg.on_gpu else "gloo", timeout_s)

    def weights(self, cfg: RolloutConfig, lock: "threading.Lock | None" = None) -> "PublishedWeights | Broadcast":
        """The current weights as ``cfg.weight_transfer`` has the rollout pool take them (``update_weights``):
        published objects (:meth:`publish_weights`, done now) or a broadcast (:meth:`broadcast`, done when the
        pool joins). ``lock`` as for :meth:`broadcast`, held while publishing."""
        if cfg.weight_transfer == "collective":
            return self.broadcast(cfg.weight_bucket_mb, cfg.weight_transfer_timeout_s, lock)
        with lock if lock is not None else contextlib.nullcontext():
            return self.publish_weights(cfg.weight_bucket_mb)

    def save_hf(self, out_dir: str | Path) -> Path:
        import ray

        ray.get([a.save_hf.remote(str(out_dir)) for a in self.actors])
        return Path(out_dir)

    def save_state(self, out_dir: str | Path, client_state: dict) -> None:
        import ray

        ray.get([a.save_state.remote(str(out_dir), client_state) for a in self.actors])

    def load_state(self, in_dir: str | Path) -> dict:
        import ray

        return ray.get([a.load_state.remote(str(in_dir)) for a in self.actors])[0]

    def global_step(self) -> int:
        import ray

        return ray.get(self.actors[0].global_step.remote())

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
