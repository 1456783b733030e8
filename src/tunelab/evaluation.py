"""`tunelab eval`: score a model on held-out rows; write eval.json and print one table.

What is measured depends on each row's format (all three can be mixed in one run):
- perplexity: exp(mean NLL) over the tokens that carry loss, exactly as training masks them (the replies of
  alpaca / chat / sharegpt / gemini / completion rows; the whole text of `format: text` rows);
- generation: rows with a prompt and an answer (alpaca rows: instruction -> output; `format: prompt` rows with
  an `answer`; completion rows: prompt -> completion) are answered by batched greedy decoding (left padding,
  stopping at the template's end of turn) and scored by `eval.scorer`: exact_match (after stripping
  whitespace), contains (the answer occurs in the reply) or `module:function`, called like a GRPO reward function
  as `f(prompt=..., response=..., answer=...) -> float`;
- preference: for `format: preference` rows, log p(chosen) and log p(rejected) summed over the response tokens;
  accuracy = share of pairs with log p(chosen) > log p(rejected). With `eval.reference` (a model dir) also the DPO
  implicit reward margin beta * [(pi_c - ref_c) - (pi_r - ref_r)] (beta = dpo.beta) and its accuracy.
Rows with a `family` field are also reported per family. The rows: `eval.data`, else `data.eval`, else the
`data.eval_fraction` hold-out of `data.train` (the same rows training held out).

`evaluate(model, tokenizer, cfg, rows)` works on a loaded model, so a training loop can call it too; during
`tunelab train`, `train.eval_every` reports the eval loss (and perplexity), and `tunelab eval` gives the rest.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab import run_files
from tunelab.config import Config, UserError

IGNORE = -100
GENERATION_FORMATS = ("alpaca", "prompt", "completion")
PERPLEXITY_FORMATS = ("alpaca", "chat", "sharegpt", "gemini", "completion", "text")


# ---------------------------------------------------------------- scorers

def exact_match(prompt: Any, response: str, answer: Any = None, **_) -> float:
    return float(answer is not None and response.strip() == str(answer).strip())


def contains(prompt: Any, response: str, answer: Any = None, **_) -> float:
    return float(answer is not None and str(answer).strip() in response)


BUILTIN_SCORERS: dict[str, Callable] = {"exact_match": exact_match, "contains": contains}


def load_scorer(spec: str) -> Callable:
    """exact_match, contains, or an importable `module:function` (loaded as RL reward functions are)."""
    if spec in BUILTIN_SCORERS:
        return BUILTIN_SCORERS[spec]
    from tunelab.objectives.rewards import load_function

    return load_function(spec, "eval.scorer")


# ---------------------------------------------------------------- rows -> items

@dataclass
class Sequence:
    """A tokenized sequence whose labelled tokens are scored (perplexity, or one side of a preference pair)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Items:
    ppl: list[tuple[Sequence, str | None, str]] = field(default_factory=list)  # (seq, family, source)
    gen: list[dict] = field(default_factory=list)  # {ids, prompt, answer, family, where}
    pref: list[tuple[Sequence, Sequence, str | None]] = field(default_factory=list)  # (chosen, rejected, family)


def _family(row) -> str | None:
    value = row.data.get("family")
    return str(value) if value is not None else None


