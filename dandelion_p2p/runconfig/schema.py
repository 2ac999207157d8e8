"""The run config schema: one TOML file, read into frozen dataclasses and validated.

Every error names the key (``optimizer.lr``) and what was wrong, so the run owner can fix the
file. Unknown keys are errors too: a misspelt key silently ignored would train something else
than the owner thinks. The layout is documented in ``docs/run-config.md``.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.admission import MAX_ADMITTED, AdmissionConfig, is_ed25519_peer_id
from dandelion_p2p.runconfig.toml_text import dump_toml, plain

MAX_CONFIG_BYTES = 64 * 1024

DEFAULT_CHUNK_TIMEOUT = 10.0
"""Seconds a reducer waits for a sender's next valid chunk, and an averaging peer for a member's
writes to drain, before giving up on it (protocol/averaging.md section 11). The one default of
the run config's ``averaging.chunk_timeout``, ``AveragingSettings`` and ``AllReducePeer``."""

DEFAULT_GATHER_WINDOW = 5.0
"""Seconds between announcing for a round and reading the others' announcements
(protocol/averaging.md section 14.1). The one default of the run config's
``averaging.gather_window`` and ``MatchmakingSettings``."""

DEFAULT_MAX_WEIGHT = 1e6
"""Samples one member may claim for one averaging round; a larger announcement is clipped to it
and scored as a violation (protocol/averaging.md section 3). The one default of the run
config's ``averaging.max_weight`` and ``MatchmakingSettings``."""

MAX_INTEGER = 2**63
MAX_FRAGMENTS = 64
"""The most fragments a streaming run cuts its vector into (``sync.fragments``)."""
"""Integers are bounded like a signed 64-bit value: the trainer hands them to C code."""
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")

Family = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["auto", "epsilon", "v_prediction"]
Method = Literal["full", "lora"]
OptimizerName = Literal["adamw", "adamw8bit", "prodigy", "adafactor"]
ScheduleName = Literal["constant", "constant_with_warmup", "linear", "cosine",
                       "cosine_with_restarts", "polynomial"]
