"""The run configuration: a pydantic schema, YAML loading, dotted overrides, friendly errors.

Configuration is data validated here, at the edge; everything inside works with these typed objects.
This module imports no torch: `tunelab validate` and `--help` stay fast.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """An error caused by the user's input: printed as one clear message, never a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- model / adapter

class InitConfig(Section):
    """Build a model from an architecture config instead of loading weights (pretraining from scratch)."""

    architecture: Literal["llama", "bert"] = "llama"
    hidden_size: int = Field(256, gt=0)
    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    max_position: int = Field(1024, gt=0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _shape(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"model.init.hidden_size ({self.hidden_size}) must be a multiple of model.init.heads ({self.heads})")
        if self.kv_heads is not None:
            if self.architecture == "bert":
                raise ValueError("model.init.kv_heads: bert has no grouped-query attention; leave kv_heads out")
            if self.heads % self.kv_heads:
                raise ValueError(f"model.init.heads ({self.heads}) must be a multiple of model.init.kv_heads ({self.kv_heads})")
        return self


class ModelConfig(Section):
    path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["nf4", "fp4"] | None = None
    double_quant: bool = True
    trust_remote_code: bool = False
    allow_pickle: bool = False
    init: InitConfig | None = None

    @model_validator(mode="after")
    def _path_or_init(self):
        if self.path is None and self.init is None:
            raise ValueError("set model.path (a model dir or hub id) or model.init (build from an architecture)")
        return self


class TokenizerConfig(Section):
    """Train a byte-level BPE tokenizer on the training text (used with model.init)."""

    train: bool = False
    vocab_size: int = Field(8192, gt=256)
    path: str | None = None  # a tokenizer dir to use instead of the model's


class AdapterConfig(Section):
    type: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = []
    rslora: bool = False
    dora: bool = False


# ---------------------------------------------------------------- data

PADDING_FREE_METHODS = ("sft", "dpo", "orpo")  # the objectives whose collate and loss take padding-free rows

Format = Literal["alpaca", "chat", "sharegpt", "gemini", "completion", "text", "preference", "kto", "prompt"]


class DataSource(Section):
    path: str
    format: Format = "chat"
    text_field: str = "text"
    # Files whose names differ from the format's (tunelab.data.columns): the format's field -> the file's column,
    # the format's message key (role/content, or from/value) -> the file's, and the file's role names -> the format's.
    columns: dict[str, str] = {}
    message_keys: dict[str, str] = {}
    roles: dict[str, str] = {}
    # Drop each row's leading system message (a `system` column, or a conversation's first turn when it is one);
    # axolotl's drop_system_message. System messages later in a conversation stay.
    drop_system: bool = False


class DataConfig(Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = []
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    template: str = "auto"  # auto | none | a built-in (tunelab/data/builtin_templates.py) | a Jinja template string
    max_length: int = Field(1024, gt=1)
    # Rows over max_length: keep_response cuts the prompt from the left (oldest turns first; the system message
    # and the response stay) and drops only rows whose response alone cannot fit; right cuts the tokens' end.
    truncation: Literal["keep_response", "right"] = "keep_response"
    train_on_prompt: bool = False
    skip_bad_rows: bool = False
    packing: bool = False
    # SFT and DPO: each micro-batch as one row of its sequences end to end, attention per document
    # (modeling/attention.py): no padding and no cross-document L x L mask, the same rows per step as padded batches.
    # auto: on for sft and dpo when the model keeps documents apart (checked at start, else a notice and padded
    # batches), off for other methods and with data.packing; true / false force it.
    padding_free: Union[bool, Literal["auto"]] = "auto"

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        from tunelab.data.builtin_templates import RENDER  # plain strings: no heavy import

        names = ["auto", "none", *RENDER]
        if value in names or "{%" in value or "{{" in value:
            return value
        close = difflib.get_close_matches(value, names, n=1, cutoff=0.5)
        raise ValueError(f"unknown template {value!r}: use one of {', '.join(names)} or a Jinja chat template"
                         + (f"; did you mean '{close[0]}'?" if close else ""))

    @model_validator(mode="after")
    def _padding_free(self):
        if self.padding_free is True and self.packing:
            raise ValueError("data.padding_free and data.packing are two ways to drop padding; choose one")
        return self


# ---------------------------------------------------------------- training

class TrainConfig(Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(4, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # MoE models: weight of the router load-balancing loss (Switch Transformer); null = the model config's
    # router_aux_loss_coef. Logged as router_aux_loss.
    router_aux_loss_coef: float | None = Field(None, ge=0)
    # Batch rows of similar length (sorted within windows of the seeded order, batches then shuffled): little
    # padding without packing's cross-document attention mask. See data.order.epoch_order.
    group_by_length: bool = False
    seed: int = 42
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(50, gt=0)
    save_every: int | None = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping_patience: int | None = Field(None, gt=0)
    max_bad_steps: int = Field(5, ge=1)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    progress: bool = True


class LogConfig(Section):
    tensorboard: bool = True
    wandb: dict[str, Any] | None = None
    mlflow: dict[str, Any] | None = None
    plot: bool = True


# ---------------------------------------------------------------- method-specific sections

class DPOConfig(Section):
    loss: Literal["sigmoid", "ipo", "label_smoothing", "simpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    gamma: float = 0.5  # SimPO target margin
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + nll_alpha x the chosen response's per-token NLL, so the
    # preferred answers do not lose likelihood while the margin grows. 0 = off.
    nll_alpha: float = Field(0.0, ge=0)
    precompute_reference: bool = False

    @model_validator(mode="after")
    def _smoothing(self):
        if self.loss == "label_smoothing" and self.label_smoothing == 0:
            raise ValueError("dpo.loss: label_smoothing (cDPO) needs dpo.label_smoothing > 0, e.g. 0.1")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("dpo.label_smoothing does not apply to loss: ipo (a squared loss); set it to 0")
        return self


class ORPOConfig(Section):
    beta: float = Field(0.1, gt=0)  # weight of the odds-ratio term against the chosen response's NLL (TRL: beta)


class KTOConfig(Section):
    beta: float = Field(0.1, gt=0)
    # Weights of the desirable / undesirable examples' losses; with unbalanced data the KTO paper keeps
    # desirable_weight x n_desirable / (undesirable_weight x n_undesirable) within [1, 4/3].
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class RewardConfig(Section):
    margin: float = 0.0


class RolloutConfig(Section):
    """Shared by ppo and grpo: how responses are sampled and scored."""

    reward_model: str | None = None  # an HF dir with a scalar head
    reward_function: str | None = None  # module:function
    judge: dict[str, Any] | None = None  # {path: ..., template: ...}
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    kl_coef: float = Field(0.05, ge=0)
    missing_eos_penalty: float | None = None


class PPOConfig(RolloutConfig):
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    vf_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    ppo_epochs: int = Field(4, gt=0)
    minibatches: int = Field(1, gt=0)
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)  # adaptive controller: sequences over which kl_coef may change ~20 %
    whiten_rewards: bool = False


class RewardSpec(Section):  # one of grpo.rewards: a source, its weight in the summed reward, a name for its logs
    function: str | None = None  # module:function, as reward_function
    model: str | None = None  # a reward model dir, as reward_model
    judge: dict[str, Any] | None = None  # as judge
    grader: dict[str, Any] | None = None  # an OpenAI grader (tunelab.graders)
    args: dict[str, Any] = {}  # a function's options (its keyword parameters), checked against its signature
    weight: float = 1.0
    name: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.function, self.model, self.judge, self.grader)) != 1:
            raise ValueError("each grpo.rewards entry names exactly one of function, model, judge or grader")
        if self.args and self.function is None:
            raise ValueError("args are a function's options: only a grpo.rewards entry with a function takes them")
        return self


class JudgeEndpoint(Section):  # grpo.judge_endpoint: the server score_model / label_model graders ask
    base_url: str = Field(pattern=r"^https?://")  # an OpenAI-compatible API root, e.g. http://HOST:8321/v1
    api_key_env: str | None = None  # the environment variable holding its API key: never the key itself
    timeout_s: float = Field(120.0, gt=0)  # per request


class GRPOConfig(RolloutConfig):  # the keys and their papers: README.md's GRPO section
    group_size: int = Field(4, gt=1)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    clip_range: float = Field(0.2, gt=0)
    clip_range_high: float | None = Field(None, gt=0)  # None: clip_range
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    overlong_buffer: int | None = Field(None, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    steps_per_generation: int = Field(1, gt=0)
    rewards: list[RewardSpec] = []
    graders: list[dict[str, Any]] = []
    judge_endpoint: JudgeEndpoint | None = None  # where model graders' judge is served (README: GRPO)
    dynamic_sampling_rounds: int = Field(0, ge=0)
    environment: str | None = None  # module:Class, multi-turn tool rollouts (objectives/multiturn.py)
    max_turns: int = Field(4, gt=0)  # assistant turns per rollout with an environment
    tools_in_prompt: bool = True  # False: the environment's tools run but are not described in the prompt

    def grader_entries(self) -> list[tuple[str, dict[str, Any]]]:
        """(config key, grader JSON) of every OpenAI grader here: grpo.rewards[i].grader, then grpo.graders[i]."""
        found = [(f"grpo.rewards[{i}].grader", s.grader) for i, s in enumerate(self.rewards) if s.grader]
        return found + [(f"grpo.graders[{i}]", g) for i, g in enumerate(self.graders)]


class TeacherConfig(Section):
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class DistillConfig(Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the distillation term; 1 - alpha goes to plain CE
    beta: float = Field(0.5, gt=0, lt=1)  # JSD interpolation
    on_policy: bool = False
    max_new_tokens: int = Field(64, gt=0)


class MLMConfig(Section):
    mask_prob: float = Field(0.15, gt=0, lt=1)
    whole_word: bool = False


class EvalConfig(Section):
    """`tunelab eval`: which rows, how generations are scored, what is measured."""

    data: list[DataSource] = []  # default: data.eval, else the data.eval_fraction hold-out of data.train
    scorer: str = "exact_match"  # exact_match | contains | module:function (called as f(prompt=, response=, answer=))
    metrics: list[Literal["perplexity", "generation", "preference"]] | None = None  # None: all the data allows
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0)
    max_rows: int | None = Field(None, gt=0)  # per source, the first ones
    reference: str | None = None  # a model/run dir: adds the DPO implicit reward margin (beta = dpo.beta)

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, value: str) -> str:
        import re

        if value not in ("exact_match", "contains") and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
            raise ValueError(f"must be exact_match, contains or module:function "
                             f"(e.g. tunelab.tasks:correctness_reward), got {value!r}")
        return value


Method = Literal["sft", "pretrain", "mlm", "reward", "dpo", "orpo", "kto", "ppo", "grpo", "distill"]


class OutputConfig(Section):
    """Where the finished model goes besides output_dir: a Hub repo, pushed at the end of training (HF_TOKEN)."""

    hub_model_id: str | None = None
    hub_private: bool = False


class Config(Section):
    model: ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    adapter: AdapterConfig | None = None
    data: DataConfig
    method: Method = "sft"
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    output_dir: str = "runs/default"
    output: OutputConfig = OutputConfig()
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    kto: KTOConfig = KTOConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    teacher: TeacherConfig | None = None
    distill: DistillConfig = DistillConfig()
    mlm: MLMConfig = MLMConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _combinations(self):
        if self.model.quantize and self.adapter is None:
            raise ValueError(
                "model.quantize needs an adapter: 4-bit weights cannot be trained directly "
                "(QLoRA trains a LoRA adapter on top of the quantized base); add an `adapter:` section"
            )
        if self.model.init is not None and self.adapter is not None:
            raise ValueError(
                "model.init builds random weights, which an adapter cannot usefully adapt; train the new model "
                "fully (leave out `adapter:`), then fine-tune its output with an adapter in a second run"
            )
        if self.data.padding_free is True and self.method not in PADDING_FREE_METHODS:
            raise ValueError(f"data.padding_free is implemented for method: sft, dpo and orpo (got {self.method}); use data.packing "
                             "or train.group_by_length")
        if self.method == "kto" and self.train.micro_batch_size < 2:
            raise ValueError("method: kto needs train.micro_batch_size >= 2: its KL reference point pairs each prompt "
                             "with another row's completion of the same micro-batch (as TRL's KTOTrainer)")
        if self.method == "distill" and self.teacher is None:
            raise ValueError("method: distill needs a `teacher: {path: ...}` section")
        if self.tokenizer.train and self.model.init is None:
            raise ValueError("tokenizer.train builds a vocabulary for a new model (model.init); a loaded model "
                             "keeps the tokenizer its embeddings were trained with")
        init = self.model.init
        if init is not None:
            if (init.architecture == "bert" and self.method not in ("mlm", "reward")) or (
                    init.architecture == "llama" and self.method == "mlm"):
                raise ValueError(f"method: {self.method} cannot train a model.init.architecture: {init.architecture} "
                                 "model; mlm needs an encoder (bert), the generative methods a decoder (llama)")
            if init.architecture == "bert" and self.data.max_length > init.max_position:
                raise ValueError(f"data.max_length ({self.data.max_length}) exceeds model.init.max_position "
                                 f"({init.max_position}): bert has a learned embedding per position")
        g = self.grpo
        if self.method == "grpo" and not (g.rewards or g.graders or any(
                x is not None for x in (g.reward_function, g.reward_model, g.judge, g.environment))):
            raise ValueError("method: grpo needs a reward: grpo.reward_function, grpo.reward_model, grpo.judge, "
                             "grpo.rewards, grpo.graders or an environment with get_reward")
        if g.overlong_buffer is not None and g.overlong_buffer > g.max_new_tokens:
            raise ValueError(f"grpo.overlong_buffer ({g.overlong_buffer}) must not exceed grpo.max_new_tokens "
                             f"({g.max_new_tokens}): it is the last stretch of the generation limit")
        if not g.tools_in_prompt and g.environment is None:
            raise ValueError("grpo.tools_in_prompt: false needs grpo.environment: without one there are no tools to "
                             "leave out of the prompt")
        if self.method == "ppo":
            section = self.ppo
            sources = [section.reward_model, section.reward_function, section.judge]
            if sum(s is not None for s in sources) != 1:
                raise ValueError(
                    f"method: {self.method} needs exactly one of {self.method}.reward_model, "
                    f"{self.method}.reward_function or {self.method}.judge"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


# ---------------------------------------------------------------- loading

def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def _section_fields(loc: tuple) -> list[str]:
    """Field names valid at the location of an error, for 'did you mean' suggestions."""
    cls: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        cls = _section_class(field.annotation)
    return list(cls.model_fields) if cls is not None and hasattr(cls, "model_fields") else []


def _section_class(annotation: Any):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
            lines.append(f"unknown config key '{path}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing config key '{path}'")
        elif e["type"] == "value_error":
            where = f"'{path}': " if loc else ""
            lines.append(f"{where}{e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"'{path}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {source}: " + "; ".join(lines)


def wants_padding_free(cfg: Config) -> bool:
    """Whether the run's micro-batches are meant to be padding-free: data.padding_free true, or auto for the methods
    that have them (without data.packing). At run time auto also needs the model to keep documents apart
    (tunelab.modeling.attention.choose checks it and otherwise falls back to padded batches)."""
    setting = cfg.data.padding_free
    return setting is True or (setting == "auto" and cfg.method in PADDING_FREE_METHODS and not cfg.data.packing)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None,
                source: str | None = None) -> Config:
    """Read YAML (or take a dict), apply `key=value` overrides, validate. Raises UserError. `source` names a dict's
    origin in errors."""
    source = source or (str(path) if path is not None else "(dict)")
    if data is None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:  # one line: file:line, what the parser found
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise UserError(f"{where}: not valid YAML: {what}" + (f" (column {mark.column + 1})" if mark else "")) from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: the config must be a mapping of sections (model:, data:, train: ...)")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
