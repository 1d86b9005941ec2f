"""Reward configuration (DESIGN section 4) and the two published presets.

``r = R_correct + R_accel - format_penalty``:

* ``R_correct`` is ``correct_reward`` when the final answer matches the
  reference, else ``incorrect_reward``;
* ``R_accel`` is paid only to a correct, format-valid response:
  ``min(rho * eta, clip)`` (``accel_form = "scale_then_clip"``) or
  ``rho * min(eta, clip)`` (``"clip_then_scale"``);
* ``format_penalty`` is subtracted from a response that is not format-valid.

A response the model did not end itself (its finish reason is not ``eos`` or
``stop``: a length limit cut it, or the orchestrator stopped it) gets neither
``R_correct`` nor ``R_accel`` unless ``reward_cut_responses``: an answer
written before the cut is not a finished answer.

A *preset* fixes ``rho``, ``clip``, ``incorrect_reward``, ``accel_form`` and how
tokens are counted, so a run compares with published numbers:

* ``paper``: ``min(rho * eta, clip)``, an incorrect answer scores 0, ``eta`` from
  the units (model-generated tokens, DESIGN section 3);
* ``official-code``: ``rho * min(eta, clip)``, an incorrect answer scores -1, and
  ``eta`` counted the way the published reward code counts it
  (``token_count = "tag_stream"`` over the prompt and the whole joined response,
  seeds and every thread's ``<Thread>``/``</Thread>`` included; see
  :mod:`rewards.tag_count`);

both with rho 0.5 and clip 0.2. Setting one of the fields a preset fixes to a value
other than its default *and* other than the preset's is an error (set
``preset: null`` to choose them yourself). What ``official-code`` does not
reproduce: the published code checks answers with its own graders (this project
uses math-verify) and pays ``R_accel`` to any correct answer, where this project
pays it only to a format-valid one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from rollout.config import check_ranges

AccelForm = Literal["scale_then_clip", "clip_then_scale"]
AnswerRegion = Literal["after_think", "whole"]
TokenCount = Literal["units", "tag_stream"]

#: preset name -> the fields it fixes
PRESETS: dict[str, dict[str, object]] = {
    "paper": {"rho": 0.5, "clip": 0.2, "incorrect_reward": 0.0, "accel_form": "scale_then_clip",
              "token_count": "units"},
    "official-code": {"rho": 0.5, "clip": 0.2, "incorrect_reward": -1.0, "accel_form": "clip_then_scale",
                      "token_count": "tag_stream", "count_inserted": True, "count_prompt": True},
}


@dataclass
class RewardConfig:
    """Weights of the reward, how answers are checked, and the reward service's shape."""

    preset: Literal["paper", "official-code"] | None = field(default=None, metadata={
        "help": "fix rho, clip, incorrect_reward and accel_form to a published setting ('paper' or "
                "'official-code', which also counts tokens like the published code: token_count=tag_stream, "
                "count_inserted and count_prompt true); null: use the fields as given"})
    rho: float = field(default=0.5, metadata={
        "help": "weight of the acceleration ratio eta in R_accel (reward/eta)", "range": ">= 0"})
    clip: float = field(default=0.2, metadata={
        "help": "cap of R_accel ('scale_then_clip') or of eta ('clip_then_scale') (reward or ratio)",
        "range": ">= 0"})
    accel_form: AccelForm = field(default="scale_then_clip", metadata={
        "help": "'scale_then_clip': R_accel = min(rho*eta, clip); 'clip_then_scale': rho*min(eta, clip)"})
    correct_reward: float = field(default=1.0, metadata={
        "help": "R_correct of a correct answer (reward)", "range": "finite"})
    incorrect_reward: float = field(default=0.0, metadata={
        "help": "R_correct of an incorrect, missing or timed-out answer (reward)", "range": "finite"})
    format_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the reward of a response that is not format-valid (reward)", "range": ">= 0"})
    reward_cut_responses: bool = field(default=False, metadata={
        "help": "check and reward the answer of a response the model did not end itself (finish reason other "
                "than 'eos'/'stop': budget, context, too_many_threads, too_many_blocks, bad_outlines, "
                "eos_in_thread, unknown_stop, error); false: such a response scores incorrect_reward and is "
                "flagged cut (a record without a finish reason counts as ended) (true/false)"})
    answer_region: AnswerRegion = field(default="after_think", metadata={
        "help": "where the final \\boxed{} answer is taken from: 'after_think' (text after </think>; "
                "none without </think>) or 'whole' (the last \\boxed{} anywhere in the response)"})
    count_inserted: bool = field(default=False, metadata={
        "help": "count orchestrator-inserted tokens (thread seeds, join newline) in L_total and L_crit"})
    count_prompt: bool = field(default=False, metadata={"help": "count the prompt tokens in L_total and L_crit"})
    token_count: TokenCount = field(default="units", metadata={
        "help": "how L_total and L_crit are counted: 'units' (the critical path through the units, DESIGN "
                "section 3) or 'tag_stream' (the published reward code's one pass over the token sequence, "
                "rewards.tag_count; needs count_inserted true and the tokenizer's tag ids)"})
    checker_timeout_s: float = field(default=5.0, metadata={
        "help": "hard limit on checking one answer with math-verify (seconds); past it the item is "
                "incorrect and flagged timed_out", "range": "> 0"})
    verdict_cache: int = field(default=4096, metadata={
        "help": "math-verify verdicts remembered per checker, by (answer, reference) text (count); 0 disables",
        "range": ">= 0"})
    memory_limit_mb: int = field(default=4096, metadata={
        "help": "address-space limit of the math-verify worker process (MiB); 0 disables it", "range": ">= 0"})
    num_actors: int = field(default=2, metadata={
        "help": "reward service: Ray actors in the pool (count)", "range": ">= 1"})
    actor_cpus: float = field(default=0.25, metadata={
        "help": "reward service: CPUs reserved per actor (Ray CPUs); scoring is bursty (between rollout and "
                "learning), so a fraction leaves room for the other actors on a small machine",
        "range": ">= 0"})
    chunk_size: int = field(default=32, metadata={
        "help": "reward service: items per actor call (count)", "range": ">= 1"})
    max_attempts: int = field(default=3, metadata={
        "help": "reward service: tries of one chunk on fresh actors before the batch fails (count)",
        "range": ">= 1"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown reward preset {self.preset!r}; presets are {sorted(PRESETS)}")
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in PRESETS[self.preset].items():
                current = getattr(self, name)
                if current != defaults[name] and current != value:
                    raise ValueError(f"reward preset {self.preset!r} fixes {name}={value!r} but {name}={current!r} "
                                     f"was given; drop one of them (preset: null to set {name} yourself)")
                setattr(self, name, value)
        if self.accel_form not in ("scale_then_clip", "clip_then_scale"):
            raise ValueError(f"accel_form must be 'scale_then_clip' or 'clip_then_scale', got {self.accel_form!r}")
        if self.token_count not in ("units", "tag_stream"):
            raise ValueError(f"token_count must be 'units' or 'tag_stream', got {self.token_count!r}")
        if self.token_count == "tag_stream" and not self.count_inserted:
            raise ValueError("token_count='tag_stream' counts every token of the sequence, inserted ones too; "
                             "set count_inserted=true")
        if self.answer_region not in ("after_think", "whole"):
            raise ValueError(f"answer_region must be 'after_think' or 'whole', got {self.answer_region!r}")
