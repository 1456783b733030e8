"""What every grader shares: the user-facing error, the per-sample failure, and one grading's outcome."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config import UserError

# OpenAI's metadata.errors of POST /fine_tuning/alpha/graders/run: a flag per kind of failure (plus two details).
ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error")
ERROR_DETAILS = ("model_grader_server_error_details", "python_grader_runtime_error_details",
                 "python_grader_server_error_type")


class GraderError(UserError):
    """Bad grader JSON (or a data row a template cannot read); the message names the field path."""


class JudgeUnavailable(UserError):
    """The judge cannot be asked at all (unreachable, refuses the API key, does not serve the model). Every sample
    would fail the same way, so this is not one sample's failure: it stops a training run with this one line rather
    than letting it learn from rewards that are all 0."""


class Failed(Exception):
    """This one sample could not be graded (unparseable output, a judge that did not answer, grade() raising).
    Like OpenAI, such a sample scores 0 and the failure is reported in metadata.errors: a training run goes on."""

    def __init__(self, flags: dict[str, bool | str], message: str):
        super().__init__(message)
        self.flags = flags


@dataclass
class Outcome:
    """One grading: the reward and what the run endpoint reports beside it."""

    reward: float
    errors: dict[str, bool | str] = field(default_factory=dict)  # only the flags that are set
    sub_rewards: dict[str, float] = field(default_factory=dict)  # multi: each named grader's reward
    judge_model: str | None = None  # model graders: the judge's name (OpenAI's sampled_model_name)
