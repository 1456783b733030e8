"""On-policy RL from prompts: what PPO and GRPO share, and PPO (RLHF as in InstructGPT); GRPO is in grpo.py.

How they fit the one loop. The loop hands an objective the prompt micro-batches of one window
(`micro_batch_size x grad_accum` prompts per rank) and asks `updates()` for the optimizer updates to make
from them. Here that is:

1. rollout: the policy (adapter enabled, eval mode, KV cache, left-padded batches) samples a response to
   each prompt (GRPO: `group_size` responses); one more forward pass gives their log-probs (and PPO's
   values), one under the reference gives the reference log-probs; the reward source scores the texts;
2. PPO: per-token rewards (-kl_coef * (log pi - log pi_ref), the score on the last token), GAE, whitened
   advantages; GRPO: group-normalised scores as every token's advantage;
3. `ppo_epochs` passes over the rollout, PPO in `minibatches` shuffled minibatches, each one optimizer
   update made of micro-batches of `micro_batch_size` sequences.

One loop step is one rollout batch: the LR schedule, `max_steps`, logging and checkpoints count rollout
batches, and a checkpoint always falls between rollouts, so resume needs no rollout buffer: the trainable
weights (the value head included: it is an objective-owned module), the optimizer, the RNG and the adaptive
KL coefficient (`state_dict`) restore the run exactly.

Units are response tokens: every loss is a sum over response tokens divided by the response tokens of the
whole update (all ranks), the token-level normalisation of TRL's GRPO default ("dapo") and of PPO's masked
means, invariant to how the update is split into micro-batches. Per-rollout statistics (reward, KL,
response length, ...) are returned as `value x units` so the loop's division gives back the value.

Dropout is switched off in the policy (TRL PPO does the same): with it the ratio pi / pi_old of the first
update would not be 1 and clipping would act on dropout noise. The reference is the base model with the
adapter disabled (LoRA / QLoRA) or a frozen copy of the initial weights (full fine-tuning).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from tunelab.config import Config, UserError
from tunelab.data import run_rows
from tunelab.objectives import losses as L
from tunelab.objectives import policy_losses as PL
from tunelab.objectives.base import Objective
from tunelab.objectives.forward import decoder_and_head
from tunelab.objectives.rewards import PromptItem, make_reward


def _pad_left(rows: list[torch.Tensor], width: int, value) -> torch.Tensor:
    return torch.stack([torch.cat([r.new_full((width - r.shape[-1],), value), r]) for r in rows])


def _pad_right(rows: list[torch.Tensor], width: int, value) -> torch.Tensor:
    return torch.stack([torch.cat([r, r.new_full((width - r.shape[-1],), value)]) for r in rows])


class RLObjective(Objective):
    """Shared by PPO and GRPO: prompt data, sampling, reward, reference, the rollout forward pass."""

    extra_models = True

    samples_per_prompt = 1

    def __init__(self, cfg: Config, tokenizer):
        from tunelab.data import stop_token_ids
        from tunelab.objectives.rewards import load_function

        super().__init__(cfg, tokenizer)
        self.key = cfg.method
        self.rc = getattr(cfg, cfg.method)
        if self.rc.reward_function is not None:
            load_function(self.rc.reward_function, f"{self.key}.reward_function")  # fail before loading models
        self.stop_ids = stop_token_ids(cfg.data.template, tokenizer)
        self.kl_coef = float(self.rc.kl_coef)
        self.stats: dict = {}
        self.reward = None
        self.ref_model = None
        self.device = torch.device("cpu")

    # -- data

    def _items(self, rows) -> tuple[list[PromptItem], int]:
        from tunelab.data import render, to_prompt, tokenize_example

        items, too_long = [], 0
        limit = self.cfg.data.max_length - self.rc.max_new_tokens
        for row in rows:
            if row.format != "prompt":
                raise UserError(f"{row.where}: method {self.key} trains on format: prompt rows ({{prompt}} or "
                                f"{{messages}}, optional answer); this source is format: {row.format}")
            p = to_prompt(row)
            try:
                segments = render(p.messages, self.cfg.data.template, self.tokenizer, add_generation_prompt=True)
            except UserError as e:
                raise UserError(f"{row.where}: {e}") from None
            ids = tokenize_example(segments, self.tokenizer, max_length=10**9, train_on_prompt=True).input_ids
            if len(ids) > limit:
                too_long += 1  # a cut prompt is another question: leave it out and count it
                continue
            items.append(PromptItem(ids, p.messages, p.answer, row.where, row.data))
        return items, too_long

    def datasets(self):
        data = self.cfg.data
        if data.max_length <= self.rc.max_new_tokens:
            raise UserError(f"data.max_length ({data.max_length}) must exceed {self.key}.max_new_tokens "
                            f"({self.rc.max_new_tokens}): prompt and response share it")
        rows = run_rows(self.cfg)
        train, long_train = self._items(rows.train)
        evals, long_eval = self._items(rows.eval)
        lengths = sorted(len(i.input_ids) for i in train) or [0]
        self.stats = {"prompts": len(train), "eval_prompts": len(evals), "prompt_length_max": lengths[-1],
                      "prompt_length_p50": lengths[len(lengths) // 2]}
        if long_train or long_eval:
            self.stats["dropped_too_long"] = long_train + long_eval
        if rows.skipped:
            self.stats["skipped_bad_rows"] = rows.skipped
        return train, evals

    def collate(self, items: list[PromptItem]) -> dict:
        width = max(len(i.input_ids) for i in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(i.input_ids)) + i.input_ids for i in items], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(i.input_ids)) + [1] * len(i.input_ids) for i in items],
                            dtype=torch.long)
        return {"prompt_ids": ids, "prompt_mask": mask, "items": list(items)}

    def preview(self, items: list[PromptItem], n: int) -> str:
        out = []
        for item in items[:n]:
            text = self.tokenizer.decode(item.input_ids)
            out.append(f"--- {item.where} ({len(item.input_ids)} prompt tokens, answer {item.answer!r})\n{text}")
        return "\n".join(out)

    def log_stats(self):
        return self.stats

    def units(self, batch: dict) -> int:
        if "response_mask" in batch:
            return int(batch["response_mask"].sum())
        return len(batch["items"])  # an eval batch of prompts: units are prompts

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))

    # -- setup

    def setup(self, model: nn.Module, dist=None, padding_free=None) -> None:
        super().setup(model, dist, padding_free)
        self.device = next(model.parameters()).device
        from tunelab.modeling.lora_dropout import DroppedInputLinear

        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            elif isinstance(module, DroppedInputLinear):  # LoRA dropout moved into lora_A by model.attach_adapter
                module.dropout_p = 0.0
        self.lora = hasattr(model, "disable_adapter")
        if not self.lora and self.needs_reference():
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.reward = self.reward_source()

    def reward_source(self):
        return make_reward(self.rc, self.key, self.device)

    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or bool(getattr(self.rc, "adaptive_kl", False))

    def _autocast(self):
        from tunelab.modeling.precision import precision_context

        return precision_context(self.cfg.train.precision, self.device)[0]()

    # -- sampling

    def sampling_kwargs(self, greedy: bool = False, max_new_tokens: int | None = None) -> dict:
        """Sample from softmax(logits / temperature) exactly (top_p aside): explicit neutral values for every
        other knob, since generate() fills unset ones from the model's generation_config (top_k, min_p,
        repetition_penalty, ...), which would make the sampling distribution differ from the policy's."""
        kw = dict(max_new_tokens=max_new_tokens or self.rc.max_new_tokens, eos_token_id=self.stop_ids,
                  pad_token_id=self.tokenizer.pad_token_id, use_cache=True, num_beams=1, min_length=0,
                  min_new_tokens=None, repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None,
                  sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                  forced_eos_token_id=None, exponential_decay_length_penalty=None)
        if greedy:
            return {**kw, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**kw, "do_sample": True, "temperature": self.rc.temperature, "top_p": self.rc.top_p, "top_k": 0,
                "typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: dict, repeat: int = 1, greedy: bool = False,
                 max_new_tokens: int | None = None) -> dict:
        """Sample responses for a prompt batch: left-padded prompts [N, P] and right-padded responses
        [N, R], each ending at (and including) its first stop token; `eos` tells which responses stopped."""
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        if repeat > 1:
            ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        was_training = model.training
        model.eval()
        try:
            with self._autocast():
                out = model.generate(input_ids=ids, attention_mask=mask, **self.sampling_kwargs(greedy, max_new_tokens))
        finally:
            model.train(was_training)
        response = out[:, ids.shape[1]:]
        stop = torch.isin(response, torch.tensor(self.stop_ids, device=response.device))
        has_stop = stop.any(-1)
        length = torch.where(has_stop, stop.int().argmax(-1) + 1, torch.full_like(has_stop, response.shape[1],
                                                                                    dtype=torch.long))
        resp_mask = (torch.arange(response.shape[1], device=response.device)[None] < length[:, None]).long()
        response = response.masked_fill(resp_mask == 0, self.tokenizer.pad_token_id)
        items = [item for item in batch["items"] for _ in range(repeat)]
        texts = self.tokenizer.batch_decode(response.masked_fill(resp_mask == 0, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        return {"prompt_ids": ids, "prompt_mask": mask, "response": response, "response_mask": resp_mask,
                "eos": has_stop, "items": items, "texts": [t.strip() for t in texts]}

    def score(self, rollout: dict) -> torch.Tensor:
        return self.reward(rollout["items"], rollout["texts"]).to(self.device)

    # -- forward passes

    def forward(self, model: nn.Module, batch: dict, values: bool = False, entropy: bool = False) -> dict:
        """Per-response-token log-probs of `batch["response"]` under `model` ([N, R], temperature-scaled
        logits as sampled), and optionally the value head's values and the policy entropy."""
        prompt_mask, resp_mask = batch["prompt_mask"], batch["response_mask"]
        ids = torch.cat([batch["prompt_ids"], batch["response"]], 1)
        mask = torch.cat([prompt_mask, resp_mask], 1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate counted them under left padding
        decoder, head = decoder_and_head(model)
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        start = prompt_mask.shape[1]
        h = hidden[:, start - 1:]  # h[t] predicts response token t; the last row predicts nothing
        logits = head(h)
        labels = torch.cat([ids[:, start - 1:start], batch["response"].masked_fill(resp_mask == 0, L.IGNORE_INDEX)], 1)
        out = {"logp": L.token_logprobs(logits, labels, temperature=self.rc.temperature)}
        if values:
            out["values"] = self.value_head(h[:, :-1].float()).squeeze(-1) * resp_mask
        if entropy:
            out["entropy"] = L.entropy_from_logits(logits[:, :-1] / self.rc.temperature, resp_mask)
        return out

    @torch.no_grad()
    def reference_logp(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return self.forward(self.ref_model, batch)["logp"]
        with model.disable_adapter():
            return self.forward(model, batch)["logp"]

    # -- rollouts

    def rollout(self, model: nn.Module, prompt_batches: list[dict]) -> dict:
        """Generate, score and evaluate one window of prompt batches: one dict of [N, ...] tensors."""
        t0 = time.time()
        parts = []
        for batch in prompt_batches:
            part = self.generate(model, batch, repeat=self.samples_per_prompt)
            part["scores"] = self.score(part)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), self._autocast():
                    part.update(self.rollout_forward(model, part))
            finally:
                model.train(was_training)
            parts.append(part)
        roll = self._concat(parts)
        roll["rollout_s"] = time.time() - t0
        return roll

    def rollout_forward(self, model, part: dict) -> dict:
        raise NotImplementedError

    def _concat(self, parts: list[dict]) -> dict:
        """One rollout from the parts of several generation batches: prompts left-padded to the longest,
        per-token tensors right-padded to the longest response."""
        P = max(p["prompt_ids"].shape[1] for p in parts)
        R = max(p["response"].shape[1] for p in parts)
        pad_id = self.tokenizer.pad_token_id
        out: dict = {}
        for key in parts[0]:
            values = [p[key] for p in parts]
            if isinstance(values[0], list):
                out[key] = [x for v in values for x in v]
            elif key in ("prompt_ids", "prompt_mask"):
                out[key] = torch.cat([_pad_left(list(v), P, 0 if key == "prompt_mask" else pad_id) for v in values])
            elif values[0].dim() == 2:
                out[key] = torch.cat([_pad_right(list(v), R, pad_id if key == "response" else 0) for v in values])
            else:
                out[key] = torch.cat(values)
        return out

    def micro_batch(self, roll: dict, idx: torch.Tensor, stats: dict) -> dict:
        """The rows `idx` of a rollout, trimmed of columns that are padding in every row."""
        prompt_mask = roll["prompt_mask"][idx]
        resp_mask = roll["response_mask"][idx]
        left = int((prompt_mask.cumsum(-1) == 0).sum(-1).min())
        right = int(resp_mask.sum(-1).max())
        out = {"stats": stats}
        for key, value in roll.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            value = value[idx]
            if key in ("prompt_ids", "prompt_mask"):
                value = value[:, left:]
            elif value.dim() == 2:
                value = value[:, :right]
            out[key] = value
        # attention_mask / input_ids let the loop count real tokens (throughput) like any batch
        out["attention_mask"] = torch.cat([out["prompt_mask"], out["response_mask"]], 1)
        out["input_ids"] = torch.cat([out["prompt_ids"], out["response"]], 1)
        return out

    def rollout_stats(self, roll: dict) -> dict[str, float]:
        m = roll["response_mask"]
        stats = {
            "reward": float(roll["scores"].mean()),
            "reward_std": float(roll["scores"].std()) if len(roll["scores"]) > 1 else 0.0,
            "response_length": float(m.sum(-1).float().mean()),
            "eos_fraction": float(roll["eos"].float().mean()),
            "rollout_s": float(roll["rollout_s"]),
        }
        if "ref_logp" in roll:
            stats["kl"] = float(L.masked_sum(roll["logp"] - roll["ref_logp"], m, -1).mean())
            stats["kl_coef"] = self.kl_coef
        return stats

    def penalised_scores(self, roll: dict) -> torch.Tensor:
        scores = roll["scores"].float()
        if self.rc.missing_eos_penalty is not None:
            scores = scores - self.rc.missing_eos_penalty * (~roll["eos"]).float()
        return scores

    def split(self, roll: dict, minibatches: int, epochs: int, stats: dict):
        n = roll["response"].shape[0]
        mb = self.cfg.train.micro_batch_size
        for _ in range(epochs):
            order = torch.randperm(n).to(roll["response"].device)
            for minibatch in order.tensor_split(minibatches):
                if len(minibatch):
                    yield [self.micro_batch(roll, idx, stats) for idx in minibatch.split(mb)]

    def updates(self, model, batches):
        roll = self.rollout(model, list(batches))
        yield from self.plan(roll)

    def plan(self, roll: dict):
        raise NotImplementedError

    # -- evaluation: greedy responses to held-out prompts, scored; eval_loss = -mean reward

    @torch.no_grad()
    def evaluate_batch(self, model, batch: dict):
        part = self.generate(model, batch, greedy=True)
        scores = self.score(part)
        n_tokens = part["response_mask"].sum()
        return -scores.sum(), {"reward": scores.sum(), "response_length": n_tokens.float()}

    @staticmethod
    def with_stats(metrics: dict, batch: dict, n: torch.Tensor) -> dict:
        for k, v in batch["stats"].items():
            metrics[k] = v * float(n)  # the loop divides metric sums by the update's units
        return metrics


class PPO(RLObjective):
    """PPO for RLHF (Ouyang et al. 2022; Huang et al., "The N implementation details of RLHF with PPO"):
    the value head is a linear layer on the policy's final hidden states (a shared trunk, as TRL's
    AutoModelForCausalLMWithValueHead: one forward gives log-probs and values, at no extra model copy)."""

    def setup(self, model, dist=None, padding_free=None):
        super().setup(model, dist, padding_free)
        from tunelab.modeling.load import unwrap

        hidden = unwrap(model).config.hidden_size
        self.value_head = nn.Linear(hidden, 1).to(self.device, torch.float32)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: neutral, no random baseline
        nn.init.zeros_(self.value_head.bias)

    def extra_modules(self):
        return {"value_head": self.value_head}

    def rollout_forward(self, model, part):
        out = self.forward(model, part, values=True)
        result = {"logp": out["logp"], "values": out["values"]}
        if self.needs_reference():
            result["ref_logp"] = self.reference_logp(model, part)
        return result

    def advantages(self, roll: dict) -> dict:
        """Per-token rewards, GAE advantages (raw and whitened) and returns of a rollout."""
        m = roll["response_mask"]
        kl = (roll["logp"] - roll["ref_logp"]) * m if "ref_logp" in roll else torch.zeros_like(roll["logp"])
        rewards = -self.kl_coef * kl
        last = m.sum(-1) - 1
        rows = torch.arange(len(last), device=m.device)
        rewards[rows, last] += self.penalised_scores(roll)
        if self.rc.whiten_rewards:
            rewards = L.whiten(rewards, m, shift_mean=False)
        adv, returns = PL.gae(rewards, roll["values"], m, self.rc.gamma, self.rc.lam)
        return {"rewards": rewards, "advantages_raw": adv, "advantages": L.whiten(adv, m), "returns": returns}

    def update_kl_coef(self, roll: dict) -> None:
        """Adaptive KL controller (Ziegler et al. 2019): move kl_coef so that the rollout KL approaches kl_target."""
        if not self.rc.adaptive_kl or "ref_logp" not in roll:
            return
        kl = L.masked_sum(roll["logp"] - roll["ref_logp"], roll["response_mask"], -1)
        total, n = self.reduce_sum(float(kl.sum())), self.reduce_sum(len(kl))
        mean_kl = total / n
        error = min(max(mean_kl / self.rc.kl_target - 1, -0.2), 0.2)
        self.kl_coef *= 1 + error * n / self.rc.kl_horizon

    def plan(self, roll):
        roll.update(self.advantages(roll))
        stats = self.rollout_stats(roll)
        stats["value"] = float(L.masked_mean(roll["values"], roll["response_mask"]))
        self.update_kl_coef(roll)
        roll["old_logp"], roll["old_values"] = roll.pop("logp"), roll.pop("values")
        yield from self.split(roll, self.rc.minibatches, self.rc.ppo_epochs, stats)

    def loss(self, model, batch):
        if "response_mask" not in batch:
            return self.evaluate_batch(model, batch)
        m = batch["response_mask"]
        n = m.sum()
        out = self.forward(model, batch, values=True, entropy=True)
        pg, clipfrac, approx_kl = PL.ppo_policy_loss(out["logp"], batch["old_logp"], batch["advantages"], m,
                                                    self.rc.clip_range)
        vf, vf_clipfrac = PL.ppo_value_loss(out["values"], batch["old_values"], batch["returns"], m, self.rc.vf_clip)
        metrics = {"pg_loss": pg.detach() * n, "vf_loss": vf.detach() * n, "clipfrac": clipfrac * n,
                   "approx_kl": approx_kl * n, "vf_clipfrac": vf_clipfrac * n,
                   "entropy": out["entropy"].detach().sum()}
        return (pg + self.rc.vf_coef * vf) * n, self.with_stats(metrics, batch, n)
