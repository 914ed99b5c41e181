"""Predicting with an exported `.onnx` file in onnxruntime: the same `Predictor` interface, no PyTorch model.

The file describes itself (ONNX metadata written by `resunet export`): classes, palette, ignore label, working size,
normalisation, which graph it holds. Two kinds of graph:

- "end-to-end": uint8 N×H×W×3 image in, uint8 N×H×W class map and float N×C×H×W full-size logits out; resize,
  normalisation, the network, the flip TTA chosen at export, upsampling and argmax are all inside the graph. It
  answers `predict_tensor`, probabilities and confidence in one call each; it has no working-size logits, so
  multi-scale TTA, sliding windows and ensembles need the logits graph.
- "logits": the network alone (normalised float N×3×H×W in, logits out); everything around it runs here exactly as
  for a `.pt` checkpoint, so every TTA mode and sliding window work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import CheckpointError, UnsupportedOptionError, checked_temperature, file_state
from .fingerprint import file_kind
from .data.classes import ClassInfo
from .data.images import DataError
from .predict import (AUTO_TTA, DEFAULT_SCALES, ONNX_PRECISIONS, Predictor, check_batch, check_image_tensor,
                      onnx_runs_on)
from .runtime import DeviceError, available_cores

FORMAT_KEY = "resunet.graph"
# Written by export once an INT8 file passed its mIoU check on labelled data (split, images, drift): an INT8 file
# without it was never measured, and `--backend auto` does not let it win on speed alone.
MIOU_CHECK_KEY = "resunet.miou_check"
GRAPHS = ("end-to-end", "logits")
# An 8000×8000 image through an end-to-end graph of 21 classes took 7 GB; past this, such a graph refuses the image.
END_TO_END_MAX_LOGIT_BYTES = 2 * 2**30


class LogitBoundError(DataError):
    """An image whose full-size logits an end-to-end graph cannot hold (END_TO_END_MAX_LOGIT_BYTES): the checkpoint,
    or a --logits file, takes it."""


def checked_metadata(props: dict[str, str], path: str | Path) -> dict[str, str]:
    """`props` if they are resunet's; a one-line CheckpointError for any other ONNX file."""
    kind = props.get(FORMAT_KEY)
    if kind is None:
        raise CheckpointError(f"{path}: an ONNX file, but not one exported by resunet (no resunet metadata)")
    if kind not in GRAPHS:  # a later resunet's kind of graph: "not one exported by resunet" sent the user astray
        version = props.get("resunet.version")
        by = f"resunet {version}" if version else "another resunet version"
        raise CheckpointError(f"{path}: a resunet graph of kind {kind!r} (exported by {by}), which this resunet "
                              f"({__version__}) cannot run: it runs {' and '.join(GRAPHS)} graphs")
    return props


def unreadable_onnx_reason(path: Path, error: Exception, reader: str = "onnxruntime") -> str:
    """Why an .onnx file could not be opened: a resunet checkpoint given the wrong suffix is named as one."""
    kind = file_kind(path)
    if kind == "zip":
        return "it is a zip archive, as a PyTorch checkpoint is: name a resunet checkpoint .pt"
    if kind == "empty":
        return "an empty file: an export or copy cut short?"
    message = str(error).strip()
    return f"{reader}: {message.splitlines()[0][:160]}" if message else type(error).__name__


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's metadata_props without starting onnxruntime (the protobuf, weights included, is parsed); a
    one-line CheckpointError for a bad file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # truncated protobuf, random bytes, a text file: all the same to a user
        raise CheckpointError(f"{path}: not a readable ONNX file ({unreadable_onnx_reason(path, error, 'onnx')})"
                              ) from None
    return checked_metadata({p.key: p.value for p in model.metadata_props}, path)


def open_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # truncated protobuf, random bytes, a text file: all the same to a user
        raise CheckpointError(f"{path}: not a readable ONNX file ({unreadable_onnx_reason(path, error)})") from None


# What each graph takes and gives (ONNX Runtime's names for the types; None: a dimension left free).
SIGNATURES = {"end-to-end": (("tensor(uint8)", (None, None, None, 3)), ["tensor(uint8)", "tensor(float)"]),
              "logits": (("tensor(float)", (None, 3, None, None)), ["tensor(float)"])}


