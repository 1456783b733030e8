"""Reward models: `method: reward`, a scalar head trained with the Bradley-Terry loss on preference pairs.

The model is `AutoModelForSequenceClassification` with num_labels=1 (model.build(kind="sequence_classification")),
fully fine-tuned or with LoRA (peft task_type SEQ_CLS puts the `score` head in modules_to_save, so it is
trained fully and saved with the adapter). Loss per pair: -log sigma(r_chosen - r_rejected - margin)
(losses.bradley_terry_loss), margin = the row's "margin" field if it has one, else reward.margin.

The reward of a sequence is the head applied to the final hidden state of its last real token (by the
attention mask): for tunelab-rendered text, the end-of-turn token of the reply. Use `load_reward_model`
and `score` to read rewards the same way elsewhere (PPO): they render prompt + response with the
template the reward model was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.objectives.losses import bradley_terry_loss
from tunelab.objectives.preference import PreferenceObjective


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row, fp32 [N], read at the last position where attention_mask is 1 (left or
    right padding). Decoder models with a `score` head run the head on that position only."""
    from tunelab.modeling.load import unwrap

    hf = unwrap(model)
    head = getattr(hf, "score", None)
    if head is None:  # e.g. encoder classifiers (pooler + classifier): their own forward pools
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    hidden = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(-1)
    return head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


class Reward(PreferenceObjective):
    model_kind = "sequence_classification"

    def loss(self, model, batch):
        n = int(batch["num_pairs"])
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
        r_c, r_r = scores[:n], scores[n:]
        margin = batch["margin"].to(scores.device)
        margin = torch.where(torch.isnan(margin), torch.full_like(margin, self.cfg.reward.margin), margin)
        losses = bradley_terry_loss(r_c, r_r, margin)
        with torch.no_grad():
            metrics = {
                "accuracy": (r_c > r_r).float().sum(),
                "margin": (r_c - r_r).sum(),
                "rewards/chosen": r_c.sum(),
                "rewards/rejected": r_r.sum(),
            }
        return losses.sum(), metrics


# ---------------------------------------------------------------- using a trained reward model

def load_reward_model(path: str, *, dtype: str = "auto", device: torch.device | None = None):
    """(model, tokenizer, data config) of a reward run: a run dir (its final/), a LoRA adapter dir (base + adapter
    incl. the trained score head) or a full / merged model dir. The data config (template, max_length) comes
    from the run's config.yaml when it is beside the model, else defaults (template auto)."""
    from tunelab.config import DataConfig, DataSource
    from tunelab.modeling.load import _run_config, load_pretrained, resolve_model_dir

    model, tokenizer = load_pretrained(path, dtype=dtype, device=device, kind="sequence_classification")
    run_cfg = _run_config(Path(resolve_model_dir(path)))
    data_cfg = run_cfg.data if run_cfg is not None else DataConfig(train=[DataSource(path="-")])
    return model, tokenizer, data_cfg


@torch.no_grad()
def score(model, tokenizer, data_cfg, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
    """Rewards [N] of responses to prompts (a prompt: a string or a list of messages ending with a user turn),
    rendered and tokenized exactly as reward training saw them."""
    from tunelab.objectives.preference import encode_reply

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs = []
        for prompt, response in zip(prompts[start:start + batch_size], responses[start:start + batch_size]):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            reply = [{"role": "assistant", "content": response}]
            seqs.append(encode_reply(messages, reply, tokenizer, data_cfg).input_ids)
        length = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (length - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs], device=device)
        out.append(reward_scores(model, ids, mask))
    return torch.cat(out)
