"""Ray rollout workers: each owns one vLLM engine and runs many spawn/join state machines on it.

:class:`RolloutPool` starts ``config.workers`` :class:`RolloutWorker` actors,
each reserving ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs (on a GPU
cluster: 1 GPU per worker with ``tensor_parallel_size`` 1; with
``tensor_parallel_size > 1`` vLLM's Ray executor starts the engine's shard
workers as Ray actors of 1 GPU each in the worker's placement group, which
``cluster.placement`` gives every such engine, so the worker actor holds none;
a real tensor-parallel engine has not run on the CPU test machine). ``generate`` spreads the prompts over the
workers round-robin, a prompt's ``n`` samples staying together on one worker
so they share its prefix cache, and returns every trajectory in prompt-major
order. ``update_weights`` takes weights already published in Ray's object
store (``rollout.weights.PublishedWeights``: in training the learner puts the
buckets itself) and hands the bucket references to every worker, which
fetches the buckets straight from their owner, writes each as it arrives and
reloads its engine in place; the pool's process never fetches a bucket. Or
it takes a broadcast (``rollout.collective.Broadcast``): it names a group of
the sender and every engine worker process, starts the sender and the
workers' receives together and waits for both. It returns the measured
times.

The workers catch nothing themselves: model output cannot make the
orchestrator raise (a trajectory ends with a finish reason instead), so an
exception from a worker is an infrastructure failure (engine crash, bad
configuration) and reaches the caller as such.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from rollout.config import RolloutConfig
from rollout.engine import VLLMEngine, make_llm, shutdown_llm
from rollout.orchestrator import Trajectory, generate
from rollout.storage import SCRATCH_ENV, ShippedFolder, fetch_folder, scratch_dir, ship_folder

if TYPE_CHECKING:  # rollout.weights and rollout.collective import torch (~1 s): only the weight updates need it
    from rollout.collective import Broadcast
    from rollout.weights import PublishedWeights

#: Environment variables copied from the driver into every worker (vLLM, tokenizers, torch threads).
FORWARDED_ENV_PREFIXES = ("VLLM_", "TOKENIZERS_", "OMP_", "HF_")


def assign_prompts(num_prompts: int, num_workers: int) -> list[list[int]]:
    """Prompt indices of each worker: round-robin, so counts differ by at most one."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return [list(range(w, num_prompts, num_workers)) for w in range(num_workers)]


@dataclass
class WeightUpdate:
    """Times of one weight update, in seconds, and its size."""

    seconds: float  # publishing (publish_s) plus the wall clock from hand-over to the last worker's cache reset
    publish_s: float  # the publisher's cutting, serialising and putting of the buckets
    load_s: float  # slowest worker: fetch buckets, write them, reload in place, reset the prefix cache
    n_buckets: int
    n_bytes: int


class RolloutWorker:
    """One engine and the orchestrator on it; wrapped by ``ray.remote`` in :class:`RolloutPool`."""

    def __init__(self, model_dir: "str | ShippedFolder", config: RolloutConfig, env: Mapping[str, str] | None = None):
        os.environ.update(env or {})
        if os.environ.get(SCRATCH_ENV):  # a node with its own scratch folder keeps the engine's files there too
            os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch_dir("vllm-cache")))
        model_dir = str(fetch_folder(model_dir))  # a path this node sees: shipped and URI models copied to scratch
        from rollout.onboard import eos_token_ids  # lazy: transformers takes seconds to import; only the actor
        from rollout.tiny import load_tokenizer  # needs them

        self.config = config
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer)
        self.llm = make_llm(model_dir, max_model_len=config.max_context, seed=config.seed or 0,
                            dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
                            enforce_eager=config.enforce_eager,
                            gpu_memory_utilization=config.gpu_memory_utilization)
        self.engine = VLLMEngine(self.llm)
        self.weights_dir: Path | None = None

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], config: RolloutConfig,
                 counter=None) -> list[Trajectory]:
        """Run the orchestrator on this worker's prompts; ``counter.add`` is told of each finished trajectory."""
        on_finish = (lambda _t: counter.add.remote(1)) if counter is not None else None
        return generate(self.engine, self.tokenizer, prompts, config, prompt_indices=prompt_indices,
                        eos_token_id=self.eos_token_ids, on_finish=on_finish)

    def load_weights(self, bucket_refs: list) -> float:
        """Fetch the buckets (each written to a fresh directory as it arrives), reload in place; returns seconds."""
        from rollout.weights import fetch_to_dir, reload_in_place  # lazy: torch (~1 s); weight updates only

        start = time.perf_counter()
        new_dir = Path(tempfile.mkdtemp(prefix="weights-", dir=scratch_dir("weights")))
        try:
            fetch_to_dir(bucket_refs, new_dir)
            reload_in_place(self.llm, new_dir)
        except BaseException:
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        if self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)
        self.weights_dir = new_dir
        return time.perf_counter() - start

    def receive_weights(self, rendezvous: dict, first_rank: int) -> dict:
        """Join learner rank 0's broadcast group (``rollout.collective``) with this engine's workers as ranks
        ``first_rank`` and up, load the weights as they arrive, reset the prefix cache; returns the seconds and
        what the first engine worker received."""
        start = time.perf_counter()
        stats = self.llm.collective_rpc("threadweaver_receive", args=(rendezvous, first_rank))
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset the prefix cache after a weight update")
        if self.weights_dir is not None:  # the files of an earlier objects update are no longer the weights
            shutil.rmtree(self.weights_dir, ignore_errors=True)
            self.weights_dir = None
        return {**stats[0], "seconds": time.perf_counter() - start}

    def shutdown(self) -> None:
        shutdown_llm(self.llm)
        if self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)


