"""`resunet export`: one portable ONNX file per model, checked against PyTorch before it is kept.

    resunet export runs/camvid/best.pt --onnx camvid.onnx                       # end-to-end graph, verified
    resunet export runs/camvid/best.pt --onnx camvid.onnx --data-root DATA     # + mIoU of the file on val
    resunet export runs/camvid/best.pt --onnx camvid.int8.onnx --int8 --calibration DATA   # INT8 (QDQ)
    resunet export runs/camvid/best.pt --onnx camvid-logits.onnx --logits      # the network alone

What the graphs are (ONNX opset 18, dynamic batch, height and width, metadata in `metadata_props`):
- end-to-end (default): `image` uint8 N×H×W×3 (RGB) → `mask` uint8 N×H×W class map and `logits` float N×C×H×W,
  both at the input's size. Inside: resize (shorter side = the working size, antialiased bilinear), normalisation,
  the network, the flip TTA if exported with `--tta flip`, bilinear upsampling back, argmax. `EndToEnd` below is that
  graph as a PyTorch module: it is what the exporter traces, and the verification runs the file against the toolkit's
  own `Predictor`, not against this module.
- logits (`--logits`): `input` float N×3×H×W, normalised (metadata `resunet.mean`/`resunet.std` on 0..1 pixels) →
  `logits` float N×C×H×W, same size (any size: the model pads to a multiple of 32 inside and crops back).

Verification (a failure deletes the file and exits non-zero): onnxruntime against PyTorch fp32 on four images of
different sizes, landscape and portrait (from --data-root's split, else --calibration's photos not calibrated on,
a quarter of a small folder's, at most 3, being kept apart for it, else generated scenes); the max absolute logit
difference must be < 1e-3 and the class maps must agree on ≥ 99.9% of the pixels. An INT8 file cannot meet a fp32
tolerance: its agreement, its speed against the fp32 file and (with `--data-root`) its mIoU drift are reported, and
the drift must stay within `--max-miou-drop` points; without `--data-root` no drift can be measured, and the agreement
must reach MIN_INT8_AGREEMENT instead.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import file_state, load_checkpoint, model_from_checkpoint, rename_over, temporary_path
from .config import EXPORT_GRAPHS, export_refusal
from .data.classes import ClassInfo
from .data.dataset import open_dataset, open_dataset_for_model
from .data.images import DataError, image_size, list_images, read_image
from .data.voc import find_voc_dir
from .evaluate import evaluate_dataset, strict_json
from .fingerprint import sha256_file
from .model.fold import fold_batchnorm
from .onnx_predictor import FORMAT_KEY, MIOU_CHECK_KEY, OnnxPredictor, check_end_to_end_bound, open_session
from .outputs import check_output_files, make_folders, names_a_folder, remove_empty_folders, resolved, write_output
from .predict import Predictor, check_working_size

OPSET = 18  # Resize with antialias (our downscaling) needs 18; current onnxruntime runs it natively
MAX_LOGIT_DIFF = 1e-3
MIN_AGREEMENT = 0.999
# An INT8 file checked on no labelled data: its class maps must agree with PyTorch fp32's on this share of the
# verification pixels (photos of --calibration it was not calibrated on). Measured on CamVid val (RESULTS.md), one
# model's INT8 variants: 98.79% agreement lost 0.90 points of mIoU, 97.46% lost 2.84, 92.29% lost 6.84; another
# model's file at 99.21% gained 0.08. The limit sits where --max-miou-drop's default, 1 point, would.
MIN_INT8_AGREEMENT = 0.985


class ExportError(ValueError):
    """Export or its verification failed; the message is one line."""


class EndToEnd(nn.Module):
    """uint8 N×H×W×3 → (uint8 N×H×W class map, float N×C×H×W logits), the `Predictor`'s steps in one module."""

    def __init__(self, network: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 tta: str = "none") -> None:
        super().__init__()
        if tta not in ("none", "flip"):
            raise ExportError(f"an end-to-end graph can hold --tta none or flip, not {tta!r} (use --logits)")
        self.network, self.size, self.tta = network, size, tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[1], image.shape[2]
        # transforms.resize_short_side in integer arithmetic on the (symbolic) input size: the same working size.
        short = torch.sym_min(height, width)
        work = ((2 * height * self.size + short) // (2 * short), (2 * width * self.size + short) // (2 * short))
        x = image.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=work, mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255 - self.mean) / self.std
        if self.tta == "flip":  # one network call on the image and its mirror, batched
            both = self.network(torch.cat([x, x.flip(-1)]))
            count = x.shape[0]
            logits = (both[:count] + both[count:].flip(-1)) / 2
        else:
            logits = self.network(x)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits.argmax(1).to(torch.uint8), logits


