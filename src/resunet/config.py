"""Training settings: one dataclass. Its defaults are the seed recipe; `cli.py` derives one flag per field."""

from __future__ import annotations

import functools
import numbers
import os
import typing
from dataclasses import asdict, dataclass, field, fields

from .data.images import DEFAULT_MAX_PIXELS


def setting(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    data_root: str = setting(None, "dataset folder: VOCdevkit layout or {train,val}/{images,masks} (required, "
                                   "unless --resume reads it from the run)", required=True)
    out: str = setting("runs/train", "run folder: last.pt, best.pt, metrics.jsonl, curves.png")
    train_split: str = setting("train", "training split (VOC: train or train_aug)")
    val_split: str = setting("val", "validation split, evaluated every --eval-every epochs at original resolution")
    num_classes: int | None = setting(None, "number of classes for a folder dataset without classes.json")
    ignore_index: int | None = setting(None, "label ignored by loss and metric (default 255, or classes.json's)")
    encoder: str = setting("resnet34", "resnet18|resnet34|resnet50|resnet101|efficientnet-lite0|-lite1|-lite2")
    pretrained: bool = setting(True, "start the encoder from ImageNet weights (--no-pretrained: random init)",
                               help_off="start the encoder from random weights instead of ImageNet's")
    encoder_weights: str | None = setting(None, "start the encoder from this weights file instead of ImageNet's: "
                                          "torchvision's or timm's layout (a classifier's head is dropped), the "
                                          "Lite packages' .pth, or a resunet model's encoder (a .pt of this tool)")
    decoder_channels: str = setting("256,128,64,32", "the four decoder blocks' widths, deepest first (narrower: faster)")
    attention: str = setting("none", "decoder attention: none, or scse (squeeze-and-excitation, channel and spatial, "
                             "in each decoder block)", choices=("none", "scse"))
    epochs: int = setting(100, "epochs (with --time-budget: the most)")
    time_budget: str | None = setting(None, "fit the run to this wall-clock time (50m, 1.5h, 3000s), setup included: "
                                      "after the first epoch (always evaluated, to time it) the epochs are cut to "
                                      "what fits at the measured pace and the schedule spans those; re-fitted after "
                                      "each later epoch (shortened if it would overrun, lengthened if an epoch's time "
                                      "is left over; the decay goes on from where it is); stored, so a resumed run "
                                      "keeps them")
    batch_size: int = setting(8, "images per step (per process under torchrun)")
    lr: float = setting(1e-4, "learning rate")
    weight_decay: float = setting(1e-5, "weight decay")
    optimizer: str = setting("adam", "adam (L2 weight decay, the seed) or adamw (decoupled)", choices=("adam", "adamw"))
    scheduler: str = setting("plateau", "plateau: ReduceLROnPlateau on val mIoU; cosine: per-step decay to 0; poly: "
                             "per-step (1 - progress)^0.9 decay to 0", choices=("plateau", "cosine", "poly"))
    warmup_epochs: float = setting(0.0, "linear warm-up epochs (cosine and poly; plateau has none)")
    ema: float = setting(0.0, "keep an exponential moving average of the weights and BatchNorm statistics with this "
                         "decay (e.g. 0.999; 0: off); it is the model evaluated, selected and saved")
    size: int = setting(256, "working size: images are scaled so the shorter side is size (× a random scale when "
                        "training); inference resizes the shorter side to it")
    crop_size: int | None = setting(None, "training crop, square (default: size)")
    scale_min: float = setting(0.5, "smallest random scale (of shorter side = size)")
    scale_max: float = setting(2.0, "largest random scale")
    jitter: float = setting(0.2, "brightness/contrast/saturation jitter strength (0: off)")
    mix: str = setting("none", "cutmix: paste a random box of another image of the batch, with its labels; classmix: "
                       "paste half of the classes of another image, with their labels", choices=("none", "cutmix",
                                                                                                  "classmix"))
    mix_prob: float = setting(0.5, "the share of the images of a batch that get mixed (--mix)")
    class_weights: str = setting("none", "none, or sqrt-inv-freq: loss weights sqrt(median freq / class freq)",
                                 choices=("none", "sqrt-inv-freq"))
    loss: str = setting("ce", "ce, focal, dice, lovasz (Lovász-softmax), ohem (cross-entropy on the hardest pixels), "
                        "ce+dice or ce+lovasz; all skip the ignore label", choices=("ce", "focal", "dice", "lovasz",
                                                                                      "ohem", "ce+dice", "ce+lovasz"))
    focal_gamma: float = setting(2.0, "focal loss: the exponent of (1 - p) (0: plain cross-entropy)")
    ohem_keep: float = setting(0.25, "ohem: the fraction of the valid pixels kept, those with the highest loss")
    seed: int = setting(0, "random seed (weights init, data order, augmentation)")
    workers: int = setting(2, "data loader worker processes")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = setting("auto", "auto (bf16 where the hardware runs it faster than fp32; fp16 on CUDA GPUs before "
                                     "Ampere), fp32, bf16, fp16", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")
    data_path: str = setting("auto", "cached: decode once, augment batched on the device; simple: per-sample "
                             "PIL/torchvision loader; auto: cached unless the cache would exceed 20 GiB",
                             choices=("auto", "cached", "simple"))
    cache_dir: str | None = setting(None, "decoded-image cache folder (default $XDG_CACHE_HOME/resunet, or ~/.cache/resunet)")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse images/masks with more pixels, read from their header "
                              "(decompression bombs)")
    skip_data_check: bool = setting(False, "start without the dataset check (resunet check-data) of the train and "
                                    "val splits that otherwise runs first, cached while the files are unchanged")
    calibrate: bool = setting(False, "after training, fit best.pt's temperature on the validation split (resunet "
                              "calibrate) and print the calibration error before and after")
    eval_every: int = setting(1, "evaluate every N epochs (and always after the last)")
    resume: str | None = setting(None, "continue exactly from this last.pt (an epoch's end or a step inside one)")
    overwrite: bool = setting(False, "start a new run in an --out that holds one already: its last.pt, best.pt, "
                              "metrics.jsonl, curves.png and tensorboard/ are removed once the new run's data and "
                              "model are ready "
                              "(without it such a folder is refused)")
    checkpoint_every: str | None = setting(None, "also save last.pt inside epochs: every N steps (500) or N minutes "
                                           "(10m); a run resumed from it continues at that step")
    tensorboard: bool = setting(False, "also write TensorBoard event files to OUT/tensorboard (needs the "
                                "tensorboard package: pip install 'resunet[tensorboard]')")
    progress: bool = setting(True, "show per-epoch progress bars",
                             help_off="no progress bars or in-epoch progress lines")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, normalised_setting(f.name, getattr(self, f.name)))

    def to_dict(self) -> dict:
        return asdict(self)


