"""GRPO and the family that grew from it: DAPO, Dr. GRPO, GSPO, CISPO, as `grpo.*` keys of one objective.

A loop step is one rollout, as for PPO (rl.py): the window's prompts are sampled `group_size` times and scored
by every reward source (their weighted sum is the reward; each is logged apart); with
`dynamic_sampling_rounds` (DAPO) groups whose rewards all agree are replaced by groups of newly drawn
prompts. Advantages are the group-normalised rewards (`scale_rewards`). The rollout is then used for
`ppo_epochs` passes of `steps_per_generation` optimizer updates each; when there is more than one update the
sampling policy's log-probs are kept from the rollout (pi_old), otherwise pi_old is the policy itself and
the ratio is 1 with the policy's gradient. The loss of each type is policy_losses.grpo_loss, and the units the
loop divides by are that loss type's normaliser (sequences, tokens, sequences x max_new_tokens, or one per
micro-batch), so any micro-batch split gives TRL's loss. kl_coef 0 loads no reference at all.
"""

from __future__ import annotations

import time

import torch

from tunelab.config import UserError
from tunelab.objectives import losses as L
from tunelab.objectives import policy_losses as PL
from tunelab.objectives.base import move_to
from tunelab.objectives.rewards import function_options, load_function, make_judge, make_rewards
from tunelab.objectives.rl import RLObjective, _pad_right


