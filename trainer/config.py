"""The run configuration: one typed dataclass tree, recipes as functions, dotted overrides, the DeepSpeed config.

A run is `recipe()` + overrides (`--set model.depths=2,2,6,2`). Rank 0 writes the resolved tree as
`config.json` in the run directory; `to_ds_config` derives DeepSpeed's config from it and nothing edits that dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer.model.config import ModelConfig, base_model, huge_model, tiny_model


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the dataprep dataset is and how views are cut from it (trainer/views.py has each operation).

    Per image set: 2 global views (teacher and student) + `local_crops` local views (student only). A view is a
    random box in ground coordinates, cut from every modality at its own resolution and resampled to the view size,
    flipped / turned alike in every modality, then jittered per modality. HR ops and probabilities follow DINO,
    scale ranges DINO-MC (remote sensing); papers/small-scale-ssl-notes.md.
    """

    path: str = ""
    hr_crop: int = 64  # global view side in HR pixels (multiple of 32); S2/S1 side = hr_crop / (HR:S2 pixel ratio)
    local_crop: int = 32  # local view side in HR pixels (multiple of 32)
    local_crops: int = 4  # local views per set, student only; 0 = two-view training
    global_scale: tuple[float, float] = (0.32, 1.0)  # box area as a fraction of the set's extent (DINO-MC)
    local_scale: tuple[float, float] = (0.05, 0.32)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # box width / height, log-uniform
    flip: bool = True  # row and column flips, p = 0.5 each
    rotate: bool = True  # quarter turns k ~ U{0..3}: aerial imagery has no canonical up (views are square)
    photometric: bool = True  # False: geometry only (crop, flips, turns), for tests and ablations
    # HR optical (DINO): colour jitter in torchvision's random op order, grayscale, Gaussian blur, solarisation.
    hr_jitter_p: float = 0.8
    hr_brightness: float = 0.4
    hr_contrast: float = 0.4
    hr_saturation: float = 0.2
    hr_hue: float = 0.1
    hr_grayscale_p: float = 0.2
    hr_blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global view 1, global view 2, local views
    hr_blur_sigma: tuple[float, float] = (0.1, 2.0)  # standard deviation in view pixels
    hr_solarize_p: float = 0.2  # global view 2 only
    # S2 multispectral: per-band contrast and gain, one draw per view for all its dates; no hue, no blur.
    s2_jitter_p: float = 0.8
    s2_brightness: float = 0.2
    s2_contrast: float = 0.2
    # S1 SAR (dB): unit-mean gamma speckle in linear power (an additive term in dB), a global gain offset in dB.
    s1_speckle_p: float = 0.5
    s1_looks: float = 4.0
    s1_gain_p: float = 0.8
    s1_gain_db: float = 1.0  # offset ~ U(-1, 1) dB, shared by both polarisations and all dates of a view
    s2_frames: int = 4  # S2 dates sampled per view (paper: 10)
    s1_frames: int = 2  # S1 dates sampled per view (paper: 5)
    num_workers: int = 8  # per rank
    prefetch_factor: int = 2
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Self-distillation heads and temperatures (DINO defaults, objectives-notes.md)."""

    head_out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 30000
    center_momentum: float = 0.9
    centering: str = "center"  # teacher targets: "center" (DINO, EMA once per optimizer step) or "sinkhorn" (DINOv2)
    # MGCL levels (paper section 3.2), each a sum over hr, s2, s1 and F_fus; 0 switches a level off.
    image_weight: float = 1.0  # pooled features
    pixel_weight: float = 0.0  # per ground point of the two views' overlap (RoIAlign), objectives/pixel.py
    object_weight: float = 0.0  # Sinkhorn clusters of the overlap's pixel features, objectives/object.py
    pixel_grid: int = 2  # ground points per side sampled in the overlap
    object_clusters: int = 4  # N_C
    koleo_weight: float = 0.0  # DINOv2's KoLeo regulariser on the student's pooled global features
    # A MoCo-v2 InfoNCE fallback at the image level (objectives/contrastive.py); not the paper's objective.
    contrast_weight: float = 0.0
    contrast_temp: float = 0.2
    contrast_queue: int = 4096
    contrast_dim: int = 128


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; weight decay and EMA momentum on cosine schedules."""

    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 3.0
    momentum_start: float = 0.994  # teacher EMA momentum, cosine to momentum_end
    momentum_end: float = 1.0


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Steps, batch arithmetic, precision and checkpointing. `global_batch` is fixed across world sizes."""

    max_steps: int = 600_000
    global_batch: int = 1024
    micro_batch: int = 8  # per rank; accumulation = global_batch / (micro_batch * world)
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or "fp32" / "bf16"
    kernels: str = "auto"  # hot ops: auto (Triton on CUDA, PyTorch elsewhere), "triton" or "reference"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    # max_steps is the schedule length (lr, wd, momentum, temperature); stop_step only ends this job early
    # (`--max-steps N`; 0 = at max_steps), so a run continued later keeps its schedules.
    stop_step: int = 0
    max_bad_steps: int = 3  # optimizer steps skipped for non-finite loss/gradients in a row before the run stops
    allow_data_change: bool = False  # resume although the dataset fingerprint differs from the checkpoint's
    allow_schedule_change: bool = False  # resume although max_steps or a schedule setting differs
    # Collectives (gloo/nccl) fail after this long instead of hanging when a rank dies; long enough for the
    # slowest checkpoint write of a large run, short enough that a dead node frees the job within minutes. It also
    # bounds the start-up rendezvous (every rank must have started within it).
    collective_timeout_s: int = 900


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """Prometheus endpoint: each rank serves on port + local_rank; port 0 turns it off."""

    port: int = 9400
    # Bind address; "" = $SKYSENSE_METRICS_ADDR, else all interfaces when the job spans nodes, else loopback.
    addr: str = ""
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up by device name (unknown on CPU)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """In-training k-NN of the teacher backbone on a small labelled folder (rank 0, every `every` steps; 0 = off).

    Either `train` and `val` folders, or one `data` folder split `split` / 1 - split with a fixed seed. It reads
    no training RNG and takes no collective, so the loss sequence is the same with it on or off.
    """

    every: int = 0
    data: str = ""
    train: str = ""
    val: str = ""
    split: float = 0.5
    size: int = 64
    modality: str = ""  # "" = from the band count
    k: int = 20
    max_images: int = 1000  # per split, so an evaluation stays a few seconds


@dataclass(kw_only=True, slots=True)
class RunConfig:
    recipe: str = "huge"
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=huge_model)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------------------
# recipes


def huge() -> RunConfig:
    """The paper's setting: batch 1024 on 128 H20, AdamW 2e-4 cosine to 1e-6, 600k steps (objectives-notes.md).

    Views as the official SkySense code feeds them: HR 512 px globals, so S2/S1 16 px per date on the paper's sets
    (2048 px HR over a 64 px S2 tile, 32:1); locals 256 px HR / 8 px S2 (not in the paper: DINO's half-side
    locals, 4 of them); 10 S2 and 5 S1 dates per view. Micro-batch 8 = 1024 / 128 (no accumulation) with activation
    checkpointing on: `python -m trainer.plan --recipe huge --gpus 128 --gpu-kind h20` traces ~26 GiB of activations
    per sample without checkpointing (the 24-layer fusion over every view's 16x16 cells is most of it), so at
    most micro-batch 2 would fit a 96 GB H20 (README, "Capacity planning").
    """
    cfg = RunConfig(recipe="huge", model=huge_model())
    cfg.model.activation_checkpointing = True
    cfg.data = DataConfig(hr_crop=512, local_crop=256, local_crops=4, s2_frames=10, s1_frames=5)
    cfg.train.micro_batch = 8
    return cfg


def base() -> RunConfig:
    """A single-node experiment at a tenth of the paper's width and depth."""
    cfg = huge()
    cfg.recipe = "base"
    cfg.model = base_model()
    cfg.data = DataConfig()  # small views as before huge took the paper's sizes: a single-node experiment
    cfg.loss.head_out_dim = 8192
    cfg.train.global_batch = 256
    cfg.train.max_steps = 100_000
    return cfg


def tiny() -> RunConfig:
    """CPU tests and the demo: seconds per step on 2 cores, every component present."""
    cfg = huge()
    cfg.recipe = "tiny"
    cfg.model = tiny_model()
    cfg.data = DataConfig(hr_crop=64, local_crop=32, local_crops=4, s2_frames=4, s1_frames=2, num_workers=1)
    # A constant teacher temperature (overriding the warm-up of the other recipes): within a 30-step demo the DINO
    # warm-up 0.04 -> 0.07 only raises the loss floor. The `learn` recipe below has the warm-up.
    cfg.loss = LossConfig(head_out_dim=256, head_hidden_dim=128, head_bottleneck_dim=64, teacher_temp=0.04,
                          teacher_temp_warmup=0.04, teacher_temp_warmup_steps=0)
    # Teacher momentum 0.994 -> 1 as in every recipe: a teacher that copies the student (0.9) collapses.
    cfg.optim = OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=5, grad_clip=3.0)
    cfg.train = TrainConfig(max_steps=50, global_batch=8, micro_batch=4, log_every=1, ckpt_every=25)
    return cfg


