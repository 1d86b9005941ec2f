"""Weight broadcast over a collective group (``rollout.collective``): the config option, the bucket layout, a
gloo round trip between two threads of this process, and clear failures (no hang) when a rank is missing.

The end-to-end check with the real vLLM engine and DeepSpeed learner is
``tests/test_weight_sync.py::test_collective_broadcast_loads_what_the_objects_way_loads``.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from cluster.cli import main
from cluster.config import ConfigError, load_config
from rl.driver import RLConfig
from rollout.collective import (CollectiveError, Rendezvous, flatten, open_group, receive_buckets, send_buckets,
                                unflatten)
from rollout.config import RolloutConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_weight_transfer_option_accepts_the_two_ways_and_names_the_bad_key():
    assert RolloutConfig().weight_transfer == "objects"
    assert load_config(RLConfig, overrides=["rollout.n=2", "rollout.weight_transfer=collective"]).rollout.weight_transfer == \
        "collective"
    with pytest.raises(ConfigError, match=r"^rollout: weight_transfer must be one of \['objects', 'collective'\], "
                                          r"got 'nccl'$"):
        load_config(RLConfig, overrides=["rollout.n=2", "rollout.weight_transfer=nccl"])
    with pytest.raises(ConfigError, match="rollout.weight_transfer_timeout_s must be a finite number > 0, got 0"):
        load_config(RLConfig, overrides=["rollout.n=2", "rollout.weight_transfer_timeout_s=0"])


def test_rl_refuses_a_bad_weight_transfer_with_one_line_and_exit_2(capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **kw: pytest.fail("Ray started before the config was checked"))
    assert main(["rl", "model=none", "rollout.n=2", "rollout.weight_transfer=broadcast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weight_transfer must be one of ['objects', 'collective'], got 'broadcast'" in err
    assert "\n" not in err and "Traceback" not in err


def test_rendezvous_refuses_what_cannot_form_a_group():
    with pytest.raises(ValueError, match="backend must be 'gloo' or 'nccl'"):
        Rendezvous("127.0.0.1", 1, 2, "mpi", 1.0)
    with pytest.raises(ValueError, match="needs a sender and a receiver"):
        Rendezvous("127.0.0.1", 1, 1, "gloo", 1.0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Rendezvous("127.0.0.1", 1, 2, "gloo", 0)


def mixed_bucket() -> list[tuple[str, torch.Tensor]]:
    """Dtypes of different sizes and odd byte counts, so that every view needs the padding to be aligned."""
    g = torch.Generator().manual_seed(0)
    return [("a.bias", torch.randn(3, generator=g).to(torch.bfloat16)),  # 6 bytes
            ("a.weight", torch.randn(5, 7, generator=g)),  # float32
            ("b.steps", torch.tensor(12345678901, dtype=torch.int64)),  # a 0-d tensor
            ("c.weight", torch.randn(2, 3, generator=g).to(torch.float16)[:, ::2])]  # not contiguous


def test_flatten_and_unflatten_give_back_every_tensor_exactly():
    bucket = mixed_bucket()
    flat, manifest = flatten(bucket, "cpu")
    assert flat.dtype == torch.uint8 and all(offset % 16 == 0 for *_, offset in manifest)
    back = list(unflatten(flat, manifest))
    assert [n for n, _ in back] == [n for n, _ in bucket]
    for (_, want), (_, got) in zip(bucket, back):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def run_pair(sender, receiver):
    """``sender(port)`` and ``receiver(port)`` in two threads; their results or exceptions."""
    port = free_port()
    results: dict = {}

    def run(name, fn):
        try:
            results[name] = fn(port)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[name] = e
    threads = [threading.Thread(target=run, args=(n, f)) for n, f in (("send", sender), ("receive", receiver))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a side hung"
    return results["send"], results["receive"]


def test_buckets_broadcast_over_gloo_arrive_whole_and_in_order():
    buckets = [mixed_bucket(), [("d.weight", torch.arange(10, dtype=torch.float32))]]

    def send(port):
        group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 20.0), 0)
        try:
            return send_buckets(group, buckets, "cpu")
        finally:
            group.close()

    def receive(port):
        group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 20.0), 1)
        stats: dict = {}
        received = []
        try:
            for name, tensor in receive_buckets(group, "cpu", stats):
                received.append((name, tensor.clone()))
                time.sleep(0.3 if name == "d.weight" else 0)  # slow on the last one: the sender must wait for us
            return received, stats
        finally:
            group.close()

    sent, (received, stats) = run_pair(send, receive)
    assert sent[0] == 2 and stats == {"buckets": 2, "bytes": sent[1]}
    want = [item for bucket in buckets for item in bucket]
    assert [n for n, _ in received] == [n for n, _ in want]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(received, want))


def test_an_unreachable_rendezvous_fails_clearly_within_the_timeout():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(CollectiveError, match=f"rank 1 could not reach learner rank 0's store at 127.0.0.1:{port}"):
        open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 1.0), 1)
    assert time.monotonic() - start < 30  # the retries of torch's store client end too


def test_a_sender_without_receivers_fails_clearly_within_the_timeout():
    port = free_port()
    with pytest.raises(CollectiveError, match=f"learner rank 0 hosting the store waited for all 3 ranks at "
                                              f"127.0.0.1:{port} for 1 s"):
        open_group(Rendezvous("127.0.0.1", port, 3, "gloo", 1.0), 0)


def test_a_receiver_whose_sender_stops_sending_fails_instead_of_waiting_forever():
    def send(port):  # joins, then leaves without a bucket or the end mark
        group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 2.0), 0)
        time.sleep(4)  # the store (hosted here) must outlive the receiver's wait
        group.close()

    def receive(port):
        group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 2.0), 1)
        try:
            return list(receive_buckets(group, "cpu"))
        finally:
            group.close()

    _, received = run_pair(send, receive)
    assert isinstance(received, CollectiveError)
    assert "rank 1 of 2" in str(received) and "waited 2 s for 'bucket/0' from learner rank 0" in str(received)


def test_a_sender_whose_receiver_never_reads_the_end_fails_clearly():
    def send(port):
        group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 2.0), 0)
        try:
            return send_buckets(group, [[("w", torch.ones(4))]], "cpu")
        finally:
            group.close()

    def receive(port):  # takes the one bucket, never asks for the end mark
        group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo", 2.0), 1)
        first = next(receive_buckets(group, "cpu"))
        time.sleep(4)
        group.close()
        return first

    sent, received = run_pair(send, receive)
    assert received[0] == "w"
    assert isinstance(sent, CollectiveError) and "waited 2 s for ranks [1] to read the end" in str(sent)
