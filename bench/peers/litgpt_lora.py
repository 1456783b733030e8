"""litgpt 0.5.13 LoRA on the bench Llama: its converter accepts only built-in config names, so register the
model's Config, convert the HF weights, then run `finetune_lora` from Python. Args: MODEL_DIR ROWS OUT."""

import shutil
import sys
from pathlib import Path

from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import name_to_config
from litgpt.data import JSON
from litgpt.finetune.lora import setup
from litgpt.prompts import PromptStyle
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

model, rows, out = map(Path, sys.argv[1:4])
name_to_config["bench-llama"] = dict(
    name="bench-llama", block_size=1024, vocab_size=8192, padded_vocab_size=8192, n_layer=8, n_head=8, n_embd=512,
    n_query_groups=8, rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
    norm_eps=1e-6, mlp_class_name="LLaMAMLP", intermediate_size=1376, rope_base=10000)
ckpt = out / "bench-llama"
shutil.copytree(model, ckpt, dirs_exist_ok=True)
convert_hf_checkpoint(ckpt)
data_dir = out / "data"  # a folder with train + val files: all rows train (a single file would lose a split)
data_dir.mkdir(exist_ok=True)
shutil.copy(rows, data_dir / "train.jsonl")
(data_dir / "val.jsonl").write_text("".join(rows.read_text().splitlines(keepends=True)[:8]))


class Plain(PromptStyle):  # the prompt as is (the others add no template either)
    def apply(self, prompt, **kw):
        return prompt


# litgpt saves its hyper-parameters by re-parsing the command line as its own CLI, and its final merge rebuilds
# the model from that file: give it the command line these arguments would be (the LoRA shape above all)
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_query=True, lora_key=True, lora_value=True,
            lora_projection=True, lora_mlp=True, lora_head=False)
sys.argv[1:] = [str(ckpt), "--precision", "32-true", *(f"--{k}={str(v).lower()}" for k, v in LORA.items())]
setup(ckpt, out_dir=out / "run", precision="32-true", devices=1, **LORA,
      data=JSON(json_path=data_dir, mask_prompt=True, prompt_style=Plain(), num_workers=0),
      train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=8, micro_batch_size=8,
                      lr_warmup_steps=1, epochs=1, max_seq_length=1024),
      eval=EvalArgs(interval=10_000, max_new_tokens=1, max_iters=1, initial_validation=False, final_validation=False),
      optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-4, "weight_decay": 0.0}},
      logger_name="csv", seed=42)
