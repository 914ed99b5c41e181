"""What each training option is worth: one recipe and one budget, one option changed at a time.

Every row trains the base recipe for the same number of epochs with one option changed (the base itself at a second
seed gives the run-to-run noise), evaluates the final weights on the validation split — mIoU, boundary mIoU and
expected calibration error, `resunet evaluate`'s figures — and takes the training speed from metrics.jsonl. Each row
lives in OUT/<row>/: a finished row (its result.json) is kept, an interrupted one resumes exactly from its last.pt,
so a long ablation can be stopped and continued, and rows can be added later.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import replace
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import ABLATION_OPTIONS, TrainConfig, normalised_setting
from .data.voc import find_voc_dir
from .evaluate import run_evaluate
from .outputs import FolderLock, write_output
from .runtime import cpu_kind, cpu_name
from .train import CONFIG_DEFAULTS, TrainingError, check_settings, check_types, read_metrics, train


def row_folder(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# Fields that change how a run is carried out, not what it learns: a row may be continued with other values.
NOT_RECIPE = {"out", "resume", "workers", "progress", "device", "cache_dir", "max_pixels", "skip_data_check",
              "checkpoint_every", "tensorboard", "calibrate", "overwrite"}


def recipe(cfg: TrainConfig | dict) -> dict:
    # A stored row's settings as TrainConfig keeps them now (widths stored with spaces by an earlier version)
    values = cfg.to_dict() if isinstance(cfg, TrainConfig) else {k: normalised_setting(k, v) for k, v in cfg.items()}
    # Under --time-budget a run stores the epoch count it fitted: the budget, not the count, is the recipe then.
    budgeted = {"epochs", "eval_every"} if values.get("time_budget") else set()
    # A loss's or --mix's own setting where the row does not use it (`row_config` leaves it out now; an earlier row
    # of another loss stored the base's)
    unused = unused_settings(values.get("loss"), values.get("mix", "none"))
    kept = {k: v for k, v in values.items() if k not in NOT_RECIPE | budgeted | unused}
    for name in ("data_root", "encoder_weights"):  # `train` stores them absolute: `w.pth` and /abs/w.pth are one file
        if kept.get(name):
            kept[name] = os.path.abspath(kept[name])
    if kept.get("data_root"):  # a VOC tree given at any of its levels (demo, demo/VOCdevkit/VOC2012) is one dataset
        kept["data_root"] = str(find_voc_dir(Path(kept["data_root"])) or kept["data_root"])
    return kept


ROW_FIGURES = ("option", "seed", "miou", "boundary_miou", "ece", "train_images_per_s")


def read_result(path: Path) -> dict:
    """A row's result.json; one cut short or edited (a traceback, even for a row not asked for: earlier rows are read
    for the table) is one line saying how to score the row again."""
    try:
        result = json.loads(path.read_text())
        missing = [key for key in ROW_FIGURES if key not in result]
    except (OSError, ValueError, TypeError) as error:
        missing, result = [f"unreadable: {error}"], None
    if missing:
        raise TrainingError(f"{path}: not a finished row's result ({', '.join(missing)} missing); remove it to score "
                            "the row again from its last.pt")
    return result


def row_config(base: TrainConfig, name: str) -> TrainConfig:
    """`base` with row `name`'s option. A row that changes the loss (or turns --mix off) leaves out the base's setting
    of the loss it replaces: --ohem-keep 0.1 in an ohem recipe had every other loss's row refused for it (and the
    Lovász row the base's --class-weights, which it does not use)."""
    row = replace(base, **ABLATION_OPTIONS[name])
    return replace(row, **{key: CONFIG_DEFAULTS[key] for key in unused_settings(row.loss, row.mix)})


def unused_settings(loss: str | None, mix: str) -> set[str]:
    """The settings a run of `loss` and `mix` does not use: the other losses' own, --mix-prob without a mix, and
    --class-weights under Lovász (whose class average is unweighted)."""
    used = {"focal_gamma": loss == "focal", "ohem_keep": loss == "ohem", "mix_prob": mix != "none",
            "class_weights": loss != "lovasz"}
    return {name for name, is_used in used.items() if not is_used}


class OtherRecipeError(TrainingError):
    """A row folder trained with another recipe than this ablation's: one table would mix the two."""


