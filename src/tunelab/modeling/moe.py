"""Mixture-of-experts models: where their experts and routers live, what LoRA targets in them, and the router
load-balancing loss.

transformers 5 stores a MoE layer's experts as fused 3-D parameters (`experts.gate_up_proj` [experts, 2 * ffn,
hidden], `experts.down_proj` [experts, hidden, ffn]) and its router as a module holding a weight parameter, not as
nn.Linear layers. PEFT adapts such parameters with `target_parameters` (lora.ParamWrapper: one low-rank update per
expert), which cannot apply dropout. Routers are left frozen unless named: retraining them moves every token to other
experts, which undoes more of the base model than any adapter on the experts.
"""

from __future__ import annotations

import torch
from torch import nn


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_moe_block(module: nn.Module) -> bool:
    return isinstance(getattr(module, "experts", None), nn.Module)


def expert_parameters(model) -> list[str]:
    """Full names of the fused expert weights (3-D parameters of each MoE block's `experts` module)."""
    names = []
    for name, module in model.named_modules():
        if _is_moe_block(module):
            experts = module.experts
            experts = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts  # under PEFT's LoRA
            for pname, p in experts.named_parameters(recurse=False):
                if p.ndim == 3:
                    names.append(f"{name}.experts.{pname}")
    return names


def router_modules(model) -> list[str]:
    """Full names of the routers: a MoE block's `gate`/`router`, and Qwen's gate of its shared expert."""
    names = []
    for name, module in model.named_modules():
        if _is_moe_block(module):
            for child in ("gate", "router", "shared_expert_gate"):
                if isinstance(getattr(module, child, None), nn.Module):
                    names.append(f"{name}.{child}")
    return names


def is_moe(model) -> bool:
    return bool(expert_parameters(model))


def leaf(name: str, depth: int = 1) -> str:
    return ".".join(name.split(".")[-depth:])


def all_linear_targets(model, linear_names: set[str]) -> tuple[list[str], list[str]]:
    """What `adapter.target_modules: all-linear` means on a MoE model: (module names: every linear layer but the
    output head and the routers, parameter names: every fused expert weight). Names are the short suffixes PEFT
    matches (`q_proj`, `experts.gate_up_proj`)."""
    routers = {leaf(n) for n in router_modules(model)}
    modules = sorted(linear_names - routers)
    params = sorted({leaf(n, 2) for n in expert_parameters(model)})
    return modules, params


def split_dropout(peft_model, dropout: float) -> None:
    """PEFT's ParamWrapper (LoRA on expert parameters) refuses lora_dropout != 0, so the adapter is made with dropout 0
    and the ordinary LoRA layers get `dropout` back here, module by module."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for name in module.lora_dropout:
                module.lora_dropout[name] = nn.Dropout(p=dropout)


# ---------------------------------------------------------------- router load-balancing loss

def aux_loss_coef(model, requested: float | None) -> float:
    """train.router_aux_loss_coef, defaulting to the model config's router_aux_loss_coef (0 for dense models)."""
    if requested is not None:
        return requested
    return float(getattr(text_config(model), "router_aux_loss_coef", 0.0) or 0.0) if is_moe(model) else 0.0


def routing(model) -> tuple[int, int]:
    """(experts per layer, experts per token)."""
    c = text_config(model)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    return int(experts), int(c.num_experts_per_tok)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer auxiliary loss (Fedus et al. 2022, eqs. 4-6) over all MoE layers together:
    num_experts * sum_e f_e * P_e, with f_e the fraction of (token, slot) routings that chose expert e among each
    token's top_k and P_e the mean router probability of e, both over the real tokens of every layer.
    router_logits: per layer [tokens, num_experts]; attention_mask [batch, seq] (1 = real token) or None."""
    logits = torch.cat([layer.float() for layer in router_logits])  # [layers * tokens, experts]
    probs = logits.softmax(-1)
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    if attention_mask is None:
        weight = probs.new_ones(probs.shape[0])
    else:
        weight = attention_mask.reshape(-1).to(probs).repeat(len(router_logits))
    total = weight.sum()
    tokens_per_expert = (chosen * weight[:, None]).sum(0) / total
    prob_per_expert = (probs * weight[:, None]).sum(0) / total
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


class RouterLoss:
    """Records the router logits of a forward (forward hooks on every router) and turns them into the weighted
    load-balancing term an objective adds to its summed loss.

    Accumulation: the loop divides each window's summed loss by its units (loss tokens, pairs). The aux loss is a
    mean over a micro-batch's tokens, so it is added as coef * aux * units(micro-batch): after the division each
    micro-batch's aux counts by its share of the window's units, and the window's term is coef x the unit-weighted
    mean of the micro-batch aux losses: one micro-batch of 8 rows and 4 of 2 add the same scale of term. (The aux
    loss itself is a product of two means, so splitting the tokens differently changes its value a little, as with
    transformers' own per-forward aux loss.)"""

    def __init__(self, model, coef: float):
        self.coef = coef
        self.num_experts, self.top_k = routing(model)
        self.routers = [module for name, module in model.named_modules() if name in set(router_modules(model))
                        and not name.endswith("shared_expert_gate")]
        self.logits: list[torch.Tensor] | None = None

    @classmethod
    def for_model(cls, model, requested: float | None) -> "RouterLoss | None":
        from tunelab.config import UserError

        if not is_moe(model):
            if requested:
                raise UserError(f"train.router_aux_loss_coef: {text_config(model).model_type} has no experts to "
                                "balance; leave it unset")
            return None
        coef = aux_loss_coef(model, requested)
        return cls(model, coef) if coef else None

    def _hook(self, module, args, output):
        if self.logits is not None:
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    def record(self):
        """Context manager: router logits of the forwards inside it are kept for `loss`."""
        import contextlib

        @contextlib.contextmanager
        def recording():
            self.logits = []
            handles = [r.register_forward_hook(self._hook) for r in self.routers]
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()
        return recording()

    def loss(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The load-balancing loss of the recorded forward (padding left out when the mask is 2-D)."""
        logits, self.logits = self.logits, None
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return load_balancing_loss(tuple(logits), self.num_experts, self.top_k, mask)