class StaticSamePadConv(nn.Module):
    """timm's TF-style 'same' convolution with its padding fixed for even input sizes.

    timm's Conv2dSame computes its padding from each input's size at run time; traced with a symbolic size that
    becomes a tangle of guards. Our model pads every input to a multiple of 32, so every stride-2 convolution sees an
    even size and the padding is a constant: the same arithmetic, written down once."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        pads = []
        for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation):
            total = max((k - 1) * d + 1 - s, 0)  # timm's get_same_padding for an input divisible by s
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        self.pad = (left, right, top, bottom)
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                              conv.groups, conv.bias is not None)
        self.conv.load_state_dict(conv.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


def static_same_padding(model: nn.Module) -> int:
    """Replace every timm Conv2dSame in place; returns how many."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                setattr(parent, name, StaticSamePadConv(child))
                replaced += 1
    return replaced


def prepare_network(model: nn.Module) -> nn.Module:
    """A model ready to trace, in place: eval mode, BatchNorm folded, static 'same' padding."""
    model.eval()
    fold_batchnorm(model)
    static_same_padding(model)
    return model


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, graph: str) -> None:
    batch, height, width = (torch.export.Dim(n, min=1) for n in ("batch", "height", "width"))
    if graph == "end-to-end":
        dims, names, outputs = {0: batch, 1: height, 2: width}, ["image"], ["mask", "logits"]
    else:
        dims, names, outputs = {0: batch, 2: height, 3: width}, ["input"], ["logits"]
    torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=(dims,), input_names=names,
                      output_names=outputs, opset_version=OPSET, external_data=False, verbose=False)


