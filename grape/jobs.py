"""Fine-tuning jobs: what a client asks (an allow-list of TRL settings), the job as stored, its states.

The queue protocol a job goes through (queued, running on a trainer, ended; reaped when its trainer dies;
cancelled, resumed, deleted) is `grape.store.jobqueue.TRAINING`. A job's directory is
`GRAPE_TRAIN_DIR/<job id>` on its trainer; trainers remove those of deleted jobs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grape.chat_templates import NAME_PATTERN
from grape.strategies import DEFAULT_STRATEGY, SEED_MAX, SelectParams, StrategyName


class JobState(StrEnum):
    """Where a training job is. Terminal states never change again, except by an explicit resume."""

    queued = "queued"  # waiting for a trainer (new, handed back by a trainer shutting down, or resumed)
    running = "running"  # a live trainer holds it: materializing the selection, loading, training, saving
    succeeded = "succeeded"  # trained to the end; the final model (or LoRA adapter) is in `model_path`
    failed = "failed"  # an error, or its trainer died (see `error`); resumable from its last checkpoint
    cancelled = "cancelled"  # stopped on request; a running job saved a checkpoint of its last step first


OPERATOR_ONLY: dict[str, str] = {
    "output_dir": "a job always writes to GRAPE_TRAIN_DIR/<job id> on its trainer",
    "resume_from_checkpoint": "POST /v1/training-jobs/{id}/resume continues a job from its own checkpoints",
    "trust_remote_code": "the operator's GRAPE_TRUST_REMOTE_CODE_MODELS, per allowed model",
    "model_init_kwargs": "set by the trainer (dtype: hyperparameters.dtype)",
    "chat_template_path": "name a template in hyperparameters.chat_template",
    "report_to": "the operator's GRAPE_TRAIN_REPORT_TO on grape trainer",
    "logging_dir": "logs go to the job's own directory and to GET /v1/training-jobs/{id}/logs",
    "save_strategy": "a job checkpoints every save_steps",
    "use_cpu": "the trainer uses its accelerator when it has one",
    "deepspeed": "the operator's grape trainer --launcher accelerate --accelerate-config",
    "fsdp": "the operator's grape trainer --launcher accelerate --accelerate-config",
    "fsdp_config": "the operator's grape trainer --launcher accelerate --accelerate-config",
    "dataloader_num_workers": "the operator's GRAPE_TRAIN_DATALOADER_WORKERS",
    "dataset_num_proc": "set by the trainer",
    "push_to_hub": "jobs never push to a hub",
    "hub_token": "jobs never push to a hub",
    "hub_model_id": "jobs never push to a hub",
}
"""SFTConfig fields a request may not set, and where they come from instead (named in the 422)."""

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
SCHEDULERS += ("inverse_sqrt",)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "ademamix")
OPTIMIZERS += ("adamw_torch_8bit", "adamw_torch_4bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
OPTIMIZERS += ("paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit")
MAX_LENGTH_CAP = 131_072
"""Absolute cap of `max_length`; the trainer also refuses a length beyond the base model's context."""

