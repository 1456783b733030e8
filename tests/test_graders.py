"""OpenAI's graders (tunelab.graders): every type, the metrics against their reference implementations on fixed
cases, templating, the safe calculate_output evaluator, the python grader's child process and its refusal without
--allow-code, and the run endpoint's response checked against openai-python's own types."""

import json
import math
import os
import sys
import time

import pytest
from openai.types import graders as openai_graders
from openai.types.fine_tuning.alpha import GraderRunResponse

from tunelab.graders import GraderError, build, make_sample, run, validate
from tunelab.graders import metrics, python_code

# --------------------------------------------------------------------------------- metrics vs references

CASES = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("hello world", "Hello, World!"),
    ("a b c d e f", "f e d c b a"),
    ("It costs 3.50 dollars, ok-ish", "it costs 3.5 dollars - ok"),
    ("", "abc"),
    ("the the the the", "the cat"),
    ("x", "y"),
    ("the quick brown fox jumps over the lazy dog", "a quick brown dog jumps over the lazy fox"),
    ("Paris is the capital of France; it has 2,100,000 people.", "The capital of France is Paris (2.1 million)."),
    ("Zürich liegt am See", "Zürich liegt am Zürichsee"),
]


@pytest.mark.parametrize("text,reference", CASES)
def test_fuzzy_match_is_rapidfuzz_ratio(text, reference):
    from rapidfuzz import fuzz

    assert metrics.fuzzy_match(text, reference) == pytest.approx(fuzz.ratio(text, reference) / 100, abs=1e-12)


