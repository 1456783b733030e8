"""Knowledge distillation (method: distill): a student (`model`: a model dir, or model.init for a new, smaller
one) learns a teacher's (`teacher.path`) next-token distributions.

Per loss token: loss = alpha * D(teacher || student) + (1 - alpha) * CE(student, data token), with D one of
forward KL (Hinton et al. 2015), reverse KL (MiniLLM) or the generalised JSD of GKD (`distill.beta`), on
softmax(logits / temperature), times temperature^2 (losses.distill_loss). The CE term is at temperature 1. Loss
tokens are those SFT trains on: the assistant replies of SFT-format rows, every token of text rows; the data
pipeline (templates, truncation, packing) is SFT's.

The teacher is loaded once, on the student's device, in eval mode with requires_grad off; it is held by the
objective, not the trainable module, so it is neither optimised nor checkpointed nor wrapped by DDP. Logits of
both models exist only at loss positions, a chunk of rows at a time, and are recomputed in the backward pass
(memory: one chunk of [rows x vocab], not the batch's).

Student and teacher must share one tokenizer (the same token -> id map): the divergence compares the two
distributions id by id. A student built with model.init and no tokenizer settings takes the teacher's tokenizer.

On-policy (GKD, Agarwal et al. 2024; `distill.on_policy: true`): for each batch the student samples a reply
(temperature 1: its own distribution; at most `distill.max_new_tokens`) to the prompt of each row (everything
before the row's last labelled span: the last user turn for chat rows, just BOS for text rows), and the teacher
grades those tokens: the divergence term is computed on the student's samples. The CE term, which needs
reference answers, stays on the data's replies; the two are normalised by their own token counts over the whole
accumulation window (all ranks), so loss = alpha * mean D(samples) + (1 - alpha) * mean CE(data) for any
micro-batch split. Evaluation is always on the data's replies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.config import Config, UserError
from tunelab.objectives.base import Objective
from tunelab.objectives.chunks import head_chunk_rows
from tunelab.objectives.forward import causal_lm_loss, decoder_and_head, decoder_hidden, head_chunks, head_rows
from tunelab.objectives.losses import IGNORE_INDEX, distill_loss
from tunelab.objectives.sft import SFT

def check_same_vocabulary(student, teacher, teacher_path: str) -> None:
    """UserError unless both tokenizers map the same tokens to the same ids."""
    s, t = student.get_vocab(), teacher.get_vocab()
    if s == t:
        return
    only_s, only_t = sorted(set(s) - set(t)), sorted(set(t) - set(s))
    moved = sorted(k for k in set(s) & set(t) if s[k] != t[k])
    parts = [f"{len(s)} vs {len(t)} tokens"]
    if only_s:
        parts.append(f"only the student has {', '.join(map(repr, only_s[:3]))}")
    if only_t:
        parts.append(f"only the teacher has {', '.join(map(repr, only_t[:3]))}")
    if moved:
        parts.append(f"{len(moved)} tokens have other ids, e.g. {moved[0]!r}: {s[moved[0]]} vs {t[moved[0]]}")
    from tunelab.data.templates import CHATML_TOKENS

    hint = ""
    if only_s and set(only_s) <= set(CHATML_TOKENS) and not only_t and not moved:
        hint = (" (the student's tokens were added for the chatml template; use data.template: alpaca, or a "
                "teacher that has them)")
    raise UserError(
        f"teacher.path {teacher_path}: the teacher's vocabulary differs from the student's ({'; '.join(parts)}){hint}. "
        "Distillation compares the two next-token distributions id by id, so both need one tokenizer: use a teacher "
        "of the student's family, or build the student with model.init and no tokenizer settings (it then takes "
        "the teacher's tokenizer)")


def _chunk_terms(h, th, y, head, teacher_head, vocab: int | None, kind: str, temperature: float, beta: float):
    """(divergence sum, CE sum) for a chunk of loss rows: student hidden h, teacher hidden th, targets y."""
    s = head(h)
    with torch.no_grad():
        t = teacher_head(th)
    cut_s, cut_t = (s[:, :vocab], t[:, :vocab]) if vocab is not None else (s, t)
    ones = torch.ones(len(y), dtype=torch.bool, device=y.device)
    div, _ = distill_loss(cut_s, cut_t, ones, kind=kind, temperature=temperature, beta=beta, chunk_size=max(1, len(y)))
    ce = F.cross_entropy(s.float(), y, reduction="sum")
    return div, ce


class Distill(SFT):
    fused_head_loss = False
    heads_per_chunk = 2
    extra_models = True

    def __init__(self, cfg: Config, tokenizer):
        from tunelab.modeling.load import teacher_tokenizer

        super().__init__(cfg, tokenizer)
        self.dc = cfg.distill
        check_same_vocabulary(tokenizer, teacher_tokenizer(cfg.teacher.path), cfg.teacher.path)
        if self.dc.on_policy:
            if cfg.data.packing:
                raise UserError("distill.on_policy samples a reply per row; it needs unpacked rows (data.packing: false)")
            if cfg.train.distributed == "fsdp":
                raise UserError("distill.on_policy generates with the student outside the sharded forward pass, which "
                                "train.distributed: fsdp does not support; use distributed: ddp")
            self.stream = self.on_policy_stream  # only then: the class keeps the plain stream (the loop checks it)
        self.teacher = None
        self.vocab: int | None = None
        self.device = torch.device("cpu")

    # -- the teacher

    def setup(self, model, dist=None, padding_free=None):
        from tunelab.modeling.load import load_pretrained, unwrap

        Objective.setup(self, model, dist, padding_free)  # not SFT's: the distillation loss records no router loss

        self.device = next(model.parameters()).device
        try:
            teacher, _ = load_pretrained(self.cfg.teacher.path, dtype=self.cfg.teacher.dtype, device=self.device)
        except UserError as e:
            raise UserError(f"teacher.path: {e}") from None
        if hasattr(teacher, "merge_and_unload"):  # an adapter dir: fold it in, inference only
            teacher = teacher.merge_and_unload()
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        v, v_s, v_t = len(self.tokenizer), _head_rows(unwrap(model)), _head_rows(teacher)
        if min(v_s, v_t) < v:
            raise UserError(f"teacher.path {self.cfg.teacher.path}: an output layer has fewer rows (student {v_s}, "
                            f"teacher {v_t}) than the tokenizer has tokens ({v})")
        # Heads padded to different sizes: compare the distributions over the tokenizer's ids only
        self.vocab = None if v_s == v_t else v

    # -- loss

    def terms(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(divergence sum, CE sum, loss tokens) of a batch."""
        decoder, head = decoder_and_head(model)
        hidden = decoder_hidden(decoder, batch)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        h, y = hidden[:, :-1][keep], labels[keep]
        zero = hidden.new_zeros((), dtype=torch.float32)
        if self.teacher is None:
            raise RuntimeError("Distill.setup(model) loads the teacher; call it before computing losses")
        with torch.no_grad():
            t_decoder, t_head = decoder_and_head(self.teacher)
            th = decoder_hidden(t_decoder, batch)[:, :-1][keep]
        div, ce = zero, zero
        rows = head_chunk_rows(head_rows(model, head), heads=2)  # student and teacher logits exist at once
        args = (head, t_head, self.vocab, self.dc.loss, self.dc.temperature, self.dc.beta)
        for d, c in head_chunks(_chunk_terms, rows, (h, th, y), *args):
            div, ce = div + d, ce + c
        return div, ce, keep.sum()

    def loss(self, model, batch):
        alpha = self.dc.alpha
        div, ce, _ = self.terms(model, batch)
        if "reference" not in batch:
            total = alpha * div + (1 - alpha) * ce
            return total, {"loss": total.detach(), "kl": div.detach(), "ce": ce.detach()}
        # on-policy: divergence on the student's samples (this batch), CE on the data's replies, rescaled so
        # the loop's division by the sampled tokens of the window gives the per-token mean of each
        total = alpha * div
        metrics = {"kl": div.detach()}
        if alpha < 1:
            ce_ref, _ = causal_lm_loss(model, batch["reference"])  # SFT's CE: no teacher pass needed
            total = total + (1 - alpha) * batch["ce_scale"] * ce_ref
            metrics["ce"] = (batch["ce_scale"] * ce_ref).detach()
        metrics["loss"] = total.detach()
        return total, metrics

    def eval_cross_entropy(self, averaged):
        return averaged.get("eval_ce", averaged["eval_loss"])  # on-policy with alpha 1 trains no CE term

    # -- on-policy

    def on_policy_stream(self, model, batches):
        batches = list(batches)
        rolled = [self.rollout(model, b) for b in batches]
        n_gen = sum(int(r["num_loss_tokens"]) for r in rolled)
        n_ref = sum(int(b["num_loss_tokens"]) for b in batches)
        n_gen, n_ref = self.reduce_sum(n_gen), self.reduce_sum(n_ref)
        scale = n_gen / max(n_ref, 1)
        for r, b in zip(rolled, batches):
            r["reference"], r["ce_scale"] = b, scale
            yield r

    @torch.no_grad()
    def rollout(self, model, batch: dict) -> dict:
        """The batch's prompts with replies sampled from the student: input_ids, labels (the sampled tokens, each
        reply up to and including its first stop token), attention_mask, num_loss_tokens."""
        from tunelab.data import stop_token_ids
        from tunelab.modeling.precision import precision_context

        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        pad = self.tokenizer.pad_token_id
        prompts = []
        for row in range(ids.shape[0]):
            labelled = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
            end = labelled[-1] + 1 if labelled else int(mask[row].sum())
            unlabelled = (labels[row, :end] == IGNORE_INDEX).nonzero().flatten()
            start = int(unlabelled[-1]) + 1 if len(unlabelled) else 0  # where the last reply begins
            prompts.append(ids[row, :max(start, 1)])
        width = max(len(p) for p in prompts)
        prompt_ids = torch.stack([torch.cat([p.new_full((width - len(p),), pad), p]) for p in prompts])
        prompt_mask = torch.stack([torch.cat([p.new_zeros(width - len(p)), torch.ones_like(p)]) for p in prompts])
        stops = stop_token_ids(self.cfg.data.template, self.tokenizer)
        head_rows = _head_rows(model)
        sampling = dict(
            max_new_tokens=self.dc.max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True,
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_beams=1, min_length=0, min_new_tokens=None,
            repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None, typical_p=1.0, min_p=None,
            # ids past the tokenizer (a padded head) are never sampled: the teacher may not have them
            suppress_tokens=list(range(len(self.tokenizer), head_rows)) or None)
        was_training = model.training
        model.eval()
        try:
            with precision_context(self.cfg.train.precision, prompt_ids.device)[0]():
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **sampling)
        finally:
            model.train(was_training)
        reply = out[:, width:]
        is_stop = torch.isin(reply, torch.tensor(stops, device=reply.device))
        lengths = torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, torch.full_like(is_stop[:, 0], reply.shape[1], dtype=torch.long))
        rows = [torch.cat([p, reply[i, :int(lengths[i])]]) for i, p in enumerate(prompts)]
        total = max(len(r) for r in rows)
        new_ids = torch.full((len(rows), total), pad, dtype=ids.dtype, device=ids.device)
        new_labels = torch.full_like(new_ids, IGNORE_INDEX)
        new_mask = torch.zeros_like(new_ids)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            new_ids[i, :len(r)] = r
            new_labels[i, len(p):len(r)] = r[len(p):]
            new_mask[i, :len(r)] = 1
        return {"input_ids": new_ids, "labels": new_labels, "attention_mask": new_mask,
                "num_loss_tokens": (new_labels[:, 1:] != IGNORE_INDEX).sum()}


def _head_rows(model) -> int:
    from tunelab.modeling.load import unwrap

    return unwrap(model).get_output_embeddings().weight.shape[0]