def build_items(rows, tokenizer, cfg: Config, metrics: set[str]) -> Items:
    from tunelab.data import render, to_messages, to_preference, to_prompt, tokenize_example
    from tunelab.modeling.infer import prompt_ids

    template, max_length = cfg.data.template, cfg.data.max_length
    items = Items()
    for row in rows:
        fmt, family = row.format, _family(row)
        try:
            if fmt == "preference":
                if "preference" in metrics:
                    pair = to_preference(row)
                    sides = []
                    for reply in (pair.chosen, pair.rejected):
                        ex = tokenize_example(render(pair.prompt + reply, template, tokenizer), tokenizer,
                                              max_length, train_on_prompt=False)
                        sides.append(Sequence(ex.input_ids, ex.labels))
                    items.pref.append((sides[0], sides[1], family))
                continue
            if fmt in PERPLEXITY_FORMATS and "perplexity" in metrics:
                conversation = to_messages(row, fmt)
                segments = render(conversation, "none" if fmt == "completion" else template, tokenizer)
                ex = tokenize_example(segments, tokenizer, max_length, train_on_prompt=False)
                if any(label != IGNORE for label in ex.labels[1:]):
                    items.ppl.append((Sequence(ex.input_ids, ex.labels), family, row.source))
            if fmt in GENERATION_FORMATS and "generation" in metrics:
                if fmt == "prompt":
                    p = to_prompt(row)
                    messages, answer = p.messages, p.answer
                    if answer is None:
                        continue
                else:
                    conversation = to_messages(row, fmt)
                    if conversation[-1]["role"] != "assistant":
                        continue
                    messages, answer = conversation[:-1], conversation[-1]["content"]
                row_template = "none" if fmt == "completion" else template
                prompt = messages[-1]["content"] if len(messages) == 1 else messages
                items.gen.append({"ids": prompt_ids(tokenizer, messages, row_template), "prompt": prompt,
                                  "answer": answer, "family": family, "where": row.where,
                                  "template": row_template})
        except UserError as e:
            raise UserError(f"{row.where}: {e}" if row.where not in str(e) else str(e)) from None
    return items


# ---------------------------------------------------------------- model passes

