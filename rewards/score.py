"""Score one trajectory: correctness, parallelism measures and the reward (DESIGN sections 3 and 4).

``r = R_correct + R_accel - format_penalty`` (weights in :class:`RewardConfig`):

* ``R_correct``: ``correct_reward`` if the final ``\\boxed{}`` answer matches the
  reference (:mod:`rewards.answer` finds it, :class:`rewards.checker.AnswerChecker`
  decides under a hard time limit), else ``incorrect_reward``. A timed-out check
  is incorrect and flagged ``timed_out``.
* ``R_accel``: ``min(rho*eta, clip)`` or ``rho*min(eta, clip)`` (``accel_form``),
  only for a correct answer of a format-valid response (``rollout.format.validate``)
  whose token measures are known; otherwise 0.
* ``format_penalty``: subtracted when the response is not format-valid.
* A *cut* response (its finish reason is not in :data:`NATURAL_ENDS`: a limit or
  the orchestrator ended it before the model did) is not checked and counts as
  incorrect, unless ``reward_cut_responses``.

``eta``, ``L_total`` and ``L_crit`` come from the trajectory's units through
``rollout.units.latency`` (model-generated tokens unless ``count_inserted`` /
``count_prompt``), or with ``token_count = "tag_stream"`` from the units' token
sequence through ``rewards.tag_count`` (the published reward code's count; the
item then carries the tokenizer's tag ids, :func:`item_tags`). Without units they
are None, ``R_accel`` is 0 and the record says ``accel_measured=False``.

Each reward component is a pure function returning ``(value, metrics)``.
:func:`score_many` never raises for one item: an item whose scoring raises gets
:func:`error_record` (incorrect, not format-valid, ``error`` set) and a logged
warning, so one unforeseen model output cannot end a training step (a
math-verify server that cannot start at all still raises).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

from rewards.answer import extract_answer
from rewards.checker import CheckerError, Verdict
from rewards.config import RewardConfig
from rewards.tag_count import TagTokens, tag_stream_latency
from rollout.format import PARALLEL_OPEN, validate
from rollout.units import Latency, Unit, full_sequence, latency

log = logging.getLogger(__name__)

#: finish reasons of a response its model ended itself: the orchestrator's ``eos``, and ``stop`` as vLLM and
#: OpenAI-style APIs write it. Every other reason (``budget``, ``context``, ``length``, ...) means it was cut.
NATURAL_ENDS = frozenset({"eos", "stop"})


class Checker(Protocol):
    def check(self, pred: str, gold: str) -> Verdict: ...


@dataclass
class RewardItem:
    """One trajectory to score: its response text, the reference answer and, optionally, its units and
    finish reason (None: unknown, counted as a natural end).

    ``tags``: the tokenizer's tag ids, needed only by ``token_count = "tag_stream"`` (:func:`item_tags`).
    """

    response: str
    answer: str
    units: list[Unit] | None = None
    finish_reason: str | None = None
    tags: TagTokens | None = None


def item_tags(cfg: RewardConfig, tokenizer) -> TagTokens | None:
    """The tag ids :class:`RewardItem` needs under ``cfg`` (None unless ``token_count`` is ``"tag_stream"``)."""
    return TagTokens.from_tokenizer(tokenizer) if cfg.token_count == "tag_stream" else None


@dataclass
class ScoreRecord:
    """Every component of one trajectory's reward.

    ``extraction``: ``ok``, ``no_think_close``, ``no_boxed`` or ``unclosed_boxed``;
    ``check_method``: how correctness was decided (see :class:`Verdict`), ``none``
    when there was no answer to check, ``cut`` when it was not checked because
    the response was cut; ``check_cached``: a remembered math-verify
    verdict; ``parallel``: the response contains a
    ``<Parallel>`` block; ``n_blocks``: blocks in the units; ``cut``: the
    response did not end by itself; ``error``: why scoring raised (the record
    is then :func:`error_record`'s).
    """

    reward: float
    R_correct: float
    R_accel: float
    format_penalty: float
    correct: bool
    timed_out: bool
    format_valid: bool
    format_error: str | None
    extracted_answer: str | None
    extraction: str
    check_method: str
    check_error: str | None
    check_seconds: float
    check_cached: bool
    parallel: bool
    accel_measured: bool
    L_total: int | None = None
    L_crit: int | None = None
    eta: float | None = None
    speedup: float | None = None
    n_blocks: int | None = None
    cut: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The numeric components, booleans as 0/1, unmeasured ones left out, ``error`` 0/1 (for logging)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, bool):
                out[key] = float(value)
            elif isinstance(value, (int, float)):
                out[key] = float(value)
        out["error"] = float(self.error is not None)
        return out


# ---------------------------------------------------------------------------- reward components


def correctness_reward(correct: bool, cfg: RewardConfig) -> tuple[float, dict]:
    """``correct_reward`` or ``incorrect_reward``."""
    value = cfg.correct_reward if correct else cfg.incorrect_reward
    return value, {"R_correct": value, "correct": float(correct)}


def acceleration_reward(eta: float | None, correct: bool, format_valid: bool,
                        cfg: RewardConfig) -> tuple[float, dict]:
    """``min(rho*eta, clip)`` or ``rho*min(eta, clip)``; 0 unless correct, format-valid and measured."""
    if eta is None or not correct or not format_valid:
        value = 0.0
    elif cfg.accel_form == "scale_then_clip":
        value = min(cfg.rho * eta, cfg.clip)
    else:
        value = cfg.rho * min(eta, cfg.clip)
    return value, {"R_accel": value}


def format_reward(format_valid: bool, cfg: RewardConfig) -> tuple[float, dict]:
    """``-format_penalty`` for a response that is not format-valid, else 0."""
    penalty = 0.0 if format_valid else cfg.format_penalty
    return -penalty, {"format_penalty": penalty, "format_valid": float(format_valid)}


def total_reward(correct: bool, format_valid: bool, eta: float | None, cfg: RewardConfig) -> tuple[float, dict]:
    """``R_correct + R_accel - format_penalty`` and the metrics of every component."""
    r_correct, m_correct = correctness_reward(correct, cfg)
    r_accel, m_accel = acceleration_reward(eta, correct, format_valid, cfg)
    r_format, m_format = format_reward(format_valid, cfg)
    reward = r_correct + r_accel + r_format
    return reward, {"reward": reward, **m_correct, **m_accel, **m_format}


# ---------------------------------------------------------------------------- one trajectory


def measure(units: Sequence[Unit] | None, cfg: RewardConfig, tags: TagTokens | None = None) -> Latency | None:
    """Latency measures of ``units`` with the config's counting switches; None without units.

    ``token_count = "tag_stream"`` counts the units' joined token sequence (the prompt too when
    ``count_prompt``) with :func:`rewards.tag_count.tag_stream_latency` and needs ``tags``.
    """
    if units is None:
        return None
    if cfg.token_count == "units":
        return latency(units, count_inserted=cfg.count_inserted, count_prompt=cfg.count_prompt)
    if tags is None:
        raise ValueError("token_count='tag_stream' reads tag tokens: the item needs the tokenizer's tag ids "
                         "(RewardItem.tags, rewards.score.item_tags)")
    sequence = full_sequence(units) if units else []
    if not cfg.count_prompt and units:
        sequence = sequence[len(units[0].context_ids) - units[0].n_inserted:]
    return tag_stream_latency(sequence, tags)


def is_cut(finish_reason: str | None) -> bool:
    """Whether a response with this finish reason was ended before its model ended it (None: unknown, no)."""
    return finish_reason is not None and finish_reason not in NATURAL_ENDS


def score(item: RewardItem, cfg: RewardConfig, checker: Checker) -> ScoreRecord:
    """The :class:`ScoreRecord` of one trajectory."""
    reasons = validate(item.response)
    format_valid = not reasons
    extraction = extract_answer(item.response, cfg.answer_region)
    cut = is_cut(item.finish_reason)
    if extraction.answer is None:
        verdict = Verdict(False, False, "none", 0.0)
    elif cut and not cfg.reward_cut_responses:
        verdict = Verdict(False, False, "cut", 0.0)
    else:
        verdict = checker.check(extraction.answer, item.answer)
    lat = measure(item.units, cfg, item.tags)
    eta = lat.eta if lat is not None else None
    reward, parts = total_reward(verdict.correct, format_valid, eta, cfg)
    return ScoreRecord(
        reward=reward, R_correct=parts["R_correct"], R_accel=parts["R_accel"],
        format_penalty=parts["format_penalty"], correct=verdict.correct, timed_out=verdict.timed_out,
        format_valid=format_valid, format_error=reasons[0] if reasons else None,
        extracted_answer=extraction.answer, extraction=extraction.status, check_method=verdict.method,
        check_error=verdict.error, check_seconds=verdict.seconds,
        check_cached=verdict.cached, parallel=PARALLEL_OPEN in item.response,
        accel_measured=lat is not None,
        L_total=lat.L_total if lat else None, L_crit=lat.L_crit if lat else None, eta=eta,
        speedup=lat.speedup if lat else None, n_blocks=lat.n_blocks if lat else None, cut=cut,
    )


def error_record(error: str, cfg: RewardConfig) -> ScoreRecord:
    """The record of an item whose scoring raised: incorrect and not format-valid, ``error`` says why."""
    reward, parts = total_reward(False, False, None, cfg)
    return ScoreRecord(
        reward=reward, R_correct=parts["R_correct"], R_accel=0.0, format_penalty=parts["format_penalty"],
        correct=False, timed_out=False, format_valid=False, format_error=None, extracted_answer=None,
        extraction="error", check_method="error", check_error=None, check_seconds=0.0, check_cached=False,
        parallel=False, accel_measured=False, error=error)


def score_many(items: Sequence[RewardItem], cfg: RewardConfig, checker: Checker) -> list[ScoreRecord]:
    """One record per item; an item whose scoring raises gets :func:`error_record` and a logged warning."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(score(item, cfg, checker))
        except CheckerError:  # no math-verify server at all: a failure of the service, not of this item
            raise
        except Exception as e:  # noqa: BLE001 - one unscorable output must not end the batch
            error = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("item %d could not be scored, counted as incorrect: %s", i, error)
            out.append(error_record(error, cfg))
    return out