def plan_row(base: TrainConfig, name: str, out: Path) -> tuple[TrainConfig, dict | None]:
    """One row's training config and its finished result if it has one; TrainingError if its folder holds a row
    trained with another recipe."""
    folder = out / row_folder(name)
    result_path = folder / "result.json"
    last = folder / "last.pt"
    # No last.pt: the row starts (again). A best.pt alone is a row stopped between its first two saves, not a run.
    # The rows' final weights are scored once, so evaluating between epochs would cost time for nothing; but
    # ReduceLROnPlateau steps on those evaluations, so a plateau recipe keeps them.
    plateau = ABLATION_OPTIONS[name].get("scheduler", base.scheduler) == "plateau"
    eval_every = base.eval_every if plateau else base.epochs
    cfg = replace(row_config(base, name), out=str(folder), eval_every=eval_every,
                  resume=str(last) if last.is_file() else None, calibrate=False, overwrite=not last.is_file())
    if result_path.is_file():
        result = read_result(result_path)
        stored = recipe(result["recipe"]) if isinstance(result.get("recipe"), dict) else None
    elif last.is_file():
        settings = load_checkpoint(last, tensors=False)["train_config"]
        result, stored = None, recipe(settings)
        if cfg.time_budget:  # continue the schedule the row fitted to its budget
            cfg = replace(cfg, epochs=settings["epochs"])
    else:
        result, stored = None, None
    wanted = recipe(cfg)
    if stored is not None and stored != wanted:
        changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
        raise OtherRecipeError(f"{folder}: trained with another recipe ({', '.join(changed)} differ); "
                               "give the ablation another --out")
    return cfg, result


def run_row(name: str, cfg: TrainConfig, result: dict | None) -> dict | None:
    """Train (or resume, or keep) one row as `plan_row` planned it and score its final weights (last.pt: under
    --time-budget epoch 1 is evaluated too, and best.pt may hold it); None if a signal stopped it."""
    folder = Path(cfg.out)
    result_path, last, wanted = folder / "result.json", folder / "last.pt", recipe(cfg)
    if result is not None:
        print(f"ablation: {name}: kept ({result_path})", flush=True)
        return result
    print(f"ablation: {name}: training {cfg.epochs} epochs{' (resumed)' if cfg.resume else ''}", flush=True)
    outcome = train(cfg)
    # SIGTERM/Ctrl-C: last.pt holds the position, and the next run resumes it; one that came during the final
    # evaluation leaves the row trained, and the next run scores it.
    if outcome["stopped_by"] or outcome.get("stop_requested"):
        return None
    scores = run_evaluate(str(last), cfg.data_root, cfg.val_split, device=cfg.device,
                          precision=cfg.precision, workers=cfg.workers, max_pixels=cfg.max_pixels,
                          progress=cfg.progress)
    records = read_metrics(folder / "metrics.jsonl", cfg.epochs)
    # The median epoch: an epoch slowed by something else on the machine does not move it.
    speed = statistics.median(r["train_images_per_s"] for r in records)
    result = {"option": name, "changes": ABLATION_OPTIONS[name], "epochs": len(records), "seed": cfg.seed,
              "miou": scores["miou"], "boundary_miou": scores["boundary_miou"], "ece": scores["ece"],
              "train_images_per_s": speed, "cpu": cpu_name(), "cpu_kind": cpu_kind(), "recipe": wanted}
    write_output(result_path, json.dumps(result, indent=1))
    return result


def noise_and_verdicts(results: list[dict]) -> tuple[float | None, list[str]]:
    """The seed-to-seed mIoU difference and, per row, whether its mIoU change is larger than that."""
    by_name = {r["option"]: r for r in results}
    base = by_name.get("baseline")
    noise = abs(by_name["seed 1"]["miou"] - base["miou"]) if base and "seed 1" in by_name else None
    verdicts = []
    for r in results:
        if r["option"] in ("baseline", "seed 1"):
            verdicts.append("")
        elif base is None or noise is None:
            verdicts.append("no noise estimate")
        else:
            delta = r["miou"] - base["miou"]
            verdicts.append("inside the noise" if abs(delta) <= noise else ("gain" if delta > 0 else "loss"))
    return noise, verdicts


def row_machine(result: dict) -> str:
    """The CPU a row was trained on, as recorded ("AMD EPYC, avx512_bf16"; the kind since 2026-12-07)."""
    return result.get("cpu", "CPU not recorded") + (f", {result['cpu_kind']}" if result.get("cpu_kind") else "")


def table_machine(results: list[dict]) -> str:
    """The baseline's CPU (the first row's without one): a row trained on another names its own."""
    return row_machine(next((r for r in results if r["option"] == "baseline"), results[0])) if results else cpu_name()


