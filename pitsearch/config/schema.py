"""One typed schema per config group: every key, its type, its default and its range, in one place.

Registered in Hydra's ConfigStore (`register`), so OmegaConf itself refuses a wrong type or an unknown key while
Hydra composes (`train.epochs=true`, `model.dept=3`), before any job starts. The YAML files under conf/ set only
what differs from these defaults: model presets, data sets, sweeps.

- `pitsearch_schema` types the whole primary config (conf/config.yaml lists it first).
- `data_base/<data set>` is the schema of one data set (sources take different keys); conf/config.yaml picks it
  with `optional data_base@data: ${data}`, so `data=synthetic` or a sweep's `override /data: ...` brings its own.
- `sweep_base/default`: every `sweep.*` key with its default, for sweep files (`- /sweep_base@sweep: default`). It
  is stored untyped because Hydra cannot delete a key of a typed node, and `"~sweep.seeds" "+sweep.seeds={...}"`
  must keep working; the sweep node is checked against `SweepConfig` right after composing (pitsearch.config.check).

Ranges that no type can say sit beside the type as field metadata (`ge`, `gt`, `le`, `lt`, `choices`) and are
checked in one place (pitsearch.config.check); the checks that span fields or need a registry, a file or a sampler
stay with the code that owns them (models/presets.py, data.py, search/spec.py, ...).

Only dataclasses and omegaconf here: importing this module costs no torch, timm or mlflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


def knob(default: Any = MISSING, *, factory: Any = None, **limits: Any) -> Any:
    """A dataclass field with its range: ge / gt / le / lt (numbers) or choices (a tuple of allowed values)."""
    if factory is not None:
        return field(default_factory=factory, metadata=limits)
    return field(default=default, metadata=limits)


# --- model ------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """A PoolingViT (pitsearch.models): a preset (conf/model/NAME.yaml) sets the architecture, these the rest."""
    name: Optional[str] = None              # the preset's name (a tag on the run)
    depths: List[int] = MISSING             # transformer blocks per stage (one entry per stage)
    heads: List[int] = MISSING              # attention heads per stage
    head_dims: List[int] = MISSING          # channels per head; channels per stage = heads x head_dims
    patch_size: int = knob(ge=1)            # conv stem kernel
    stride: int = knob(ge=1)                # conv stem stride
    pool: str = MISSING                     # pooling between stages (pitsearch.models.pooling): conv, max, avg, none
    mlp_ratio: float = knob(4.0, gt=0)
    drop_path: float = knob(0.0, ge=0, lt=1)   # stochastic depth, linear over all blocks from 0 to this (timm's rule)
    drop_rate: float = knob(0.0, ge=0, lt=1)   # dropout before the classifier head
    cls_pos_embed: bool = False             # DeiT's position embedding includes the class token's position
    img_size: Optional[int] = knob(None, ge=1)      # null: filled from the data config (224 without one)
    in_chans: Optional[int] = knob(None, ge=1)      # null: filled from the data config (3 without one)
    num_classes: Optional[int] = knob(None, ge=1)   # null: filled from the data config (1000 without one)
    pretrained: bool = False                # true: start from timm's pretrained weights for timm_name
    timm_name: Optional[str] = None         # the timm model whose weights match this preset, if any


# A model config without data (profiling, tests) is sized for ImageNet.
IMAGENET_SHAPE = {"img_size": 224, "in_chans": 3, "num_classes": 1000}


# --- data -------------------------------------------------------------------------------------------------------

@dataclass
class AugConfig:
    crop_padding: int = knob(0, ge=0)       # random crop after zero-padding this many px per side
    hflip: bool = False                     # random horizontal flips
    mixup: float = knob(0.0, ge=0)          # Beta alpha; 0 = off
    cutmix: float = knob(0.0, ge=0)         # Beta alpha; 0 = off


@dataclass
class DataConfig:
    """Keys every data set takes (cifar10 / cifar100 take no others)."""
    name: str = MISSING                     # the source (pitsearch.data.DATA_SOURCES)
    root: Optional[str] = None              # the folder holding the files (cifar, imagefolder: required)
    download: bool = False                  # cifar: torchvision downloads it into root if missing
    img_size: Optional[int] = knob(None, ge=1)   # null = the data set's native size
    aug: AugConfig = knob(factory=AugConfig)


@dataclass
class CachedDataConfig(DataConfig):
    """Decoded once per machine into a cache (cifar, imagefolder)."""
    cache_dir: Optional[str] = None         # null = <root>/.pitsearch_cache/


@dataclass
class SplitDataConfig(DataConfig):
    """One fixed stratified train/val split (mnist5k, digits): it depends on split_seed only, never the run seed."""
    val_fraction: float = knob(0.2, gt=0, lt=1)
    split_seed: int = 0


@dataclass
class ImageFolderConfig(CachedDataConfig):
    img_size: Optional[int] = knob(32, ge=1)     # images are squashed to img_size x img_size; required
    in_chans: int = knob(3, choices=(1, 3))      # 3 = RGB, 1 = grayscale


@dataclass
class SyntheticConfig(DataConfig):
    """Random uint8 images and labels from a fixed seed (throughput benchmarks)."""
    img_size: Optional[int] = knob(32, ge=1)
    in_chans: int = knob(3, choices=(1, 3))
    num_classes: int = knob(10, ge=2)
    num_train: int = knob(50000, ge=1)
    num_val: int = knob(10000, ge=1)
    seed: int = 0


DATA_SCHEMAS: Dict[str, type] = {
    "mnist5k": SplitDataConfig,
    "digits": SplitDataConfig,
    "cifar10": CachedDataConfig,
    "cifar100": CachedDataConfig,
    "imagefolder": ImageFolderConfig,
    "synthetic": SyntheticConfig,
}


# --- train ------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """The short-run trainer (pitsearch/train.py). Sizes suit a small PiT on mnist5k on a 2-core CPU."""
    epochs: int = knob(10, ge=1)
    batch_size: int = knob(128, ge=1)
    eval_batch_size: int = knob(500, ge=1)
    opt: str = "adamw"                      # any name timm.optim.create_optimizer_v2 knows (adamw, lamb, sgd, ...)
    lr: float = knob(2.0e-3, gt=0)
    min_lr: float = knob(1.0e-5, ge=0)
    weight_decay: float = knob(0.05, ge=0)
    warmup_epochs: float = knob(1.0, ge=0)
    warmup_lr: float = knob(1.0e-5, ge=0)
    label_smoothing: float = knob(0.1, ge=0, lt=1)
    grad_clip: float = knob(1.0, ge=0)      # max grad norm; 0 turns clipping off
    seed: int = 0                           # 64-bit (torch.manual_seed's range; checked in pitsearch.train)
    device: str = "auto"                    # auto = cuda if available, else cpu; or cpu, cuda, cuda:N
    threads: Optional[int] = knob(None, ge=1)   # torch CPU threads; null = torch's default
    compile: bool = False                   # torch.compile the model (its compile time is logged as time/compile_s)
    precision: str = knob("auto", choices=("auto", "bf16", "fp32"))   # auto = bf16 autocast on CUDA, fp32 on CPU
    # Replay each training step (forward, backward, clipping, AdamW) and the eval forward as CUDA graphs
    # (pitsearch/graphs.py; capture time logged as time/compile_s). on: capture or refuse the config (CUDA, adam /
    # adamw, no compile, no mixup / cutmix); auto: capture where it can, else eager steps and the reason logged.
    # Off by default until the benchmark on a GPU measures it (a hand-made whole-step graph ran 5.9x eager).
    cuda_graph: str = knob("off", choices=("off", "on", "auto"))
    progress: bool = True                   # rich progress bar and one summary line per epoch


# --- tracking ---------------------------------------------------------------------------------------------------

@dataclass
class TrackingConfig:
    """MLflow tracking (pitsearch/tracking.py)."""
    enabled: bool = True
    uri: Optional[str] = None               # null = sqlite:///<working directory>/mlflow.db; or http://host:port, ...
    experiment: str = "pitsearch"
    artifact_location: Optional[str] = None   # null = <working directory>/mlartifacts (for a sqlite store)
    run_name: Optional[str] = None


# --- eval -------------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """Post-training analyses (pitsearch/analysis), all off by default so plain runs cost nothing extra."""
    spatial: bool = False                   # per-block attention interaction ratio, distance and entropy
    spatial_images: int = knob(64, ge=1)    # the first N validation images feed the attention maps
    spatial_threshold: float = knob(0.1, gt=0, lt=1)   # an attention entry "interacts" above this (the paper's 10%)
    robustness: Optional[List[str]] = knob(factory=list)   # any of: occlusion, fgsm
    occlusion_fraction: float = knob(0.25, ge=0, lt=1)     # share of the image hidden by a centered black square
    fgsm_epsilon: float = knob(2.0, ge=0)   # one-step FGSM size in 0..255 pixel units
    robustness_images: int = knob(1000, ge=1)   # the first N validation images


# --- sweep ------------------------------------------------------------------------------------------------------

@dataclass
class ObjectiveConfig:
    metric: str = MISSING                   # val/acc_best, macs, params, or any metric a trial reports
    direction: str = knob(MISSING, choices=("maximize", "minimize"))


@dataclass
class BudgetConfig:
    max_macs: Optional[float] = knob(None, gt=0)     # configs over budget fail before training
    max_params: Optional[float] = knob(None, gt=0)


def _default_objectives() -> List[ObjectiveConfig]:
    return [ObjectiveConfig(metric="val/acc_best", direction="maximize")]


def pack_problem(value: Any) -> str | None:
    """`sweep.pack` (pitsearch.search.pack): off, auto or a positive number of members."""
    if value in ("off", "auto") or value is False or (isinstance(value, int) and not isinstance(value, bool)
                                                        and value >= 1):
        return None
    return f"must be off, auto or a positive integer (members per pack), got {value!r}"


@dataclass
class SweepConfig:
    """The `sweep:` node of a sweep file (pitsearch.search.spec.parse_sweep)."""
    study_name: str = MISSING               # the Optuna study and the MLflow parent run; a plain folder name
    objectives: List[ObjectiveConfig] = knob(factory=_default_objectives)   # several = a Pareto front
    sampler: Dict[str, Any] = knob(factory=lambda: {"name": "tpe"})   # {name: grid|tpe|random|nsga2|gp|bruteforce, kwargs}
    pruner: Dict[str, Any] = knob(factory=lambda: {"name": "none"})   # {name: none|median|percentile|hyperband|..., kwargs}
    n_trials: Optional[int] = knob(None, ge=1)   # finished (complete + pruned) trials over all invocations; null = grid
    storage: Optional[str] = None           # null = journal file <output_dir>/optuna-journal.log; *.log; sqlite:///...
    n_workers: int = knob(1, ge=1)          # worker processes on this machine when training on the CPU
    gpus: Optional[List[int]] = None        # CUDA: GPU indices to use; null = every visible GPU
    trials_per_gpu: int = knob(1, ge=1)     # CUDA: workers per GPU, packing small trials onto one device
    pack: Any = knob("off", check=pack_problem)   # off | auto | N: cells of one variant trained as one model
    seeds: Any = None                       # [0, 1, 2]: an axis (train.seed); {min, max, min_effect, alpha, start}: adaptive
    space: Any = knob(factory=dict)         # {config.path: {choices | low/high/step/log/type, when}}
    budget: BudgetConfig = knob(factory=BudgetConfig)
    baseline: Dict[str, Any] = knob(factory=dict)   # {config.path: value}: the variant reports compare against
    match: Any = None                       # {"on": macs|params, reference: {...}, adjust: knob(s), tolerance}
    output_dir: Optional[str] = None        # null = <cwd>/pitsearch-sweeps/<study_name>
    max_failures: Optional[int] = knob(None, ge=1)   # stop a worker after this many failed trials; null = max(10, n)
    report: bool = True                     # write the report when the sweep completes
    retry_timeout_s: float = knob(60.0, ge=0)   # a lost database / MLflow server is retried this long
    heartbeat_interval_s: int = knob(60, ge=1)  # database storages: a trial silent for 2x this is failed and re-queued


# --- the primary config -------------------------------------------------------------------------------------------

@dataclass
class PitsearchConfig:
    model: ModelConfig = knob(factory=ModelConfig)
    data: DataConfig = knob(factory=DataConfig)
    train: TrainConfig = knob(factory=TrainConfig)
    tracking: TrackingConfig = knob(factory=TrackingConfig)
    eval: EvalConfig = knob(factory=EvalConfig)
    sweep: Any = None                       # a SweepConfig node when `+sweep=NAME` is given


GROUP_SCHEMAS: Dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                                  "tracking": TrackingConfig, "eval": EvalConfig, "sweep": SweepConfig}


def field_names(schema: type) -> List[str]:
    return [f.name for f in dataclasses.fields(schema)]


def required_keys(schema: type) -> List[str]:
    """Keys without a default: a config must set them (a model preset's architecture, a sweep's study_name)."""
    return [f.name for f in dataclasses.fields(schema)
            if f.default is MISSING and f.default_factory is dataclasses.MISSING]


def defaults(schema: type) -> Dict[str, Any]:
    """Every key with a default, as plain values (nested dataclasses as dicts); required keys left out."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(OmegaConf.structured(schema), throw_on_missing=False)
    return {key: value for key, value in plain.items() if key not in required_keys(schema)}


_registered = False


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (once per process; `import pitsearch` calls it)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name="pitsearch_schema", node=PitsearchConfig)
    for name, schema in DATA_SCHEMAS.items():
        store.store(group="data_base", name=name, node=schema)
    sweep_defaults = OmegaConf.to_container(OmegaConf.structured(SweepConfig), throw_on_missing=False)
    store.store(group="sweep_base", name="default", node=sweep_defaults)   # untyped: see the module's docstring
    _registered = True