def normalised_setting(name: str, value):
    """A TrainConfig field's value as the config keeps it (and a checkpoint stores it). A Path from a Python caller is
    kept as text: checkpoints store these settings and are read back with torch.load(weights_only=True), which
    refuses pickled Path objects (a run's every checkpoint was unreadable). So are numpy numbers (as Python's) and the
    other forms a caller writes naturally: the model's own tuple (or an array) of decoder widths, or their text with
    spaces, a number of steps for checkpoint_every, of seconds for time_budget. What is left of another type is
    refused by `train` (`train.check_types`), in one line."""
    kinds = field_kinds().get(name, ())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool):
        return value
    if int in kinds and isinstance(value, numbers.Integral):
        return int(value)
    if float in kinds and isinstance(value, numbers.Real):
        return float(value)
    if name == "decoder_channels" and isinstance(value, str):  # "256, 128, 64, 32" is "256,128,64,32"
        return ",".join(part.strip() for part in value.split(","))
    if name == "decoder_channels" and (isinstance(value, (tuple, list)) or hasattr(value, "tolist")):
        return ",".join(str(v) for v in (value.tolist() if hasattr(value, "tolist") else value))
    if name in ("checkpoint_every", "time_budget") and isinstance(value, numbers.Real):
        # 500.0 steps is 500 (its text "500.0" was refused as no number of steps)
        return str(int(value)) if float(value).is_integer() else str(float(value))
    return value


@functools.cache
def field_kinds() -> dict[str, tuple[type, ...]]:
    """Each TrainConfig field's types, from its annotation (`int | None` -> (int, NoneType))."""
    return {name: typing.get_args(hint) or (hint,) for name, hint in typing.get_type_hints(TrainConfig).items()}


# `resunet ablate`'s rows: name -> the TrainConfig fields it changes. "seed 1" is the base again with another seed:
# the run-to-run noise the other rows are judged against.
ABLATION_OPTIONS: dict[str, dict] = {
    "baseline": {},
    "seed 1": {"seed": 1},
    "loss focal": {"loss": "focal"},
    "loss dice": {"loss": "dice"},
    "loss lovasz": {"loss": "lovasz"},
    "loss ohem": {"loss": "ohem"},
    "loss ce+dice": {"loss": "ce+dice"},
    "loss ce+lovasz": {"loss": "ce+lovasz"},
    "scheduler poly": {"scheduler": "poly"},
    "ema 0.999": {"ema": 0.999},
    "attention scse": {"attention": "scse"},
    "mix cutmix": {"mix": "cutmix"},
    "mix classmix": {"mix": "classmix"},
    "decoder 128,64,32,16": {"decoder_channels": "128,64,32,16"},
}


def config_fields():
    return fields(TrainConfig)


# export's options that mean something only beside another (option, what it needs): given without it, refused with
# one line, from the command line and from run_export alike (ignored, they misled: a --split without --data-root
# evaluated nothing).
EXPORT_OPTION_NEEDS = (("calibration", "--int8"), ("calibration_count", "--int8"), ("max_miou_drop", "--int8"),
                       ("max_miou_drop", "--data-root"), ("split", "--data-root"), ("workers", "--data-root"))
EXPORT_GRAPHS = ("end-to-end", "logits")


def export_refusal(int8: bool, data_root: str | None, **options) -> str | None:
    """Why export refuses these options (None given: left out), or None: the first option given without what it
    needs (EXPORT_OPTION_NEEDS)."""
    present = {"--int8": bool(int8), "--data-root": data_root is not None}
    for name, needed in EXPORT_OPTION_NEEDS:
        if options.get(name) is not None and not present[needed]:
            flag = "--" + name.replace("_", "-")
            return f"{flag} {options[name]} applies only with {needed}; give {needed} too, or leave {flag} out"
    return None