SyncMode = Literal["local_steps", "gradient"]
Codec = Literal["none", "fp16", "bf16", "int8", "int4", "int2"]
Aggregation = Literal["mean", "centered_clip"]
ExportWeights = Literal["auto", "ema", "raw"]
LoraLayers = Literal["attention", "transformer", "locon"]
LoraFormat = Literal["diffusers", "kohya"]
SavePrecision = Literal["auto", "fp16", "bf16", "fp32"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    base: str
    """A local diffusers folder, a single-file checkpoint, or a hub id (fetched at run time)."""
    family: Family = "sd1"
    prediction: Prediction = "auto"
    """auto: what the model's own scheduler config says (SD 2.x 768 models predict v; SD 1.x,
    SD 2.x 512-base and SDXL predict noise)."""
    revision: str = ""


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    method: Method = "lora"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_layers: LoraLayers = "attention"
    """attention: the attention projections; transformer: every linear layer of the UNet's
    transformer blocks (feed-forward, proj_in/out too) and of the text encoders (MLPs too), as
    kohya's LoRA; locon: that and the UNet's ResNet, down- and upsampling convolutions, as
    kohya's LoCon."""
    lora_conv_rank: int = 0
    """Rank of the 3x3 convolution adapters (locon); 0: lora_rank."""
    lora_conv_alpha: float = 0.0
    """Alpha of the 3x3 convolution adapters (locon); 0: lora_alpha."""
    lora_init: str = ""
    """A LoRA .safetensors file (kohya or diffusers layout) the adapters start from; every
    peer needs the same file at this path."""
    lora_init_sha256: str = ""
    """SHA-256 (hex) of ``lora_init``; when set, a peer with another file refuses to start."""
    train_text_encoder: bool = False
    resolution: int = 512
    bucketing: bool = True
    bucket_min: int = 256
    bucket_max: int = 1024
    bucket_step: int = 64
    batch_size: int = 4
    """Samples per peer per optimizer step (before the swarm)."""
    max_steps: int = 10_000
    """Global optimizer steps of the whole run."""
    seed: int = 42
    min_snr_gamma: float = 5.0
    """0 turns min-SNR weighting off."""
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9999
    sample_every: int = 0
    """Steps between sample images; 0 turns sampling off."""
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 25


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    name: OptimizerName = "adamw8bit"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """0 turns gradient clipping off."""
    unet_lr: float = 0.0
    """Learning rate of the UNet's parameters; 0: ``lr``."""
    text_encoder_lr: float = 0.0
    """Learning rate of the text encoders' parameters (``train_text_encoder``); 0: ``lr``."""
    d_coef: float = 1.0
    """Prodigy only: scales the step size Prodigy estimates."""


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    name: ScheduleName = "constant_with_warmup"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Floor of linear, cosine and polynomial decay, as a fraction of ``optimizer.lr``."""
    num_cycles: int = 1
    """cosine_with_restarts: how many cosine decays (each restarting at the full rate)."""
    power: float = 1.0
    """polynomial: the exponent of the decay (1: linear)."""


@dataclass(frozen=True, slots=True)
class SyncConfig:
    mode: SyncMode = "local_steps"
    local_steps: int = 50
    """H: local optimizer steps between two averaging rounds (local_steps mode)."""
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    """Nesterov momentum of the outer optimizer (local_steps mode)."""
    outer_step_alone: bool = False
    """Take the outer step in a round this peer had to itself. Off: a lone peer's weights are
    what its inner optimizer made of them (local_steps mode)."""
    overlap: bool | None = None
    """Average each round's pseudo-gradient while the next round's local steps train, and
    apply it one round late (local_steps mode; ``worker/overlap.py``). Unset: the mode's own
    value from construction on, true in local_steps mode and false in gradient mode."""
    fragments: int = 1
    """Streaming (with ``overlap``): the vector is cut into this many fragments, synced one at
    a time every local_steps / fragments steps, each over the local_steps steps since its own
    last sync (``worker/fragments.py``). 1: the whole vector every local_steps steps."""
    target_batch: int = 256
    """Samples the swarm accumulates before one lockstep optimizer step (gradient mode)."""

    def __post_init__(self) -> None:
        if self.overlap is None:  # one setting with that value written out, wherever compared
            object.__setattr__(self, "overlap", self.mode == "local_steps")

    @property
    def overlapped(self) -> bool:
        """Whether rounds are averaged while the next local steps train (``overlap``)."""
        return bool(self.overlap)


@dataclass(frozen=True, slots=True)
class AveragingConfig:
    codec: Codec = "fp16"
    aggregation: Aggregation = "mean"
    min_group: int = 2
    max_group: int = 16
    chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT
    gather_window: float = DEFAULT_GATHER_WINDOW
    max_weight: float = DEFAULT_MAX_WEIGHT


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    keep_rounds: int | None = None
    """Unset: what a joiner needs, by codec (``worker/served_rounds.py`` ``rounds_to_keep``)."""


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    lease_seconds: float = 900.0
    """How long a peer may hold a chunk before the dataset server leases it to another."""
    max_leases_per_peer: int = 4
    """Chunks one peer may hold at once, so no peer can take a whole epoch."""
    manifest: str = ""
    """BLAKE3 (hex) of the signed manifest (``dataset pack`` prints it). Peers then take
    leases and chunks only from servers of that manifest; empty: from any announced server."""


@dataclass(frozen=True, slots=True)
class SubsetConfig:
    """Settings of one subset: a folder directly under the training data folder. Unset
    (None) caption and augmentation settings are the ``[data]`` ones."""

    folder: str
    repeats: int = 0
    """Times each image trains per epoch; 0: the N of a kohya ``N_name`` folder, else 1."""
    loss_weight: float = 1.0
    """Multiplies the loss of this subset's images."""
    shuffle_caption: bool | None = None
    keep_tokens: int | None = None
    tag_dropout: float | None = None
    caption_dropout: float | None = None
    flip: bool | None = None
    random_crop: bool | None = None


@dataclass(frozen=True, slots=True)
class DataConfig:
    """How images and captions become training inputs (kohya sd-scripts' meanings)."""

    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of a caption at every draw."""
    keep_tokens: int = 0
    """Leading tags that stay first and are never shuffled or dropped."""
    tag_dropout: float = 0.0
    """Chance that each tag (after ``keep_tokens``) is left out of a draw."""
    flip: bool = False
    """Mirror an image left-right at random (each draw)."""
    random_crop: bool = False
    """Crop a random window of the scaled image rather than its centre."""
    clip_skip: int = 1
    """Use the text encoder's n-th layer from the end (1: the last); SD 1.x/2.x only."""
    max_token_length: int = 75
    """Caption tokens the text encoder reads: 75, 150 or 225 (chunks of 75, A1111-style)."""
    subsets: tuple[SubsetConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class ExportConfig:
    weights: ExportWeights = "auto"
    """Weights exported and sampled; auto: the EMA when training.ema is on, else the raw."""
    lora_formats: tuple[LoraFormat, ...] = ("diffusers", "kohya")
    """LoRA files: diffusers' ``pytorch_lora_weights.safetensors``, kohya/A1111 layout."""
    precision: SavePrecision = "auto"
    """Of the single-file checkpoint and the LoRA files; auto: fp16 for the single file, fp32
    for LoRA files. The diffusers folder keeps the fp32 master weights."""


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    """Validation loss on a held-out split of a local data folder (``worker/validation.py``)."""

    every_steps: int = 0
    """Global steps between validation losses; 0: none."""
    split: float = 0.0
    """Share of the images held out of training, chosen by content hash (the same on every
    peer); 0: none."""
    max_images: int = 64
    """Held-out images validated at most (the rest of the split trains neither)."""


@dataclass(frozen=True, slots=True)
class RunConfig:
    name: str
    model: ModelConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ConfigError("run config: " + "; ".join(problems))

    def exported_weights(self) -> Literal["ema", "raw"]:
        """The weights export and sample images use, ``export.weights`` resolved."""
        if self.export.weights == "auto":
            return "ema" if self.training.ema else "raw"
        return self.export.weights

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists): what ``from_dict`` reads back."""
        return plain(asdict(self))

    def to_toml(self) -> str:
        """A TOML text that ``loads`` reads back to an equal config."""
        return dump_toml(self.to_dict())


def loads(text: str | bytes) -> RunConfig:
    """Parse and validate a run config from TOML; raises ``ConfigError`` naming each problem."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"run config is {len(raw)} bytes, over the {MAX_CONFIG_BYTES} limit")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("run config is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run config is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError("run config is nested too deeply") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise ConfigError(f"run config is not valid TOML: {exc}") from None
    try:
        return from_dict(data)
    except RecursionError:
        raise ConfigError("run config is nested too deeply") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise ConfigError(f"run config: {exc}") from None


def from_dict(data: Any) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError("run config must be a table")
    return typing.cast(RunConfig, _build(RunConfig, data, ""))


# ------------------------------------------------------------------------------ validation


def validate(c: RunConfig) -> list[str]:
    out: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            out.append(f"{key}: {message}")

    need(bool(_NAME.fullmatch(c.name)), "name",
         f"1-64 of a-z, 0-9, '.', '_', '-', starting alphanumeric; got {c.name!r}")
    need(bool(c.model.base.strip()), "model.base", "must name a model folder, file or hub id")
    if c.model.family == "sdxl":
        need(c.model.prediction != "v_prediction", "model.prediction",
             "SDXL models predict noise (epsilon)")
    t = c.training
    need(1 <= t.lora_rank <= 1024, "training.lora_rank", "must be 1-1024")
    need(t.lora_alpha > 0, "training.lora_alpha", "must be > 0")
    need(0 <= t.lora_conv_rank <= 1024, "training.lora_conv_rank", "must be 0-1024 (0: lora_rank)")
    need(t.lora_conv_alpha >= 0, "training.lora_conv_alpha", "must be >= 0 (0: lora_alpha)")
    need(not t.lora_init or t.method == "lora", "training.lora_init", 'needs method = "lora"')
    need(t.lora_init_sha256 == "" or bool(_HEX_DIGEST.fullmatch(t.lora_init_sha256)),
         "training.lora_init_sha256", "must be 64 lowercase hex digits, or empty")
    for key, value in (("resolution", t.resolution), ("bucket_min", t.bucket_min),
                       ("bucket_max", t.bucket_max)):
        need(64 <= value <= 4096 and value % 8 == 0, f"training.{key}",
             f"must be a multiple of 8 in 64-4096, got {value}")
    need(t.bucket_step >= 8 and t.bucket_step % 8 == 0, "training.bucket_step",
         "must be a positive multiple of 8")
    need(t.bucket_min <= t.resolution <= t.bucket_max, "training.resolution",
         "must lie between bucket_min and bucket_max")
    need(1 <= t.batch_size <= 4096, "training.batch_size", "must be 1-4096")
    need(t.max_steps >= 1, "training.max_steps", "must be >= 1")
    need(t.seed >= 0, "training.seed", "must be >= 0")
    need(t.min_snr_gamma >= 0, "training.min_snr_gamma", "must be >= 0 (0: off)")
    need(0 <= t.noise_offset <= 1, "training.noise_offset", "must be 0-1")
    need(0 <= t.caption_dropout < 1, "training.caption_dropout", "must be in [0, 1)")
    need(0 < t.ema_decay < 1, "training.ema_decay", "must be in (0, 1)")
    need(t.sample_every >= 0, "training.sample_every", "must be >= 0 (0: off)")
    need(not (t.sample_every and not t.sample_prompts), "training.sample_prompts",
         "needed when sample_every is set")
    need(len(t.sample_prompts) <= 16 and all(len(p) <= 1000 for p in t.sample_prompts),
         "training.sample_prompts", "at most 16 prompts of 1000 characters")
    need(1 <= t.sample_steps <= 200, "training.sample_steps", "must be 1-200")
    va = c.validation
    need(va.every_steps >= 0, "validation.every_steps", "must be >= 0 (0: off)")
    need(0 <= va.split <= 0.5, "validation.split", "must be in [0, 0.5]")
    need(not (va.every_steps and not va.split), "validation.split",
         "needed when every_steps is set")
    need(1 <= va.max_images <= 4096, "validation.max_images", "must be 1-4096")
    o = c.optimizer
    need(0 < o.lr <= 1, "optimizer.lr", f"must be in (0, 1], got {o.lr}")
    need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    need(0 <= o.beta1 < 1, "optimizer.beta1", "must be in [0, 1)")
    need(0 <= o.beta2 < 1, "optimizer.beta2", "must be in [0, 1)")
    need(0 < o.eps < 1, "optimizer.eps", "must be in (0, 1)")
    need(o.max_grad_norm >= 0, "optimizer.max_grad_norm", "must be >= 0 (0: off)")
    for name, rate in (("unet_lr", o.unet_lr), ("text_encoder_lr", o.text_encoder_lr)):
        need(0 <= rate <= 1, f"optimizer.{name}",
             f"must be in [0, 1] (0: optimizer.lr), got {rate}")
    need(not (o.text_encoder_lr and not t.train_text_encoder), "optimizer.text_encoder_lr",
         "set, but training.train_text_encoder is false: no text encoder trains")
    need(0 < o.d_coef <= 100, "optimizer.d_coef", "must be in (0, 100]")
    s = c.schedule
    need(0 <= s.warmup_steps <= t.max_steps, "schedule.warmup_steps",
         "must be between 0 and training.max_steps")
    need(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be 0-1")
    need(1 <= s.num_cycles <= 10_000, "schedule.num_cycles", "must be 1-10000")
    need(0 < s.power <= 10, "schedule.power", "must be in (0, 10]")
    need(not (s.name == "polynomial" and s.min_lr_ratio >= 1), "schedule.min_lr_ratio",
         "must be below 1 for the polynomial schedule (it decays towards this floor)")
    need(not (s.name == "cosine_with_restarts" and s.min_lr_ratio), "schedule.min_lr_ratio",
         "cosine_with_restarts decays to 0 each cycle; leave min_lr_ratio at 0")
    y = c.sync
    need(1 <= y.local_steps <= 100_000, "sync.local_steps", "must be 1-100000")
    need(0 < y.outer_lr <= 10, "sync.outer_lr", "must be in (0, 10]")
    need(0 <= y.outer_momentum < 1, "sync.outer_momentum", "must be in [0, 1)")
    need(y.target_batch >= 1, "sync.target_batch", "must be >= 1")
    need(not (y.overlap and y.mode != "local_steps"), "sync.overlap",
         "applies to local_steps mode only (gradient mode never overlaps)")
    need(1 <= y.fragments <= MAX_FRAGMENTS, "sync.fragments", f"must be 1-{MAX_FRAGMENTS}")
    need(y.fragments == 1 or y.overlapped, "sync.fragments",
         "streaming fragments need overlapped rounds (local_steps mode, overlap not false)")
    need(y.fragments < 1 or y.local_steps % y.fragments == 0, "sync.fragments",
         "must divide sync.local_steps (each fragment syncs every local_steps / fragments steps)")
    a = c.averaging
    need(2 <= a.min_group <= a.max_group <= 256, "averaging.min_group",
         "need 2 <= min_group <= max_group <= 256")
    need(0.1 <= a.chunk_timeout <= 600, "averaging.chunk_timeout", "must be 0.1-600 seconds")
    need(0.1 <= a.gather_window <= 600, "averaging.gather_window", "must be 0.1-600 seconds")
    need(1.0 <= a.max_weight <= 1e12, "averaging.max_weight", "must be 1-1e12 samples")
    k = c.checkpoint
    need(k.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    need(1 <= k.keep_last <= 1000, "checkpoint.keep_last", "must be 1-1000")
    need(k.keep_rounds in (None, *range(65)), "checkpoint.keep_rounds", "must be 0-64")
    d = c.dataset
    need(1 <= d.lease_seconds <= 86_400, "dataset.lease_seconds", "must be 1-86400 seconds")
    need(1 <= d.max_leases_per_peer <= 64, "dataset.max_leases_per_peer", "must be 1-64")
    need(d.manifest == "" or bool(_HEX_DIGEST.fullmatch(d.manifest)), "dataset.manifest",
         "must be the 64 lowercase hex digits `dataset pack` printed, or empty")
    _validate_data(c, need)
    peers = c.admission.peers
    need(len(peers) <= MAX_ADMITTED and len(set(peers)) == len(peers), "admission.peers",
         f"at most {MAX_ADMITTED} distinct peer ids")
    for i, text in enumerate(peers[:MAX_ADMITTED]):
        need(is_ed25519_peer_id(text), f"admission.peers[{i}]",
             f"must be a peer id as `dandelion-p2p status` prints it, got {text[:80]!r}")
    # Refused rather than quietly exporting the raw weights: the owner asked for something
    # this run does not keep.
    formats = c.export.lora_formats
    need(set(formats) <= set(get_args(LoraFormat)) and len(set(formats)) == len(formats),
         "export.lora_formats", 'a list of distinct formats from "diffusers", "kohya"')
    need(c.export.weights != "ema" or t.ema, "export.weights",
         '"ema" needs training.ema = true')
    return out


MAX_SUBSETS = 64


def _validate_data(c: RunConfig, need: typing.Callable[[bool, str, str], None]) -> None:
    d = c.data
    need(1 <= d.clip_skip <= 12, "data.clip_skip", "must be 1-12 (1: the last layer)")
    need(d.clip_skip == 1 or c.model.family != "sdxl", "data.clip_skip",
         "SDXL always reads the penultimate layer; leave clip_skip at 1")
    need(d.max_token_length in (75, 150, 225), "data.max_token_length",
         f"must be 75, 150 or 225, got {d.max_token_length}")
    need(len(d.subsets) <= MAX_SUBSETS, "data.subsets", f"at most {MAX_SUBSETS}")
    seen: set[str] = set()
    for i, sub in enumerate((None, *d.subsets)):
        key = "data" if sub is None else f"data.subsets[{i - 1}]"
        if sub is not None:
            need(bool(sub.folder) and len(sub.folder) <= 255 and "/" not in sub.folder
                 and "\\" not in sub.folder and sub.folder not in (".", ".."),
                 f"{key}.folder", "must name one folder directly under the data folder, got "
                 f"{sub.folder!r}")
            need(sub.folder not in seen, f"{key}.folder", f"{sub.folder!r} is listed twice")
            seen.add(sub.folder)
            need(0 <= sub.repeats <= 10_000, f"{key}.repeats",
                 "must be 0-10000 (0: from the folder name)")
            need(0 < sub.loss_weight <= 100, f"{key}.loss_weight", "must be in (0, 100]")
        source = d if sub is None else sub
        keep, tag, caption = source.keep_tokens, source.tag_dropout, getattr(
            source, "caption_dropout", None)
        need(keep is None or 0 <= keep <= 1000, f"{key}.keep_tokens", "must be 0-1000")
        need(tag is None or 0 <= tag < 1, f"{key}.tag_dropout", "must be in [0, 1)")
        need(caption is None or 0 <= caption < 1, f"{key}.caption_dropout",
             "must be in [0, 1)")


# ------------------------------------------------------------------------------ conversion


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
        raise ConfigError(f"run config: unknown key {prefix}{key!r}{hint}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = prefix + f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"run config: {key} is required")
            continue
        values[f.name] = _value(hints[f.name], data[f.name], key)
    return cls(**values)


def _value(kind: Any, value: Any, key: str) -> Any:
    origin = get_origin(kind)
    if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise ConfigError(f"run config: {key} must be a table")
        return _build(kind, value, key + ".")
    if origin is Literal:
        allowed = get_args(kind)
        if value not in allowed:
            raise ConfigError(
                f"run config: {key} must be one of {', '.join(map(str, allowed))}, got {value!r}"
            )
        return value
    if origin is types.UnionType and type(None) in get_args(kind):
        # Optional settings (unset: inherited) have no TOML spelling of None; a dict read
        # back from ``to_dict`` holds it.
        if value is None:
            return None
        inner = [a for a in get_args(kind) if a is not type(None)]
        return _value(inner[0], value, key)
    if origin is tuple:
        item = get_args(kind)[0]
        if hasattr(item, "__dataclass_fields__"):
            if not isinstance(value, list | tuple):
                raise ConfigError(f"run config: {key} must be a list of tables")
            return tuple(_value(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"run config: {key} must be a list of strings")
        return tuple(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"run config: {key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"run config: {key} must be an integer, got {value!r}")
        if not -MAX_INTEGER < value < MAX_INTEGER:
            raise ConfigError(f"run config: {key} must be an integer below 2**63 in magnitude")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"run config: {key} must be a number, got {value!r}")
        if isinstance(value, int):
            if not -MAX_INTEGER < value < MAX_INTEGER:
                raise ConfigError(f"run config: {key} must be a number below 2**63 in magnitude")
            return float(value)
        if not math.isfinite(value):
            raise ConfigError(f"run config: {key} must be finite")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"run config: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported run config type {kind!r} for {key}")  # a schema bug
