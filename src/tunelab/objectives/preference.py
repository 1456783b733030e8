"""Preference pairs, shared by `method: reward` and `method: dpo`.

A `format: preference` row (see data.formats.to_preference) becomes one `PairItem`: prompt + chosen
and prompt + rejected, each rendered with the run's template and tokenized like SFT data (labels on the
reply turns only; over data.max_length the prompt is cut, data.truncation). The prompt tokens of both sides are identical:
rendering is per segment, so the shared prompt segments tokenize the same way.

Pairs that cannot teach anything are dropped and reported (count and first file:line), never trained
on: chosen identical to rejected (as written, or as tokens after truncation), and pairs left with no
response tokens on either side after truncation. If nothing is left, the run stops with that report.

A batch of B pairs is ONE padded tensor of 2B rows: the B chosen sequences, then the B rejected ones,
so both go through a single forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tunelab.config import Config, DataConfig, DataSource, UserError
from tunelab.objectives.base import Objective

if TYPE_CHECKING:
    from tunelab.data import Example, Message, PreferencePair, Row

log = logging.getLogger("tunelab")

IGNORE = -100
SHOW_LINES = 5  # file:line locations quoted per kind of dropped pair


@dataclass
class PairItem:
    chosen_ids: list[int]
    chosen_labels: list[int]  # -100 outside the chosen reply
    rejected_ids: list[int]
    rejected_labels: list[int]
    where: str  # file:line of the row
    margin: float | None = None  # optional per-row "margin" (reward models)
    truncated: bool = False
    ref_chosen: float | None = None  # reference log-probs, when precomputed (DPO)
    ref_rejected: float | None = None


# ---------------------------------------------------------------- rows -> pairs

def read_preference_rows(sources: list[DataSource], skip_bad_rows: bool, method: str):
    """(rows with their parsed pairs, file:line of rows whose chosen equals rejected, skipped count, first errors).

    Like data.load_rows, except that a row whose chosen equals its rejected does not stop the run: it is
    collected for the report. Every other malformed row raises with its file:line (or is skipped and
    counted with skip_bad_rows).
    """
    from tunelab.data import to_preference
    from tunelab.data.columns import remap
    from tunelab.data.readers import _expand, _read  # load_rows' reading, without its stop on identical pairs

    for source in sources:
        if source.format != "preference":
            raise UserError(
                f"data source {source.path} has format: {source.format}; method: {method} trains on "
                "format: preference rows ({prompt, chosen, rejected}, {messages, chosen, rejected}, hh-rlhf style "
                "{chosen, rejected}, or OpenAI's {input, preferred_output, non_preferred_output})")
    pairs: list[tuple[Row, PreferencePair]] = []
    identical: list[str] = []
    skipped, errors = 0, []
    for source in sources:
        for path in _expand(source.path):
            for item in _read(path):
                try:
                    if isinstance(item, UserError):
                        raise item
                    item.format = "preference"
                    item.data = remap(item.data, source)
                    if _same_raw_reply(item):
                        identical.append(item.where)
                        continue
                    pairs.append((item, to_preference(item)))
                except UserError as e:
                    # hh-rlhf dialogues can differ as text yet parse to the same turns
                    if str(e).endswith("are identical"):
                        identical.append(item.where)
                        continue
                    if not skip_bad_rows:
                        raise
                    skipped += 1
                    if len(errors) < SHOW_LINES:
                        errors.append(str(e))
    return pairs, identical, skipped, errors


def _same_raw_reply(row: Row) -> bool:
    chosen = row.data.get("chosen", row.data.get("preferred_output"))
    rejected = row.data.get("rejected", row.data.get("non_preferred_output"))
    return chosen is not None and chosen == rejected


def _row_margin(row: Row) -> float | None:
    value = row.data.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{row.where}: 'margin' must be a number, got {value!r}")
    return float(value)


def encode_reply(prompt: list[Message], reply: list[Message], tokenizer, data_cfg: DataConfig,
                 max_length: int | None = None) -> Example:
    """prompt + reply rendered with the run's template and tokenized; labels only on the reply's assistant turns.

    Assistant turns inside the prompt (multi-turn prompts) carry no label, and the template's text after
    the last reply (e.g. a newline after <|im_end|>) is dropped, so every sequence ends with the reply's
    end-of-turn token: the token a reward model is read at, and the one generation stops on.
    """
    from tunelab.data import render, tokenize_example

    try:
        in_prompt = sum(is_assistant for _, is_assistant in render(prompt, data_cfg.template, tokenizer))
        segments = render(prompt + reply, data_cfg.template, tokenizer)
    except UserError as e:
        raise UserError(f"data.template: {e}") from None
    masked, seen = [], 0
    for text, is_assistant in segments:
        if is_assistant:
            seen += 1
            is_assistant = seen > in_prompt
        masked.append((text, is_assistant))
    while masked and not masked[-1][1]:
        masked.pop()
    return tokenize_example(masked, tokenizer, max_length or data_cfg.max_length, train_on_prompt=False)


def fit_pair_prompt(prompt: list[Message], replies: list[list[Message]], tokenizer,
                    data_cfg: DataConfig) -> list[Message] | None:
    """The prompt, cut by data.truncation keep_response so that it fits with each reply (one prompt for all, so
    the sides share their prompt tokens); None when a reply alone cannot fit. `right` leaves it whole."""
    from tunelab.data.tokenize import UNLIMITED, fit_prompt

    if data_cfg.truncation == "right":
        return prompt

    def length(p):
        return max(len(encode_reply(p, r, tokenizer, data_cfg, UNLIMITED).input_ids) for r in replies)

    return fit_prompt(prompt, length, data_cfg.max_length, tokenizer)


def build_pairs(rows: list[tuple[Row, PreferencePair]], tokenizer, data_cfg: DataConfig):
    """PairItems, and the file:line of pairs dropped for having no response tokens / identical tokens."""
    from tunelab.data import num_loss_tokens

    items, no_response, identical = [], [], []
    for row, pair in rows:
        prompt = fit_pair_prompt(pair.prompt, [pair.chosen, pair.rejected], tokenizer, data_cfg)
        if prompt is None:
            no_response.append(row.where)
            continue
        chosen = encode_reply(prompt, pair.chosen, tokenizer, data_cfg)
        rejected = encode_reply(prompt, pair.rejected, tokenizer, data_cfg)
        if num_loss_tokens(chosen.labels) == 0 or num_loss_tokens(rejected.labels) == 0:
            no_response.append(row.where)
            continue
        if chosen.input_ids == rejected.input_ids:
            identical.append(row.where)  # e.g. the difference was cut off by truncation
            continue
        items.append(PairItem(chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels, row.where,
                              margin=_row_margin(row),
                              truncated=prompt is not pair.prompt or chosen.truncated or rejected.truncated))
    return items, no_response, identical


def drop_report(split: str, total: int, identical: list[str], no_response: list[str], max_length: int) -> str:
    def where(lines):
        more = f", ... {len(lines) - SHOW_LINES} more" if len(lines) > SHOW_LINES else ""
        return ", ".join(lines[:SHOW_LINES]) + more

    parts = []
    if identical:
        parts.append(f"{len(identical)} with chosen identical to rejected ({where(identical)})")
    if no_response:
        parts.append(f"{len(no_response)} whose response does not fit data.max_length={max_length} "
                     f"({where(no_response)})")
    return f"{split} data: dropped {len(identical) + len(no_response)} of {total} preference pairs: " + "; ".join(parts)


# ---------------------------------------------------------------- collation

def collate_pairs(items: list[PairItem], pad_id: int, padding_free: bool = False) -> dict:
    """input_ids / labels / attention_mask [2B, L]: rows 0..B-1 chosen, B..2B-1 rejected (right-padded); with
    `padding_free` the 2B sequences end to end in one row instead (data.collate_padding_free, doc_bounds in the
    same order). Also num_pairs, margin [B] (NaN where the row gave none) and, when precomputed, ref_chosen /
    ref_rejected [B]."""
    seqs = [(i.chosen_ids, i.chosen_labels) for i in items] + [(i.rejected_ids, i.rejected_labels) for i in items]
    if padding_free:
        from tunelab.data import Example, collate_padding_free

        batch = collate_padding_free([Example(list(ids), list(labels)) for ids, labels in seqs])
        del batch["num_loss_tokens"]
    else:
        length = max(len(ids) for ids, _ in seqs)

        def pad(rows, value):
            return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)

        batch = {
            "input_ids": pad([ids for ids, _ in seqs], pad_id),
            "labels": pad([labels for _, labels in seqs], IGNORE),
            "attention_mask": pad([[1] * len(ids) for ids, _ in seqs], 0),
        }
    batch["num_pairs"] = len(items)
    batch["margin"] = torch.tensor([float("nan") if i.margin is None else i.margin for i in items])
    if all(i.ref_chosen is not None for i in items):
        batch["ref_chosen"] = torch.tensor([i.ref_chosen for i in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([i.ref_rejected for i in items], dtype=torch.float32)
    return batch


# ---------------------------------------------------------------- the shared objective part

class PreferenceObjective(Objective):
    """Data, collation, units (pairs), preview and statistics for objectives trained on preference pairs."""

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.stats: dict = {}
        self.train_items: list[PairItem] = []
        self.eval_items: list[PairItem] = []

    def datasets(self):
        from tunelab.data import split_eval

        data = self.cfg.data
        if data.packing:
            raise UserError(f"data.packing: method {self.cfg.method} trains on padded (chosen, rejected) pairs; "
                            "packing is for sft and pretrain. Set data.packing: false")
        train_rows, train_same, skipped, errors = read_preference_rows(data.train, data.skip_bad_rows, self.cfg.method)
        eval_rows, eval_same, eval_skipped, eval_errors = (
            read_preference_rows(data.eval, data.skip_bad_rows, self.cfg.method) if data.eval else ([], [], 0, []))
        if not data.eval and data.eval_fraction:
            train_rows, eval_rows = split_eval(self.cfg, train_rows, [])
        self.train_items, train_stats = self._build("train", train_rows, train_same, required=True)
        self.eval_items, eval_stats = self._build("eval", eval_rows, eval_same, required=False)
        self.stats = {**train_stats, **{f"eval_{k}": v for k, v in eval_stats.items() if eval_rows or eval_same}}
        if skipped + eval_skipped:
            self.stats["skipped_bad_rows"] = skipped + eval_skipped
            self.stats["skipped_errors"] = (errors + eval_errors)[:SHOW_LINES]
        return self.train_items, self.eval_items

    def _build(self, split: str, rows, same: list[str], required: bool):
        items, no_response, identical = build_pairs(rows, self.tokenizer, self.cfg.data)
        identical = same + identical
        total = len(rows) + len(same)
        stats = {"pairs": len(items), "truncated": sum(i.truncated for i in items),
                 "dropped_identical": len(identical), "dropped_no_response": len(no_response),
                 "dropped_lines": (identical + no_response)[:SHOW_LINES]}
        if identical or no_response:
            report = drop_report(split, total, identical, no_response, self.cfg.data.max_length)
            if not items and (required or total):
                hint = " Raise data.max_length or shorten the responses." if no_response else ""
                raise UserError(f"no usable preference pairs: {report}.{hint}")
            log.warning(report)
        return items, stats

    def collate(self, items):
        return collate_pairs(items, self.tokenizer.pad_token_id, self.padding_free)

    def units(self, batch):
        return int(batch["num_pairs"])

    def preview(self, items, n):
        from tunelab.data import Example, preview

        examples = []
        for item in items[:n]:
            examples += [Example(item.chosen_ids, item.chosen_labels), Example(item.rejected_ids, item.rejected_labels)]
        text = preview(examples, self.tokenizer, 2 * n)
        return "(each pair shows chosen, then rejected)\n" + text

    def log_stats(self):
        return self.stats
