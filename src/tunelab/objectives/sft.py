"""Supervised fine-tuning: chat / instruction rows, loss on the assistant's tokens only (objectives/forward.py:
causal_lm_loss)."""

from __future__ import annotations

from tunelab.config import Config, UserError
from tunelab.objectives.base import Objective
from tunelab.objectives.forward import add_router_loss, causal_lm_loss_and_correct, router_loss


class SFT(Objective):
    fused_head_loss = True

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.stats: dict = {}

    def _examples(self, rows):
        from tunelab.data import build_sft_examples

        return build_sft_examples(rows, None, self.tokenizer, self.cfg.data)

    def _tokenized(self):
        """(train examples, eval examples, stats), unpacked: what the token cache stores."""
        from tunelab.data import run_rows

        rows = run_rows(self.cfg)
        train, stats = self._examples(rows.train)
        evals = self._examples(rows.eval)[0] if rows.eval else []
        if rows.skipped:
            stats["skipped_bad_rows"] = rows.skipped
            stats["skipped_errors"] = rows.skipped_errors
        return train, evals, stats

    def cache_key(self) -> dict:
        """Everything the tokenized examples depend on (see data.cache); packing and collation come after it."""
        from tunelab.data import cache

        data = self.cfg.data
        return {
            "objective": "sft",
            "train_files": cache.files_digest([s.path for s in data.train]),
            "eval_files": cache.files_digest([s.path for s in data.eval]),
            "data": data.model_dump(mode="json", exclude={"packing", "padding_free"}),
            "split_seed": self.cfg.train.seed if data.eval_fraction and not data.eval else None,
            "tokenizer": cache.tokenizer_digest(self.tokenizer),
            "code": cache.code_digest(),
        }

    def datasets(self):
        from tunelab.data import cache, pack_examples

        try:
            parts = self.cache_key() if cache.cache_dir() is not None else None
        except (OSError, UserError):  # an unreadable or missing file: let the loading report it
            parts = None
        if parts is None:
            train, evals, self.stats = self._tokenized()
        else:
            train, evals, self.stats, _ = cache.cached(parts, self._tokenized)
        if self.cfg.data.packing:
            train = pack_examples(train, self.cfg.data.max_length)
            evals = pack_examples(evals, self.cfg.data.max_length) if evals else []
        return train, evals

    def collate(self, items):
        from tunelab.data import collate, collate_padding_free

        if self.padding_free:
            return collate_padding_free(items)
        return collate(items, self.tokenizer.pad_token_id)

    def setup(self, model, dist=None, padding_free=None):
        super().setup(model, dist, padding_free)
        self.router = router_loss(model, self.cfg.train.router_aux_loss_coef)

    def loss(self, model, batch):
        # token_accuracy is summed like the loss (correct predictions per loss token): the loop's division by the
        # window's loss tokens makes it the fraction over the step's (or the eval set's) tokens
        router = getattr(self, "router", None)
        if router is None:
            total, n, correct = causal_lm_loss_and_correct(model, batch)
            return total, {"loss": total.detach(), "token_accuracy": correct}
        with router.record():
            total, n, correct = causal_lm_loss_and_correct(model, batch)
        return add_router_loss(router, total, n, batch, {"loss": total.detach(), "token_accuracy": correct})

    def eval_cross_entropy(self, averaged):
        return averaged["eval_loss"]

    def log_stats(self):
        return self.stats
