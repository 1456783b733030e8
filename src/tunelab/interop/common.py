"""What both peer mappings share: a Mapping that records, for every tunelab key it sets, which source keys it came
from; one note per source key mapped differently; and a refusal (UserError, the key named) for what tunelab cannot
honour. A key left unread is refused unless it is empty or listed as safe to drop."""

from __future__ import annotations

from typing import Any, Callable

from ..config import UserError

# (a path the config names, the key it came from) -> the path to read. The CLI reads paths as they are; the service
# passes its resolver, so a peer config's data paths are checked against its roots before anything is read.
Locate = Callable[[str, str], str]


def as_given(path: str, key: str) -> str:
    return path


def empty(value: Any) -> bool:
    """Unset in the peer's sense: null, false, "", [] or {} (their defaults: nothing to carry over)."""
    return value is None or value is False or value == "" or value == [] or value == {}


class Mapping:
    def __init__(self, source: dict, tool: str, where: str, locate: Locate = as_given):
        self.source, self.tool, self.where, self.locate = source, tool, where, locate
        self.config: dict = {}
        self.origin: dict[str, list[str]] = {}  # tunelab dotted key -> "source_key: value" it came from
        self.notes: list[str] = []  # "key: how it maps differently"
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.source.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return not empty(self.source.get(key))

    def set(self, dotted: str, value: Any, *keys: str) -> None:
        """Set config[dotted] = value; `keys` are the source keys it was read from (their values go in comments)."""
        node = self.config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.read.update(keys)
        self.origin.setdefault(dotted, []).extend(
            f"{k}: {_short(self.source[k])}" if self.source.get(k) is not None else f"{k} unset ({self.tool}'s default)"
            for k in keys)

    def note(self, key: str, text: str) -> None:
        self.read.add(key)
        self.notes.append(f"{self.tool} {key}: {text}")

    def refuse(self, key: str, why: str) -> UserError:
        value = self.source.get(key)
        return UserError(f"{self.where}: {self.tool} key '{key}' ({_short(value)}) cannot be honoured: {why}")

    def finish(self, droppable: dict[str, str]) -> None:
        """Every key not read: empty -> nothing to do; in `droppable` (key -> why it does not matter here) -> a
        note; anything else -> refused, named."""
        for key, value in self.source.items():
            if key in self.read or empty(value):
                continue
            if key in droppable:
                self.note(key, f"not carried over ({droppable[key]})")
            else:
                raise self.refuse(key, "tunelab has no equivalent; remove it or set it to null")


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def convert_by_steps(source: dict, tool: str, where: str, steps: tuple, droppable: dict[str, str],
                     locate: Locate = as_given) -> Mapping:
    """Run each peer's section mappers in order (the order keys appear in the converted YAML), then the KTO batch
    fix-up and the unread-key check."""
    m = Mapping(source, tool, where, locate)
    for step in steps:
        step(m)
    kto_batch(m)
    m.finish(droppable)
    return m


def copy_keys(m: Mapping, section: str, pairs) -> None:
    """(ours, theirs) pairs copied as they are into `section` where the source sets them."""
    for ours, theirs in pairs:
        if m.has(theirs):
            m.set(f"{section}.{ours}", m.get(theirs), theirs)


def dpo_label_smoothing(m: Mapping) -> None:
    if m.has("dpo_label_smoothing"):
        m.set("dpo.label_smoothing", m.get("dpo_label_smoothing"), "dpo_label_smoothing")
        m.set("dpo.loss", "label_smoothing", "dpo_label_smoothing")


# transformers' TrainingArguments names (both peers use them) that tunelab reads as they are.
TRAINER_KEYS = (("warmup_steps", "warmup_steps"), ("warmup_ratio", "warmup_ratio"), ("weight_decay", "weight_decay"),
                ("max_grad_norm", "max_grad_norm"), ("seed", "seed"), ("log_every", "logging_steps"),
                ("save_every", "save_steps"), ("eval_every", "eval_steps"), ("keep_checkpoints", "save_total_limit"))


