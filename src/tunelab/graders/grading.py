"""Graders built from checked JSON, and the three entry points: validate, build, run."""

from __future__ import annotations

import json
import keyword
import time
from typing import Any

from tunelab.graders import python_code
from tunelab.graders.base import ERROR_DETAILS, ERROR_FLAGS, Failed, GraderError, Outcome
from tunelab.graders.formula import compile_formula
from tunelab.graders.judged import Judge, ask, parse_label, parse_score
from tunelab.graders.metrics import METRICS
from tunelab.graders.schema import (GraderSpec, LabelModel, Multi, Python, ScoreModel, StringCheck, TextSimilarity,
                                    parse)
from tunelab.graders.template import references, render

STRING_CHECKS = {"eq": lambda text, ref: text == ref, "ne": lambda text, ref: text != ref,
                 "like": lambda text, ref: ref in text, "ilike": lambda text, ref: ref.lower() in text.lower()}


class Grader:
    """A grader ready to score samples: `grader(sample, item) -> reward`. A sample that cannot be graded
    (see base.Failed) scores 0, as on OpenAI; `grade` returns the whole Outcome with the reason."""

    def __init__(self, spec: GraderSpec, where: str):
        self.spec, self.where = spec, where

    def __call__(self, sample: dict, item: dict) -> float:
        return self.grade(sample, item).reward

    def grade(self, sample: dict, item: dict) -> Outcome:
        try:
            return Outcome(self.score(sample, item), judge_model=getattr(self.spec, "model", None))
        except Failed as failure:
            return Outcome(0.0, dict(failure.flags), judge_model=getattr(self.spec, "model", None))

    def score(self, sample: dict, item: dict) -> float:
        raise NotImplementedError

    def text(self, field: str, sample: dict, item: dict) -> str:
        return render(getattr(self.spec, field), sample, item, f"{self.where}.{field}")


class StringCheckGrader(Grader):
    def score(self, sample, item):
        check = STRING_CHECKS[self.spec.operation]
        return float(check(self.text("input", sample, item), self.text("reference", sample, item)))


class TextSimilarityGrader(Grader):
    def score(self, sample, item):
        metric = METRICS[self.spec.evaluation_metric]
        return metric(self.text("input", sample, item), self.text("reference", sample, item))


class ScoreModelGrader(Grader):
    def __init__(self, spec, where, judge: Judge):
        super().__init__(spec, where)
        self.judge = judge

    def score(self, sample, item):
        reply = ask(self.spec, self.judge, sample, item, self.where)
        return parse_score(reply, *self.spec.range, self.where)


class LabelModelGrader(ScoreModelGrader):
    def score(self, sample, item):
        label = parse_label(ask(self.spec, self.judge, sample, item, self.where), self.spec.labels, self.where)
        return float(label in self.spec.passing_labels)


class PythonGrader(Grader):
    def score(self, sample, item):
        return python_code.run_source(self.spec.source, sample, item)


class MultiGrader(Grader):
    """Sub-graders by name, combined by calculate_output. A sub-grader that fails scores 0 and its failure is
    reported; the formula still runs."""

    def __init__(self, spec, where, graders: dict[str, Grader]):
        super().__init__(spec, where)
        self.graders = graders
        self.formula = compile_formula(spec.calculate_output, list(graders), f"{where}.calculate_output")

    def grade(self, sample, item):
        outcomes = {name: grader.grade(sample, item) for name, grader in self.graders.items()}
        errors = {flag: value for outcome in outcomes.values() for flag, value in outcome.errors.items()}
        sub_rewards = {name: outcome.reward for name, outcome in outcomes.items()}
        judges = [outcome.judge_model for outcome in outcomes.values() if outcome.judge_model]
        try:
            reward = self.formula(sub_rewards)
        except Failed as failure:
            reward, errors = 0.0, {**errors, **failure.flags}
        return Outcome(reward, errors, sub_rewards, judges[0] if judges else None)


