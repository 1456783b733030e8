"""Kahneman-Tversky optimisation: `method: kto` (Ethayarajh et al. 2024) on unpaired rows, each one completion
labelled desirable or not (`format: kto`); `format: preference` sources are unpaired into one desirable and one
undesirable example per pair (as TRL's unpair_preference_dataset).

- Examples are tokenized like DPO's replies (preference.encode_reply: labels on the completion only; over
  data.max_length the prompt is cut, data.truncation) and kept as prompt ids + completion ids, so that collate can
  pair each prompt with another row's completion.
- The KL reference point z0 is TRL's: in each micro-batch, prompt i with completion i-1 (cyclically, TRL's
  "KL_completion_ids"), z0 = mean over those mismatched sequences of policy minus reference log-probs, detached and
  clamped at 0. Hence train.micro_batch_size >= 2 (checked with the config). The mismatched rows run under no_grad.
- The reference model is DPO's: the base with the adapter disabled (LoRA / QLoRA), or a frozen copy (full FT).
- The loss is losses.kto_loss summed over examples; units are examples, so the loop's mean is TRL's batch mean.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from tunelab.config import Config, UserError
from tunelab.objectives.base import Objective
from tunelab.objectives.forward import eval_mode, response_logprobs
from tunelab.objectives.losses import kto_loss
from tunelab.objectives.preference import IGNORE, SHOW_LINES, encode_reply, fit_pair_prompt, read_preference_rows

log = logging.getLogger("tunelab")


@dataclass
class KTOItem:
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_labels: list[int]  # IGNORE where the completion carries no loss
    desirable: bool
    where: str
    truncated: bool = False


def _rows(sources, skip_bad_rows: bool, method: str) -> list:
    """(file:line, UnpairedRow) of every source: format kto rows as they are, preference pairs unpaired."""
    from tunelab.data import UnpairedRow, load_rows, to_unpaired

    unpaired = []
    for source in sources:
        if source.format == "kto":
            unpaired += [(row.where, to_unpaired(row)) for row in load_rows([source], skip_bad_rows=skip_bad_rows)]
        elif source.format == "preference":
            pairs, _, _, _ = read_preference_rows([source], skip_bad_rows, method)
            for row, pair in pairs:
                unpaired += [(row.where, UnpairedRow(pair.prompt, pair.chosen, True)),
                             (row.where, UnpairedRow(pair.prompt, pair.rejected, False))]
        else:
            raise UserError(f"data source {source.path} has format: {source.format}; method: kto trains on format: kto "
                            "rows ({messages, label} or {prompt, completion, label}) or format: preference pairs")
    return unpaired


def build_items(rows: list, tokenizer, data_cfg) -> tuple[list[KTOItem], list[str]]:
    """KTOItems, and the file:line of rows dropped for a completion that cannot fit data.max_length."""
    from tunelab.data import num_loss_tokens

    items, dropped = [], []
    for where, row in rows:
        prompt = fit_pair_prompt(row.prompt, [row.completion], tokenizer, data_cfg)
        example = None if prompt is None else encode_reply(prompt, row.completion, tokenizer, data_cfg)
        if example is None or num_loss_tokens(example.labels) == 0:
            dropped.append(where)
            continue
        start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        items.append(KTOItem(example.input_ids[:start], example.input_ids[start:], example.labels[start:],
                             row.desirable, where, truncated=prompt is not row.prompt or example.truncated))
    return items, dropped


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    length = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def collate_kto(items: list[KTOItem], pad_id: int, max_length: int) -> dict:
    """input_ids / labels / attention_mask [B, L] (prompt + its completion, labels on the completion), the same
    under kl_* for prompt i + completion i-1 (cyclic; cut to max_length), desirable [B] bool, num_examples."""
    kl = [items[i - 1] for i in range(len(items))]  # items[-1] for i = 0: TRL's rotation
    main_ids = [i.prompt_ids + i.completion_ids for i in items]
    main_labels = [[IGNORE] * len(i.prompt_ids) + i.completion_labels for i in items]
    kl_ids = [(i.prompt_ids + k.completion_ids)[:max_length] for i, k in zip(items, kl)]
    kl_labels = [([IGNORE] * len(i.prompt_ids) + k.completion_labels)[:max_length] for i, k in zip(items, kl)]
    return {
        "input_ids": _pad(main_ids, pad_id), "labels": _pad(main_labels, IGNORE),
        "attention_mask": _pad([[1] * len(r) for r in main_ids], 0),
        "kl_input_ids": _pad(kl_ids, pad_id), "kl_labels": _pad(kl_labels, IGNORE),
        "kl_attention_mask": _pad([[1] * len(r) for r in kl_ids], 0),
        "desirable": torch.tensor([i.desirable for i in items]),
        "num_examples": len(items),
    }


class KTO(Objective):
    extra_models = True
    model_kind = "causal_lm"

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.kc = cfg.kto
        self.ref_model = None  # full fine-tuning: a frozen copy
        self.stats: dict = {}

    def datasets(self):
        from tunelab.data import split_eval

        data = self.cfg.data
        if data.packing:
            raise UserError("data.packing: method kto trains on padded prompt/completion rows; packing is for sft and "
                            "pretrain. Set data.packing: false")
        train_rows = _rows(data.train, data.skip_bad_rows, "kto")
        eval_rows = _rows(data.eval, data.skip_bad_rows, "kto") if data.eval else []
        train_rows, eval_rows = split_eval(self.cfg, train_rows, eval_rows)
        train, dropped = build_items(train_rows, self.tokenizer, data)
        evals, eval_dropped = build_items(eval_rows, self.tokenizer, data)
        self.stats = {"examples": len(train), "desirable": sum(i.desirable for i in train),
                      "truncated": sum(i.truncated for i in train), "dropped_too_long": len(dropped),
                      "too_long_lines": dropped[:SHOW_LINES]}
        if not train:
            raise UserError(f"no usable kto examples: {len(dropped)} of {len(train_rows)} rows have a completion that "
                            f"does not fit data.max_length={data.max_length} ({', '.join(dropped[:SHOW_LINES])})")
        if len(train) < self.cfg.train.micro_batch_size:
            log.warning("kto: fewer examples than train.micro_batch_size; the KL reference point uses what there is")
        self.train_items, self.eval_items = train, evals
        return train, evals

    def setup(self, model, dist=None, padding_free=None):
        super().setup(model, dist, padding_free)
        if self.cfg.adapter is None:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()

    def collate(self, items):
        return collate_kto(items, self.tokenizer.pad_token_id, self.cfg.data.max_length)

    def units(self, batch):
        return int(batch["num_examples"])

    @torch.no_grad()
    def _reference(self, model, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return response_logprobs(self.ref_model, batch)[0]
        with model.disable_adapter(), eval_mode(model):
            return response_logprobs(model, batch)[0]

    def loss(self, model, batch):
        main = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
        kl_batch = {k: batch[f"kl_{k}"] for k in ("input_ids", "labels", "attention_mask")}
        logps, _ = response_logprobs(model, main)
        with torch.no_grad():
            kl_logps, _ = response_logprobs(model, kl_batch)
        ref_logps, ref_kl_logps = self._reference(model, main), self._reference(model, kl_batch)
        kl = (kl_logps - ref_kl_logps).mean().clamp(min=0)
        desirable = batch["desirable"].to(logps.device)
        losses, rewards = kto_loss(logps, ref_logps, desirable, kl, beta=self.kc.beta,
                                   desirable_weight=self.kc.desirable_weight,
                                   undesirable_weight=self.kc.undesirable_weight)
        n = len(losses)
        signed = torch.where(desirable, rewards, -rewards)  # higher is better for both kinds
        return losses.sum(), {"kl": kl * n, "rewards/signed": signed.sum(), "logps": logps.detach().sum()}

    def preview(self, items, n):
        from tunelab.data import Example, preview

        examples = [Example(i.prompt_ids + i.completion_ids, [IGNORE] * len(i.prompt_ids) + i.completion_labels)
                    for i in items[:n]]
        kinds = ", ".join("desirable" if i.desirable else "undesirable" for i in items[:n])
        return f"(examples: {kinds})\n" + preview(examples, self.tokenizer, n)

    def log_stats(self):
        return self.stats