def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sequence_logprobs(model, seqs: list[Sequence], batch_size: int, pad_id: int) -> tuple[list[float], list[int]]:
    """Per sequence: the summed log-probability of its labelled tokens (next-token, after the causal shift) and
    their count. The LM head runs only on labelled positions, a chunk at a time (objectives/forward.py)."""
    from tunelab.objectives.forward import decoder_and_head, decoder_hidden, label_logprobs

    decoder, head = decoder_and_head(model)
    device = _device(model)
    sums, counts = [0.0] * len(seqs), [0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(seqs[i].input_ids) for i in idx)
        ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(seqs[i].input_ids)
            ids[r, :n] = torch.tensor(seqs[i].input_ids)
            labels[r, :n] = torch.tensor(seqs[i].labels)
            mask[r, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        hidden = decoder_hidden(decoder, {"input_ids": ids, "attention_mask": mask})
        lp, keep = label_logprobs(model, head, hidden, labels)
        rows = keep.nonzero()[:, 0]
        per_row = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add(0, rows, lp.double())
        for r, i in enumerate(idx):
            sums[i] = float(per_row[r])
            counts[i] = int(keep[r].sum())
    return sums, counts


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                   batch_size: int) -> list[list[int]]:
    """Greedy continuations of many prompts: similar lengths batched together, left-padded, each cut at its first
    stop token (which is not returned)."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = set(stop_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(prompts[i])
            ids[r, length - n:] = torch.tensor(prompts[i])
            mask[r, length - n:] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stop_ids, pad_token_id=pad,
        )
        for r, i in enumerate(idx):
            new = generated[r, length:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop), len(new))
            out[i] = new[:cut]
    return out


# ---------------------------------------------------------------- the evaluation

def _group(values: list[tuple[str | None, float]]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for family, value in values:
        if family is not None:
            groups[family].append(value)
    return dict(sorted(groups.items()))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate(model, tokenizer, cfg: Config, rows, reference=None, say=print) -> dict:
    """All metrics the rows allow (or `eval.metrics` asks for) on a loaded model; returns the eval.json dict."""
    from tunelab.data import stop_token_ids

    ec = cfg.eval
    wanted = set(ec.metrics or ("perplexity", "generation", "preference"))
    scorer = load_scorer(ec.scorer) if "generation" in wanted else None
    items = build_items(rows, tokenizer, cfg, wanted)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result: dict[str, Any] = {}
    try:
        if items.ppl:
            t0 = time.time()
            sums, counts = sequence_logprobs(model, [s for s, _, _ in items.ppl], ec.batch_size, pad)
            nll, tokens = -sum(sums), sum(counts)

            def ppl(pairs):
                n = sum(c for _, c in pairs)
                return {"perplexity": math.exp(min(-sum(s for s, _ in pairs) / max(n, 1), 50.0)), "tokens": n}

            by_family: dict[str, list] = defaultdict(list)
            by_source: dict[str, list] = defaultdict(list)
            for (seq, family, source), s, c in zip(items.ppl, sums, counts):
                if family is not None:
                    by_family[family].append((s, c))
                by_source[source].append((s, c))
            result["perplexity"] = {
                "perplexity": math.exp(min(nll / max(tokens, 1), 50.0)), "loss": nll / max(tokens, 1),
                "tokens": tokens, "rows": len(items.ppl),
                "by_family": {f: ppl(v) for f, v in sorted(by_family.items())},
                "by_source": {s: ppl(v) for s, v in by_source.items()} if len(by_source) > 1 else {},
                "seconds": round(time.time() - t0, 2),
            }
        if items.gen:
            t0 = time.time()
            max_new = ec.max_new_tokens
            predictions: list[str] = [""] * len(items.gen)
            by_template: dict[str, list[int]] = defaultdict(list)
            for k, g in enumerate(items.gen):
                by_template[g["template"]].append(k)
            for template, ks in by_template.items():
                new_ids = generate_batch(model, tokenizer, [items.gen[k]["ids"] for k in ks], max_new,
                                         stop_token_ids(template, tokenizer), ec.batch_size)
                for k, ids in zip(ks, new_ids):
                    predictions[k] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            scores, samples = [], []
            for g, pred in zip(items.gen, predictions):
                try:
                    value = float(scorer(prompt=g["prompt"], response=pred, answer=g["answer"]))
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - the user's scorer
                    raise UserError(f"eval.scorer: {ec.scorer} raised {type(e).__name__}: {e} "
                                    f"(row {g['where']}, response {pred[:80]!r})") from None
                scores.append(value)
                samples.append({"where": g["where"], "family": g["family"], "prompt": g["prompt"],
                                "answer": g["answer"], "prediction": pred, "score": value})
            result["generation"] = {
                "scorer": ec.scorer, "score": _mean(scores), "rows": len(scores),
                "by_family": {f: {"score": _mean(v), "rows": len(v)}
                              for f, v in _group([(g["family"], s) for g, s in zip(items.gen, scores)]).items()},
                "max_new_tokens": max_new, "seconds": round(time.time() - t0, 2),
                "predictions": samples,
            }
        if items.pref:
            t0 = time.time()
            seqs = [c for c, _, _ in items.pref] + [r for _, r, _ in items.pref]
            n = len(items.pref)
            lp, _ = sequence_logprobs(model, seqs, ec.batch_size, pad)
            margins = [lp[i] - lp[n + i] for i in range(n)]
            families = [f for _, _, f in items.pref]
            pref: dict[str, Any] = {
                "accuracy": _mean([float(m > 0) for m in margins]), "logp_margin": _mean(margins), "pairs": n,
                "by_family": {f: {"accuracy": _mean([float(m > 0) for m in v]), "pairs": len(v)}
                              for f, v in _group(list(zip(families, margins))).items()},
            }
            if reference is not None:
                ref, _ = sequence_logprobs(reference, seqs, ec.batch_size, pad)
                beta = cfg.dpo.beta
                rewards = [beta * ((lp[i] - ref[i]) - (lp[n + i] - ref[n + i])) for i in range(n)]
                pref.update(reward_margin=_mean(rewards), reward_accuracy=_mean([float(r > 0) for r in rewards]),
                            beta=beta)
            pref["seconds"] = round(time.time() - t0, 2)
            result["preference"] = pref
    finally:
        model.train(was_training)
    if not result:
        raise UserError("nothing to evaluate: the eval rows allow none of the requested metrics "
                        f"({', '.join(sorted(wanted))}); perplexity needs alpaca/chat/sharegpt/gemini/completion/text rows, "
                        "generation alpaca, completion or prompt rows with an answer, preference preference rows")
    return result


def eval_rows(cfg: Config):
    """eval.data, else data.eval, else the data.eval_fraction hold-out of data.train (as training held it out)."""
    from tunelab.data import load_rows, run_rows

    if cfg.eval.data:
        sources = cfg.eval.data
    elif cfg.data.eval:
        sources = cfg.data.eval
    elif cfg.data.eval_fraction:
        return run_rows(cfg, eval_sources=[]).eval
    else:
        raise UserError("no eval data: set eval.data or data.eval (a list of {path, format}), "
                        "or data.eval_fraction to hold out part of data.train")
    rows = []
    for source in sources:
        part = list(load_rows([source], skip_bad_rows=cfg.data.skip_bad_rows))
        rows += part[:cfg.eval.max_rows] if cfg.eval.max_rows else part
    return rows


def _model_path(cfg: Config, model_path: str | None) -> str:
    if model_path:
        return model_path
    run = cfg.run_dir
    if (run / run_files.FINAL).is_dir():
        return str(run)
    raise UserError(f"no trained model in output_dir {run} (no {run / run_files.FINAL}): train first, or name the "
                    "model to evaluate with --model DIR (a run dir, an adapter dir or a model dir)")


def run_eval(cfg: Config, model_path: str | None = None, out: str | None = None, say=print) -> dict:
    """`tunelab eval`: load the model, evaluate, write eval.json (default: in the model/run dir), print a table."""
    from tunelab.modeling.load import load_pretrained

    started = time.time()
    path = _model_path(cfg, model_path)
    rows = eval_rows(cfg)
    model, tokenizer = load_pretrained(path, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle)
    reference = None
    if cfg.eval.reference:
        reference = load_pretrained(cfg.eval.reference, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle)[0]
    result = evaluate(model, tokenizer, cfg, rows, reference=reference, say=say)
    params = sum(p.numel() for p in model.parameters())
    report = {"model": path, "params": params, "template": cfg.data.template, "rows": len(rows),
              "seconds": round(time.time() - started, 2), **result}
    out_path = Path(out) if out else Path(path) / run_files.EVAL_REPORT
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    _refresh_model_card(Path(path), out_path)
    say(format_table(report))
    say(f"written: {out_path}")
    return report


def _refresh_model_card(path: Path, eval_json: Path) -> None:
    """The model card of the evaluated run's final/ (or model dir) gains the eval table (modelcard reads eval.json
    beside the model or in its run dir)."""
    from tunelab.modelcard import run_config, write_model_card

    model_dir = path / "final" if (path / "final").is_dir() else path
    if (model_dir / "README.md").is_file() and eval_json.parent in (model_dir, model_dir.parent):
        write_model_card(model_dir, run_config(model_dir))


# ---------------------------------------------------------------- the table

def format_table(report: dict) -> str:
    """One row per metric, one column for all rows and one per task family."""
    families: list[str] = []
    for section in ("generation", "preference", "perplexity"):
        for f in report.get(section, {}).get("by_family", {}):
            if f not in families:
                families.append(f)
    families.sort()
    lines: list[list[str]] = [["metric", "all", *families]]
    if "generation" in report:
        g = report["generation"]
        lines.append([f"{g['scorer']} (n={g['rows']})", f"{g['score']:.3f}",
                      *(f"{g['by_family'][f]['score']:.3f}" if f in g["by_family"] else "-" for f in families)])
    if "preference" in report:
        p = report["preference"]
        lines.append([f"preference accuracy (n={p['pairs']})", f"{p['accuracy']:.3f}",
                      *(f"{p['by_family'][f]['accuracy']:.3f}" if f in p["by_family"] else "-" for f in families)])
        lines.append(["log p(chosen) - log p(rejected)", f"{p['logp_margin']:.3f}", *("" for _ in families)])
        if "reward_margin" in p:
            lines.append([f"implicit reward margin (beta {p['beta']})", f"{p['reward_margin']:.3f}",
                          *("" for _ in families)])
            lines.append(["implicit reward accuracy", f"{p['reward_accuracy']:.3f}", *("" for _ in families)])
    if "perplexity" in report:
        q = report["perplexity"]
        lines.append([f"perplexity ({q['tokens']} tokens)", f"{q['perplexity']:.3f}",
                      *(f"{q['by_family'][f]['perplexity']:.3f}" if f in q["by_family"] else "-" for f in families)])
        for source, v in q.get("by_source", {}).items():
            lines.append([f"  perplexity {Path(source).name}", f"{v['perplexity']:.3f}", *("" for _ in families)])
    widths = [max(len(row[c]) for row in lines) for c in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    head = f"eval of {report['model']} ({report['params']:,} parameters, {report['rows']} rows, {report['seconds']:.1f}s)"
    return "\n".join([head, *text])