def set_metadata(path: Path, values: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "resunet"
    onnx.save(model, str(path))


def metadata_for(info: ClassInfo, size: int, mean: tuple[float, ...], std: tuple[float, ...], encoder: str,
                 graph: str, tta: str, source: Path | None = None, temperature: float = 1.0,
                 source_sha256: str | None = None) -> dict[str, str]:
    """What the file says about itself: enough to use it without resunet, and to trace it back to its checkpoint."""
    from . import __version__

    values = {
        FORMAT_KEY: graph,
        "resunet.classes": json.dumps(info.to_dict()),
        "resunet.class_names": json.dumps(list(info.names)),
        "resunet.palette": json.dumps([list(c) for c in info.palette]),
        "resunet.ignore_index": str(info.ignore_index),
        "resunet.num_classes": str(info.num_classes),
        "resunet.mean": json.dumps(list(mean)),
        "resunet.std": json.dumps(list(std)),
        "resunet.working_size": str(int(size)),
        "resunet.tta": tta,
        "resunet.encoder": encoder,
        "resunet.version": __version__,
        "resunet.int8": "false",
        # `resunet calibrate`'s temperature: probabilities are softmax(logits / T) (the class map does not change)
        "resunet.temperature": repr(float(temperature)),
        "resunet.input": ("image: uint8 N×H×W×3 RGB, any size" if graph == "end-to-end"
                          else "input: float32 N×3×H×W, (pixel/255 - mean) / std, resized first (antialiased "
                               "bilinear) so the shorter side is resunet.working_size; any size works, only that one "
                               "matches the checkpoint"),
        "resunet.output": ("mask: uint8 N×H×W class ids; logits: float32 N×C×H×W, both at the input size"
                           if graph == "end-to-end" else "logits: float32 N×C×H×W at the input size"),
    }
    if source is not None:
        values["resunet.source_checkpoint"] = source.name
        values["resunet.source_sha256"] = source_sha256 or sha256_file(source)
    return values


def write_model_onnx(network: nn.Module, path: Path, graph: str, size: int, mean: tuple[float, ...],
                     std: tuple[float, ...], tta: str = "none") -> None:
    """Trace `network` (prepared by `prepare_network`) into `path` as an end-to-end or logits graph."""
    draws = torch.Generator().manual_seed(0)  # not the caller's generator
    if graph == "end-to-end":
        module = EndToEnd(network, size, mean, std, tta).eval()
        example = torch.randint(0, 256, (1, 75, 101, 3), dtype=torch.uint8, generator=draws)
    else:
        module, example = network, torch.randn(1, 3, 96, 128, generator=draws)
    with torch.no_grad():
        write_onnx(module, example, path, graph)


# ---- verification ----------------------------------------------------------------------------------------------


def verification_sizes(size: int) -> list[tuple[int, int]]:
    """(height, width) of the verification images for working size `size`: odd sides, enlarged and reduced to the
    working size, landscape and portrait. The sizes were fixed (75×101, 257×333, 360×480): all landscape, and at
    working size 360 none reduced, so a graph that resized without antialiasing, or took the height for the short
    side, passed at 100% (a helper, 2026-12-06)."""
    small, large = ((size // 2 + 11) | 1, (2 * size // 3 + 17) | 1), ((3 * size // 2) | 1, (2 * size) | 1)
    return [small, small[::-1], large, large[::-1]]


def verification_images(sources: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Real pictures at the verification sizes (resized from `sources`; generated scenes when there are none)."""
    sizes = verification_sizes(size)
    if not sources:
        from .data.demo import make_sample

        rng = np.random.default_rng(0)
        sources = [np.array(make_sample(rng, 256)[0]) for _ in sizes]
    return [np.array(Image.fromarray(sources[i % len(sources)]).resize((w, h), Image.BILINEAR))
            for i, (h, w) in enumerate(sizes)]


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


@dataclass
class Parity:
    max_logit_diff: float
    agreement: float  # fraction of pixels whose class is the same
    sizes: list[tuple[int, int]]


@torch.no_grad()
def check_parity(candidate: OnnxPredictor, reference: Predictor, images: list[np.ndarray]) -> Parity:
    """Logits and class maps of the file against PyTorch fp32, image by image."""
    worst, same, total = 0.0, 0, 0
    for image in images:
        batch = as_batch(image)
        reference_logits = reference.logits(batch)  # at the image's size
        expected = reference_logits.argmax(1)[0].cpu()
        if candidate.graph == "logits":  # the network's own output, at the working size
            x = reference.preprocess(batch)
            difference = candidate.network(x) - reference.network(x).float()
            mask = candidate.predict_tensor(batch)[0]
        else:
            feed = np.ascontiguousarray(image[None])
            mask_np, logits_np = candidate.session.run(None, {candidate.input_name: feed})
            difference = torch.from_numpy(logits_np) - reference_logits
            mask = torch.from_numpy(mask_np[0]).long()
        worst = max(worst, float(difference.abs().max()))
        same += int((mask == expected).sum())
        total += expected.numel()
    return Parity(worst, same / total, [tuple(i.shape[:2]) for i in images])


def images_per_second(predictor: Predictor, images: list[np.ndarray], repeats: int = 3) -> float:
    """Median over `repeats` passes over `images` (one call each), after one warm-up pass."""
    batches = [as_batch(i) for i in images]
    for batch in batches:
        predictor.predict_tensor(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            predictor.predict_tensor(batch)
        times.append(time.perf_counter() - start)
    return len(batches) / statistics.median(times)


# ---- INT8 -----------------------------------------------------------------------------------------------------------


def calibration_paths(root: str | Path) -> list[Path]:
    """The images INT8 calibration may use under `root`: a dataset's train split; else, as calibration needs no
    masks, a VOC tree's JPEGImages, an unlabelled `root/train/images` or `root/images` folder, or the images in
    `root` itself."""
    root = Path(root)
    if root.is_file():
        raise ExportError(f"--calibration {root}: a file; give a folder of images (or a dataset root)")
    if not root.is_dir():
        raise ExportError(f"--calibration {root}: calibration folder not found")
    dataset_error = None
    try:
        paths = open_dataset(root, "train").image_paths
    except DataError as error:  # a missing mask or classes.json does not matter here; said below if nothing is found
        dataset_error, paths = str(error), []
        voc_dir = find_voc_dir(root)
        voc_photos = () if voc_dir is None else (voc_dir / "JPEGImages",)
        for folder in (*voc_photos, root / "train" / "images", root / "images", root):
            if folder.is_dir() and (paths := list_images(folder)):
                break
    if not paths:
        why = f"; as a dataset: {dataset_error}" if dataset_error else ""
        raise ExportError(f"--calibration {root}: no calibration images found (a dataset root with a train split, "
                          f"an images or train/images folder, or a folder of images){why}")
    return paths


def spread(paths: list[Path], count: int) -> list[Path]:
    """`count` of `paths` spread evenly from the first to the last (all when there are no more): over the split, not
    its first files (a step of len // count took the first `count` of a split under twice `count`)."""
    chosen = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).round()})
    return [paths[i] for i in chosen]


def calibration_images(root: str | Path, count: int, paths: list[Path] | None = None,
                       size: int | None = None) -> list[np.ndarray]:
    """`count` images of `calibration_paths(root)` (or of `paths`, listed from it before), as `read_calibration`
    reads them."""
    paths = calibration_paths(root) if paths is None else paths
    return [image for _, image in read_calibration(root, paths, count, size)]


def read_calibration(root: str | Path, paths: list[Path], count: int,
                     size: int | None = None) -> list[tuple[Path, np.ndarray]]:
    """(path, image) for `count` of `paths`, spread evenly over the list from its first to its last. An unreadable
    image, or with `size` (the model's working size) one the model cannot take at that size (a strip past the
    working-size limit), is skipped and named, and another of the list read in its place (a folder of 3 good photos
    and 3 bad ones was refused at --calibration-count 2). ExportError if none can be used."""
    read, skipped = [], []
    picked = spread(paths, count)
    chosen = set(picked)
    for path in [*picked, *(path for path in paths if path not in chosen)]:
        if len(read) == count:
            break
        try:
            image = read_image(path)
            if size is not None:
                check_working_size(image.shape[0], image.shape[1], size)
            read.append((path, image))
        except DataError as error:  # one bad photo should not stop a quantisation the others can calibrate
            skipped.append(str(error) if str(path) in str(error) else f"{path}: {error}")
    for line in skipped:
        print(f"calibration: skipped {line}", file=sys.stderr)
    if not read:
        raise ExportError(f"--calibration {root}: none of the {len(skipped)} calibration images could be used")
    return read


def quantize_int8(fp32_path: Path, out_path: Path, images: list[np.ndarray], graph: str,
                  reference: Predictor) -> None:
    """Static INT8 quantisation in onnxruntime: QDQ, per-channel int8 weights, uint8 activations calibrated (min/max)
    on `images` fed exactly as the deployed file will see them."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    session_input = "image" if graph == "end-to-end" else "input"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self) -> dict | None:
            image = next(self.items, None)
            if image is None:
                return None
            if graph == "end-to-end":
                return {session_input: np.ascontiguousarray(image[None])}
            return {session_input: reference.preprocess(as_batch(image)).numpy()}

    with tempfile.TemporaryDirectory(prefix="resunet-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # Only the network's convolutions are quantised: the resize, normalisation and argmax around it stay float.
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "ConvTranspose", "Concat", "Add", "Mul", "Relu", "Clip"],
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


# ---- the command ----------------------------------------------------------------------------------------------------


def write_json(result: dict, path: str | Path | None) -> None:
    if path:
        # numpy scalars and the like as text, as before; NaN as null, so that every JSON parser reads it
        write_output(path, strict_json(json.loads(json.dumps(result, default=str))))


def run_export(checkpoint: str, onnx_out: str, graph: str = "end-to-end", tta: str = "none", int8: bool = False,
               calibration: str | None = None, calibration_count: int | None = None, data_root: str | None = None,
               split: str | None = None, max_miou_drop: float | None = None, workers: int | None = None,
               json_out: str | None = None) -> dict:
    """Export, verify, optionally quantise and evaluate; print what was checked; return the figures (and write them
    to `json_out`, also when the file is refused for its parity or mIoU, so the measurements are not lost).
    `graph`: "end-to-end" or "logits". None: the default, 64 calibration images, the val split, a 1.0-point mIoU
    limit for INT8, 2 workers; an option given without what it needs (`calibration` without `int8`, `split` without
    `data_root`, ...) is refused as the command refuses it (ExportError)."""
    if graph not in EXPORT_GRAPHS:  # a typo exported a logits graph, refused after the trace naming a temporary file
        raise ExportError(f"graph {graph!r}: choose {' or '.join(map(repr, EXPORT_GRAPHS))}")
    # (workers without data_root, a reading setting for an evaluation not asked for, is let be here)
    if refusal := export_refusal(int8, data_root, calibration=calibration, calibration_count=calibration_count,
                                 max_miou_drop=max_miou_drop, split=split):
        raise ExportError(refusal)
    calibration_count = 64 if calibration_count is None else calibration_count
    split, workers = split or "val", 2 if workers is None else workers
    max_miou_drop = 1.0 if max_miou_drop is None else max_miou_drop
    source, out = Path(checkpoint), Path(onnx_out)
    if int8 and not calibration:
        raise ExportError("--int8 needs --calibration DIR (training images to calibrate activations on)")
    if graph == "logits" and tta != "none":
        raise ExportError("a logits graph holds the network alone: apply --tta when predicting with it")
    # Checked before any work: the outputs must be .onnx files (resunet loads a model by its suffix), must not be
    # folders, and must not replace the checkpoint they come from.
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--onnx {out}: name the file *.onnx (resunet tells a model's kind by its suffix)")
    if names_a_folder(onnx_out):  # checked here too: `out` is a Path, its slash dropped, before the outputs' check
        raise ExportError(f"--onnx {onnx_out}: is a folder; give a file name")
    written = [out, out.with_name(out.stem + ".fp32.onnx")] if int8 else [out]
    for path in written:
        if path.is_dir():
            raise ExportError(f"--onnx {out}: {path} is a folder")
        if path.exists() and source.exists() and path.resolve() == source.resolve():
            raise ExportError(f"--onnx {out}: {path} is the checkpoint being exported; choose another name")
    if int8 and calibration_count < 1:
        raise ExportError(f"--calibration-count {calibration_count}: at least 1 image")
    # Every file written (an INT8 export keeps OUT.fp32.onnx too) must differ from the others and from every input.
    outputs = [("--onnx", out), ("--onnx (fp32 copy)", written[-1] if int8 else None), ("--json", json_out)]
    calibration_files = calibration_paths(calibration) if int8 else []  # a listing: cheap, and before any work
    # The file as read: one saved again during the export (a run still training into its folder) is refused at the
    # end; its hash, taken later, named the newer model in a file holding the earlier one (`predict --backend auto`
    # then ran it as the newer)
    loaded = file_state(source) if source.is_file() else None
    payload = load_checkpoint(source)
    source_sha256 = sha256_file(source)
    reference = Predictor.from_payload(payload, source, device="cpu", precision="fp32", tta=tta)  # description read
    check_output_files(outputs, inputs=[source])
    if reference.info.num_classes > 256:
        raise ExportError(f"{source}: {reference.info.num_classes} classes do not fit a uint8 mask")
    network = prepare_network(model_from_checkpoint(payload, source))
    mean, std, size = reference.mean, reference.std, reference.size
    dataset = open_dataset_for_model(data_root, split, reference.info) if data_root else None
    dataset_files = [*dataset.image_paths, *dataset.mask_paths] if dataset is not None else []
    # An image the evaluations cannot take is refused now: they found it after the export (and the end-to-end
    # file's, after the PyTorch pass too), minutes later, with no --json written
    for path in dataset.image_paths if dataset is not None else []:
        width, height = image_size(path)
        try:
            reference.check_size(height, width)  # a strip past the working-size limit
            if graph == "end-to-end":
                check_end_to_end_bound(reference.info.num_classes, height, width)
        except DataError as error:
            raise ExportError(f"{path}: {error}; nothing exported, as the file could not be checked on this "
                              "--split") from None
    check_output_files(outputs, inputs=[source, *dataset_files, *calibration_files], data_root=data_root)
    if int8 and calibration is not None:  # a dataset read for calibration is one too: its classes.json, split lists
        check_output_files(outputs, data_root=calibration)
    # Read now: an unreadable calibration set is refused before the export and its verification, not after them.
    pool = calibration_files
    if int8 and data_root is None and len(calibration_files) <= calibration_count:
        # Without --data-root the INT8 file's one check is its agreement on photos it was not calibrated on: a folder
        # of no more photos than --calibration-count keeps a quarter of them (at most 3) apart for it, or the check
        # ran on the calibration photos themselves and flattered the file.
        kept_apart = set(spread(calibration_files, min(3, len(calibration_files) // 4)))
        pool = [path for path in calibration_files if path not in kept_apart]
    calibration_read = read_calibration(calibration, pool, calibration_count, reference.size) if int8 else []
    calibration_set = [image for _, image in calibration_read]
    calibrated_on = {path for path, _ in calibration_read}  # the photos calibrated on, replacements included
    # Real photos where there are any: generated scenes put the CamVid model's INT8 agreement at 86.71%, against
    # 99.36% on its val images at the same mIoU. Without --data-root, photos the INT8 file was not calibrated on.
    sources, source_name = [], "generated scenes"
    held_out = [path for path in calibration_files if path not in calibrated_on]
    if dataset is not None:
        sources, source_name = [dataset.load(i).image for i in range(min(3, len(dataset)))], f"{split} images"
    elif held_out:
        try:
            sources, source_name = calibration_images(calibration, 3, held_out, size), "held-out calibration images"
        except ExportError:  # none of them readable (each named): the calibrated-on photos below
            pass
    if not sources and calibration_set:  # fewer than 4 photos, or none of those kept apart readable
        sources, source_name = calibration_set[:3], "calibration images (also calibrated on)"
    images = verification_images(sources, size)
    # The checks run on each verification size, resized from at most 3 pictures: "4 held-out calibration images"
    # said four photos where the folder had kept one or two apart.
    pictures = (f"{len(images)} pictures resized from {len(sources)} of the {source_name}" if sources
                else f"{len(images)} {source_name}")
    result: dict = {"checkpoint": str(source), "onnx": str(out), "graph": graph, "tta": tta, "int8": int8,
                    "verified_on": source_name, "verified_sources": len(sources) or len(images)}

    def refuse(message: str) -> ExportError:
        """The error for a file not kept; its figures still go to --json (with the fp32 file only if it is kept: a
        script deploying `fp32_file` after a refusal shipped an earlier export's, or a file not there)."""
        result.update(onnx_kept=False, error=message, fp32_file=str(fp32_path) if int8 and keeps_fp32 and verified
                      else None)
        write_json(result, json_out)
        return ExportError(message)

    fp32_path = out.with_name(out.stem + ".fp32.onnx") if int8 else out
    # Written where a link points, with an earlier file's permissions (as every other output): the link to a
    # release's file was replaced by a plain file, and a file other users read became the umask's 0600.
    out_file, fp32_file = resolved(out), resolved(fp32_path)
    tmp = temporary_path(fp32_file)
    # A file takes its name only once its checks have passed (parity, then the mIoU check): a failed or interrupted
    # export leaves an earlier file of that name as it was, and no folder it made. An INT8 export's two files take
    # their names together, so an earlier pair is never split (the next checkpoint's fp32 copy beside the earlier
    # INT8 file); a refused INT8 file leaves its verified fp32 copy only where no earlier OUT stands.
    keeps_fp32 = int8 and not out_file.exists()
    fp32_note = (f"the verified fp32 file is {fp32_path}" if keeps_fp32
                 else f"{out} and {fp32_path} are left as they were")
    made = make_folders(fp32_file.parent)
    verified = False  # the fp32 file passed its parity check
    try:
        started = time.perf_counter()
        write_model_onnx(network, tmp, graph, size, mean, std, tta)
        set_metadata(tmp, metadata_for(reference.info, size, mean, std, payload["model_config"]["encoder"], graph,
                                       tta, source, payload.get("temperature", 1.0), source_sha256))
        result["export_s"] = time.perf_counter() - started
        fp32 = OnnxPredictor(tmp)
        parity = check_parity(fp32, reference, images)
        sizes = ", ".join(f"{w}×{h}" for h, w in parity.sizes)
        print(f"parity, onnxruntime fp32 vs PyTorch fp32 on {pictures} ({sizes}): max |Δlogit| "
              f"{parity.max_logit_diff:.2e} (limit {MAX_LOGIT_DIFF:g}), class maps agree on "
              f"{100 * parity.agreement:.3f}% of pixels (limit {100 * MIN_AGREEMENT:g}%)")
        result["parity"] = {"max_logit_diff": parity.max_logit_diff, "agreement": parity.agreement,
                            "sizes": parity.sizes}
        if parity.max_logit_diff >= MAX_LOGIT_DIFF or parity.agreement < MIN_AGREEMENT:
            raise refuse(f"{out}: the exported graph does not match PyTorch (max |Δlogit| "
                         f"{parity.max_logit_diff:.2e}, agreement {100 * parity.agreement:.3f}%); file not kept")
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_empty_folders(made)
        raise
    verified = True

    final = fp32
    # The file asked for takes its name only after the mIoU check below, and a file that fails the check is
    # removed: nothing unchecked is left where a deployment would pick it up (an INT8 export's fp32 file stays).
    checked = temporary_path(out_file) if int8 else tmp
    try:
        if int8:
            started = time.perf_counter()
            quantize_int8(tmp, checked, calibration_set, graph, reference)
            set_metadata(checked, {"resunet.int8": "true", "resunet.calibration_images": str(len(calibration_set))})
            final = OnnxPredictor(checked)
            result["quantize_s"] = time.perf_counter() - started
            agreement = check_parity(final, reference, images).agreement
            speed_fp32, speed_int8 = images_per_second(fp32, images), images_per_second(final, images)
            result["int8"] = {"calibration_images": len(calibration_set), "agreement": agreement,
                              "fp32_images_per_s": speed_fp32, "int8_images_per_s": speed_int8}
            print(f"INT8 (QDQ, per-channel weights, {len(calibration_set)} calibration images): class maps agree with "
                  f"PyTorch fp32 on {100 * agreement:.2f}% of the pixels of the {pictures}; "
                  f"{speed_int8:.2f} img/s vs {speed_fp32:.2f} img/s for the fp32 file "
                  f"({speed_int8 / speed_fp32:.2f}×)")
            if dataset is None and agreement < MIN_INT8_AGREEMENT:  # the one check there is without labels
                raise refuse(f"{out}: INT8 class maps agree with PyTorch fp32 on only {100 * agreement:.2f}% of the "
                             f"pixels (limit {100 * MIN_INT8_AGREEMENT:g}% without --data-root); file not kept; "
                             f"{fp32_note}; give --data-root to judge it by its mIoU instead")

        if dataset is not None:
            ref_scores = evaluate_dataset(reference, dataset, workers=workers, progress=False).compute()
            file_scores = evaluate_dataset(final, dataset, workers=workers, progress=False).compute()
            drift = 100 * (file_scores["miou"] - ref_scores["miou"])
            result["miou"] = {"split": split, "images": len(dataset), "pytorch_fp32": ref_scores["miou"],
                              "onnx": file_scores["miou"], "drift_points": drift}
            if not math.isfinite(drift):  # NaN passed the check below: an unchecked file kept, marked as checked
                raise refuse(f"{dataset.description}: no pixel of its {split} masks is labelled (all the ignore "
                             "label), so the file's mIoU cannot be checked on it; give --split another split")
            print(f"mIoU on {dataset.description} ({len(dataset)} images, original resolution): PyTorch fp32 "
                  f"{100 * ref_scores['miou']:.2f}%, {out.name} {100 * file_scores['miou']:.2f}% ({drift:+.2f} points)")
            limit = max_miou_drop if int8 else 0.1
            if drift < -limit:  # the file is removed below
                kept = f"; {fp32_note}" if int8 else ""
                raise refuse(f"{out}: mIoU fell {-drift:.2f} points (limit {limit:g}) on {split}; file not "
                             f"kept{kept}")
            if int8:  # what `predict --backend auto` asks before it lets an INT8 file win on speed
                set_metadata(checked, {MIOU_CHECK_KEY: json.dumps(
                    {"split": split, "images": len(dataset), "drift_points": round(drift, 4), "limit": limit})})
        elif int8:
            print(f"{out.name}: INT8 not checked on labelled images (no --data-root): no mIoU drift is known, and "
                  "predict --backend auto will not pick it")
        if loaded is not None and file_state(source) != loaded:
            keeps_fp32 = False
            raise refuse(f"{source}: saved again while it was exported (a run still writing it?); file not kept: "
                         "export it again once it is written")
    except BaseException as error:  # a failed check, a failed or interrupted quantisation: no temporary file is left
        checked.unlink(missing_ok=True)
        if keeps_fp32 and isinstance(error, ExportError):
            rename_over(tmp, fp32_file)
        else:
            tmp.unlink(missing_ok=True)
            remove_empty_folders(made)
        raise
    if int8:
        rename_over(tmp, fp32_file)
    rename_over(checked, out_file)
    result.update(onnx_kept=True, fp32_file=str(fp32_path))
    write_json(result, json_out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {graph} graph{', INT8' if int8 else ''}"
          f"{', tta ' + tta if tta != 'none' else ''})")
    return result