@pytest.mark.parametrize("text,reference", CASES)
def test_bleu_is_sacrebleu_sentence_bleu(text, reference):
    import sacrebleu

    expected = sacrebleu.sentence_bleu(text, [reference]).score / 100
    assert metrics.bleu(text, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("text,reference", CASES)
def test_gleu_is_nltk_sentence_gleu(text, reference):
    from nltk.translate.gleu_score import sentence_gleu

    expected = sentence_gleu([reference.split()], text.split())
    assert metrics.gleu(text, reference) == pytest.approx(expected, abs=1e-12)


class _NoStemmer:
    def stem(self, word):
        return word


class _NoSynonyms:
    """WordNet without data (it cannot be downloaded here): no word has a synonym."""

    def synsets(self, word):
        return []


@pytest.mark.parametrize("text,reference", CASES + [("cats sat quickly", "the cat sat quick")])
def test_meteor_is_nltk_meteor_with_exact_matches_only(text, reference):
    from nltk.translate.meteor_score import single_meteor_score

    expected = single_meteor_score(reference.split(), text.split(), stemmer=_NoStemmer(), wordnet=_NoSynonyms())
    assert metrics.meteor(text, reference) == pytest.approx(expected, abs=1e-12)


def test_meteor_differs_from_nltk_only_by_stemming():
    """nltk's default Porter stemmer also matches cats~cat; tunelab's exact-only METEOR does not (documented)."""
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import single_meteor_score

    stemmed = single_meteor_score(["the", "cat", "sat"], ["the", "cats", "sat"], stemmer=PorterStemmer(),
                                  wordnet=_NoSynonyms())
    assert metrics.meteor("the cats sat", "the cat sat") < stemmed


@pytest.mark.parametrize("text,reference", CASES)
def test_rouge_is_rouge_score(text, reference):
    from rouge_score import rouge_scorer

    names = ["rouge1", "rouge2", "rouge3", "rouge4", "rouge5", "rougeL"]
    expected = rouge_scorer.RougeScorer(names, use_stemmer=False).score(reference, text)
    for name in names:
        ours = metrics.METRICS["rouge_l" if name == "rougeL" else f"rouge_{name[-1]}"](text, reference)
        assert ours == pytest.approx(expected[name].fmeasure, abs=1e-12), name


def test_lcs_matches_the_dynamic_programme_on_long_text():
    import random

    rng = random.Random(0)
    a, b = ("".join(rng.choice("abcd ") for _ in range(n)) for n in (300, 250))
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    assert metrics.lcs_length(a, b) == table[-1][-1]


# --------------------------------------------------------------------------------- string_check, text_similarity

def _check(operation, input_, reference="{{item.answer}}"):
    return {"type": "string_check", "name": "c", "input": input_, "reference": reference, "operation": operation}


@pytest.mark.parametrize("operation,output,expected", [
    ("eq", "Paris", 1.0), ("eq", "paris", 0.0), ("ne", "Lyon", 1.0), ("ne", "Paris", 0.0),
    ("like", "It is Paris.", 1.0), ("like", "It is PARIS.", 0.0), ("ilike", "It is PARIS.", 1.0),
    ("ilike", "It is Lyon.", 0.0)])
def test_string_check_operations(operation, output, expected):
    grader = build(_check(operation, "{{sample.output_text}}"))
    assert grader(make_sample(output), {"answer": "Paris"}) == expected


def test_text_similarity_grader_scores_with_its_metric():
    from rapidfuzz import fuzz

    spec = {"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
            "evaluation_metric": "fuzzy_match"}
    expected = fuzz.ratio("kitten", "sitting") / 100
    assert build(spec)(make_sample("kitten"), {"ref": "sitting"}) == pytest.approx(expected)


def test_cosine_is_refused_with_the_reason():
    spec = {"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "cosine"}
    with pytest.raises(GraderError, match=r"grader.evaluation_metric: cosine needs an embedding model"):
        validate(spec)


# --------------------------------------------------------------------------------- templating

def test_templates_read_nested_items_lists_and_output_json():
    spec = _check("eq", "{{ sample.output_json.city }}-{{item.meta.tags[1]}}-{{item.n}}-{{item.meta}}",
                  reference='Paris-b-3-{"tags": ["a", "b"]}')
    item = {"n": 3, "meta": {"tags": ["a", "b"]}}
    assert build(spec)(make_sample('{"city": "Paris"}'), item) == 1.0


def test_a_missing_item_field_is_an_error_naming_it():
    with pytest.raises(GraderError, match=r"grader.reference: the item has no item.answer .*fields are question"):
        build(_check("eq", "x"))(make_sample("x"), {"question": "q"})
    with pytest.raises(GraderError, match=r"the item has no item.meta.tags\[5\]"):
        build(_check("eq", "x", "{{item.meta.tags[5]}}"))(make_sample("x"), {"meta": {"tags": []}})


def test_output_that_is_not_json_scores_zero_with_a_sample_parse_error():
    spec = _check("eq", "{{sample.output_json.city}}", "Paris")
    result = run(spec, make_sample("Paris, I think"), {})
    assert result["reward"] == 0.0 and result["metadata"]["errors"]["sample_parse_error"] is True


@pytest.mark.parametrize("template,message", [
    ("{{items.answer}}", r"the namespaces are 'item' and 'sample', not 'items'"),
    ("{{sample.output_txt}}", r"did you mean 'sample.output_text'"),
    ("{{item.a b}}", r"cannot read the template"),
])
def test_bad_templates_are_refused_at_validation(template, message):
    with pytest.raises(GraderError, match=message):
        validate(_check("eq", template))


# --------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("spec,message", [
    ({**_check("eq", "x"), "refrence": "y"}, r"grader.refrence: unknown key; did you mean 'grader.reference'\?"),
    ({**_check("eq", "x"), "operation": "contains"}, r"grader.operation: Input should be 'eq', 'ne', 'like' or"),
    ({"type": "strng_check"}, r"grader.type: 'strng_check' is not a grader type.*did you mean 'string_check'"),
    ({"type": "string_check", "name": "c", "input": "x", "operation": "eq"}, r"grader.reference: missing"),
    ([], r"grader: a grader is a JSON object"),
    ({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "contnet": "x"}]},
     r"grader.input.0.contnet: unknown key; did you mean 'grader.input.0.content'\?"),
    ({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}],
      "sampling_params": {"temprature": 0}}, r"did you mean 'grader.sampling_params.temperature'"),
    ({"type": "score_model", "name": "s", "model": "m", "range": [1, 1], "input": [{"role": "user", "content": "x"}]},
     r"range must be \[low, high\]"),
    ({"type": "score_model", "name": "s", "model": "m",
      "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     r"grader.input.0.content: input_image is not supported"),
    ({"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
      "labels": ["good", "bad"], "passing_labels": ["great"]}, r"passing_labels \['great'\] are not in labels"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {**_check("eq", "x"), "operation": "="}}},
     r"grader.graders.a.operation:"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {
        "type": "multi", "name": "n", "calculate_output": "b", "graders": {"b": _check("eq", "x")}}}},
     r"grader.graders.a: a multi grader's graders cannot be multi graders"),
    ({"type": "multi", "name": "m", "calculate_output": "1", "graders": {"my-check": _check("eq", "x")}},
     r"grader.graders: calculate_output cannot name 'my-check'"),
    ({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "ok"},
                                                                  {"role": "user", "content": "{{itm.q}}"}]},
     r"grader.input.1.content: \{\{itm.q\}\}: the namespaces are"),
])
def test_validate_names_the_field_path_of_the_first_problem(spec, message):
    with pytest.raises(GraderError, match=message):
        validate(spec)