def check_signature(session, graph: str, num_classes: int, path: Path) -> None:
    """CheckpointError (one line) when the graph does not take and give what resunet feeds and reads for `graph`:
    images of any batch and size. onnxruntime's own make_dynamic_shape_fixed keeps the metadata of a file whose
    input it fixed to one size, and such a file ended predict and evaluate at its first other image with
    onnxruntime's traceback (a helper, 2026-12-06)."""
    (input_type, input_shape), output_types = SIGNATURES[graph]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    takes = f"{inputs[0].type} {inputs[0].shape}" if len(inputs) == 1 else f"{len(inputs)} inputs"
    problem = None
    if len(inputs) != 1 or inputs[0].type != input_type or len(inputs[0].shape) != 4:
        problem = f"its graph takes {takes}"
    elif any(isinstance(have, int) if want is None else have != want
             for have, want in zip(inputs[0].shape, input_shape)):
        problem = f"its graph takes only {takes} (fixed sides or batch: resunet feeds any)"
    elif [o.type for o in outputs] != output_types or not all(len(o.shape) in (3, 4) for o in outputs):
        problem = f"its graph gives {[f'{o.type} {o.shape}' for o in outputs]}"
    elif isinstance(outputs[-1].shape[1], int) and outputs[-1].shape[1] != num_classes:
        problem = f"its graph gives {outputs[-1].shape[1]} classes, its metadata {num_classes}"
    if problem:
        layout = "uint8 N×H×W×3" if graph == "end-to-end" else "float N×3×H×W"
        raise CheckpointError(f"{path}: resunet metadata for the {graph} graph ({layout} of any size), but {problem}; "
                              "export it again from its checkpoint")