def _wait_all(refs: Sequence) -> list:
    """Every result of ``refs``, an exception in place of each failed one (waits for all of them)."""
    import ray

    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - returned to the caller, which raises the most telling one
            out.append(e)
    return out


class _Counter:
    """Finished-trajectory count shared by the workers (for progress bars)."""

    def __init__(self):
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def get(self) -> int:
        return self.n


class RolloutPool:
    """``config.workers`` rollout workers on the model in ``model_dir`` (Ray must be initialised): a folder, a
    storage URI, or a folder the driver shipped (``rollout.storage.ship_folder``; a ``model_dir`` given as a
    path is shipped here when Ray has several nodes).

    ``actor_options[i]`` (when given) are extra Ray ``.options`` of worker ``i``, e.g. the placement group
    bundle it is scheduled into (``cluster.placement``).
    """

    def __init__(self, model_dir: "str | Path | ShippedFolder", config: RolloutConfig,
                 env: Mapping[str, str] | None = None, actor_options: Sequence[Mapping] = ()):
        import ray

        self.config = config
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        forwarded.update(env or {})
        actor = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker)(RolloutWorker)
        options = list(actor_options) or [{}] * config.workers
        model = model_dir if isinstance(model_dir, ShippedFolder) else ship_folder(model_dir)
        self.workers = [actor.options(**options[i]).remote(model, config, forwarded)
                        for i in range(config.workers)]
        ray.get([w.ready.remote() for w in self.workers])

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int | None = None, sequential: bool | None = None,
                 config: RolloutConfig | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Trajectory]:
        """``n`` trajectories per prompt (token ids), prompt-major.

        ``n`` and ``sequential`` override the pool's config for this call;
        ``config`` replaces it (its engine fields are ignored: the engines
        are already running). ``progress(k)`` is called with the number of
        trajectories finished so far, about twice a second.
        """
        import ray

        cfg = config or self.config
        cfg = replace(cfg, n=cfg.n if n is None else n, sequential=cfg.sequential if sequential is None else sequential)
        counter = ray.remote(num_cpus=0)(_Counter).remote() if progress is not None else None
        refs = []
        for worker, indices in zip(self.workers, assign_prompts(len(prompts), len(self.workers))):
            if indices:
                refs.append(worker.generate.remote([list(prompts[i]) for i in indices], indices, cfg, counter))
        waiting = list(refs)
        while waiting:
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
            if counter is not None:
                progress(ray.get(counter.get.remote()))
        trajectories = [t for part in ray.get(refs) for t in part]
        if counter is not None:
            ray.kill(counter)
        return sorted(trajectories, key=lambda t: (t.prompt_index, t.sample_index))

    def update_weights(self, weights: "PublishedWeights | Broadcast") -> WeightUpdate:
        """Load new weights (Hugging Face names) into every engine: published ones
        (``rollout.weights.PublishedWeights``) or a broadcast from their holder (``rollout.collective.Broadcast``).

        Published: only the bucket references pass through here; the caller keeps ``weights`` (and so the
        buckets) alive until this returns, when every worker has loaded them. Broadcast: see
        :meth:`_receive`.
        """
        import ray

        from rollout.collective import Broadcast  # lazy: torch (~1 s); weight updates only

        if isinstance(weights, Broadcast):
            return self._receive(weights)
        start = time.perf_counter()
        load_s = max(ray.get([w.load_weights.remote(weights.refs) for w in self.workers]))
        return WeightUpdate(seconds=weights.publish_s + time.perf_counter() - start, publish_s=weights.publish_s,
                            load_s=load_s, n_buckets=weights.n_buckets, n_bytes=weights.n_bytes)

    def _receive(self, source: "Broadcast") -> WeightUpdate:
        """One broadcast group of the sender (rank 0) and every engine worker (``tensor_parallel_size`` ranks per
        engine, from 1 up), the send and the receives started together and both waited for. ``publish_s`` is
        the sender's time (it overlaps the loading), ``seconds`` the wall clock of the whole update."""
        import ray

        from rollout.collective import Rendezvous

        start = time.perf_counter()
        host, port = source.address()
        tp = self.config.tensor_parallel_size
        rendezvous = Rendezvous(host, port, 1 + tp * len(self.workers), source.backend, source.timeout_s)
        sends = source.send(rendezvous)
        receives = [w.receive_weights.remote(rendezvous.as_dict(), 1 + i * tp) for i, w in enumerate(self.workers)]
        sent, received = _wait_all(sends), _wait_all(receives)
        failures = [r for r in received + sent if isinstance(r, BaseException)]
        if failures:  # a dead worker first (the caller may rebuild the pool), then the others in order
            raise next((f for f in failures if isinstance(f, ray.exceptions.RayActorError)), failures[0])
        n_buckets, n_bytes, send_s = max(sent, key=lambda s: s[0])
        return WeightUpdate(seconds=time.perf_counter() - start, publish_s=send_s,
                            load_s=max(r["seconds"] for r in received), n_buckets=n_buckets, n_bytes=n_bytes)

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        finally:
            for w in self.workers:
                ray.kill(w)
            self.workers = []
