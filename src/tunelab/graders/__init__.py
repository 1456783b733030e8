"""OpenAI's graders (string_check, text_similarity, score_model, label_model, python, multi) as rewards.

    validate(grader_json, allow_code=False)                  GraderError naming the field path, or None
    build(grader_json, allow_code=False, judge=None)         a Grader: grader(sample, item) -> float
    run(grader_json, sample, item, allow_code=False, judge)  the body of POST /v1/fine_tuning/alpha/graders/run

sample = {"output_text", "output_json", "output_tools"} (make_sample builds it from a reply); item = the data row.
A judge is `(messages, model_name, sampling_params) -> reply text`, for score_model and label_model: HttpJudge asks
any OpenAI-compatible server; judge_models(grader_json) lists the models a grader needs its judge to serve.
Pure Python: nothing here imports torch or transformers.
"""

from tunelab.graders.base import GraderError, JudgeUnavailable, Outcome
from tunelab.graders.grading import Grader, build, judge_models, make_sample, run, validate
from tunelab.graders.http_judge import HttpJudge
from tunelab.graders.judged import Judge, chat_params

__all__ = ["GraderError", "Grader", "HttpJudge", "Judge", "JudgeUnavailable", "Outcome", "build", "chat_params",
           "judge_models", "make_sample", "run", "validate"]
