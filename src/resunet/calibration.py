"""How far to trust a mask: temperature scaling (Guo et al. 2017) fitted on a validation split.

    resunet calibrate runs/camvid/best.pt --data-root DIR      # fits T, stores it in the checkpoint, prints ECE

The logits are divided by one temperature T before the softmax; T is chosen to minimise the negative log-likelihood
of the validation pixels (ignored ones excluded). It changes no prediction (the argmax stays), only the
probabilities: a model that is too sure of itself (T > 1) gets softer probabilities whose confidence matches its
accuracy. Expected calibration error (15 bins, all non-ignored pixels) is reported before and after.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, file_state, load_checkpoint, save_checkpoint
from .data.dataset import PairedDataset, open_dataset_for_model
from .data.images import DEFAULT_MAX_PIXELS, DataError
from .evaluate import evaluate_dataset
from .metrics import CalibrationError
from .outputs import FolderLock, check_output_folder
from .predict import Predictor

PIXELS_PER_IMAGE = 20_000  # the temperature's fit sees this many random valid pixels of each image, at most
# and this many in all: VOC's 1,449 val images at 20,000 each held 29M pixels' logits (2.4 GB, and four times that in
# the fit's float64), where one scalar is fitted as well from 4M. A larger split gives fewer pixels an image.
FIT_PIXELS = 4_000_000
FIT_CHUNK = 2**18  # pixels a step of the fit's NLL takes at once (its float64 copies stay tens of MB)
# The NLL is convex in 1/T, so the bounded fit is the unbounded one clamped. It runs off to 0 for a model right on
# every fitted pixel and to infinity for one no better than chance: neither is a number worth storing.
TEMPERATURE_BOUNDS = (0.01, 100.0)


def collect(predictor: Predictor, dataset: PairedDataset,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One pass over the split: logits P×C and labels P of up to PIXELS_PER_IMAGE random valid pixels of every
    image (fewer when the split has more than FIT_PIXELS // PIXELS_PER_IMAGE images), and each one's weight P (the
    valid pixels it stands for: the fit is over every pixel, as the ECE is, not image by image, where a small image
    weighed as much as a large one), for the fit; and the expected calibration error of the uncalibrated
    probabilities over every pixel."""
    generator = torch.Generator().manual_seed(seed)
    per_image = max(1, min(PIXELS_PER_IMAGE, FIT_PIXELS // max(1, len(dataset))))
    logits, labels, weights = [], [], []
    ignore = dataset.info.ignore_index
    meter = CalibrationError(ignore)
    for index in range(len(dataset)):
        sample = dataset.load(index)
        image = torch.from_numpy(sample.image).permute(2, 0, 1)[None]
        target = torch.from_numpy(sample.mask).long()
        height, width = target.shape
        flat_target = target.reshape(-1)
        valid = (flat_target != ignore).nonzero()[:, 0]
        picked = valid[torch.randperm(len(valid), generator=generator)[:per_image]].sort().values
        # The full-size logits band by band of rows, as evaluate's (a large photo's were held whole, twice)
        with torch.no_grad():
            try:
                (models,) = predictor.low_res_logits([image])
            except DataError as error:  # too large at the working size
                raise dataset.named(index, error) from None
            for top, bottom, band in predictor.logit_bands(models, (height, width)):
                meter.update(band.softmax(1), target[None, top:bottom].to(band.device))
                inside = picked[(picked >= top * width) & (picked < bottom * width)]
                logits.append(band[0].flatten(1).T[(inside - top * width).to(band.device)].float().cpu())
                labels.append(flat_target[inside])
                del band
        weights.append(torch.full((len(picked),), len(valid) / max(1, len(picked)), dtype=torch.float64))
    if sum(len(picked) for picked in labels) == 0:  # nothing to fit: the stored temperature must stay as it is
        raise DataError(f"{dataset.description}: no labelled pixels in {len(dataset)} image(s) (all are the ignore "
                        f"label {ignore}); nothing to fit, the checkpoint is unchanged")
    return torch.cat(logits), torch.cat(labels), torch.cat(weights), meter.compute()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """The T in TEMPERATURE_BOUNDS minimising the mean NLL of softmax(logits / T), each pixel weighted by `weights`
    if given (L-BFGS on log T, in float64, FIT_CHUNK pixels at a time: the gradients add up over the chunks)."""
    weights = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double()
    low, high = TEMPERATURE_BOUNDS
    if every_pixel_right(logits, labels, weights):
        # Each pixel's NLL then falls for ever as T does: the minimum is the lower bound. L-BFGS would stop early,
        # where the NLL is too small for its gradient to count (T 0.25 for logits 5·one-hot).
        return low
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    total_weight = weights.sum()
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(labels), FIT_CHUNK):
            end = start + FIT_CHUNK
            part = (F.cross_entropy(logits[start:end].double() / log_t.exp(), labels[start:end], reduction="none")
                    * weights[start:end]).sum() / total_weight
            part.backward()
            loss += part.detach()
        return loss

    optimizer.step(closure)
    return min(max(float(log_t.detach().exp()), low), high)


def every_pixel_right(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether every pixel of positive weight has its label's score above every other class's."""
    for start in range(0, len(labels), FIT_CHUNK):
        part, truth = logits[start:start + FIT_CHUNK], labels[start:start + FIT_CHUNK]
        own = part.gather(1, truth[:, None])
        rivals = part.scatter(1, truth[:, None], float("-inf")).amax(1, keepdim=True)
        if ((own <= rivals).squeeze(1) & (weights[start:start + FIT_CHUNK] > 0)).any():
            return False
    return True


def bound_note(temperature: float) -> str | None:
    """What a temperature at one of TEMPERATURE_BOUNDS means, for the user; None inside them."""
    low, high = TEMPERATURE_BOUNDS
    if temperature == high:
        return (f"the fit reached its bound {high:g}: on this split the model's scores tell its right pixels from its "
                "wrong ones no better than chance, so the fit makes its probabilities near uniform")
    if temperature == low:
        return (f"the fit reached its bound {low:g}: the model is right on every pixel the fit saw, so the fit "
                "makes its probabilities near certain")
    return None


def ece_change(result: dict) -> str:
    """A calibration's ECE before and after, as `calibrate` and `train --calibrate` say it: the "before" is the model
    at temperature 1, whatever temperature the file held (a second calibration's before/after read as a gain)."""
    return (f"expected calibration error {100 * result['ece_before']:.2f}% uncalibrated (temperature 1) → "
            f"{100 * result['ece_after']:.2f}%")


def calibrate(checkpoint: str | Path, dataset: PairedDataset, predictor: Predictor,
              loaded: tuple[int, int, int] | None = None) -> dict:
    """Fit the temperature of a .pt checkpoint (whose model `predictor` runs) on `dataset`, store it in the
    checkpoint (rewritten atomically) and return {"temperature", "ece_before", "ece_after", "stored",
    "stored_temperature", "stored_ece", "reset"}. A temperature that raises the ECE is not stored ("stored" False):
    the NLL's optimum is not the ECE's, and the ECE is what evaluate reports (an audit's barely trained model: T 0.209,
    ECE 1.69% -> 24.61%). The file then keeps its own temperature unless that one, fitted elsewhere (another split),
    does worse here than none ("stored_ece", measured then): temperature 1 replaces it ("reset"), so the file ends
    with the best of the three on this split. `loaded`: the file's `file_state` when `predictor` was read from it; a
    file saved again since (a run still training into its folder) is refused, not given another model's
    temperature."""
    def ece_at(temperature: float) -> float:
        # `evaluate`'s own ECE, one image at a time as the fit's pass: at evaluate's 8 a GPU that had trained with
        # --batch-size 2 could run out of memory at the very end of `train --calibrate`, the fit lost
        predictor.temperature = temperature
        meter = CalibrationError(dataset.info.ignore_index)
        evaluate_dataset(predictor, dataset, batch_size=1, workers=0, progress=False, calibration=meter)
        return meter.compute()

    stored, predictor.temperature = predictor.temperature, 1.0
    logits, labels, weights, before = collect(predictor, dataset)
    temperature = fit_temperature(logits, labels, weights)
    after = ece_at(temperature)
    result = {"temperature": temperature, "ece_before": before, "ece_after": after, "stored": after <= before,
              "stored_temperature": stored, "stored_ece": None, "reset": False}
    if not result["stored"]:
        if stored != 1.0:  # kept as it was, one fitted on train left the file worse here than none (a helper's audit)
            result["stored_ece"] = ece_at(stored)
            result["reset"] = result["stored_ece"] > before
        if not result["reset"]:
            predictor.temperature = stored
            return result
        after = before
    kept = 1.0 if result["reset"] else temperature  # what the file is given
    predictor.temperature = kept
    payload = load_checkpoint(checkpoint)
    # After the re-read (a save between a check and the read put the older model back over the newer one)
    if loaded is not None and file_state(checkpoint) != loaded:
        raise CheckpointError(f"{checkpoint}: saved again while the temperature was fitted (a run still training "
                              f"into its folder?); the fitted {temperature:.3f} is the earlier model's, so it is not "
                              "stored: calibrate again once the file is final")
    payload.update(temperature=kept, calibration={"split": dataset.description, "ece_before": before,
                                                         "ece_after": after})
    # An immutable file or a full disk is met only here: the fit's result goes on the error line, not lost with it.
    what = ("temperature 1, in place of one worse here," if result["reset"]
            else f"the fitted temperature {temperature:.3f} ({ece_change(result)})")
    save_checkpoint(payload, checkpoint, advice=f"{what} is not stored; free some space or make it writable, then "
                    "calibrate again")
    return result


def run_calibrate(checkpoint: str, data_root: str, split: str = "val", device: str = "auto", precision: str = "auto",
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """The `resunet calibrate` command."""
    loaded = file_state(checkpoint)  # before it is read: a save during the fit is then seen
    predictor = Predictor.from_checkpoint(checkpoint, device, precision)
    # The temperature is stored in the file: one it cannot rewrite is refused before the fit, not after.
    real = Path(os.path.realpath(checkpoint))
    if not real.stat().st_mode & 0o222:
        raise CheckpointError(f"{checkpoint}: read-only, and calibrate stores the temperature in it; make it "
                              "writable, or calibrate a copy")
    check_output_folder("calibrate", real.parent)
    dataset = open_dataset_for_model(data_root, split, predictor.info, max_pixels)
    # A run training in the folder (or another calibrate) would replace the file between this one's read and write:
    # the newer model lost, or a temperature fitted to another model. They hold the folder's lock while they write.
    with FolderLock(real.parent) as folder:
        if not folder.held:
            raise CheckpointError(f"{checkpoint}: its folder is being written by a resunet train or another "
                                  "calibrate; calibrate once it ends")
        result = calibrate(checkpoint, dataset, predictor, loaded)
    replaced = result["stored_temperature"]
    fitted = (f"{checkpoint}: temperature {result['temperature']:.3f} fitted on {dataset.description} "
              f"({len(dataset)} images)")
    bins = "(15 bins, every non-ignored pixel)"
    if result["stored"]:
        print(f"{fitted}; {ece_change(result)} {bins}; stored in the checkpoint"
              + (f", replacing temperature {replaced:.3f}" if replaced != 1.0 else ""))
    elif result["reset"]:
        print(f"{fitted} would raise the {ece_change(result)} {bins}; not stored, and the checkpoint's temperature "
              f"{replaced:.3f} does worse here ({100 * result['stored_ece']:.2f}%): temperature 1 (uncalibrated) "
              "stored in its place")
    elif replaced != 1.0:
        print(f"{fitted} would raise the {ece_change(result)} {bins}; not stored: the checkpoint keeps its "
              f"temperature {replaced:.3f} ({100 * result['stored_ece']:.2f}% here)")
    else:
        print(f"{fitted} would raise the {ece_change(result)} {bins}; not stored: the checkpoint is unchanged "
              f"(temperature {replaced:.3f})")
    if note := bound_note(result["temperature"]):
        print(f"  {note}")
    return result

