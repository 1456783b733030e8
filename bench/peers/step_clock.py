"""The GRPO benchmark's instrument, installed the same way in tunelab's process and in TRL's (this file imports
neither): each `generate` call is timed and its tokens counted, and each optimizer step closes a training step.

A step runs from the end of the previous optimizer step to the end of its own; its generation time is the time
spent inside `GenerationMixin.generate` during it, and "update" is the rest (rewards, reference log-probs, the
loss forward and backward passes, the optimizer). Only plain-torch and transformers hooks are used, so both tools
are measured by the same code at the same points.
"""

from __future__ import annotations

import functools
import json
import time


class StepClock:
    def __init__(self, min_new_tokens: int):
        self.steps: list[dict] = []
        self._start, self._start_cpu = time.perf_counter(), time.process_time()
        self._gen = self._nothing_generated()
        self.min_new_tokens = min_new_tokens
        self.dtype = None  # the generating model's, seen at the first generate call

    def install(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.generate
        clock = self

        @functools.wraps(original)
        def generate(model, *args, **kwargs):
            # equal work: every completion runs to max_new_tokens (min_new_tokens keeps every stop token out)
            if kwargs.get("generation_config") is not None:
                kwargs["generation_config"].min_new_tokens = clock.min_new_tokens
            else:
                kwargs["min_new_tokens"] = clock.min_new_tokens
            clock.dtype = str(model.dtype)
            start, cpu = time.perf_counter(), time.process_time()
            out = original(model, *args, **kwargs)
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            g = clock._gen
            g["generate_s"] += time.perf_counter() - start
            g["generate_cpu_s"] += time.process_time() - cpu
            g["generated_tokens"] += (out.shape[1] - ids.shape[1]) * out.shape[0]
            g["prompt_tokens"] += int(mask.sum()) if mask is not None else ids.numel()
            g["sequences"] += out.shape[0]
            config = kwargs.get("generation_config") or model.generation_config
            stop = kwargs.get("eos_token_id", config.eos_token_id)
            stop = [stop] if isinstance(stop, int) else list(stop or [])
            g["stopped_early"] += int(torch.isin(out[:, ids.shape[1]:], torch.tensor(stop)).any(-1).sum())
            return out

        GenerationMixin.generate = generate
        hook = register_optimizer_step_post_hook(self._optimizer_stepped)
        self._undo = lambda: (setattr(GenerationMixin, "generate", original), hook.remove())

    def uninstall(self) -> None:  # for the test, which runs in a process that goes on
        self._undo()

    @staticmethod
    def _nothing_generated() -> dict:
        keys = ("generate_s", "generate_cpu_s", "generated_tokens", "prompt_tokens", "sequences", "stopped_early")
        return dict.fromkeys(keys, 0)

    def _optimizer_stepped(self, optimizer, args, kwargs) -> None:
        # wall time, and the process's CPU time (all its threads): on a shared machine the second moves less
        now, cpu = time.perf_counter(), time.process_time()
        step_s, step_cpu_s = now - self._start, cpu - self._start_cpu
        self.steps.append({"step_s": step_s, "update_s": step_s - self._gen["generate_s"], "step_cpu_s": step_cpu_s,
                           "update_cpu_s": step_cpu_s - self._gen["generate_cpu_s"], **self._gen})
        self._start, self._start_cpu = now, cpu
        self._gen = self._nothing_generated()

    def write(self, path: str, **extra) -> None:
        with open(path, "w") as f:
            json.dump({"steps": self.steps, "dtype": self.dtype, **extra}, f)
