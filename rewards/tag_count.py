"""The published reward code's token count: ``L_total`` and ``L_crit`` from one pass over a token sequence.

The ``official-code`` reward preset counts tokens this way (``RewardConfig.token_count = "tag_stream"``),
the way the published ThreadWeaver reward does (``get_parallel_stats`` in its
``deepscaler/rewards/math_rewardv2.py``). That code is handed the decoded prompt plus response of a
trajectory, tokenizes it again, and walks the tokens once, watching four tags:

* outside a block every token is sequential, ``<Parallel>`` included; a ``<Parallel>`` opens a block;
* inside a block, the tokens between a ``<Thread>`` and its ``</Thread>`` are that thread's; the
  ``<Thread>`` and ``</Thread>`` wrappers themselves, and every other token of the block (outlines, the
  newline before each ``<Thread>``, a stray ``</Thread>``, a ``<Parallel>`` between threads), are the
  block's *sequential part*;
* inside a thread, a second ``<Thread>``, a ``<Parallel>`` or a ``</Parallel>`` is thread content (no
  nesting); a ``</Parallel>`` outside a thread closes the block and counts as sequential;
* a thread or block still open at the end of the sequence is closed there.

``L_total`` is every token of the sequence; ``L_crit`` is the tokens outside blocks plus, per block,
its sequential part and its longest thread. Against this project's count from units
(``rollout.units.latency``: model-generated tokens, the critical path through the units), this count
also includes the orchestrator's thread seeds (``"\\n<Thread>\\nN:"``: the newline and ``<Thread>`` in
the block's sequential part, ``"\\nN:"`` in the thread), the join newline, the final EOS, and, as the
published code is given the whole sequence, the prompt; every thread's ``<Thread>``/``</Thread>`` pair
adds to ``L_crit``, not only the longest thread's.

Here the sequence is the token ids themselves (the units' joined sequence, or a response tokenized
once); the published code decodes and re-encodes them, which gives the same ids whenever the tokenizer
round-trips the text (it does for this project's tiny tokenizer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from rollout.format import PARALLEL_CLOSE, PARALLEL_OPEN, THREAD_CLOSE, THREAD_OPEN
from rollout.units import Latency, encode


@dataclass(frozen=True)
class TagTokens:
    """The token ids of the four tags the count watches."""

    parallel_open: int
    parallel_close: int
    thread_open: int
    thread_close: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TagTokens":
        """The tags' ids in ``tokenizer``; ValueError if one is not a single token."""
        ids = {}
        for name, tag in (("parallel_open", PARALLEL_OPEN), ("parallel_close", PARALLEL_CLOSE),
                          ("thread_open", THREAD_OPEN), ("thread_close", THREAD_CLOSE)):
            tokens = encode(tokenizer, tag)
            if len(tokens) != 1:
                raise ValueError(f"the tokenizer splits {tag} into {len(tokens)} tokens; "
                                 "the tags must be single tokens")
            ids[name] = tokens[0]
        return cls(**ids)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def tag_stream_latency(token_ids: Sequence[int], tags: TagTokens) -> Latency:
    """``L_total``, ``L_crit``, ``eta`` and the block shape of ``token_ids`` under the rules of the module doc."""
    outside = 0                                # tokens outside every block, <Parallel> and </Parallel> included
    blocks: list[tuple[int, list[int]]] = []   # per block: (sequential part, thread lengths)
    in_block = in_thread = False
    for tok in token_ids:
        if not in_block:
            outside += 1
            if tok == tags.parallel_open:
                in_block, in_thread = True, False
                blocks.append((0, []))
            continue
        seq, threads = blocks[-1]
        if in_thread:
            if tok == tags.thread_close:
                in_thread = False
                blocks[-1] = (seq + 1, threads)
            else:
                threads[-1] += 1
        elif tok == tags.parallel_close:
            in_block = False
            outside += 1
        elif tok == tags.thread_open:
            in_thread = True
            threads.append(0)
            blocks[-1] = (seq + 1, threads)
        else:
            blocks[-1] = (seq + 1, threads)

    total = outside + sum(seq + sum(threads) for seq, threads in blocks)
    crit = outside + sum(seq + max(threads, default=0) for seq, threads in blocks)
    if total != len(token_ids):
        raise AssertionError(f"counted {total} of {len(token_ids)} tokens")  # every token lands in one bucket
    eta = 1.0 - crit / total if total else 0.0
    speedup = total / crit if crit else 1.0
    return Latency(total, crit, eta, speedup, len(blocks), [len(threads) for _, threads in blocks])
