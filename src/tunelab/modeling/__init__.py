"""What a model is and how it runs: building one to train (build: load or build from scratch, quantize, attach
LoRA, save) and loading a finished one for inference (load), from scratch (scratch: tokenizer and architecture),
padding-free attention, MoE routers and their loss, gated MLPs, LoRA dropout, merging an adapter, autocast,
the CPU allocator setting, and generation (infer)."""