def test_graders_written_with_openais_own_types_validate():
    """The reference for the JSON shapes: openai-python's grader models, dumped as the SDK would send them."""
    message = {"role": "user", "content": "Rate {{sample.output_text}} against {{item.ref}}"}
    shapes = [
        openai_graders.StringCheckGrader(type="string_check", name="a", input="{{sample.output_text}}",
                                         reference="{{item.ref}}", operation="ilike"),
        openai_graders.TextSimilarityGrader(type="text_similarity", name="b", input="{{sample.output_text}}",
                                            reference="{{item.ref}}", evaluation_metric="rouge_l"),
        openai_graders.ScoreModelGrader(type="score_model", name="c", model="judge", input=[message], range=[0, 5],
                                        sampling_params={"temperature": 0.0, "seed": 1}),
        openai_graders.LabelModelGrader(type="label_model", name="d", model="judge", input=[message],
                                        labels=["yes", "no"], passing_labels=["yes"]),
        openai_graders.PythonGrader(type="python", name="e", source="def grade(sample, item):\n    return 1.0\n",
                                    image_tag="2025-05-08"),
    ]
    for shape in shapes:
        validate(shape.model_dump(exclude_none=True), allow_code=True)


# --------------------------------------------------------------------------------- score_model, label_model

class FakeJudge:
    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, messages, model, params):
        self.calls.append((messages, model, params))
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


SCORE = {"type": "score_model", "name": "s", "model": "judge-1", "range": [0, 10],
         "sampling_params": {"temperature": 0.0, "max_completions_tokens": 16},
         "input": [{"role": "system", "content": "Score 0-10."},
                   {"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}}"},
                                                {"type": "output_text", "text": "A: {{sample.output_text}}"}]}]}


def test_score_model_sends_rendered_messages_model_and_sampling_params():
    judge = FakeJudge("The answer is right, I give it 7.5")
    assert build(SCORE, judge=judge)(make_sample("4"), {"q": "2+2?"}) == 7.5
    messages, model, params = judge.calls[0]
    assert messages == [{"role": "system", "content": "Score 0-10."}, {"role": "user", "content": "Q: 2+2?\nA: 4"}]
    assert model == "judge-1" and params == {"temperature": 0.0, "max_completions_tokens": 16}


@pytest.mark.parametrize("reply,reward,flag", [
    ('{"steps": [], "result": 3}', 3.0, None), ("12", 10.0, None), ("-4", 0.0, None),
    ("I cannot tell", 0.0, "model_grader_parse_error"), (RuntimeError("connection refused"), 0.0,
                                                         "model_grader_server_error")])
def test_score_model_parses_clamps_and_reports_failures(reply, reward, flag):
    result = run(SCORE, make_sample("4"), {"q": "2+2?"}, judge=FakeJudge(reply))
    assert result["reward"] == reward
    errors = result["metadata"]["errors"]
    assert [name for name, on in errors.items() if on is True] == ([flag] if flag else [])
    assert result["metadata"]["sampled_model_name"] == "judge-1"


LABEL = {"type": "label_model", "name": "l", "model": "judge-1", "labels": ["correct", "incorrect", "unsure"],
         "passing_labels": ["correct"], "input": [{"role": "user", "content": "Is {{sample.output_text}} right?"}]}


