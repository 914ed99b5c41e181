"""`resunet` command line: argument parsing only; each subcommand calls one function."""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import math
import os
import signal
import sys
import threading
import typing
from collections.abc import Iterable
from dataclasses import MISSING
from pathlib import Path

from .config import ABLATION_OPTIONS, TrainConfig, config_fields, export_refusal
from .data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DataError, image_name, one_line



class UsageError(Exception):
    """Options that cannot work together, or one a command needs: exit status 2, as argparse's own usage errors."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, not our bug: one line, no traceback. A module's error class counts once the
    command has imported that module (no other can have raised it): a refused flag is said without importing torch."""
    errors: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, UsageError)
    for module, name in (("checkpoint", "CheckpointError"), ("data.download", "DownloadError"),
                         ("model.encoders", "WeightsUnavailableError"), ("runtime", "DeviceError"),
                         ("train", "TrainingError"), ("export", "ExportError")):
        if (loaded := sys.modules.get(f"{__package__}.{module}")) is not None:
            errors += (getattr(loaded, name),)
    return errors


def _positive_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got {text!r}")
    return values


def _window(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 pixels, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _demo_size(text: str) -> int:
    value = int(text)
    # The shapes drawn need room; a side of 20,000 asked 9 GiB for one image's background noise
    if not 16 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be 16 to 4096 pixels, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # inf: a lone request waited for a whole batch to arrive
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {value:g}")
    return value


def _connections(text: str) -> int:
    value = int(text)
    if value < 2:  # the request's own connection counts: 1 answered every request, /healthz too, with 503
        raise argparse.ArgumentTypeError(f"must be at least 2 (a new request's own connection counts), got {value}")
    return value


def _drop_points(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # nan fails both comparisons (a drift check that would never fire)
        raise argparse.ArgumentTypeError(f"must be a finite number of points, 0 or more, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


# The switches a --resume may turn either way (train.RESUME_CHANGEABLE) have the opposite spelling too: the one that
# turned a switch on could not be undone from the command line (a run started with --tensorboard, resumed on a machine
# without the package, was refused; one started with --calibrate calibrated again at every resume).
OPPOSITE_FLAGS = {"tensorboard": "--no-tensorboard", "calibrate": "--no-calibrate", "progress": "--progress",
                  "skip_data_check": "--data-check"}


def add_train_flags(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per TrainConfig field. defaults=False leaves every flag not on the command line out of the result
    (how `train --resume` tells a flag given from one left at its default)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            unset = {} if defaults else {"default": argparse.SUPPRESS}
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=f.metadata.get("help_off", help_text), **unset)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text, **unset)
            if f.name in OPPOSITE_FLAGS:
                undone = "--no-" + f.name.replace("_", "-") if f.default else flag
                parser.add_argument(OPPOSITE_FLAGS[f.name], dest=f.name,
                                    action="store_true" if f.default else "store_false",
                                    help=f"with --resume: undoes the run's {undone}", **unset)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default = None if f.default is MISSING else f.default
        # No "(default: None)": an unset flag's meaning is in its help, which names its own default where it has one.
        shown = "" if default is None or "default" in help_text else f" (default: {default})"
        parser.add_argument(flag, dest=f.name, type=base, default=default if defaults else argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), help=help_text + shown)


def flags_given(argv: list[str]) -> dict:
    """The train flags on this command line (after the subcommand), with their values."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_flags(parser, defaults=False)
    return vars(parser.parse_known_args(argv)[0])


def cmd_demo_data(args) -> int:
    from .data.demo import make_demo_dataset

    voc = make_demo_dataset(args.dir, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} train + {args.val} val images ({args.size}×{args.size}) to {voc}")
    return 0


def cmd_train(args) -> int:
    if args.resume is None and args.data_root is None:  # before importing torch: a refusal is said at once
        raise UsageError("--data-root is required (or --resume RUN_DIR/last.pt)")
    from .train import resumed_config, train

    if args.resume:
        # Resume continues the stored run; a flag given changes its setting where it may (train.RESUME_CHANGEABLE),
        # a flag left out keeps the stored value.
        given = flags_given(args.argv[args.argv.index("train") + 1:])
        cfg = resumed_config(args.resume, {name: value for name, value in given.items() if name != "resume"})
    else:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in config_fields()})
    result = train(cfg)
    # also a Ctrl-C during the last epoch's saves: the run is whole, but a shell loop or `&&` chain should stop
    return 130 if result.get("stop_requested") == "SIGINT" else 0


def cmd_ablate(args) -> int:
    if args.data_root is None:
        raise UsageError("--data-root is required")
    if args.resume:
        raise UsageError("--resume: ablate continues its stopped rows itself; run the same "
                         "ablate command again")
    if args.calibrate:
        raise UsageError("--calibrate: the table's ECE is measured before calibration; "
                         "calibrate a row afterwards with resunet calibrate OUT/ROW/best.pt")
    if args.overwrite:
        raise UsageError("--overwrite: ablate keeps its finished rows and continues stopped "
                         "ones; give another --out to start a table over")
    base = TrainConfig(**{f.name: getattr(args, f.name) for f in config_fields()})
    if base.scheduler != "plateau" and "eval_every" in flags_given(args.argv[1:]):
        raise UsageError(f"--eval-every: ablate scores each row's final weights once, so with --scheduler "
                         f"{base.scheduler} evaluations between epochs would only cost time (a plateau schedule "
                         "keeps them: it steps on them)")
    options = [name.strip() for name in args.options.split(";") if name.strip()]
    if not options:
        raise UsageError(f"--options {args.options!r}: no rows; choose from "
                         f"{'; '.join(ABLATION_OPTIONS)}")
    from .ablate import run_ablation  # after the refusals: they come without importing torch

    results = run_ablation(base, options, base.out)
    return 0 if len(results) == len(options) else 130  # fewer: a signal stopped a row (run it again to continue)


def cmd_check_data(args) -> int:
    from .doctor import check_data, format_report, plot_class_shares, write_json
    from .outputs import PLOT_SUFFIXES, check_output_files

    # Before reading the whole dataset: its folders and classes.json are known from the layout alone.
    check_output_files([("--json", args.json), ("--plot", args.plot)], suffixes={"--plot": PLOT_SUFFIXES},
                       data_root=args.data_root)
    report = check_data(args.data_root, args.splits, args.num_classes, args.ignore_index, args.max_pixels,
                        args.workers)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_class_shares(report, args.plot)
    return 1 if report.errors else 0


def inference_options(args) -> dict:
    """The options every inference command passes to `predict.load`."""
    if args.stride is not None and (args.window is None or args.stride > args.window):
        raise UsageError(f"--stride {args.stride}: needs --window, and at most the "
                         "window (tiles must touch or overlap)")
    if args.scales is not None and "ms" not in args.tta:  # None when not given: the default given was ignored too
        raise UsageError(f"--scales is for --tta ms or ms+flip (--tta is {args.tta})")
    scales = None if args.scales is None else tuple(args.scales)  # None: predict.DEFAULT_SCALES
    return {"device": args.device, "precision": args.precision, "tta": args.tta, "scales": scales,
            "window": args.window, "stride": args.stride}


def cmd_evaluate(args) -> int:
    from .evaluate import run_evaluate

    if args.worst and not args.out:
        raise UsageError("--worst K needs --out DIR for its contact sheet")
    if args.out and not args.worst:
        raise UsageError("--out DIR is the folder for --worst K's contact sheet; give --worst "
                         "too, or --json/--confusion for the scores")
    run_evaluate(args.checkpoint, args.data_root, args.split, args.json, batch_size=args.batch_size,
                 workers=args.workers, confusion_png=args.confusion, max_pixels=args.max_pixels, worst=args.worst,
                 worst_out=args.out, ensemble=args.ensemble, **inference_options(args))
    return 0


def cmd_calibrate(args) -> int:
    from .calibration import run_calibrate

    run_calibrate(args.checkpoint, args.data_root, args.split, args.device, args.precision, args.max_pixels)
    return 0


def cmd_export(args) -> int:
    # Options that only mean something with another are refused, not ignored (their defaults are None to tell); here
    # too, so the refusal comes without importing torch.
    if refusal := export_refusal(args.int8, args.data_root, calibration=args.calibration,
                                 calibration_count=args.calibration_count, max_miou_drop=args.max_miou_drop,
                                 split=args.split, workers=args.workers):
        raise UsageError(refusal)
    from .export import run_export

    # SIGTERM (a timeout, a scheduler) as Ctrl-C: run_export's cleanup then removes its temporary file and the folders
    # it made, where the default action killed it with a partial hidden .onnx left behind.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run_export(args.checkpoint, args.onnx, "logits" if args.logits else "end-to-end", args.tta, args.int8,
                   args.calibration, args.calibration_count, args.data_root, args.split, args.max_miou_drop,
                   args.workers, json_out=args.json)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum: int, frame) -> None:
    print("resunet export: stopped by SIGTERM", file=sys.stderr)
    raise SystemExit(128 + signum)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str], list[str]]:
    """The image files that files, folders and globs name; a line for each input that names none (a glob that
    matches nothing, a folder without images: a typo must not pass for a finished run); and a note for each folder
    whose subfolders hold images (they are not read; a Cityscapes-style tree needs 'DIR/**/*') or whose files have
    suffixes not read (a phone's .heic)."""
    from .data.images import SYSTEM_FILES, list_images, nested_images, unread_files, unread_note

    paths: list[Path] = []
    problems: list[str] = []
    notes: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                found = list_images(path)  # as the datasets list them: a Mac's hidden ._name.jpg is not an image
            except DataError as error:  # a folder without read permission: the other inputs still run
                problems.append(str(error))
                continue
            nested = nested_images(path)
            if nested:
                notes.append(f"{path}: {len(nested)} image(s) in subfolders, such as {nested[0].relative_to(path)}, "
                             f"are not read; give '{path}/**/*' to include them")
            unread = unread_note(unread_files(path))
            if not found:
                problems.append(f"{path}: a folder without images" + (f" ({unread})" if unread else ""))
            elif unread:
                notes.append(f"{path}: {unread}")
            paths += found
        elif any(c in item for c in "*?[") and not path.is_file():  # a file named a[1].jpg (the shell's * gave it)
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            found = [p for p in matched if image_name(p)]
            # '*.HEIC' alone, or beside the JPEGs of 'DIR/**/*': said, as for a folder
            unread = unread_note([p for p in matched if not image_name(p) and not p.name.startswith(".")
                                  and p.name.lower() not in SYSTEM_FILES])
            if not found:
                problems.append(f"{item}: matches no image file" + (f" ({unread})" if unread else ""))
            elif unread:
                notes.append(f"{item}: {unread}")
            paths += found
        else:
            paths.append(path)
    # A file named twice (itself and its folder, two globs) is predicted once, not refused as clashing with itself.
    unique, seen = [], set()
    for path in paths:
        if (key := os.path.realpath(path)) not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems, notes


def _readable(path: Path, max_pixels: int | None):
    from .data.images import read_image

    try:
        return read_image(path, max_pixels)
    except DataError:
        return None


ENSEMBLE_TAKES = ("--ensemble takes every word up to the next flag as a model: give the inputs before it (resunet "
                  "predict MODEL INPUT... --ensemble MODEL2 ...)")


class CommandParser(argparse.ArgumentParser):
    """A command's parser: predict's inputs given after --ensemble all went to it, and argparse said only that
    inputs were required (a helper, 2026-12-07)."""

    def parse_known_args(self, args=None, namespace=None):
        self.words = list(args or ())  # a command's parser is always handed its words
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        if "required: inputs" in message and any(w.startswith("--ensemble") for w in getattr(self, "words", ())):
            message += f" ({ENSEMBLE_TAKES})"
        super().error(message)


def images_only_folder(path: Path) -> bool:
    """A folder of images (predict's input), not a run folder (a checkpoint's, said so when loaded)."""
    try:
        return path.is_dir() and not any(path.glob("*.pt")) and any(image_name(p) for p in path.iterdir())
    except OSError:
        return False


def cmd_predict(args) -> int:
    for entry in args.ensemble:  # argparse gives --ensemble every word up to the next flag, inputs too
        what = ("an image" if Path(entry).suffix.lower() in IMAGE_SUFFIXES
                else "a folder of images" if images_only_folder(Path(entry)) else None)
        if what:
            raise UsageError(f"--ensemble {entry}: {what}, not a model; {ENSEMBLE_TAKES}")
    if args.backend is not None and Path(args.checkpoint).suffix.lower() == ".onnx":  # it was ignored
        raise UsageError(f"--backend {args.backend} chooses how a .pt checkpoint runs (auto: it or a file exported "
                         f"from it); {args.checkpoint} is an exported file, which runs in onnxruntime")
    if args.ensemble and args.backend == "auto":  # the ensemble branch below never looked at it
        raise UsageError("--backend auto picks one model's fastest file; an --ensemble runs "
                         "each model as given (.pt, or .onnx logits files): leave one of them out")
    if args.alpha is not None and not args.overlay:
        raise UsageError(f"--alpha {args.alpha:g} applies only with --overlay; give --overlay "
                         "too, or leave --alpha out")
    import numpy as np  # after the refusals: they come without importing torch
    import torch
    from PIL import Image
    from tqdm import tqdm

    from .data.images import read_image
    from .outputs import (DiskError, check_writable_folder, data_folder_around, is_prediction,
                          prediction_save_options, save_whole)
    from .onnx_predictor import LogitBoundError, load_fastest
    from .predict import load, load_ensemble
    from .runtime import is_out_of_memory

    paths, problems, notes = expand_inputs(args.inputs)
    # Run again with its --out among its inputs, predict took its own results for photos: each failed as one it would
    # overwrite, and --skip-existing could not go on.
    if earlier := [path for path in paths if is_prediction(path)]:
        left_out = set(earlier)  # once: not rebuilt for every path
        paths = [path for path in paths if path not in left_out]
        notes.append(f"left out {len(earlier)} file(s) that resunet predict wrote, such as {earlier[0]}: results of "
                     "an earlier run, not images to predict")
    for line in [*notes, *problems]:
        print(f"resunet predict: {line}", file=sys.stderr)
    if not paths:
        print("resunet predict: error: no input images found", file=sys.stderr)
        return 1
    checkpoint_predictor = None  # --backend auto: the checkpoint's, kept for an image its exported winner refuses
    if args.ensemble:
        predictor = load_ensemble([args.checkpoint, *args.ensemble], **inference_options(args))
    elif args.backend == "auto" and Path(args.checkpoint).suffix.lower() != ".onnx":
        samples = (image for image in (_readable(p, args.max_pixels) for p in paths) if image is not None)
        predictor, line, checkpoint_predictor = load_fastest(args.checkpoint, samples, **inference_options(args))
        print(line)
    else:
        predictor = load(args.checkpoint, **inference_options(args))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, a read-only parent
        raise DataError(f"--out {out}: cannot make the folder ({error.strerror or error})") from None
    check_writable_folder("--out", out, out)  # before any prediction, not at the first write
    if (data_folder := data_folder_around(out)) is not None:  # pseudo-labels are made so; an accident too
        print(f"resunet predict: note: --out {out} is inside {data_folder}, a folder a dataset is read from: the "
              "results will be read as its files", file=sys.stderr)
    failed, written, skipped = len(problems), 0, 0  # an input that named no image failed

    def predicted(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if args.confidence:  # the chosen class's calibrated probability, 0..1 as 0..255
            return model.predict_with_confidence(image)
        return model.predict(image), None

    # os.path.realpath, not Path.resolve: a symlink loop among the inputs raised there (it is reported when read)
    inputs = {Path(os.path.realpath(path)) for path in paths}
    claimed: dict[Path, Path] = {}  # output file -> the input it belongs to
    # The same by the file itself (device, inode): on a case-insensitive disk (macOS, exFAT, an SMB share) IMG_1.png
    # and img_1.png are one file under two names, and a second photo's result replaced the first's without a word.
    written_files: dict[tuple[int, int], Path] = {}

    def file_id(file: Path) -> tuple[int, int] | None:
        try:
            status = file.stat()
        except OSError:
            return None
        # 0: no identity (some network shares and virtual drives give every file 0)
        return (status.st_dev, status.st_ino) if status.st_ino else None

    def owner_of(file: Path) -> Path | None:
        """The input whose result `file` is in this run: by its path, or by the file itself."""
        owner = claimed.get(Path(os.path.realpath(file)))
        if owner is None and (identity := file_id(file)) is not None:
            owner = written_files.get(identity)
        return owner

    def claim(files: Iterable[Path], owner: Path) -> None:
        for file in files:
            claimed[Path(os.path.realpath(file))] = owner
            if (identity := file_id(file)) is not None:
                written_files[identity] = owner
    # A bar only on a terminal (in a log file it would be `\r` fragments); a file's error is written above it.
    bar = tqdm(paths, desc="predict", unit="img", leave=False, disable=not sys.stderr.isatty())
    try:
        for path in bar:
            outputs = {"mask": out / f"{path.stem}.png", "overlay": out / f"{path.stem}_overlay.jpg",
                       "confidence": out / f"{path.stem}_confidence.png"}
            if not args.overlay:
                del outputs["overlay"]
            if not args.confidence:
                del outputs["confidence"]
            real = {o: Path(os.path.realpath(o)) for o in outputs.values()}
            clash = next((o for o in outputs.values() if real[o] in inputs or owner_of(o) is not None), None)
            if clash is not None:  # never write over an input image or another input's result
                owner = f"{earlier}'s result" if (earlier := owner_of(clash)) is not None else "an input image"
                tqdm.write(f"resunet predict: {path}: not predicted, its output {clash} would overwrite {owner}; give "
                           "another --out or rename the file", file=sys.stderr)
                failed += 1
                continue
            # Each file is renamed into place once written (save_whole): one that exists is a finished result.
            ours = {o: is_prediction(o) for o in outputs.values() if o.is_file()}  # each file's header read once
            if args.skip_existing and len(ours) == len(outputs) and all(ours.values()):
                claim(outputs.values(), path)
                skipped += 1
                continue
            # Only an earlier result may be replaced: --out naming a dataset's masks folder wrote over its ground
            # truth, and `evaluate` then scored 100% (a helper, 2026-12-06).
            foreign = next((o for o, mine in ours.items() if not mine), None)
            if foreign is not None:
                tqdm.write(f"resunet predict: {path}: not predicted, its output {foreign} would overwrite a file that "
                           "resunet predict did not write (a dataset's mask?); give another --out or move the file",
                           file=sys.stderr)
                failed += 1
                continue
            out_of_memory = False
            try:
                image = read_image(path, args.max_pixels)
                # The predictors bound the image's size at the working size themselves (predict.check_working_size).
                try:
                    mask, confidence = predicted(predictor, image)
                except LogitBoundError as error:
                    # Timed on a smaller image, an end-to-end file won on speed; one past its logit bound goes to
                    # the checkpoint (it failed: a choice made for speed lost images PyTorch predicts).
                    if checkpoint_predictor is None:
                        raise
                    tqdm.write(f"resunet predict: {path}: {str(error).split(';')[0]} in {predictor.path.name}; "
                               f"predicted by {args.checkpoint} instead", file=sys.stderr)
                    mask, confidence = predicted(checkpoint_predictor, image)
            except DataError as error:  # one bad file must not stop the others
                message = str(error)
                tqdm.write(f"resunet predict: {message if message.startswith(str(path)) else f'{path}: {message}'}",
                           file=sys.stderr)
                failed += 1
                continue
            except RuntimeError as error:  # a photo too large for the device's memory: the smaller ones still fit
                if not is_out_of_memory(error):
                    raise
                height, width = image.shape[:2]
                on_gpu = predictor.device.type == "cuda"
                tqdm.write(f"resunet predict: {path}: out of {predictor.device.type} memory at {width}×{height}; the "
                           f"other inputs still run ({'--device cpu, or ' if on_gpu else ''}a lower --max-pixels "
                           "skips such files)", file=sys.stderr)
                failed += 1
                out_of_memory = True
            if out_of_memory:
                if predictor.device.type == "cuda":  # out of the handler, whose traceback held the pass's tensors
                    torch.cuda.empty_cache()
                continue
            # Claimed once predicted: an unreadable a.jpg must not keep a.png from its own a.png result.
            claimed.update({real[o]: path for o in outputs.values()})
            pictures = {"mask": predictor.colorize(mask)}
            if confidence is not None:
                pictures["confidence"] = Image.fromarray((confidence * 255).round().astype(np.uint8))
            if args.overlay:
                pictures["overlay"] = predictor.overlay(image, mask, 0.5 if args.alpha is None else args.alpha)
            for kind, picture in pictures.items():
                options = prediction_save_options(kind)
                try:
                    save_whole(outputs[kind], lambda where: picture.save(where, **options))
                    claim([outputs[kind]], path)
                except DiskError as error:  # a full disk: every later file would fail the same way
                    raise DataError(f"{error}; {written} input(s) predicted before it") from None
                except DataError as error:  # this file alone (a folder in its place): the others still run
                    tqdm.write(f"resunet predict: {error}", file=sys.stderr)
                    failed += 1
                    break
            else:
                written += 1
    except KeyboardInterrupt:
        bar.close()
        print(f"resunet predict: interrupted after {written + skipped} of {len(paths)} input(s), each of their files "
              f"whole in {out}; the same command with --skip-existing goes on from there", file=sys.stderr)
        return 130
    bar.close()
    done = f"wrote {written} prediction(s) to {out}"
    if skipped:
        done += f"; {skipped} skipped, their files already there (--skip-existing)"
    print(done + (f"; {failed} input(s) failed" if failed else ""))
    return 1 if failed else 0


def cmd_visualize(args) -> int:
    from .visualize import run_visualize

    run_visualize(args.checkpoint, args.data_root, args.out, args.split, args.count, args.seed,
                  max_pixels=args.max_pixels, **inference_options(args))
    return 0


def cmd_serve(args) -> int:
    from .checkpoint import UnsupportedOptionError
    from .runtime import DeviceError
    from .serve import ServeSettings, bind_address, create_app, run_server, service_url

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_bytes=args.max_bytes, max_pixels=args.max_pixels, tta=args.tta, device=args.device,
                             precision=args.precision, threads=args.threads, body_timeout_s=args.body_timeout,
                             head_timeout_s=args.head_timeout, max_pending_pixels=args.max_pending_pixels,
                             max_pending_bytes=args.max_pending_bytes,
                             warm_up_first=False)  # the port answers while the model warms up: /readyz says when
    try:
        app = create_app(args.model, settings)
    except _user_errors() as error:  # a model that cannot be served stops start-up in one line
        print(f"resunet serve: error: {one_line(error)}", file=sys.stderr)
        # An option this machine or model cannot take (--device cuda without CUDA, --precision fp32 for an INT8
        # file, --tta flip for a graph exported without it) is a usage error, 2 as for predict and evaluate; an
        # unreadable model file or a busy port, 1.
        return 2 if isinstance(error, (DeviceError, UnsupportedOptionError, UsageError)) else 1
    try:
        sockets = bind_address(args.host, args.port)
    except OSError as error:
        print(f"resunet serve: error: cannot listen on {args.host}:{args.port} ({error.strerror or error})",
              file=sys.stderr)
        return 1
    port = sockets[0].getsockname()[1]  # the one chosen for --port 0
    print(f"resunet serve: {args.model} on {service_url(args.host, port)} (page), /predict, /docs", flush=True)
    run_server(app, args.host, port, args.log_level, args.drain_timeout, args.max_connections, sockets)
    return 0


def cmd_download(args) -> int:
    from .data import download

    root = Path(args.root)
    try:
        if root.exists() and not root.is_dir():
            raise DataError(f"--root {root}: is a file, not a folder")
        if args.dataset == "voc":
            print(f"VOC 2012 ready at {download.download_voc2012(root)}")
        else:
            voc_dir = download.download_voc2012(root)
            sbd_dir = download.download_sbd(root)
            count = download.make_train_aug(voc_dir, sbd_dir)
            print(f"train_aug ready: {count} images (use --train-split train_aug --data-root {root})")
    except KeyboardInterrupt:
        print("resunet download: interrupted; what was done is kept (a download as its .part file, the masks "
              "written): the same command goes on from there", file=sys.stderr)
        return 130
    except PermissionError as error:  # a --root under a folder this user cannot enter (Path.exists raises it)
        raise DataError(f"--root {root}: cannot use {error.filename or root} ({error.strerror or error}); give a "
                        "folder of your own") from None
    return 0


def cmd_encoders(args) -> int:
    from .model.encoders import describe_encoders

    describe_encoders()
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark import run_benchmark

    run_benchmark(args)
    return 0


DATA_ROOT_HELP = ("dataset folder: a VOCdevkit tree or {train,val,test}/{images,masks} (README, Commands: the "
                  "paragraph on --data-root)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resunet", description="U-Net segmentation on ImageNet-pretrained encoders")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    p = commands.add_parser("demo-data", help="write a generated VOC-format dataset")
    p.add_argument("dir")
    p.add_argument("--train", type=_positive_int, default=64, help="training images (default 64)")
    p.add_argument("--val", type=_positive_int, default=16, help="validation images (default 16)")
    p.add_argument("--size", type=_demo_size, default=128, help="image side in pixels (16 to 4096)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed of the shapes (default 0)")
    p.set_defaults(run=cmd_demo_data)

    p = commands.add_parser("train", help="train a model (defaults: the seed recipe)")
    add_train_flags(p)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("ablate", help="train the recipe given by the train flags once per option, one option "
                                           "changed at a time, at the same budget; a table of what each is worth")
    add_train_flags(p)
    p.add_argument("--options", default=";".join(ABLATION_OPTIONS),
                   help=f"';'-separated rows (default: all): {'; '.join(ABLATION_OPTIONS)}")
    p.set_defaults(run=cmd_ablate, out="runs/ablation")
    # The train flags' help as ablate reads them: --out holds one run folder per row; --resume, --overwrite and
    # --calibrate are refused with their reason (cmd_ablate), so not offered in --help.
    ablate_help = {"out": "the ablation's folder: ablation.md, ablation.json and one run folder per row (default: "
                          "runs/ablation)",
                   "data_root": "dataset folder: VOCdevkit layout or {train,val}/{images,masks} (required)",
                   "eval_every": "evaluate every N epochs, with --scheduler plateau only (it steps on them; each row's "
                                 "final weights are scored once anyway)",
                   "resume": argparse.SUPPRESS, "overwrite": argparse.SUPPRESS, "calibrate": argparse.SUPPRESS}
    for action in p._actions:  # the opposite switches are for --resume, which ablate refuses
        opposite = bool(set(action.option_strings) & set(OPPOSITE_FLAGS.values()))
        action.help = argparse.SUPPRESS if opposite else ablate_help.get(action.dest, action.help)

    p = commands.add_parser("check-data", help="read every image and mask once; report errors, likely mistakes "
                                               "(leakage, JPEG or 0/255 masks, ...) and class shares")
    p.add_argument("--data-root", required=True, help=DATA_ROOT_HELP)
    p.add_argument("--split", dest="splits", nargs="+", action="extend", metavar="S",
                   help="splits to check (default: train/val/test that exist, else every NAME/{images,masks}; "
                        "train and val for VOC)")
    p.add_argument("--json", help="also write the findings and facts here")
    p.add_argument("--plot", help="also draw each class's pixel share per split here (PNG)")
    p.add_argument("--workers", type=_non_negative_int, default=4, help="reading threads (default 4)")
    p.add_argument("--num-classes", type=_positive_int, help="for a folder dataset without classes.json")
    p.add_argument("--ignore-index", type=int, help="for a folder dataset without classes.json (default 255)")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images and masks from their header (default {DEFAULT_MAX_PIXELS:,})")
    p.set_defaults(run=cmd_check_data)

    inference = argparse.ArgumentParser(add_help=False)
    inference.add_argument("--device", default="auto", help="for .pt checkpoints (.onnx files run on the CPU)")
    inference.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                           help="for .pt checkpoints")
    inference.add_argument("--tta", default="auto", choices=("auto", "none", "flip", "ms", "ms+flip"),
                           help="test-time augmentation: horizontal flip, multi-scale, or both (logits averaged); "
                                "auto (default): none, or what an end-to-end .onnx file was exported with")
    inference.add_argument("--scales", type=_positive_floats, default=None,
                           help="multi-scale TTA: factors of the working size, comma-separated (default "
                                "0.75,1,1.25,1.5)")
    inference.add_argument("--window", type=_window, default=None,
                           help="sliding window: tile side in pixels of the resized image (≥ 32)")
    inference.add_argument("--stride", type=_positive_int, default=None,
                           help="sliding window step (default: two thirds of --window)")
    inference.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                           help="refuse images (and masks) with more pixels, read from the file's header before "
                                f"decoding: decompression bombs (default {DEFAULT_MAX_PIXELS:,})")

    p = commands.add_parser("evaluate", parents=[inference],
                            help="per-class IoU and boundary IoU, mIoU, pixel accuracy")
    p.add_argument("checkpoint", help="a .pt checkpoint or an exported .onnx file")
    p.add_argument("--data-root", required=True, help=DATA_ROOT_HELP)
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--json", help="also write the scores and confusion matrix here")
    p.add_argument("--confusion", help="also draw the row-normalised confusion matrix and per-class IoU bars here "
                   "(PNG)")
    p.add_argument("--worst", type=_positive_int, default=0, metavar="K",
                   help="also draw the K images with the lowest own mIoU: image / ground truth / prediction / errors "
                        "(to --out DIR/worst.png, 25 a sheet: then worst-2.png, ...; listed in worst.json)")
    p.add_argument("--out", help="folder for --worst")
    p.add_argument("--ensemble", nargs="+", action="extend", default=[], metavar="MODEL",
                   help="more .pt checkpoints or .onnx logits files: the class probabilities of all are averaged")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images read per step; those of one size go through the network together (default 8)")
    p.add_argument("--workers", type=_non_negative_int, default=2, help="image-reading processes (default 2)")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("predict", parents=[inference], help="class-map PNGs for images")
    p.add_argument("checkpoint", help="a .pt checkpoint or an exported .onnx file")
    p.add_argument("inputs", nargs="+", help="image files, folders or globs")
    p.add_argument("--out", required=True, help="folder for NAME.png (and NAME_overlay.jpg, NAME_confidence.png)")
    p.add_argument("--overlay", action="store_true", help="also write NAME_overlay.jpg")
    p.add_argument("--alpha", type=_share, default=None, help="overlay opacity, 0..1 (default 0.5; with --overlay)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out inputs whose every output file is already in --out (each is written whole): a "
                        "run stopped part-way goes on where it stopped")
    p.add_argument("--confidence", action="store_true",
                   help="also write NAME_confidence.png: each pixel's probability of its class (255 = 1), calibrated "
                        "when the checkpoint holds a temperature (resunet calibrate)")
    p.add_argument("--ensemble", nargs="+", action="extend", default=[], metavar="MODEL",
                   help="more .pt checkpoints or .onnx logits files: the class probabilities of all are averaged")
    p.add_argument("--backend", default=None, choices=("torch", "auto"),
                   help="for a .pt MODEL: torch (default) runs it; auto times it against the .onnx files exported "
                        "from it (beside it, matched by sha256) on the first image and uses the fastest (an image "
                        "past an end-to-end file's logit bound goes to the checkpoint)")
    p.set_defaults(run=cmd_predict)

    p = commands.add_parser("visualize", parents=[inference], help="3×5 grid: image / ground truth / prediction")
    p.add_argument("checkpoint", help="a .pt checkpoint or an exported .onnx file")
    p.add_argument("--data-root", required=True, help=DATA_ROOT_HELP)
    p.add_argument("--out", default="grid.png", help="the PNG to write (default grid.png)")
    p.add_argument("--split", default="val", help="split to draw from (default val)")
    p.add_argument("--count", type=_positive_int, default=5, help="images drawn, one a column (default 5)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="which images are drawn (default 0)")
    p.set_defaults(run=cmd_visualize)

    p = commands.add_parser("calibrate", help="fit a temperature on a split so probabilities match accuracy; store "
                            "it in the checkpoint; print the expected calibration error before and after")
    p.add_argument("checkpoint", help="a .pt checkpoint (rewritten with the temperature)")
    p.add_argument("--data-root", required=True, help=DATA_ROOT_HELP)
    p.add_argument("--split", default="val", help="split the temperature is fitted on (default val)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="of the forward passes (the fit itself is in float64)")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images and masks from their header (default {DEFAULT_MAX_PIXELS:,})")
    p.set_defaults(run=cmd_calibrate)

    p = commands.add_parser("export", help="write a verified ONNX file (end-to-end or logits; fp32 or INT8)")
    p.add_argument("checkpoint", help="a .pt checkpoint")
    p.add_argument("--onnx", required=True, help="the file to write")
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--end-to-end", action="store_true",
                       help="uint8 image in, class map (+ logits) out, pre/post-processing inside (the default)")
    graph.add_argument("--logits", action="store_true", help="the network alone: normalised input, logits out")
    p.add_argument("--tta", default="none", choices=("none", "flip"), help="flip TTA inside the end-to-end graph")
    p.add_argument("--int8", action="store_true", help="static INT8 quantisation (QDQ, per-channel weights)")
    p.add_argument("--calibration", help="INT8: dataset root (train split), its images folder or any image folder "
                   "to calibrate on")
    p.add_argument("--calibration-count", type=_positive_int, help="INT8: calibration images (default 64)")
    p.add_argument("--data-root", help="also evaluate the file on this dataset and print the mIoU drift")
    p.add_argument("--split", help="with --data-root: the split evaluated (default val)")
    p.add_argument("--max-miou-drop", type=_drop_points,
                   help="INT8 with --data-root: largest mIoU drop accepted, in points (default 1.0)")
    p.add_argument("--workers", type=_non_negative_int,
                   help="with --data-root: image-reading processes (default 2)")
    p.add_argument("--json", help="also write the figures here")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("serve", help="an HTTP service and a web page for a model (.pt or .onnx)")
    p.add_argument("model", help="a .pt checkpoint or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch", type=_positive_int, default=8, help="images per forward pass at most (default 8)")
    p.add_argument("--max-wait-ms", type=_non_negative, default=5.0,
                   help="how long a queued image waits for others to batch with (default 5 ms)")
    p.add_argument("--max-queue", type=_positive_int, default=64, help="images waiting at most; then 503 (default 64)")
    p.add_argument("--drain-timeout", type=_positive_int, default=30,
                   help="on SIGTERM, seconds to finish the requests in flight before closing them (default 30)")
    p.add_argument("--max-bytes", type=_positive_int, default=20_000_000, help="request body limit (default 20 MB)")
    p.add_argument("--body-timeout", type=_positive_seconds, default=30.0,
                   help="an upload that sends no byte for this many seconds gets 408 (default 30)")
    p.add_argument("--head-timeout", type=_positive_seconds, default=30.0,
                   help="a connection that has not sent a whole request head this many seconds after opening (or "
                        "after its last answer) is closed, with 408 if part came (default 30)")
    p.add_argument("--max-connections", type=_connections, default=1000,
                   help="when this many connections are open (a new request's included), it gets 503 at once "
                        "(default 1000)")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"image size limit, read from the header before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-pending-pixels", type=_positive_int, default=4 * DEFAULT_MAX_PIXELS,
                   help="pixels of the images being decoded, waiting or segmented, all requests together; beyond, "
                        f"503 (default {4 * DEFAULT_MAX_PIXELS:,}: about 3 bytes a pixel held, 10 while decoding)")
    p.add_argument("--max-pending-bytes", type=_positive_int, default=500_000_000,
                   help="bytes of the uploads being received or decoded, all requests together; beyond, 503 and the "
                        "connection closed (default 500 MB; --max-bytes bounds one)")
    p.add_argument("--tta", default="auto", choices=("auto", "none", "flip"),
                   help="default TTA (a request may ask ?tta=); auto: none, or an end-to-end .onnx file's own")
    p.add_argument("--device", default="auto", help="for .pt checkpoints")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="for .pt checkpoints")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads: onnxruntime's for an .onnx file, torch's for a .pt checkpoint "
                        "(default: the cores)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="of the service's log lines (default info)")
    p.set_defaults(run=cmd_serve)

    p = commands.add_parser("download", help="download and verify VOC 2012 (voc) or VOC + SBD train_aug (sbd)")
    p.add_argument("dataset", choices=("voc", "sbd"))
    p.add_argument("--root", default="data", help="folder to download into (default data)")
    p.set_defaults(run=cmd_download)

    p = commands.add_parser("encoders", help="list encoders, parameters, feature channels, weights available")
    p.set_defaults(run=cmd_encoders)

    p = commands.add_parser("benchmark", help="throughput of our train step, data path and Predictor vs references")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--quick", action="store_true", help="fewer, shorter windows (a smoke test, not a measurement)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.set_defaults(run=cmd_benchmark)
    return parser


