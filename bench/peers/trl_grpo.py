"""TRL's side of bench/grpo.py, run in TRL's own venv: GRPOTrainer on the spec's model, prompts and settings, with
step_clock timing every generate call and optimizer step. Usage: python trl_grpo.py SPEC.json (bench/grpo.py
writes the spec and reads back the result file it names)."""

import json
import sys

from step_clock import StepClock


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    clock = StepClock(spec["max_new_tokens"])
    clock.install()

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from grpo_reward import trl_reward

    tok = AutoTokenizer.from_pretrained(spec["model"])
    ids = [tok(text=p)["input_ids"] for p in spec["prompts"]]  # how GRPOTrainer tokenizes text prompts
    if ids != spec["prompt_ids"]:
        raise SystemExit("TRL's tokenization of the prompts differs from tunelab's: not the same work")
    sequences = spec["prompts_per_step"] * spec["group_size"]
    args = GRPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], seed=spec["seed"], use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=sequences // spec["micro_batch"],  # one optimizer step per generation
        num_generations=spec["group_size"], max_completion_length=spec["max_new_tokens"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", beta=spec["kl_coef"],
        bf16=False, gradient_checkpointing=False,  # TRL's defaults differ from tunelab's: fp32, no checkpointing
    )
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=trl_reward, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in spec["prompts"]]))
    trainer.train()
    clock.write(spec["result"], loss_type=args.loss_type, scale_rewards=args.scale_rewards, epsilon=args.epsilon,
                num_iterations=args.num_iterations, steps_per_generation=args.steps_per_generation,
                optim=str(args.optim))


if __name__ == "__main__":
    main(sys.argv[1])