def trainer_arguments(m: Mapping, extra: tuple = ()) -> None:
    """The TrainingArguments both peers pass through unchanged: TRAINER_KEYS (+ `extra` pairs), Adam's betas and
    length grouping."""
    copy_keys(m, "train", TRAINER_KEYS + extra)
    if m.has("adam_beta1") or m.has("adam_beta2"):
        m.set("train.adam_betas", [m.get("adam_beta1", 0.9), m.get("adam_beta2", 0.999)], "adam_beta1", "adam_beta2")
    if m.get("group_by_length"):
        m.set("train.group_by_length", True, "group_by_length")


def kto_batch(m: Mapping) -> None:
    """tunelab's KTO pairs each prompt with another row's completion of the same micro-batch (as TRL): a micro-batch
    of 1 becomes 2 with half the accumulation, the same rows per step."""
    train = m.config.get("train", {})
    if m.config.get("method") == "kto" and train.get("micro_batch_size", 1) < 2:
        accum = train.get("grad_accum", 1)
        m.set("train.micro_batch_size", 2)
        m.set("train.grad_accum", max(1, accum // 2))
        key = "micro_batch_size" if m.tool == "axolotl" else "per_device_train_batch_size"
        m.note(key, f"1 -> train.micro_batch_size: 2, grad_accum: {max(1, accum // 2)} (KTO's reference point "
                    "needs two rows per micro-batch)")


def optimizer(m: Mapping, key: str, names: dict[str, str]) -> None:
    value = m.get(key)
    if value is None:
        return
    if value not in names:
        raise m.refuse(key, f"tunelab's optimizers are adamw, adamw_8bit and paged_adamw_8bit "
                            f"(from {', '.join(sorted(names))})")
    m.set("train.optimizer", names[value], key)
    if names[value] == "adamw" and value not in ("adamw_torch", "adamw_torch_fused", "adamw"):
        m.note(key, f"{value} -> adamw (torch AdamW)")


def scheduler(m: Mapping, key: str) -> None:
    value = m.get(key)
    if value is None:
        return
    plain = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
    if value not in plain:
        raise m.refuse(key, "tunelab's schedules are cosine, linear and constant (each with warmup)")
    m.set("train.scheduler", plain[value], key)


def precision(m: Mapping, bf16_key: str = "bf16", fp16_key: str = "fp16") -> None:
    bf16, fp16 = m.get(bf16_key), m.get(fp16_key)
    if bf16 is True:
        m.set("train.precision", "bf16", bf16_key)
    elif fp16 is True:
        m.set("train.precision", "fp16", fp16_key)
    elif bf16 == "auto":  # both: bf16 where the device has it, else fp32
        m.set("train.precision", "auto", bf16_key)
    else:  # neither set: transformers' Trainer (both peers run on it) trains in fp32
        m.set("train.precision", "fp32", bf16_key, fp16_key)


# Chat template names shared by both tools that have a tunelab built-in of the same markup.
TEMPLATES = {"llama3": "llama3", "chatml": "chatml", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma",
             "phi3": "phi3", "phi_3": "phi3", "phi": "phi3", "alpaca": "alpaca", "mistral_v1": "mistral-v1",
             "mistral_v2v3": "mistral",
             "tokenizer_default": "auto", "empty": "none"}
# ChatML markup with the family's own default system prompt or reasoning block left out.
CHATML_FAMILIES = ("qwen", "qwen2", "qwen_25", "qwen2_5", "qwen3", "qwen3_nothink", "qwen3_5")


def template(m: Mapping, key: str, jinja_key: str | None = None) -> None:
    name = m.get(key)
    if name is None:
        return
    if name == "jinja" and jinja_key and m.has(jinja_key):
        m.set("data.template", m.get(jinja_key), key, jinja_key)
    elif name in TEMPLATES:
        m.set("data.template", TEMPLATES[name], key)
        if TEMPLATES[name] != name:
            m.note(key, f"{name} -> data.template: {TEMPLATES[name]}")
    elif name in CHATML_FAMILIES:
        m.set("data.template", "chatml", key)
        m.note(key, f"{name} -> data.template: chatml (the same turn markup; the family's default system prompt "
                    "and think block are not added)")
    else:
        raise m.refuse(key, f"no tunelab built-in template matches; use one of {', '.join(sorted(TEMPLATES))} "
                            "or give the Jinja template itself as data.template")
