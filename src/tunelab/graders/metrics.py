"""The text_similarity metrics, small and pure Python, each in [0, 1].

Each follows one reference implementation exactly (tests/test_graders.py compares them on fixed cases):
  fuzzy_match   rapidfuzz.fuzz.ratio / 100: the normalized Indel similarity 2*LCS / (len(a) + len(b)) of the
                characters, case-sensitive
  bleu          sacrebleu.sentence_bleu(input, [reference]).score / 100: 13a tokenizer, exp smoothing,
                effective order
  gleu          nltk sentence_gleu([reference], input) on whitespace tokens: 1..4-grams, min(precision, recall)
  meteor        nltk single_meteor_score with exact (lowercased) matches only: nltk also matches Porter stems and
                WordNet synonyms, which would need nltk and its WordNet data at run time
  rouge_1..5,l  rouge_score RougeScorer([...], use_stemmer=False) F-measure, reference as the target
"""

from __future__ import annotations

import math
import re
from collections import Counter


def fuzzy_match(text: str, reference: str) -> float:
    total = len(text) + len(reference)
    return 1.0 if total == 0 else 2 * lcs_length(text, reference) / total


def lcs_length(a, b) -> int:
    """Longest common subsequence length, bit-parallel (Hyyro 2004): one big-integer step per element of b,
    so long texts stay fast in pure Python."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


# ------------------------------------------------------------------ BLEU (sacrebleu's sentence_bleu defaults)

_13A_RULES = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "), (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
              (re.compile(r"([\.,])([^0-9])"), r" \1 \2"), (re.compile(r"([0-9])(-)"), r"\1 \2 ")]


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a tokenization as WMT (and sacrebleu's default) does it: punctuation split off, except
    periods and commas inside numbers."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def ngrams(tokens: list, lo: int, hi: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(lo, hi + 1) for i in range(len(tokens) - n + 1))


def bleu(text: str, reference: str, max_order: int = 4) -> float:
    hyp, ref = tokenize_13a(text), tokenize_13a(reference)
    hyp_grams, ref_grams = ngrams(hyp, 1, max_order), ngrams(ref, 1, max_order)
    correct, total = [0] * max_order, [0] * max_order
    for gram, count in hyp_grams.items():
        total[len(gram) - 1] += count
        correct[len(gram) - 1] += min(count, ref_grams[gram])
    if not any(correct):
        return 0.0
    # Effective order: orders the hypothesis is too short to have do not count; an order with no match
    # gets NIST's "exp" smoothing (1 / 2^k for the k-th such order) instead of zeroing the score.
    log_sum, order, halvings = 0.0, 0, 1.0
    for n in range(max_order):
        if total[n] == 0:
            break
        order = n + 1
        if correct[n] == 0:
            halvings *= 2
            log_sum += math.log(1 / (halvings * total[n]))
        else:
            log_sum += math.log(correct[n] / total[n])
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum / order)


# ------------------------------------------------------------------ GLEU, METEOR (nltk's definitions)

def gleu(text: str, reference: str) -> float:
    hyp, ref = ngrams(text.split(), 1, 4), ngrams(reference.split(), 1, 4)
    denominator = max(sum(hyp.values()), sum(ref.values()))
    return sum((hyp & ref).values()) / denominator if denominator else 0.0


def meteor(text: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    hyp, ref = text.lower().split(), reference.lower().split()
    matches = _align(hyp, ref)
    if not matches or not hyp or not ref:
        return 0.0
    precision, recall = len(matches) / len(hyp), len(matches) / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(1 for (h0, r0), (h1, r1) in zip(matches, matches[1:]) if not (h1 == h0 + 1 and r1 == r0 + 1))
    return (1 - gamma * (chunks / len(matches)) ** beta) * fmean


def _align(hyp: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """nltk's exact alignment: hypothesis words from the last, each taking the last unused equal reference word.
    The pairs come back sorted by hypothesis position; the chunk count depends on this exact choice."""
    positions: dict[str, list[int]] = {}
    for j, word in enumerate(ref):
        positions.setdefault(word, []).append(j)
    pairs = [(i, positions[word].pop()) for i, word in reversed(list(enumerate(hyp))) if positions.get(word)]
    return sorted(pairs)


# ------------------------------------------------------------------ ROUGE (Google's rouge_score)

def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f_measure(overlap: int, predicted: int, target: int) -> float:
    precision, recall = overlap / max(predicted, 1), overlap / max(target, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(text: str, reference: str, n: int) -> float:
    hyp, ref = ngrams(rouge_tokens(text), n, n), ngrams(rouge_tokens(reference), n, n)
    return _f_measure(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))


def rouge_l(text: str, reference: str) -> float:
    hyp, ref = rouge_tokens(text), rouge_tokens(reference)
    if not hyp or not ref:
        return 0.0
    return _f_measure(lcs_length(ref, hyp), len(hyp), len(ref))


METRICS = {"fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu, "meteor": meteor, "rouge_l": rouge_l,
           **{f"rouge_{n}": (lambda text, reference, n=n: rouge_n(text, reference, n)) for n in range(1, 6)}}