@pytest.mark.parametrize("reply,reward", [("correct", 1.0), ('"Correct."', 1.0), ("incorrect", 0.0),
                                          ("I think it is unsure", 0.0), ('{"result": "correct"}', 1.0)])
def test_label_model_passes_only_passing_labels(reply, reward):
    assert build(LABEL, judge=FakeJudge(reply))(make_sample("4"), {}) == reward


def test_label_model_reply_without_one_label_is_a_parse_error():
    for reply in ("maybe", "correct or incorrect"):
        result = run(LABEL, make_sample("4"), {}, judge=FakeJudge(reply))
        assert result["reward"] == 0.0 and result["metadata"]["errors"]["model_grader_parse_error"] is True


def test_model_graders_need_a_judge():
    validate(SCORE)
    with pytest.raises(GraderError, match="grader: a score_model grader needs a judge model"):
        build(SCORE)


# --------------------------------------------------------------------------------- python

def _python(source):
    return {"type": "python", "name": "p", "source": source}


def test_python_grader_is_refused_without_allow_code():
    spec = _python("def grade(sample, item):\n    return 1.0\n")
    for call in (lambda: validate(spec), lambda: build(spec), lambda: run(spec, make_sample("x"), {})):
        with pytest.raises(GraderError, match="grader: a python grader runs code.*--allow-code"):
            call()
    multi = {"type": "multi", "name": "m", "calculate_output": "p", "graders": {"p": spec}}
    with pytest.raises(GraderError, match="grader.graders.p: .*--allow-code"):
        validate(multi)


def test_python_grader_runs_grade_in_an_isolated_child():
    source = ("import os, sys\n"
              "def grade(sample, item):\n"
              "    print('chatter on stdout is ignored')\n"
              "    same = sample['output_json']['n'] == item['n']\n"
              "    return float(same) + sys.flags.isolated * 10 + (os.getpid() != item['parent']) * 100\n")
    grader = build(_python(source), allow_code=True)
    assert grader(make_sample('{"n": 3}'), {"n": 3, "parent": os.getpid()}) == 111.0


@pytest.mark.parametrize("source,message", [
    ("def grade(sample, item):\n    return 1 / 0\n", r"ZeroDivisionError: division by zero \(line 2\)"),
    ("def grade(sample, item):\n    return 'high'\n", r"grade\(\) must return a finite number, not 'high'"),
])
def test_python_grader_errors_score_zero_with_details(source, message):
    result = run(_python(source), make_sample("x"), {}, allow_code=True)
    errors = result["metadata"]["errors"]
    assert result["reward"] == 0.0 and errors["python_grader_runtime_error"] is True
    assert errors["python_grader_runtime_error_details"] is not None
    assert __import__("re").search(message, errors["python_grader_runtime_error_details"])


def test_python_grader_source_is_checked_without_running_it():
    with pytest.raises(GraderError, match=r"grader.source: syntax error on line 2"):
        validate(_python("def grade(sample, item):\n    return (\n"), allow_code=True)
    with pytest.raises(GraderError, match=r"grader.source: the source must define grade"):
        validate(_python("def score(sample, item):\n    return 1\n"), allow_code=True)


def test_python_grader_past_its_time_limit_is_killed(monkeypatch, tmp_path):
    monkeypatch.setattr(python_code, "TIME_LIMIT_S", 1.0)
    marker = tmp_path / "still-running"
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    source = ("import subprocess, sys, time\n"
              "def grade(sample, item):\n"
              f"    subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
              "    while True:\n"
              "        time.sleep(0.05)\n")
    started = time.monotonic()
    result = run(_python(source), make_sample("x"), {}, allow_code=True)
    assert time.monotonic() - started < 30
    errors = result["metadata"]["errors"]
    assert result["reward"] == 0.0 and errors["unresponsive_reward_error"] is True
    assert "did not finish within 1 s; the child process was killed" in errors["python_grader_runtime_error_details"]
    time.sleep(3.5)
    assert not marker.exists(), "the grader's own child outlived the kill"


# --------------------------------------------------------------------------------- multi and its formula