def learn() -> RunConfig:
    """The learning benchmark (`bash launch/learning.sh`): the tiny model on real aerial scenes, ~15 min on 2 cores.

    Chosen by the benchmark itself (issue 9 note): the InfoNCE fallback beat image-level DINO in this budget (k-NN on
    aid-dev 28.0 vs 22.0; random init 23.6), and a fixed teacher momentum of 0.99 beat 0.994 -> 1, whose teacher
    still holds about a quarter of its initial weights after a few hundred steps. `--set loss.image_weight=1
    --set loss.contrast_weight=0` gives the paper's DINO-style objective.
    """
    cfg = tiny()
    cfg.recipe = "learn"
    cfg.loss.head_out_dim = 1024
    cfg.loss.head_hidden_dim = 256
    cfg.loss.teacher_temp = 0.07
    cfg.loss.teacher_temp_warmup_steps = 90
    cfg.loss.image_weight = 0.0
    cfg.loss.contrast_weight = 1.0
    cfg.optim = OptimConfig(lr=5e-4, min_lr=1e-5, warmup_steps=30, weight_decay=0.04, weight_decay_end=0.2,
                            momentum_start=0.99, momentum_end=0.99)
    cfg.train = TrainConfig(max_steps=450, global_batch=32, micro_batch=16, log_every=25, ckpt_every=450,
                            keep_ckpts=1)
    cfg.data.num_workers = 1
    # Milder colour jitter than DINO's (no hue, saturation 0.1, grayscale 0.05): aerial scene classes carry much of
    # their identity in colour (a colour histogram alone scores 35% k-NN on aid-dev), and DINO's hue 0.1 / grayscale
    # 0.2 taught the features to throw it away. Measured: aid-dev teacher k-NN 32.2 -> 34.2 (mean of 3 seeds each;
    # random init 23.6).
    cfg.data.hr_hue = 0.0
    cfg.data.hr_saturation = 0.1
    cfg.data.hr_grayscale_p = 0.05
    # No photometric operations at all (crop, flips and quarter turns only): in this budget (450 steps, 4,000
    # scenes, the tiny model) they cost aid-dev k-NN points, even the mild ones above. Measured, README table:
    # teacher k-NN 34.2 (mild colour, 3 seeds) -> 40.0 (geometry only + the balancer below, 3 seeds). The other
    # recipes keep DINO's.
    cfg.data.photometric = False
    # Aux weight 0.05 (0.01 elsewhere): at 0.01 the busiest expert held up to 2.4x the mean load on some steps.
    # Plus the proportional bias balancer at rate 0.01 (model.moe.balance_rate): steps after warm-up with the busiest
    # expert above 2x the mean: 17 of 400 without it (seed 0, per rank) -> 5, 1, 2 (seeds 0-2, all ranks).
    cfg.model.moe.aux_loss_weight = 0.05
    cfg.model.moe.balance_rate = 0.01
    # Overflow re-routing (model.moe.reroute): a token whose expert is full takes its best expert with room instead
    # of being dropped. The load an expert processes stays <= the capacity (2x the mean here) on every step, and no
    # token is lost on the steps a batch of similar scenes crowds one expert (README, learning benchmark).
    cfg.model.moe.reroute = 2
    return cfg