def format_table(results: list[dict]) -> str:
    """A Markdown table: one row per option, the change in mIoU against the baseline and its verdict. A row kept from
    a run on another CPU names it (the header named this machine for every row, its img/s among them)."""
    noise, verdicts = noise_and_verdicts(results)
    base = next((r for r in results if r["option"] == "baseline"), None)
    machine = table_machine(results)
    lines = ["| option | val mIoU % | Δ mIoU | boundary mIoU % | ECE % | train img/s | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r, verdict in zip(results, verdicts):
        delta = f"{100 * (r['miou'] - base['miou']):+.2f}" if base and r is not base else ""
        ece = f"{100 * r['ece']:.2f}" if r["ece"] is not None else "n/a"
        option = r["option"] if row_machine(r) == machine else f"{r['option']} ({row_machine(r)})"
        lines.append(f"| {option} | {100 * r['miou']:.2f} | {delta} | {100 * r['boundary_miou']:.2f} | {ece} | "
                     f"{r['train_images_per_s']:.2f} | {verdict} |")
    if noise is not None:
        lines.append(f"\nNoise: the baseline at seeds {base['seed']} and 1 differs by {100 * noise:.2f} points of "
                     "mIoU; a change no larger than that is marked inside the noise (two seeds only: a rough bound).")
    return "\n".join(lines)


def run_ablation(base: TrainConfig, options: list[str], out: str | Path) -> list[dict]:
    """Every row in `options` (names in ABLATION_OPTIONS) on `base`; writes OUT/ablation.md and OUT/ablation.json."""
    unknown = [name for name in options if name not in ABLATION_OPTIONS]
    if unknown:
        raise TrainingError(f"unknown ablation option(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(ABLATION_OPTIONS)}")
    twice = sorted({name for name in options if options.count(name) > 1})
    if twice:
        raise TrainingError(f"ablation option(s) {', '.join(map(repr, twice))} listed twice; each row is trained once")
    if base.seed == 1 and "seed 1" in options:
        raise TrainingError("the base recipe already uses seed 1; give it another --seed for the noise row")
    # The base's own settings first: the rows leave out a loss's setting the row's loss does not use, so a
    # --focal-gamma the base's loss does not use either would go unsaid
    check_types(base)
    check_settings(base)
    for name in options:  # a row that changes nothing would retrain the baseline and be judged as the option's worth
        if name != "baseline" and recipe(row_config(base, name)) == recipe(base):
            flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in ABLATION_OPTIONS[name].items())
            raise TrainingError(f"ablation option {name!r} changes nothing: the train flags already give {flags}; "
                                "drop the row or change the base flag")
        try:  # every row's settings before the first row trains: --batch-size 1 met the mix rows hours in
            check_types(row := row_config(base, name))
            check_settings(row)
        except TrainingError as error:
            raise TrainingError(f"ablation option {name!r}: {error}") from None
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, a read-only parent
        raise TrainingError(f"--out {out}: cannot make the ablation folder ({error.strerror or error})") from None
    # Two ablations in one folder planned their rows once, each retraining (after deleting) rows the other finished
    with FolderLock(out) as folder:
        if not folder.held:
            raise TrainingError(f"--out {out}: another resunet ablate is writing there; wait for it to end, or give "
                                "another --out")
        return run_rows(base, options, out)


def run_rows(base: TrainConfig, options: list[str], out: Path) -> list[dict]:
    """`run_ablation`'s rows, its checks passed and its folder held."""
    # Every row's folder before any training (a changed recipe found at row 3 had cost two); training a row
    # touches no other row's folder, so the plans hold until each row's turn.
    plans = [plan_row(base, name, out) for name in options]
    earlier = earlier_rows(base, options, out)
    results = []

    def finished(rows: list[dict]) -> list[dict]:
        """The rows done, those after the stopped or failed one that an earlier run finished, and the rows not
        asked for this time that an earlier run finished: a table of fewer rows replaced a fuller one."""
        return rows + [result for _, result in plans[len(rows) + 1:] if result is not None] + earlier

    try:
        for name, (cfg, kept) in zip(options, plans):
            result = run_row(name, cfg, kept)
            if result is None:
                print(f"ablation: stopped in row {name!r}; run the same command again to continue it and the rows "
                      "after it (the `resunet train --resume` above would continue this row alone, with no table)",
                      flush=True)
                break
            results.append(result)
    except BaseException:  # a row that fails (a diverged loss, a full disk): the finished rows' table is still due
        if rows := finished(results):
            write_tables(base, rows, out)
        raise
    if rows := finished(results):  # a stop in the first row with no row finished leaves an earlier table
        write_tables(base, rows, out)
    return results


def earlier_rows(base: TrainConfig, options: list[str], out: Path) -> list[dict]:
    """The finished rows in `out` of options not in `options` (a row added later, as the Makefile's
    ABLATION_OPTIONS offers, wrote a table of itself alone over the full one). OtherRecipeError for a row trained
    with another recipe: a new row of this one was trained beside it, and the table of the others replaced by
    the new row's alone (a helper's audit, 2026-12-07)."""
    rows = []
    for name in ABLATION_OPTIONS:
        if name in options or not (out / row_folder(name) / "result.json").is_file():
            continue
        try:
            _, result = plan_row(base, name, out)
        except OtherRecipeError:
            raise
        except TrainingError:  # a damaged result.json, of a row not asked for: left out of the table
            continue
        if result is not None:
            rows.append(result)
    return rows


def write_tables(base: TrainConfig, results: list[dict], out: Path) -> None:
    """OUT/ablation.md and OUT/ablation.json for the rows in `results`, and the table printed."""
    table = format_table(results)
    budget = (f"{base.time_budget} of training (at most {base.epochs} epochs)" if base.time_budget
              else f"{base.epochs} epochs")
    header = (f"Ablation: {budget} each on {base.data_root} ({base.encoder}, seed {base.seed}), "
              f"final weights on {base.val_split}; {table_machine(results)} (a row on another CPU names it).\n\n")
    write_output(out / "ablation.md", header + table + "\n")
    write_output(out / "ablation.json", json.dumps({"base": base.to_dict(), "rows": results}, indent=1))
    print("\n" + header + table, flush=True)