def _multi(formula, **graders):
    graders = graders or {"exact": _check("eq", "{{sample.output_text}}"), "close": {
        "type": "text_similarity", "name": "t", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match"}}
    return {"type": "multi", "name": "m", "graders": graders, "calculate_output": formula}


def test_multi_combines_named_sub_rewards_and_reports_them():
    from rapidfuzz import fuzz

    result = run(_multi("0.5 * exact + 2 * close ^ 2 - min(exact, close) + sqrt(4) * floor(1.7)"),
                 make_sample("Pariss"), {"answer": "Paris"})
    close = fuzz.ratio("Pariss", "Paris") / 100
    assert result["sub_rewards"] == {"exact": 0.0, "close": pytest.approx(close)}
    assert result["reward"] == pytest.approx(0.5 * 0 + 2 * close ** 2 - min(0, close) + 2.0 * 1)


@pytest.mark.parametrize("formula,value", [
    ("2 * close ^ 2", 2 * 0.5 ** 2), ("-close ^ 2", -(0.5 ** 2)), ("2 ^ 3 ^ 2", 2.0 ** 9), ("close ** 2", 0.25),
    ("max(exact, close, 0.7)", 0.7), ("abs(exact - 1) + ceil(close) + exp(0) + log(1)", 3.0), ("(1 + 2) / 4", 0.75)])
def test_formula_follows_arithmetic_precedence(formula, value):
    grader = build(_multi(formula, exact=_check("eq", "a", "b"), close=_check("eq", "a", "a")))
    grader.graders["close"].score = lambda sample, item: 0.5  # a fixed sub-reward makes the closed form exact
    assert grader(make_sample("x"), {}) == pytest.approx(value)


@pytest.mark.parametrize("formula,message", [
    ("__import__('os')", r"unknown function '__import__'"),
    ("__import__('os').system('true')", r"is not allowed"),
    ("exact.__class__", r"'exact.__class__' is not allowed"),
    ("(lambda: 1)()", r"is not allowed"),
    ("lambda: 1", r"'lambda: 1' is not allowed"),
    ("exact if close else 1", r"is not allowed"),
    ("[exact][0]", r"is not allowed"),
    ("'1' * 3", r"is not allowed"),
    ("True + exact", r"'True' is not allowed"),
    ("max(*[exact])", r"max\(\) takes one or more arguments"),
    ("sqrt(exact, close)", r"sqrt\(\) takes 1 argument"),
    ("exactt + 1", r"unknown name 'exactt'.*did you mean 'exact'"),
    ("exact +", r"cannot parse"),
    ("(" * 400 + "1" + ")" * 400, r"cannot parse|over 500 parts"),
    ("1" * 5000, r"at most 2000"),
])
def test_formula_refuses_anything_but_arithmetic(formula, message):
    with pytest.raises(GraderError, match=r"grader.calculate_output: .*" + message):
        validate(_multi(formula))


@pytest.mark.parametrize("formula", ["9 ^ 9 ^ 9", "10 ** 10 ** 10", "exact / 0", "log(exact)", "sqrt(exact - 1)",
                                     "(exact - 1) ^ 0.5"])
def test_formula_math_errors_fail_the_sample_quickly(formula):
    started = time.monotonic()
    result = run(_multi(formula), make_sample("Lyon"), {"answer": "Paris"})
    assert time.monotonic() - started < 5
    assert result["reward"] == 0.0 and result["metadata"]["errors"]["other_error"] is True


# --------------------------------------------------------------------------------- the run response

def test_run_response_is_openais_grader_run_response():
    result = run(_multi("exact"), make_sample("Paris"), {"answer": "Paris"})
    parsed = GraderRunResponse.model_validate(json.loads(json.dumps(result)))
    assert parsed.reward == 1.0 and parsed.metadata.type == "multi" and parsed.metadata.name == "m"
    assert parsed.sub_rewards == {"exact": 1.0, "close": 1.0}
    assert parsed.metadata.errors.sample_parse_error is False and math.isfinite(parsed.metadata.execution_time)


def test_graders_import_no_torch():
    import subprocess

    code = "import sys, tunelab.graders; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