RECIPES: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "base": base, "huge": huge, "learn": learn}


# ---------------------------------------------------------------------------------------------------------------
# overrides


class ConfigError(ValueError):
    pass


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_value(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
    if origin is tuple:
        args = typing.get_args(tp)
        items = [s for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
        elem = args[0]
        if not (len(args) == 2 and args[1] is Ellipsis) and len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(s, elem, key) for s in items)
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        out = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            if ":" not in item:
                raise ConfigError(f"{key}: expected key:value pairs like 'hr:true,s2:false', got {text!r}")
            k, v = item.split(":", 1)
            out[_parse_value(k.strip(), ktp, key)] = _parse_value(v.strip(), vtp, key)
        return out
    raise ConfigError(f"{key}: cannot parse a value of type {tp}")


def apply_override(cfg: Any, assignment: str) -> None:
    """Apply one `dotted.key=value` assignment in place; unknown keys fail with the closest valid names."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    dotted, text = assignment.split("=", 1)
    node, parts = cfg, dotted.strip().split(".")
    for depth, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if name not in names:
            where = ".".join(parts[:depth]) or "the config root"
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(names)}"
            raise ConfigError(f"unknown key {name!r} under {where}{hint}")
        if depth < len(parts) - 1:
            node = getattr(node, name)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"{'.'.join(parts[: depth + 1])} is a value, not a section")
    tp = typing.get_type_hints(type(node))[parts[-1]]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{dotted} is a section; set one of its fields instead")
    setattr(node, parts[-1], _parse_value(text, tp, dotted))


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config tree from `to_dict` output (config.json), checking every key."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown key {key!r} for {cls.__name__}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def resolve(recipe: str, overrides: list[str] = ()) -> RunConfig:
    """`RECIPES[recipe]()` with the overrides applied in order, then validated."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    cfg = RECIPES[recipe]()
    for assignment in overrides:
        apply_override(cfg, assignment)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    t = cfg.train
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if t.kernels not in ("auto", "triton", "reference"):
        raise ConfigError(f"train.kernels must be auto, triton or reference, got {t.kernels!r}")
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"train.zero_stage must be 0, 1 or 2 (DeepSpeed refuses native MoE under ZeRO-3), "
                          f"got {t.zero_stage}")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch "
                          f"({t.micro_batch})")
    if len(cfg.model.depths) != 4:
        raise ConfigError(f"model.depths must have 4 stages, got {cfg.model.depths}")
    if cfg.loss.centering not in ("center", "sinkhorn"):
        raise ConfigError(f"loss.centering must be center or sinkhorn, got {cfg.loss.centering!r}")
    d = cfg.data
    if d.local_crop % 32 or d.local_crops < 0:
        raise ConfigError(f"data.local_crop must be a multiple of 32 and data.local_crops >= 0, got {d.local_crop}, "
                          f"{d.local_crops}")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(d, name)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
    if not 0 < d.aspect[0] <= d.aspect[1]:
        raise ConfigError(f"data.aspect must satisfy 0 < low <= high, got {d.aspect}")
    probs = {f: getattr(d, f) for f in ("hr_jitter_p", "hr_grayscale_p", "hr_solarize_p", "s2_jitter_p",
                                        "s1_speckle_p", "s1_gain_p")}
    probs.update({f"hr_blur_p[{i}]": p for i, p in enumerate(d.hr_blur_p)})
    for name, p in probs.items():
        if not 0 <= p <= 1:
            raise ConfigError(f"data.{name} is a probability, got {p}")
    if cfg.data.hr_crop % 32:
        raise ConfigError(f"data.hr_crop must be a multiple of 32 (patch 4 x three halvings), got {cfg.data.hr_crop}")


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed


def grad_accumulation(cfg: RunConfig, world_size: int) -> int:
    """Steps of accumulation so that micro x world x accumulation == global_batch, or a clear error."""
    per_step = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by micro_batch x world = "
            f"{cfg.train.micro_batch} x {world_size}; change train.micro_batch or the number of ranks")
    return cfg.train.global_batch // per_step


def use_bf16(cfg: RunConfig, on_cuda: bool) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_cuda)


DS_REDUCE_BUCKET = int(5e8)  # DeepSpeed's default reduce_bucket_size, in elements


def reduce_bucket_elements(trained_params: int | None) -> int:
    """ZeRO-1/2's gradient reduce bucket: DeepSpeed allocates it whole (`contiguous_gradients`, one per gradient
    dtype) at the first backward, 5e8 elements = 2 GB in fp32 by default, however small the model. Capped at the
    trained parameters this rank holds: the whole model still goes in one bucket, so the reductions are the same."""
    return DS_REDUCE_BUCKET if not trained_params else max(1, min(DS_REDUCE_BUCKET, int(trained_params)))


def to_ds_config(cfg: RunConfig, world_size: int, on_cuda: bool = False, trained_params: int | None = None) -> dict:
    """DeepSpeed's config, derived: train_batch_size = micro x world x accumulation. Never edited afterwards.

    `trained_params`: this rank's trainable parameter count, which caps the reduce bucket (`reduce_bucket_elements`).
    """
    accum = grad_accumulation(cfg, world_size)
    return {
        "train_batch_size": cfg.train.micro_batch * world_size * accum,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage,
                              "reduce_bucket_size": reduce_bucket_elements(trained_params)},
        "bf16": {"enabled": use_bf16(cfg, on_cuda)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our own logging and metrics replace DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
