"""This project's reward as a verl reward function: ``compute_score(data_source, solution_str, ...)``.

verl 0.9.1's reward loop calls it once per trajectory (``reward.custom_reward_function.path=
pkg://rewards.verl_reward``, ``name=compute_score``) with the ``data_source`` column, the *last* row's
response decoded without special tokens (``solution_str``), ``reward_model.ground_truth`` and the row's
``extra_info``, into which verl merges the last row's ``extra_fields``. It returns ``{"score": r, ...}``:
verl trains on ``score`` and logs every other key.

What is scored, and how:

* With the ``threadweaver`` agent loop (``rl.verl.agent_loop``), ``extra_info["threadweaver"]`` holds the
  whole trajectory: its text with the tags, its units, its finish reason and the tokenizer's tag ids.
  The reward is ``rewards.score.score`` of that text and those units, exactly as ``threadweaver score``
  computes it for a record carrying the same text, units and finish reason, with the same presets (a
  response cut by a limit is not rewarded unless ``reward_cut_responses``).
* Without it (another agent loop), the text is ``solution_str`` and the units are replayed from it
  with the tokenizer given as ``tokenizer=DIR`` (``rollout.units.replay``, over the chat-templated
  ``extra_info["prompt"]`` when the row has one, as ``threadweaver score --tokenizer`` does; a response
  that is not format-valid is not replayed); the tags must then survive in ``solution_str``, i.e. not be
  special tokens that the reward manager strips.
  Without a tokenizer there are no token measures (``accel_measured`` 0, no ``R_accel``).

Keyword arguments (``reward.custom_reward_function.reward_kwargs``): ``tokenizer`` and any
:class:`rewards.config.RewardConfig` field (``preset``, ``rho``, ``clip``, ``checker_timeout_s``, ...);
an unknown one is an error. Returned values are all numbers: ``score`` (the reward), ``acc`` (= ``correct``, the name
verl's validation metrics look for) and the components of :class:`rewards.score.ScoreRecord`; a measure
that is not available is 0 with ``accel_measured`` 0.

One math-verify server process (``rewards.checker.AnswerChecker``) per process and reward setting,
started on the first call and stopped at exit; calls from verl's executor threads are serialised by it.
"""

from __future__ import annotations

import atexit
import dataclasses
import threading
from functools import lru_cache
from typing import Any

from rewards.checker import AnswerChecker
from rewards.config import RewardConfig
from rewards.score import RewardItem, ScoreRecord, score
from rewards.tag_count import TagTokens
from rollout.format import validate
from rollout.units import chat_prompt_ids, replay, units_from_json

#: key of extra_info under which the threadweaver agent loop passes its trajectory
TRAJECTORY_KEY = "threadweaver"
#: keyword arguments verl itself may pass (reward model routing); accepted and not used
VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")
#: ScoreRecord fields returned as numbers (None -> 0.0)
NUMERIC = ("R_correct", "R_accel", "format_penalty", "correct", "timed_out", "format_valid", "parallel",
           "accel_measured", "L_total", "L_crit", "eta", "speedup", "n_blocks", "check_seconds")

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RewardConfig)}
_checkers: dict[tuple, AnswerChecker] = {}
_checkers_lock = threading.Lock()


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  **kwargs: Any) -> dict[str, float]:
    """The reward of one trajectory and its components (see the module docstring)."""
    unknown = sorted(k for k in kwargs if k not in _CONFIG_FIELDS and k != "tokenizer" and k not in VERL_KWARGS)
    if unknown:
        raise TypeError(f"compute_score: unknown keyword arguments {unknown}; give RewardConfig fields or "
                        "tokenizer")
    cfg = _config(tuple(sorted((k, v) for k, v in kwargs.items() if k in _CONFIG_FIELDS)))
    item = reward_item(solution_str, str(ground_truth), extra_info or {}, cfg, kwargs.get("tokenizer"))
    return as_verl_result(score(item, cfg, _checker(cfg)))


def reward_item(solution_str: str, answer: str, extra_info: dict, cfg: RewardConfig,
                tokenizer_dir: str | None) -> RewardItem:
    """The :class:`RewardItem` of one call: the agent loop's trajectory, or ``solution_str`` replayed."""
    trajectory = extra_info.get(TRAJECTORY_KEY)
    if isinstance(trajectory, dict):
        units = units_from_json(trajectory["units"])
        tags = TagTokens(**trajectory["tags"]) if cfg.token_count == "tag_stream" else None
        return RewardItem(trajectory["text"], answer, units, trajectory.get("finish_reason"), tags)
    if tokenizer_dir is None:
        if cfg.token_count == "tag_stream":
            raise ValueError(f"the {cfg.preset or 'tag_stream'} reward counts tokens by tag: without the "
                             "threadweaver agent loop's trajectory it needs reward_kwargs.tokenizer=DIR")
        return RewardItem(solution_str, answer)
    tokenizer = _tokenizer(tokenizer_dir)
    prompt = extra_info.get("prompt")
    prompt_ids = chat_prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else []
    units = None  # a response that is not format-valid is never replayed: no measures (and no R_accel anyway)
    if not validate(solution_str):
        units = replay(prompt_ids, solution_str, tokenizer, tokenizer.eos_token_id)
    tags = TagTokens.from_tokenizer(tokenizer) if cfg.token_count == "tag_stream" else None
    return RewardItem(solution_str, answer, units, None, tags)


def as_verl_result(rec: ScoreRecord) -> dict[str, float]:
    """``{"score": reward, "acc": correct, component: value}``, every value a float (None -> 0.0)."""
    out = {"score": float(rec.reward), "acc": float(rec.correct)}
    for key in NUMERIC:
        value = getattr(rec, key)
        out[key] = 0.0 if value is None else float(value)
    return out


@lru_cache(maxsize=None)
def _config(items: tuple) -> RewardConfig:
    return RewardConfig(**dict(items))


def _checker(cfg: RewardConfig) -> AnswerChecker:
    key = (cfg.checker_timeout_s, cfg.memory_limit_mb, cfg.verdict_cache)
    with _checkers_lock:
        if key not in _checkers:
            _checkers[key] = AnswerChecker(cfg.checker_timeout_s, cfg.memory_limit_mb, eager=False,
                                           cache_size=cfg.verdict_cache)
        return _checkers[key]


@lru_cache(maxsize=None)
def _tokenizer(path: str):
    from rollout.tiny import load_tokenizer  # transformers: only the replay path needs it

    return load_tokenizer(path)


@atexit.register
def _close_checkers() -> None:
    for checker in _checkers.values():
        checker.close()