class OnnxPredictor(Predictor):
    """`Predictor` over an exported file (CPU, onnxruntime, threads = the cores unless given)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, tta: str = AUTO_TTA, scales: tuple[float, ...] = DEFAULT_SCALES,
                 window: int | None = None, stride: int | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        # The metadata comes from the session: the file is parsed once, by onnxruntime.
        self.session = open_session(path, threads)
        self.metadata = checked_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        meta = self.metadata
        try:
            self.graph = meta[FORMAT_KEY]
            self.info = ClassInfo.from_dict(json.loads(meta["resunet.classes"]), str(path), distinct_colours=False)
            self.size = int(meta["resunet.working_size"])
            self.mean = tuple(json.loads(meta["resunet.mean"]))
            self.std = tuple(json.loads(meta["resunet.std"]))
            self.baked_tta = meta.get("resunet.tta", "none")
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{self.path}: resunet metadata incomplete ({error})") from None
        # files exported before it was stored: 1
        self.temperature = checked_temperature(meta.get("resunet.temperature", "1.0"), self.path)
        self.quantized = meta.get("resunet.int8") == "true"
        check_signature(self.session, self.graph, self.info.num_classes, self.path)
        self.input_name = self.session.get_inputs()[0].name
        self.first_output = [self.session.get_outputs()[0].name]  # the mask of an end-to-end graph (not its logits)
        # Both graphs give probabilities (an end-to-end one from its full-size logits output); only the logits graph
        # gives working-size logits, which TTA, windows and ensembles combine.
        self.has_logits, self.has_working_logits = True, self.graph == "logits"
        self.device, self.dtype, self.channels_last, self.bf16_weights, self.model = (
            torch.device("cpu"), None, False, False, None)
        self.set_inference(tta, scales, window, stride)

    def precision_name(self) -> str:
        return "int8" if self.quantized else "fp32"

    def set_inference(self, tta: str = AUTO_TTA, scales: tuple[float, ...] = DEFAULT_SCALES, window: int | None = None,
                      stride: int | None = None) -> None:
        if self.graph == "end-to-end":
            # The graph holds its own pre- and post-processing: it can do only what it was exported with. An
            # explicit "none" is refused too: it ran a graph exported with flip as flip without a word.
            tta = self.baked_tta if tta == AUTO_TTA else tta
            if window is None and stride is not None:  # as Predictor says it (dropped here without a word)
                raise ValueError(f"stride {stride} needs a window")
            if tta != self.baked_tta or window is not None:
                asked = f"--tta {tta}" if tta != self.baked_tta else "--window"
                again = f"export it again with --tta {tta}, or " if tta in ("none", "flip") and window is None else ""
                raise UnsupportedOptionError(
                    f"{self.path}: an end-to-end graph exported with tta '{self.baked_tta}' cannot run {asked}; "
                    f"{again}export with --logits for any TTA or sliding window")
            super().set_inference(self.baked_tta, scales, None, None)
            return
        super().set_inference(tta, scales, window, stride)

    def network(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph != "logits":
            raise RuntimeError("an end-to-end graph has no logits output")
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: feed})[0])

    def low_res_logits(self, groups: list[torch.Tensor]) -> list[list[tuple[float, list[torch.Tensor]]]]:
        if self.graph != "logits":
            raise CheckpointError(f"{self.path}: an end-to-end graph outputs full-size class maps and logits, not the "
                                  "working-size logits this needs (export with --logits)")
        return super().low_res_logits(groups)

    def check_size(self, height: int, width: int, count: int = 1) -> None:
        super().check_size(height, width)
        if self.graph == "end-to-end":
            check_end_to_end_bound(self.info.num_classes, height, width, count)

    def logit_bytes(self, height: int, width: int) -> int:
        return end_to_end_logit_bytes(self.info.num_classes, height, width)

    def batch_key(self, height: int, width: int) -> tuple:
        # An end-to-end graph takes the images at their own size: a batch needs one size.
        return (height, width) if self.graph == "end-to-end" else super().batch_key(height, width)

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.graph == "logits":
            return super().predict_batch(images)
        check_batch(images)
        if len({image.shape for image in images}) > 1:
            raise ValueError("predict_batch: an end-to-end graph takes a batch of one size; call predict on each")
        feed = np.ascontiguousarray(np.stack(images), dtype=np.uint8)
        return list(self.run_in_parts(feed, self.first_output)[0].astype(np.uint8))

    def run_end_to_end(self, images: torch.Tensor, logits: bool = False) -> list[np.ndarray]:
        """N×3×H×W uint8 (one size) → the graph's class maps, and on request its full-size logits."""
        return self.run_in_parts(graph_feed(images), None if logits else self.first_output)

    def run_in_parts(self, feed: np.ndarray, outputs: list[str] | None) -> list[np.ndarray]:
        """N×H×W×3 uint8 through the end-to-end graph. Class maps alone: as many images per run as their full-size
        logits allow; each image must fit (check_size), a batch of them need not (the service batches concurrent
        requests). With the logits (`outputs` None) the whole batch's are returned at once, so the batch must fit."""
        height, width = feed.shape[1:3]
        if outputs is None:
            self.check_size(height, width, len(feed))
            return self.session.run(None, {self.input_name: feed})
        parts = list(self.runs(feed, outputs))
        return parts[0] if len(parts) == 1 else [np.concatenate(pieces) for pieces in zip(*parts)]

    def runs(self, feed: np.ndarray, outputs: list[str] | None) -> Iterator[list[np.ndarray]]:
        """N×H×W×3 uint8 through the end-to-end graph, as many images a run as their full-size logits allow (each
        must fit): each run's `outputs` (None: all, the logits too)."""
        height, width = feed.shape[1:3]
        self.check_size(height, width)  # the graph resizes inside: bound it before
        per_run = max(1, END_TO_END_MAX_LOGIT_BYTES // self.logit_bytes(height, width))
        for start in range(0, len(feed), per_run):
            yield self.session.run(outputs, {self.input_name: feed[start:start + per_run]})

    def logits_by_group(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.graph == "logits":
            return super().logits_by_group(groups)
        return [torch.from_numpy(self.run_end_to_end(images, logits=True)[1]) for images in groups]

    def full_size_maps(self, groups: list[torch.Tensor], confidence: bool = False
                       ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.graph == "logits":
            return super().full_size_maps(groups, confidence)
        results = []
        for images in groups:  # as many images a run as their logits allow: the batch's are never held at once
            maps, chosen = [], []
            for part_maps, logits in self.runs(graph_feed(images), None):
                maps.append(torch.from_numpy(part_maps))
                if confidence:
                    chosen.append((torch.from_numpy(logits) / self.temperature).softmax(1).amax(1))
            results.append((torch.cat(maps), torch.cat(chosen) if confidence else None))
        return results

    def predict_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W uint8 → N×H×W int64 class maps."""
        check_image_tensor(images)
        if self.graph == "logits":
            return super().predict_tensor(images)
        return torch.from_numpy(self.run_end_to_end(images)[0]).long()


def end_to_end_logit_bytes(num_classes: int, height: int, width: int) -> int:
    # The graph upsamples the logits to full size before its argmax (ONNX has no fused form): C floats a pixel.
    return num_classes * height * width * 4


def check_end_to_end_bound(num_classes: int, height: int, width: int, count: int = 1) -> None:
    """LogitBoundError when an end-to-end graph of `num_classes` would hold more than END_TO_END_MAX_LOGIT_BYTES of
    full-size logits for `count` images of height×width."""
    needed = count * end_to_end_logit_bytes(num_classes, height, width)
    if needed > END_TO_END_MAX_LOGIT_BYTES:
        # Up to the next hundredth and the limit down: "2.0 GiB (limit 2 GiB)" read as within it (2.03 GiB)
        over = math.ceil(needed / 2**30 * 100) / 100
        limit = math.floor(END_TO_END_MAX_LOGIT_BYTES / 2**30 * 100) / 100
        raise LogitBoundError(f"{width}×{height}: this end-to-end graph would hold {over:.2f} GiB of full-size "
                              f"logits (limit {limit:.2f} GiB); export "
                              "with --logits, which resunet upsamples without them, or shrink the image")


def graph_feed(images: torch.Tensor) -> np.ndarray:
    """N×3×H×W images (one size, uint8 or float 0..255) as the end-to-end graph takes them: N×H×W×3 uint8,
    contiguous. Floats are rounded to the nearest pixel value in 0..255: cast as they were, a bicubic resize's 256.4
    wrapped to 0 (a black edge) and every fraction was cut down; a bf16 tensor has no NumPy form."""
    check_image_tensor(images)
    if images.is_floating_point():
        images = images.float().clamp(0, 255).round().to(torch.uint8)
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy(), dtype=np.uint8)


def exported_siblings(checkpoint: str | Path) -> tuple[list[Path], list[Path], list[str]]:
    """`.onnx` files beside a checkpoint that `resunet export` made from exactly that file (sha256 in metadata),
    those made from an earlier file of its name (calibrated or trained on since): out of date, to be named, and those
    that cannot be read (damaged, cut short), named with why."""
    from .fingerprint import sha256_file

    checkpoint = Path(checkpoint)
    # Any case of the suffix, as `load` reads it: model.ONNX was passed over without a word
    candidates = sorted(path for path in checkpoint.parent.iterdir() if path.suffix.lower() == ".onnx"
                        and path.is_file())
    if not candidates:
        return [], [], []
    digest = sha256_file(checkpoint)
    found, stale, unreadable = [], [], []
    for path in candidates:
        try:
            metadata = read_metadata(path)
        except CheckpointError as error:  # passed over without a word: a cut-short copy of this checkpoint's export
            unreadable.append(f"{path.name} ({str(error).replace(f'{path}: ', '', 1).split(' (')[0]})")
            continue
        if metadata.get("resunet.source_sha256") == digest:
            found.append(path)
        elif metadata.get("resunet.source_checkpoint") == checkpoint.name:
            stale.append(path)
    return found, stale, unreadable


def measured_drift(check: str) -> bool:
    """Whether an INT8 file's stored mIoU check holds a measured drift: exports of 2026-12-05 to 12-07 (4752a7d to
    b418c9f) checked against a split with no labelled pixel stamped a NaN drift, a file never measured."""
    try:
        drift = json.loads(check)["drift_points"]
    except (ValueError, TypeError, KeyError):
        return False
    return isinstance(drift, (int, float)) and math.isfinite(drift)


def load_fastest(checkpoint: str | Path, samples: np.ndarray | Iterable[np.ndarray],
                 **options) -> tuple[Predictor, str, Predictor]:
    """`--backend auto`: the checkpoint in PyTorch or a file exported from it (fp32 or INT8 ONNX), whichever answers
    a sample fastest here (median of three timed calls after one warm-up). Returns the predictor, a line saying what
    was measured, and the checkpoint's own predictor (for an image the winner refuses: loaded again, the file might
    be another model by then). Every candidate gives probabilities (--confidence), an end-to-end graph from its
    logits.
    `samples`: an image, or images of which the first the model can take is timed (one it refuses, a strip past the
    working-size limit, fails when it is predicted, as it would without --backend auto). A file that cannot run as
    `options` ask (another precision, a TTA it was not exported with), or an INT8 file never checked on labelled data,
    is left out, and the line says why."""
    import time

    from .predict import load

    loaded = file_state(checkpoint) if Path(checkpoint).is_file() else None  # a missing file: load's own error
    pytorch = load(checkpoint, **options)
    siblings, stale, unreadable = exported_siblings(checkpoint)
    if loaded is not None and file_state(checkpoint) != loaded:  # the exports found would be of another file
        raise CheckpointError(f"{checkpoint}: replaced while --backend auto read it; run again once it is in place")
    # After `calibrate` or more training the file is another: its earlier exports are not timed, and every line says so
    outdated = (f"; not timed: {', '.join(path.name for path in stale)}, exported from an earlier "
                f"{Path(checkpoint).name} (its sha256 differs), export again" if stale else "")
    outdated += f"; not read: {', '.join(unreadable)}" if unreadable else ""
    if siblings and (not onnx_runs_on(options.get("device", "auto"))
                     or options.get("precision", "auto") not in ONNX_PRECISIONS):
        return pytorch, (f"backend: PyTorch ({checkpoint}; the files exported from it run on the CPU in their "
                         f"exported precision, not as --device/--precision ask{outdated})"), pytorch
    candidates: list[tuple[str, Predictor]] = [(str(checkpoint), pytorch)]
    left_out = []
    for path in siblings:
        try:
            candidate = load(path, **options)
            baked = getattr(candidate, "baked_tta", "none")
            if candidate.graph == "end-to-end" and baked != pytorch.tta:  # "auto" loads the graph's own TTA
                raise CheckpointError(f"{path}: exported with tta {baked}, not {pytorch.tta}")
            if candidate.quantized and MIOU_CHECK_KEY not in candidate.metadata:
                raise CheckpointError(f"{path}: INT8 with no mIoU check (export it with --data-root)")
            if candidate.quantized and not measured_drift(candidate.metadata[MIOU_CHECK_KEY]):
                raise CheckpointError(f"{path}: INT8 whose mIoU check measured nothing (export it again)")
        except (CheckpointError, DeviceError) as error:  # a TTA, window or precision the file cannot run
            reason = str(error).replace(f"{path}: ", "", 1).replace(str(path), "it").split(";")[0]
            left_out.append(f"{path.name}: {reason}")
            continue
        candidates.append((str(path), candidate))
    why = f"; left out: {', '.join(left_out)}" if left_out else ""
    if len(candidates) == 1:
        beside = "the files exported from it cannot run as asked" if left_out else "no exported file from it beside it"
        return pytorch, f"backend: PyTorch ({checkpoint}; {beside}{outdated}{why})", pytorch
    sample = None
    for image in [samples] if isinstance(samples, np.ndarray) else samples:
        try:
            pytorch.predict(image)
        except DataError:
            continue
        sample = image
        break
    if sample is None:
        return (pytorch, f"backend: PyTorch ({checkpoint}; no input image it can take, to time the exported files "
                f"on{outdated})", pytorch)
    timings = []
    for name, predictor in candidates:
        try:
            predictor.predict(sample)
        except LogitBoundError as error:  # the PyTorch model took it
            left_out.append(f"{Path(name).name}: {str(error).split(';')[0]}")
            continue
        times = []
        for _ in range(3):
            started = time.perf_counter()
            predictor.predict(sample)
            times.append(time.perf_counter() - started)
        timings.append((sorted(times)[1], name, predictor))
    timings.sort(key=lambda t: t[0])
    summary = ", ".join(f"{Path(name).name} {1000 * seconds:.0f} ms" for seconds, name, _ in timings)
    why = f"; left out: {', '.join(left_out)}" if left_out else ""
    line = f"backend auto: {Path(timings[0][1]).name} is fastest here ({summary} per image{why}{outdated})"
    return timings[0][2], line, pytorch