_TARGET_MODULE = r"^[A-Za-z0-9_.]{1,100}$"
_BOUNDED = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraSpec(BaseModel):
    """A LoRA adapter (peft `LoraConfig`) instead of full fine-tuning."""

    model_config = _BOUNDED

    r: int = Field(16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(
        32, ge=1, le=16384, description="Scale numerator (peft `lora_alpha`); the update is scaled by alpha/r."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input (peft `lora_dropout`).")
    target_modules: (
        Annotated[list[Annotated[str, Field(pattern=_TARGET_MODULE)]], Field(min_length=1, max_length=64)]
        | Literal["all-linear"]
    ) = Field("all-linear", description='Module names to adapt (e.g. ["q_proj", "v_proj"]), or "all-linear".')


# ---- how each hyperparameter reaches TRL, declared on its field -------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What the trainer knows besides the job when it builds TRL's arguments: some hyperparameters resolve with it."""

    lora: bool
    """A LoRA adapter is trained (the learning rate's default)."""
    accelerator: bool
    """The trainer has a GPU or another accelerator (bf16's default)."""
    save_total_limit: int
    """The operator's cap of checkpoints kept (GRAPE_TRAIN_SAVE_TOTAL_LIMIT)."""
    sft_fields: frozenset[str]
    """SFTConfig's fields in the installed TRL: a setting renamed between releases goes by the name it has there."""
    chat: bool
    """The data is conversational (a chat template); False: plain prompt and completion."""
    model: str
    context: int | None = None
    """The base model's context length once its config is read (max_length is checked against it)."""


@dataclasses.dataclass(frozen=True)
class ToTrl:
    """How one hyperparameter reaches TRL, declared on its field (`Annotated[type, ToTrl(...)]`).

    `to`: the `SFTConfig` arguments it may set (empty: the field's own name; `a.b`: key b of the dict argument a),
    or, with `trainer=True`, the trainer's own setup (not an SFTConfig argument). `how(value, setup)`: the
    arguments it sets, `{target: value}` (default: the value as given, at `to[0]`). `unset_keeps_default`: None is
    not passed, so TRL's default applies. `note`: how the value is resolved, in one line, for the documentation."""

    to: tuple[str, ...] = ()
    how: Callable[[Any, TrainSetup], dict[str, Any]] | None = None
    unset_keeps_default: bool = False
    trainer: bool = False
    note: str = ""

    def targets(self, name: str) -> tuple[str, ...]:
        return self.to or (name,)

    def arguments(self, name: str, value: Any, setup: TrainSetup) -> dict[str, Any]:
        if value is None and self.unset_keeps_default:
            return {}
        if self.how is None:
            return {self.targets(name)[0]: value}
        return self.how(value, setup)


AS_GIVEN = ToTrl()
"""The SFTConfig argument of the same name, the value as given."""
UNSET_KEEPS_DEFAULT = ToTrl(unset_keeps_default=True, note="unset: TRL's default")
"""The SFTConfig argument of the same name when given; unset, TRL's default."""


def _learning_rate(value: float | None, setup: TrainSetup) -> dict[str, Any]:
    return {"learning_rate": value if value is not None else (1e-4 if setup.lora else 2e-5)}


def _max_length(value: int | None, setup: TrainSetup) -> dict[str, Any]:
    return {"max_length": checked_max_length(value, setup.context, setup.model)}


def _loss_on(value: bool, setup: TrainSetup) -> dict[str, Any]:
    if setup.chat:
        return {"assistant_only_loss": value}
    return {"assistant_only_loss": False, "completion_only_loss": value}


def _save_total_limit(value: int | None, setup: TrainSetup) -> dict[str, Any]:
    return {"save_total_limit": kept_checkpoints(value, setup.save_total_limit)}


def _bf16(value: bool | None, setup: TrainSetup) -> dict[str, Any]:
    # without a GPU: CPU training, fp32 unless bf16 is asked
    return {"bf16": value if value is not None else (None if setup.accelerator else False)}


def _checkpointing(value: bool, setup: TrainSetup) -> dict[str, Any]:
    # transformers 5.2x renamed it in some releases; the old name still works, with a warning
    new = "activation_checkpointing"
    return {new if new in setup.sft_fields else "gradient_checkpointing": value}


class Hyperparameters(BaseModel):
    """The TRL `SFTConfig` fields a request may set: an allow-list, each typed and bounded, each declaring how it
    reaches TRL (`ToTrl`). Any other name is refused (422 naming it); what touches code, files, the network or the
    machine is the operator's (`OPERATOR_ONLY`). Unset optional fields keep TRL's default."""

    model_config = _BOUNDED

    learning_rate: Annotated[
        float | None, ToTrl(how=_learning_rate, note="unset: 2e-5 for full fine-tuning, 1e-4 with LoRA")
    ] = Field(
        None, gt=0, le=1, description="Peak learning rate; default 2e-5 (TRL's) for full fine-tuning, 1e-4 with LoRA."
    )
    num_train_epochs: Annotated[float, AS_GIVEN] = Field(
        1.0, gt=0, le=1000, description="Passes over the selected set (when max_steps is -1)."
    )
    max_steps: Annotated[int, AS_GIVEN] = Field(
        -1, ge=-1, le=1_000_000, description="Optimizer steps; -1: num_train_epochs decides."
    )
    per_device_train_batch_size: Annotated[int, AS_GIVEN] = Field(
        8, ge=1, le=1024, description="Sequences per device per micro-batch."
    )
    gradient_accumulation_steps: Annotated[int, AS_GIVEN] = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    max_length: Annotated[
        int | None, ToTrl(how=_max_length, note="checked against the base model's context; unset: that context")
    ] = Field(
        1024,
        ge=8,
        le=MAX_LENGTH_CAP,
        description="Tokens per sequence (longer ones are truncated); with packing, the block length. At most the "
        "base model's context (checked by the trainer); null: the model's context.",
    )
    packing: Annotated[bool, AS_GIVEN] = Field(False, description="Pack several sequences into each max_length block.")
    packing_strategy: Annotated[Literal["bfd", "bfd_split", "wrapped"], AS_GIVEN] = Field(
        "bfd", description="TRL's packing strategy."
    )
    assistant_only_loss: Annotated[
        bool,
        ToTrl(
            to=("assistant_only_loss", "completion_only_loss"),
            how=_loss_on,
            note="chat data: assistant_only_loss; plain data: completion_only_loss (assistant_only_loss off)",
        ),
    ] = Field(
        True,
        description="Loss on the assistant turn only (the selected response); for a plain-template dataset, on the "
        "completion only (TRL completion_only_loss). False trains on prompt tokens too.",
    )
    loss_type: Annotated[Literal["nll", "dft"], AS_GIVEN] = Field(
        "nll", description="TRL's loss: nll, or dft (dynamic fine-tuning)."
    )
    lr_scheduler_type: Annotated[Literal[SCHEDULERS], AS_GIVEN] = Field(  # type: ignore[valid-type]
        "linear", description="Learning-rate schedule."
    )
    warmup_steps: Annotated[float, AS_GIVEN] = Field(
        0, ge=0, le=1_000_000, description="Warm-up steps; a value below 1 is a fraction of the run (a ratio)."
    )
    weight_decay: Annotated[float, AS_GIVEN] = Field(0.0, ge=0, le=1)
    max_grad_norm: Annotated[float, AS_GIVEN] = Field(
        1.0, ge=0, le=10_000, description="Gradient clipping norm; 0: no clipping."
    )
    optim: Annotated[Literal[OPTIMIZERS] | None, UNSET_KEEPS_DEFAULT] = Field(  # type: ignore[valid-type]
        None, description="Optimizer (transformers `optim`); default TRL's. The 8-bit ones need bitsandbytes."
    )
    adam_beta1: Annotated[float | None, UNSET_KEEPS_DEFAULT] = Field(None, ge=0, lt=1)
    adam_beta2: Annotated[float | None, UNSET_KEEPS_DEFAULT] = Field(None, ge=0, lt=1)
    adam_epsilon: Annotated[float | None, UNSET_KEEPS_DEFAULT] = Field(None, gt=0, le=1)
    neftune_noise_alpha: Annotated[float | None, UNSET_KEEPS_DEFAULT] = Field(
        None, gt=0, le=100, description="NEFTune embedding noise."
    )
    seed: Annotated[int, AS_GIVEN] = Field(42, ge=0, le=SEED_MAX)
    logging_steps: Annotated[float, AS_GIVEN] = Field(
        1, gt=0, le=1_000_000, description="Loss / learning rate reported every N steps (below 1: a fraction)."
    )
    save_steps: Annotated[float, AS_GIVEN] = Field(
        500,
        gt=0,
        le=1_000_000,
        description="Checkpoint every N steps (a value below 1: a fraction of the run); at most the operator's "
        "GRAPE_MAX_TRAIN_SAVES checkpoints over the run.",
    )
    save_total_limit: Annotated[
        int | None, ToTrl(how=_save_total_limit, note="at most GRAPE_TRAIN_SAVE_TOTAL_LIMIT; unset: that cap")
    ] = Field(
        None,
        ge=1,
        le=1000,
        description="Checkpoints kept, older ones deleted; at most (and by default) the operator's "
        "GRAPE_TRAIN_SAVE_TOTAL_LIMIT.",
    )
    bf16: Annotated[bool | None, ToTrl(how=_bf16, note="unset: TRL's default with an accelerator, off on CPU")] = Field(
        None, description="bf16 mixed precision; default TRL's (on unless fp16), off on CPU."
    )
    fp16: Annotated[bool | None, UNSET_KEEPS_DEFAULT] = Field(None, description="fp16 mixed precision (GPUs).")
    gradient_checkpointing: Annotated[
        bool | None,
        ToTrl(
            to=("activation_checkpointing", "gradient_checkpointing"),
            how=_checkpointing,
            unset_keeps_default=True,
            note="the name the installed TRL has; unset: TRL's default",
        ),
    ] = Field(None, description="Recompute activations; default TRL's (on).")
    dtype: Annotated[
        Literal["auto", "bfloat16", "float16", "float32"],
        ToTrl(to=("model_init_kwargs.dtype",), note="the dtype the base model is loaded in"),
    ] = Field(
        "float32", description="dtype the weights are loaded in (TRL's default; bf16 comes from mixed precision)."
    )
    chat_template: Annotated[
        str | None,
        ToTrl(trainer=True, note="the tokenizer's chat template, loaded by name before the data is rendered"),
    ] = Field(
        None,
        pattern=NAME_PATTERN,
        description="A training chat template by name (with {% generation %} markers), for models whose template "
        "grape cannot make training-compatible itself: one grape or TRL ships, or NAME.jinja in the operator's "
        "GRAPE_CHAT_TEMPLATE_DIR. Never a path.",
    )

    @model_validator(mode="before")
    @classmethod
    def _allowed_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                why = "; ".join(f"{k}: {OPERATOR_ONLY[k]}" for k in unknown if k in OPERATOR_ONLY)
                raise ValueError(
                    f"not allowed in a request: {', '.join(map(str, unknown[:10]))}"
                    + (f" ({why})" if why else "")
                    + f"; the allowed settings are {', '.join(cls.model_fields)}"
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> Hyperparameters:
        if self.max_steps == 0:
            raise ValueError("max_steps: 0 steps trains nothing; give -1 (epochs decide) or a positive number")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16: choose one mixed precision")
        return self


def hp_route(name: str) -> ToTrl:
    """How the hyperparameter `name` reaches TRL (its field's `ToTrl`)."""
    routes = [m for m in Hyperparameters.model_fields[name].metadata if isinstance(m, ToTrl)]
    if len(routes) != 1:
        raise TypeError(f"Hyperparameters.{name}: declare how it reaches TRL, one ToTrl in its annotation")
    return routes[0]


def trl_arguments(hp: Hyperparameters, setup: TrainSetup, *, trainer: bool = False) -> dict[str, Any]:
    """The job's hyperparameters as TRL takes them: `SFTConfig` arguments (a `a.b` target nested into the dict
    argument a), or with `trainer=True` the trainer's own settings (the chat template)."""
    out: dict[str, Any] = {}
    for name in Hyperparameters.model_fields:
        route = hp_route(name)
        if route.trainer is not trainer:
            continue
        for target, value in route.arguments(name, getattr(hp, name), setup).items():
            head, dot, key = target.partition(".")
            if dot:
                out.setdefault(head, {})[key] = value
            else:
                out[target] = value
    return out


for _name in Hyperparameters.model_fields:  # every field of the allow-list says how it reaches TRL
    hp_route(_name)


class JobRequest(SelectParams):
    """What a client asks: which selection (a strategy and the selection parameters), which model, how to train
    it."""

    model_config = _BOUNDED

    dataset_id: str = Field(min_length=1, max_length=200, description="A dataset whose scoring is done.")
    strategy: StrategyName = DEFAULT_STRATEGY
    base_model: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="Model to fine-tune, one of the operator's allowed models (GRAPE_ALLOWED_MODELS; by default "
        "the bundled `smollm2-135m` and the models live workers serve); default the dataset's target model "
        "(GRAPE selects what fits that model).",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter; null: full fine-tuning.")
    auto_resume: bool = Field(
        False, description="If the trainer running the job dies, queue it again to resume from its last checkpoint."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Runs in all with auto_resume; then the job fails.")


class JobSpec(JobRequest):
    """A job as stored and run: the request with the gateway's defaults filled in."""

    base_model: str
    template: str = Field("auto", description="The dataset's prompt template (auto, chat, plain).")
    selection_ref: str | None = Field(
        None,
        description="Server-only (experiments): train on the selection stored for this experiment arm "
        "(`exp-…/<arm>`, grape.experiments) instead of running the strategy.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_legacy(cls, data: Any) -> Any:
        """Specs stored by earlier versions may hold fields a request can no longer set (`output_dir`,
        pass-through hyperparameters such as `report_to`): they are dropped here, never used."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k in cls.model_fields}
        for name, model in (("hyperparameters", Hyperparameters), ("lora", LoraSpec)):
            sub = data.get(name)
            if isinstance(sub, dict):
                data[name] = {k: v for k, v in sub.items() if k in model.model_fields}
        return data


def new_job_fields(job_id: str, spec: JobSpec, now: float) -> dict[str, str]:
    """The fields of a new job hash."""
    return {
        "id": job_id,
        "state": JobState.queued.value,
        "spec": spec.model_dump_json(),
        "dataset_id": spec.dataset_id,
        "base_model": spec.base_model,
        "created": f"{now:.3f}",
        "attempts": "0",
        "auto_resume": "1" if spec.auto_resume else "0",
        "max_attempts": str(spec.max_attempts if spec.auto_resume else 1),
        "checkpoints": "[]",
    }


# ---- budgets: what one job may ask for (GRAPE_MAX_TRAIN_TOKENS, GRAPE_MAX_TRAIN_SAVES) --------------------


class OverBudget(ValueError):
    """A job asks for more than the operator's cap; the message names the setting, the figure and the cap."""


@dataclasses.dataclass(frozen=True)
class TrainBudget:
    """The work a job asks for, counted before it runs (an upper bound: packing and short sequences do less)."""

    steps: int
    """Optimizer steps of the whole run."""
    tokens: int
    """steps x effective batch (batch x accumulation x processes) x max_length."""
    saves: int
    """Checkpoints written over the run at save_steps."""


def save_every(save_steps: float, steps: int) -> int:
    """The step interval of checkpoints, as transformers reads save_steps: below 1, a fraction of the run."""
    every = math.ceil(steps * save_steps) if save_steps < 1 else math.floor(save_steps)
    return max(1, every)


def train_budget(
    hp: Hyperparameters, records: int, *, world_size: int = 1, max_length: int | None = None
) -> TrainBudget:
    """The job's steps, tokens and checkpoints over `records` selected records on `world_size` processes.
    `max_length`: the resolved length (the trainer knows the model's context); default the job's, or
    MAX_LENGTH_CAP when the job leaves it to the model (an upper bound)."""
    length = max_length or hp.max_length or MAX_LENGTH_CAP
    per_step = hp.per_device_train_batch_size * hp.gradient_accumulation_steps * max(1, world_size)
    if hp.max_steps > 0:
        steps = hp.max_steps
    else:  # transformers: ceil(batches per epoch / accumulation) steps per epoch, epochs may be fractional
        batches = math.ceil(max(1, records) / (hp.per_device_train_batch_size * max(1, world_size)))
        steps = max(1, math.ceil(math.ceil(batches / hp.gradient_accumulation_steps) * hp.num_train_epochs))
    return TrainBudget(steps=steps, tokens=steps * per_step * length, saves=steps // save_every(hp.save_steps, steps))


def check_budget(
    hp: Hyperparameters,
    records: int,
    *,
    max_tokens: int,
    max_saves: int,
    world_size: int = 1,
    max_length: int | None = None,
    where: str = "hyperparameters",
) -> TrainBudget:
    """The job's budget, or OverBudget naming GRAPE_MAX_TRAIN_TOKENS / GRAPE_MAX_TRAIN_SAVES, the figure asked
    and the cap."""
    b = train_budget(hp, records, world_size=world_size, max_length=max_length)
    if b.tokens > max_tokens:
        how = (
            f"max_steps {hp.max_steps}"
            if hp.max_steps > 0
            else f"{hp.num_train_epochs:g} epochs over {records} records = {b.steps} steps"
        )
        raise OverBudget(
            f"{where}: the job asks for {b.tokens:,} tokens of training ({how} x "
            f"{hp.per_device_train_batch_size} per_device_train_batch_size x {hp.gradient_accumulation_steps} "
            f"gradient_accumulation_steps x {max(1, world_size)} processes x "
            f"{max_length or hp.max_length or MAX_LENGTH_CAP} max_length), more than the operator's "
            f"GRAPE_MAX_TRAIN_TOKENS={max_tokens:,}: ask for fewer steps, epochs, a smaller batch or max_length"
        )
    if b.saves > max_saves:
        raise OverBudget(
            f"{where}.save_steps: {hp.save_steps:g} over {b.steps} steps writes {b.saves:,} checkpoints, more than "
            f"the operator's GRAPE_MAX_TRAIN_SAVES={max_saves:,}: give save_steps of at least "
            f"{math.ceil(b.steps / max_saves)}"
        )
    return b


def kept_checkpoints(asked: int | None, cap: int) -> int:
    """save_total_limit as run: the job's, never more than the operator's GRAPE_TRAIN_SAVE_TOTAL_LIMIT."""
    return min(asked, cap) if asked is not None else cap


def checked_max_length(asked: int | None, context: int | None, model: str) -> int:
    """The job's max_length: at most the model's context (an error naming both otherwise); unset: the context."""
    if asked is None:
        return min(context or MAX_LENGTH_CAP, MAX_LENGTH_CAP)
    if context is not None and asked > context:
        raise ValueError(
            f"hyperparameters.max_length {asked} is longer than the context of {model} ({context} tokens, "
            "max_position_embeddings): give at most that"
        )
    return asked
