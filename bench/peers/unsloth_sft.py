"""unsloth 2026.10.9 on CPU: FastLanguageModel + TRL SFTTrainer, completion-only loss. Args: MODEL_DIR ROWS OUT."""

import sys

import unsloth  # noqa: F401  (first: it patches transformers/trl)
import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

model_dir, rows, out = sys.argv[1:4]
model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=1024, dtype=torch.float32,
                                               load_in_4bit=False)
model = FastLanguageModel.get_peft_model(
    model, r=16, lora_alpha=32, lora_dropout=0.0, use_gradient_checkpointing=False, random_state=42,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
ds = load_dataset("json", data_files=rows)["train"]
ds = ds.map(lambda r: {"prompt": r["instruction"], "completion": " " + r["output"]}, remove_columns=ds.column_names)
args = SFTConfig(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=1, num_train_epochs=1,
                 learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                 save_strategy="no", report_to=[], completion_only_loss=True, max_length=1024, use_cpu=True,
                 bf16=False, fp16=False, seed=42)
SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args).train()
