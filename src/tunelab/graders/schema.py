"""OpenAI's grader JSON as pydantic models (fields as in openai-python's types/graders), validated at the edge.

Errors name the field path ("grader.graders.exact.operation") and, for an unknown key, the closest valid one.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.graders.base import GraderError

Metric = Literal["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
                 "rouge_l"]
Role = Literal["user", "assistant", "system", "developer"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    role: Role
    content: Any  # a string, a text part or a list of them (checked below)
    type: Optional[Literal["message"]] = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: Any) -> str:
        """Content as one string: the parts' texts joined. Images and audio would need a judge that sees them."""
        parts = content if isinstance(content, list) else [content]
        texts = []
        for part in parts:
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text") and isinstance(
                    part.get("text"), str) and set(part) == {"type", "text"}:
                part = part["text"]
            elif isinstance(part, dict) and part.get("type") in ("input_image", "input_audio"):
                raise ValueError(f"{part['type']} is not supported: the judge is a text model")
            if not isinstance(part, str):
                raise ValueError("content is a string, or a list of strings and "
                                 "{'type': 'input_text' | 'output_text', 'text': ...} parts")
            texts.append(part)
        return "\n".join(texts)


class SamplingParams(Strict):
    max_completions_tokens: Optional[int] = Field(None, gt=0)
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]] = None
    seed: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)


class StringCheck(Strict):
    type: Literal["string_check"]
    name: str
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarity(Strict):
    type: Literal["text_similarity"]
    name: str
    input: str
    reference: str
    evaluation_metric: Metric
    pass_threshold: Optional[float] = None  # OpenAI's evals form carries it; the reward does not use it


class ScoreModel(Strict):
    type: Literal["score_model"]
    name: str
    model: str
    input: list[Message] = Field(min_length=1)
    range: list[float] = Field([0.0, 1.0], min_length=2, max_length=2)
    sampling_params: Optional[SamplingParams] = None
    pass_threshold: Optional[float] = None

    @model_validator(mode="after")
    def _range(self):
        if not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, not {self.range}")
        return self


class LabelModel(Strict):
    type: Literal["label_model"]
    name: str
    model: str
    input: list[Message] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)
    sampling_params: Optional[SamplingParams] = None

    @model_validator(mode="after")
    def _subset(self):
        stray = [label for label in self.passing_labels if label not in self.labels]
        if stray:
            raise ValueError(f"passing_labels {stray} are not in labels {self.labels}")
        return self


class Python(Strict):
    type: Literal["python"]
    name: str
    source: str
    image_tag: Optional[str] = None  # OpenAI's runtime image; here the server's own Python runs the code
    pass_threshold: Optional[float] = None


class Multi(Strict):
    type: Literal["multi"]
    name: str
    graders: dict[str, dict[str, Any]] = Field(min_length=1)  # each checked as a grader of its own
    calculate_output: str


GraderSpec = Union[StringCheck, TextSimilarity, ScoreModel, LabelModel, Python, Multi]
TYPES: dict[str, type[BaseModel]] = {"string_check": StringCheck, "text_similarity": TextSimilarity,
                                     "score_model": ScoreModel, "label_model": LabelModel, "python": Python,
                                     "multi": Multi}


def parse(grader: Any, where: str = "grader") -> GraderSpec:
    """One grader object (a multi's sub-graders are parsed by the caller) -> its model, or GraderError."""
    if not isinstance(grader, dict):
        raise GraderError(f"{where}: a grader is a JSON object with a 'type', not {type(grader).__name__}")
    kind = grader.get("type")
    if kind == "text_similarity" and grader.get("evaluation_metric") == "cosine":
        raise GraderError(f"{where}.evaluation_metric: cosine needs an embedding model, which tunelab does not "
                          "serve; use fuzzy_match, bleu, gleu, meteor, rouge_1..rouge_5 or rouge_l")
    if kind not in TYPES:
        close = difflib.get_close_matches(str(kind), TYPES, n=1)
        raise GraderError(f"{where}.type: {kind!r} is not a grader type; use one of {', '.join(TYPES)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        return TYPES[kind].model_validate(grader)
    except ValidationError as err:
        raise GraderError(_first_problem(err, TYPES[kind], where)) from None


def _first_problem(err: ValidationError, cls: type[BaseModel], where: str) -> str:
    errors = err.errors()
    e = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a misspelt key explains the rest
    loc = tuple(e["loc"])
    path = ".".join([where, *map(str, loc)])
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc[:-1]), n=1, cutoff=0.5)
        parent = ".".join([where, *map(str, loc[:-1])])
        return f"{path}: unknown key" + (f"; did you mean '{parent}.{close[0]}'?" if close else "")
    if e["type"] == "missing":
        return f"{path}: missing"
    if e["type"] == "value_error":
        return f"{path}: {e['msg'].removeprefix('Value error, ')}"
    return f"{path}: {e['msg']} (got {e.get('input')!r})"


def _fields_at(cls: Any, loc: tuple) -> list[str]:
    """Field names of the model found by following loc from cls (list indexes and unions are looked through)."""
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        cls = _model_in(field.annotation) if field is not None else None
    return list(cls.model_fields) if cls is not None else []


def _model_in(annotation: Any):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