def _check(grader: Any, allow_code: bool, where: str, nested: bool = False) -> tuple[GraderSpec, dict]:
    """Parse and check one grader (recursively for multi): the spec and its sub-specs by name."""
    spec = parse(grader, where)
    if isinstance(spec, Python):
        if not allow_code:
            raise GraderError(f"{where}: {python_code.ALLOW_CODE_HINT}")
        python_code.check_source(spec.source, f"{where}.source")
    if isinstance(spec, (StringCheck, TextSimilarity)):
        references(spec.input, f"{where}.input")
        references(spec.reference, f"{where}.reference")
    if isinstance(spec, (ScoreModel, LabelModel)):
        for i, message in enumerate(spec.input):
            references(message.content, f"{where}.input.{i}.content")
    subs = {}
    if isinstance(spec, Multi):
        if nested:
            raise GraderError(f"{where}: a multi grader's graders cannot be multi graders themselves")
        unusable = [name for name in spec.graders if not name.isidentifier() or keyword.iskeyword(name)]
        if unusable:
            raise GraderError(f"{where}.graders: calculate_output cannot name {unusable[0]!r}; name each grader "
                              "with letters, digits and _ (not starting with a digit)")
        subs = {name: _check(sub, allow_code, f"{where}.graders.{name}", nested=True)[0]
                for name, sub in spec.graders.items()}
        compile_formula(spec.calculate_output, list(subs), f"{where}.calculate_output")
    return spec, subs


def validate(grader: dict, *, allow_code: bool = False) -> None:
    """Check a grader's JSON; GraderError names the field path of the first problem."""
    _check(grader, allow_code, "grader")


def build(grader: dict, *, allow_code: bool = False, judge: Judge | None = None) -> Grader:
    """A ready Grader. Model graders need `judge`; python graders need allow_code (the operator's --allow-code)."""
    spec, subs = _check(grader, allow_code, "grader")
    return _make(spec, subs, judge, "grader")


def _make(spec: GraderSpec, subs: dict, judge: Judge | None, where: str) -> Grader:
    if isinstance(spec, Multi):
        graders = {name: _make(sub, {}, judge, f"{where}.graders.{name}") for name, sub in subs.items()}
        return MultiGrader(spec, where, graders)
    if isinstance(spec, (ScoreModel, LabelModel)):
        if judge is None:
            raise GraderError(f"{where}: a {spec.type} grader needs a judge model, and none was given here")
        return (ScoreModelGrader if isinstance(spec, ScoreModel) else LabelModelGrader)(spec, where, judge)
    kinds = {StringCheck: StringCheckGrader, TextSimilarity: TextSimilarityGrader, Python: PythonGrader}
    return kinds[type(spec)](spec, where)


def judge_models(grader: dict, where: str = "grader") -> list[tuple[str, str]]:
    """(field path, model name) of each model grader in a checked grader, a multi's sub-graders included: the
    models its judge must serve, e.g. [("grader.graders.style.model", "judge")]."""
    if grader.get("type") in ("score_model", "label_model"):
        return [(f"{where}.model", grader["model"])]
    if grader.get("type") == "multi":
        return [found for name, sub in grader["graders"].items()
                for found in judge_models(sub, f"{where}.graders.{name}")]
    return []


def run(grader: dict, sample: dict, item: dict, *, allow_code: bool = False, judge: Judge | None = None) -> dict:
    """What POST /v1/fine_tuning/alpha/graders/run answers (OpenAI's GraderRunResponse)."""
    built = build(grader, allow_code=allow_code, judge=judge)
    started = time.monotonic()
    outcome = built.grade(sample, item)
    errors = {flag: bool(outcome.errors.get(flag, False)) for flag in ERROR_FLAGS}
    errors |= {detail: outcome.errors.get(detail) for detail in ERROR_DETAILS}
    metadata = {"name": built.spec.name, "type": built.spec.type, "errors": errors,
                "execution_time": time.monotonic() - started, "scores": dict(outcome.sub_rewards),
                "token_usage": None, "sampled_model_name": outcome.judge_model}
    return {"reward": outcome.reward, "metadata": metadata, "sub_rewards": dict(outcome.sub_rewards),
            "model_grader_token_usage_per_model": {}}


def make_sample(output_text: str, output_tools: list | None = None) -> dict:
    """The sample namespace from a model's answer, as OpenAI fills it: output_json is the answer parsed as JSON
    when it is JSON (None otherwise)."""
    try:
        output_json = json.loads(output_text)
    except ValueError:
        output_json = None
    return {"output_text": output_text, "output_json": output_json, "output_tools": output_tools or []}
