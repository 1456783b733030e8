"""Over-long rows of an OpenAI fine-tuning job, found at job create: only there are the model, so its tokenizer and
chat template, known (an upload has neither).

OpenAI does not refuse a file for long examples: they are truncated to the model's token limit during fine-tuning
(its data-preparation cookbook: "examples may be over the 16,385 token limit, they will be truncated during
fine-tuning"). tunelab does the equivalent: the job's data.max_length is capped at the model's context window, and
rows over it are reported in one warning event (how many, their first lines, what the trainer does to them). The
trainer's data.truncation keep_response cuts a prompt from the left (oldest turns first) and drops a row whose reply
alone cannot fit; a reinforcement prompt that leaves no room for grpo.max_new_tokens is left out.

Each row is rendered and tokenized by the data layer as the trainer will (the run's tokenizer readied for its chat
template, modeling.build_tokenizer); no weights are loaded. The first MAX_CHECKED rows of each file are checked in
the request; a longer file's remaining rows are not, and the warning says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config import Config, DataSource, UserError
from tunelab.data import load_rows, render, to_messages, to_preference, to_prompt, tokenize_example
from tunelab.data.tokenize import UNLIMITED, tokenize_conversation

MAX_CHECKED = 1000  # rows per file tokenized during the create request: ~1 s, ~5 s when all are over-long (2 CPUs)
SHOW_LINES = 5  # line numbers named in the warning
HUGE = 10**7  # tokenizers without a known limit say model_max_length = 1e30


def context_window(model_path: str, tokenizer) -> int | None:
    """The model's real limit: max_position_embeddings (or n_positions) from its config, else the tokenizer's
    model_max_length when that is a real number; the smaller when both are known."""
    from transformers import AutoConfig

    limits = []
    adapter = Path(model_path) / "adapter_config.json"  # continuous tuning: the adapter's base has the config
    base = json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.is_file() else model_path
    if base and Path(base).is_dir():
        try:
            config = AutoConfig.from_pretrained(base)
        except (OSError, ValueError):
            config = None  # then the tokenizer's limit is what is known
        text = getattr(config, "text_config", None) or config
        limits += [v for v in (getattr(text, "max_position_embeddings", None), getattr(text, "n_positions", None))
                   if isinstance(v, int)]
    if 0 < (tokenizer.model_max_length or 0) < HUGE:
        limits.append(tokenizer.model_max_length)
    return min(limits) if limits else None


def check_lengths(cfg: Config, kind: str, tokenizer_model: str) -> tuple[Config, list[str]]:
    """(cfg with data.max_length capped at the context window, lines for the job's events: the cap as information,
    over-long rows as warnings, level warn). `tokenizer_model`:
    where the tokenizer is (for a job continuing from an `ft:` adapter, that adapter: the merged start model is
    written later by the job)."""
    from tunelab.modeling.build import build_tokenizer

    probe = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": tokenizer_model})})
    tokenizer, _ = build_tokenizer(probe)
    capped, notes = None, []
    window = context_window(tokenizer_model, tokenizer)
    if window is not None and cfg.data.max_length > window:
        capped = f"data.max_length lowered from {cfg.data.max_length} to the model's context window, {window} tokens"
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": window})})
    for param, sources in (("training_file", cfg.data.train), ("validation_file", cfg.data.eval)):
        for source in sources:
            note = _report(param, source, kind, tokenizer, cfg)
            if note:
                notes.append(note)
    return cfg, [capped] * bool(capped) + [f"warning: {n}" for n in notes]


def _report(param: str, source: DataSource, kind: str, tokenizer, cfg: Config) -> str | None:
    rows = load_rows([source])
    over, fate = [], {"cut": 0, "dropped": 0}
    for row in rows[:MAX_CHECKED]:
        try:
            outcome = _fate(row, kind, tokenizer, cfg)
        except UserError:
            continue  # the trainer names a row it cannot render; here only lengths are reported
        if outcome:
            over.append(row.where.rpartition(":")[2])
            fate[outcome] += 1
    unchecked = max(0, len(rows) - MAX_CHECKED)
    if not over:
        return f"{param}: rows after the first {MAX_CHECKED} were not checked for length ({unchecked} rows)" \
            if unchecked else None
    limit = cfg.data.max_length - (cfg.grpo.max_new_tokens if kind == "reinforcement" else 0)
    what = "prompt tokens (data.max_length less grpo.max_new_tokens)" if kind == "reinforcement" else "tokens"
    lines = ", ".join(over[:SHOW_LINES]) + (", ..." if len(over) > SHOW_LINES else "")
    how = "the prompt cut from the left, oldest turns first" if cfg.data.truncation == "keep_response" else \
        "cut at the end"
    why = "no room left for the sampled reply" if kind == "reinforcement" else "the reply alone does not fit"
    did = [f"{fate['cut']} cut to fit ({how})" if fate["cut"] else "",
           f"{fate['dropped']} left out of training ({why})" if fate["dropped"] else ""]
    more = f"; rows after the first {MAX_CHECKED} were not checked ({unchecked} rows)" if unchecked else ""
    count = f"{len(over)} row is" if len(over) == 1 else f"{len(over)} rows are"
    return (f"{param}: {count} over the job's limit of {limit} {what} (line{'s' * (len(over) > 1)} {lines}): "
            f"{'; '.join(d for d in did if d)}{more}")


def _fate(row, kind: str, tokenizer, cfg: Config) -> str | None:
    """None when the row fits data.max_length as the trainer tokenizes it, else "cut" or "dropped"."""
    data = cfg.data
    if kind == "supervised":
        whole = tokenize_conversation(to_messages(row, row.format), data.template, tokenizer,
                                      data.model_copy(update={"max_length": UNLIMITED}))
        if len(whole.input_ids) <= data.max_length:
            return None
        return "cut" if tokenize_conversation(to_messages(row, row.format), data.template, tokenizer, data) else \
            "dropped"
    if kind == "dpo":
        from tunelab.objectives.preference import encode_reply, fit_pair_prompt

        pair = to_preference(row)
        longest = max(len(encode_reply(pair.prompt, r, tokenizer, data, UNLIMITED).input_ids)
                      for r in (pair.chosen, pair.rejected))
        if longest <= data.max_length:
            return None
        return "cut" if fit_pair_prompt(pair.prompt, [pair.chosen, pair.rejected], tokenizer, data) else "dropped"
    # reinforcement: the prompt and its sampled reply share data.max_length (objectives.rl leaves a long one out)
    segments = render(to_prompt(row).messages, data.template, tokenizer, add_generation_prompt=True)
    ids = tokenize_example(segments, tokenizer, UNLIMITED, train_on_prompt=True).input_ids
    return "dropped" if len(ids) > data.max_length - cfg.grpo.max_new_tokens else None