class GRPO(RLObjective):
    """GRPO (Shao et al. 2024): `group_size` samples per prompt, group-normalised rewards as every token's
    advantage, no value model, k3 KL to the reference in the loss (weight kl_coef)."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        for i, spec in enumerate(self.rc.rewards):
            if spec.function is not None:  # fail before loading models
                key = f"grpo.rewards[{i}].function"
                function_options(load_function(spec.function, key), spec.function, spec.args, key)
        graders = self.rc.grader_entries()
        if graders:
            from tunelab.graders import GraderError, judge_models, validate

            for key, grader in graders:
                try:
                    validate(grader, allow_code=True)
                except GraderError as e:
                    raise UserError(f"{key}: {e}") from None
                if judge_models(grader):  # fail before loading models
                    make_judge(self.rc.judge_endpoint, key)
        self.sampler = None
        if self.rc.environment is not None:
            from tunelab.objectives.multiturn import MultiTurnSampler

            self.sampler = MultiTurnSampler(self, self.rc.environment)
            if not self.has_reward_source() and not hasattr(self.sampler.cls, "get_reward"):
                raise UserError(f"grpo.environment: {self.rc.environment} has no get_reward() and no other reward "
                                "is configured (grpo.reward_function, grpo.rewards, grpo.graders, ...)")
        self.pool: list = []  # the training prompts, which dynamic sampling draws from
        self._units_per_row = 1.0

    @property
    def samples_per_prompt(self):
        return self.rc.group_size

    def datasets(self):
        train, evals = super().datasets()
        self.pool = train
        return train, evals

    def reward_source(self):
        return make_rewards(self.rc, self.key, self.device, tools=self.sampler.tools if self.sampler else None)

    def has_reward_source(self) -> bool:
        rc = self.rc
        return any(x is not None for x in (rc.reward_function, rc.reward_model, rc.judge)) or bool(
            rc.rewards or rc.graders)

    def needs_old_logp(self) -> bool:
        # with one update per rollout pi_old is the policy itself: its log-probs are those of the update
        return self.rc.ppo_epochs > 1 or self.rc.steps_per_generation > 1

    # -- rollouts

    def score(self, part: dict) -> torch.Tensor:
        """The weighted sum of the reward sources (plus DAPO's overlong penalty); each source's scores are
        kept in the rollout as `reward/NAME` for logging."""
        parts, total = self.reward(part["items"], part["texts"]) if self.has_reward_source() else ({}, 0.0)
        envs = part.get("environments")
        if envs and hasattr(self.sampler.cls, "get_reward"):  # the environment owns a reward (TRL's get_reward)
            parts[self.sampler.cls.__name__] = torch.tensor([float(env.get_reward()) for env in envs])
            total = total + parts[self.sampler.cls.__name__]
        if self.rc.overlong_buffer is not None:
            lengths = part["response_mask"].sum(-1).cpu()
            parts["overlong"] = PL.overlong_penalty(lengths, self.rc.max_new_tokens, self.rc.overlong_buffer)
            total = total + parts["overlong"]
        for name, scores in parts.items():
            part[f"reward/{name}"] = scores.to(self.device)
        return total.to(self.device)

    def _sample(self, model, batch: dict) -> dict:
        if self.sampler is not None:
            part = self.sampler.generate(model, batch, repeat=self.rc.group_size)
        else:
            part = self.generate(model, batch, repeat=self.rc.group_size)
        part["scores"] = self.score(part)
        return part

    def rollout(self, model, prompt_batches: list[dict]) -> dict:
        t0 = time.time()
        roll = self._concat([self._sample(model, b) for b in prompt_batches])
        frac_zero = float(PL.zero_std_groups(roll["scores"], self.rc.group_size).float().mean())
        rounds = 0
        if self.rc.dynamic_sampling_rounds:
            roll, rounds = self._dynamic_sampling(model, roll)
        self._forward_passes(model, roll)
        roll["rollout_s"] = time.time() - t0
        roll["frac_reward_zero_std"], roll["sampling_rounds"] = frac_zero, rounds
        return roll

    def _rows(self, roll: dict, rows: torch.Tensor) -> dict:
        idx = rows.tolist()
        return {k: ([v[i] for i in idx] if isinstance(v, list) else v[rows]) for k, v in roll.items()}

    def _group_rows(self, keep: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(keep.repeat_interleave(self.rc.group_size)).squeeze(-1)

    def _dynamic_sampling(self, model, roll: dict) -> tuple[dict, int]:
        """DAPO's dynamic sampling (Yu et al. 2025): drop the groups whose rewards all agree (no advantage, no
        signal) and sample groups for newly drawn training prompts in their place, for at most
        `dynamic_sampling_rounds` more generation rounds. Returns (rollout, rounds used); when rounds run
        out the batch is smaller, and when no group has signal it is kept as drawn."""
        G, want = self.rc.group_size, roll["scores"].shape[0] // self.rc.group_size
        keep = ~PL.zero_std_groups(roll["scores"], G)
        kept, n_kept, rounds = [self._rows(roll, self._group_rows(keep))], int(keep.sum()), 0
        mb = self.cfg.train.micro_batch_size
        while n_kept < want and rounds < self.rc.dynamic_sampling_rounds:
            rounds += 1
            draw = torch.randint(len(self.pool), (want - n_kept,)).tolist()  # the global RNG: resumes exactly
            for s in range(0, len(draw), mb):
                batch = move_to(self.collate([self.pool[i] for i in draw[s:s + mb]]), self.device)
                part = self._sample(model, batch)
                ok = ~PL.zero_std_groups(part["scores"], G)
                kept.append(self._rows(part, self._group_rows(ok)))
                n_kept += int(ok.sum())
        if n_kept == 0:
            return roll, rounds
        out = self._concat([p for p in kept if p["scores"].numel()])
        return self._rows(out, torch.arange(min(n_kept, want) * G, device=out["scores"].device)), rounds

    def _forward_passes(self, model, roll: dict) -> None:
        """The sampling policy's log-probs (when kept) and the reference's, per generation-sized chunk."""
        old, ref = self.needs_old_logp(), self.needs_reference()
        if not (old or ref):
            return
        R = roll["response"].shape[1]
        logps, refs = [], []
        chunk = self.cfg.train.micro_batch_size * self.rc.group_size
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                for idx in torch.arange(roll["response"].shape[0], device=self.device).split(chunk):
                    batch = self.micro_batch(roll, idx, {})
                    if old:
                        logps.extend(self.forward(model, batch)["logp"])
                    if ref:
                        refs.extend(self.reference_logp(model, batch))
        finally:
            model.train(was_training)
        if old:
            roll["logp"] = _pad_right(logps, R, 0.0)
        if ref:
            roll["ref_logp"] = _pad_right(refs, R, 0.0)

    # -- the update plan

    def _batch_std(self, scores: torch.Tensor) -> torch.Tensor | None:
        """The std of the rewards of all ranks (scale_rewards: batch), Bessel-corrected as TRL's."""
        if self.rc.scale_rewards != "batch" or not (torch.distributed.is_available()
                                                    and torch.distributed.is_initialized()):
            return None
        x = scores.double()
        sums = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device).double()])
        torch.distributed.all_reduce(sums)
        total, squares, n = sums
        return ((squares - total * total / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt().to(scores.dtype)

    def _reward_stats(self, roll: dict) -> dict[str, float]:
        stats = {"frac_reward_zero_std": roll["frac_reward_zero_std"]}
        if self.rc.dynamic_sampling_rounds:
            stats["sampling_rounds"] = float(roll["sampling_rounds"])
        for key, value in roll.items():
            if key.startswith("reward/"):
                name = key.partition("/")[2]
                stats[f"rewards/{name}/mean"] = float(value.float().mean())
                stats[f"rewards/{name}/std"] = float(value.float().std()) if value.numel() > 1 else 0.0
        return stats

    def plan(self, roll):
        m = roll["response_mask"]
        if "tool_mask" in roll:  # tool results are the environment's words, never the policy's
            m = m * roll["tool_mask"]
        roll["loss_mask"] = m * roll["eos"][:, None] if self.rc.mask_truncated_completions else m.clone()
        scores = self.penalised_scores(roll)
        roll["advantages"] = PL.group_advantages(scores, self.rc.group_size, self.rc.scale_rewards,
                                                 batch_std=self._batch_std(scores))
        stats = self.rollout_stats(roll) if "logp" in roll else self._stats_without_logp(roll)
        stats.update(self._reward_stats(roll))
        if self.rc.mask_truncated_completions:
            stats["masked_completions"] = float((~roll["eos"]).sum())
        if "logp" in roll:
            roll["old_logp"] = roll.pop("logp")
        updates = list(self.split(roll, self.rc.steps_per_generation, self.rc.ppo_epochs, stats))
        rows = sum(b["response_mask"].shape[0] for b in updates[0])
        self._units_per_row = sum(self.units(b) for b in updates[0]) / max(rows, 1)
        yield from updates

    def _stats_without_logp(self, roll):
        stats = self.rollout_stats({k: v for k, v in roll.items() if k != "ref_logp"})
        if "ref_logp" in roll:
            stats["kl_coef"] = self.kl_coef  # the KL itself is measured in the update (kl, kl_k3)
        return stats

    @torch.no_grad()
    def evaluate_batch(self, model, batch: dict):
        if self.sampler is None:
            return super().evaluate_batch(model, batch)
        part = self.sampler.generate(model, batch, greedy=True)
        scores = self.score(part)
        return -scores.sum(), {"reward": scores.sum(), "response_length": part["response_mask"].sum().float()}

    def idle_metrics(self, batches: list[dict], units: int) -> dict[str, float] | None:
        """Every loss type does nothing when no token carries loss (mask_truncated_completions with every
        completion truncated): dapo would divide by 0 tokens, and the others would step the optimizer on zero
        gradients, which AdamW's weight decay and moments turn into a change. The rollout's statistics are logged."""
        if any("loss_mask" not in b or bool(b["loss_mask"].any()) for b in batches):
            return None
        return dict(batches[0]["stats"])

    def units(self, batch: dict) -> int:
        if "response_mask" not in batch:
            return len(batch["items"])  # an eval batch of prompts: units are prompts
        rows = batch["response_mask"].shape[0]
        if self.rc.loss_type == "grpo":
            return rows
        if self.rc.loss_type == "bnpo":
            return 1
        if self.rc.loss_type == "dr_grpo":
            return rows * self.rc.max_new_tokens
        return int(batch["loss_mask"].sum())

    def loss(self, model, batch):
        if "response_mask" not in batch:
            return self.evaluate_batch(model, batch)
        m = batch["loss_mask"]
        out = self.forward(model, batch, entropy=True)
        logp, ref = out["logp"], batch.get("ref_logp")
        rc = self.rc
        loss, n, st = PL.grpo_loss(logp, batch.get("old_logp"), batch["advantages"], m, loss_type=rc.loss_type,
                                   level=rc.importance_sampling_level, clip_low=rc.clip_range,
                                   clip_high=rc.clip_range_high, ref_logp=ref,
                                   beta=self.kl_coef if ref is not None else 0.0, max_length=rc.max_new_tokens)
        metrics = {"pg_loss": loss.detach(), "clip_low": st["clip_low"] * n, "clip_high": st["clip_high"] * n,
                   "clipfrac": (st["clip_low"] + st["clip_high"]) * n,
                   "entropy": L.masked_mean(out["entropy"].detach(), m) * n}
        if "old_logp" in batch:
            log_ratio = logp.detach() - batch["old_logp"]
            metrics["approx_kl"] = L.masked_mean(torch.exp(log_ratio) - 1 - log_ratio, m) * n
        if ref is not None:
            metrics["kl_k3"] = st["kl_k3"] * n
            if "kl" not in batch["stats"]:
                # sequence-level KL (sum of k1 over a response, mean over responses) as PPO logs it: the rows'
                # k1 sums times the rollout's units per row, which the loop divides by the update's units
                k1 = L.masked_sum(logp.detach() - ref, batch["response_mask"])
                metrics["kl"] = k1 * self._units_per_row
        return loss, self.with_stats(metrics, batch, n)