# Commands that write files as they go and have no SIGTERM handling of their own (train saves its position, serve
# drains, export removes its temporary file): a SIGTERM (a timeout, a scheduler, `docker stop`) as Ctrl-C, so a file
# being written is removed, not left half-written under its hidden temporary name, and the same line is said.
SIGTERM_AS_CTRL_C = {"predict", "evaluate", "visualize", "calibrate", "check-data"}


@contextlib.contextmanager
def _sigterm_as_ctrl_c(wanted: bool) -> typing.Iterator[None]:
    if not wanted or threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return

    def interrupt(signum: int, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from .allocator import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 (café.jpg from a Latin-1 archive) is
        if hasattr(stream, "reconfigure"):  # printed as caf\udce9.jpg, not a UnicodeEncodeError in the middle
            stream.reconfigure(errors="backslashreplace")
    tune_cpu_allocator()
    try:
        with _sigterm_as_ctrl_c(args.command in SIGTERM_AS_CTRL_C):
            return args.run(args)
    except _user_errors() as error:
        if not getattr(error, "quiet", False):  # under torchrun, said by the first process only
            print(f"resunet {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a write no command foresaw, on a full or read-only disk: still one line
        # outputs.WHOLE_DISK_ERRNOS, written out: importing outputs would import torch for every command
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"resunet {args.command}: error: {where}could not write ({error.strerror})", file=sys.stderr)
        return 2
    except RuntimeError as error:  # out of memory where no file is to blame (a model, a batch): one line too
        runtime = sys.modules.get(f"{__package__}.runtime")  # loaded by whatever ran out: torch is imported
        if runtime is None or not runtime.is_out_of_memory(error):
            raise
        levers = [flag for flag, dest in (("--batch-size", "batch_size"), ("--size", "size"),
                                          ("--max-pixels", "max_pixels")) if hasattr(args, dest)]
        advice = f"; a lower {' or '.join(levers)} needs less" if levers else ""
        advice += (", as does --device cpu" if levers else "; --device cpu") if hasattr(args, "device") else ""
        print(f"resunet {args.command}: error: out of memory ({str(error).splitlines()[0][:200]}){advice}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resunet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
