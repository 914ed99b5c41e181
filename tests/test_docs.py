"""The README is run, not just read: its Python blocks execute (against a real checkpoint and ONNX file; the training
block with train recording its settings), and every flag its command lines (and the Makefile's) give a subcommand is
one that subcommand accepts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resunet.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "Makefile", "RESULTS.md", "benchmarks/RESULTS.md"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def commands_with_flags(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its --flags) for each `resunet SUB ...` or `$(RESUNET) SUB ...` command line, continuation lines
    joined. An error message quoted after the command ('resunet evaluate: error: ...') is not a command line."""
    text = text.replace("\\\n", " ")
    found = []
    for sub, rest in re.findall(r"(?:\bresunet|\$\(RESUNET\)) ([a-z][a-z-]*)((?:[^\n`#]|#\S)*)", text):
        if rest.startswith(":"):
            continue
        found.append((sub, re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)))
    return found


def with_make_variables(text: str) -> str:
    """A Makefile with each `$(NAME)` of its own variables written out: `make camvid`'s flags are mostly in
    CAMVID_COMMON and CAMVID_SCHEDULE, on lines no command finder reads (a renamed flag there passed)."""
    joined = text.replace("\\\n", " ")
    variables = dict(re.findall(r"(?m)^([A-Z][A-Z0-9_]*)\s*[?:]?=[ \t]*(.*)$", joined))
    for _ in range(5):  # variables naming variables
        joined = re.sub(r"\$\(([A-Z][A-Z0-9_]*)\)", lambda m: variables.get(m[1], m[0]), joined)
    return joined


def test_command_finder_reads_continuations_and_skips_error_messages():
    text = ("```\nresunet train --data-root D \\\n    --epochs 5  # --not-a-flag\n```\n"
            "`resunet evaluate: error: ... --ignore-index`\n$(RESUNET) predict CKPT IMG --out O")
    assert commands_with_flags(text) == [("train", ["--data-root", "--epochs"]), ("predict", ["--out"])]
    makefile = ("COMMON = --data-root $(DATA) \\\n\t--seed $(SEED)\nSEED ?= 0\nrun:\n\t$(RESUNET) train $(COMMON) "
                "--out $(RUN)\n")
    assert commands_with_flags(with_make_variables(makefile)) == [("train", ["--data-root", "--seed", "--out"])]


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_flag_exists(doc):
    subcommands = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    unknown, checked = [], 0
    text = (ROOT / doc).read_text()
    for sub, flags in commands_with_flags(with_make_variables(text) if doc == "Makefile" else text):
        if sub not in subcommands:  # prose such as "resunet refuses an image": not a command, unless it has flags
            unknown += [f"resunet {sub} (no such subcommand) {' '.join(flags)}"] if flags else []
            continue
        accepted = subcommands[sub]._option_string_actions
        unknown += [f"resunet {sub} {flag}" for flag in flags if flag not in accepted]
        checked += len(flags)
    assert checked > 0
    assert not unknown, f"{doc} names flags its subcommand does not take: {unknown}"


def test_readme_python_runs(exported, demo_root, tmp_path, monkeypatch):
    """Each Python block of the README, executed as written in a folder holding the files it names: the demo run's
    checkpoint and ONNX file, and a photo. What the comments promise is then checked."""
    blocks = python_blocks((ROOT / "README.md").read_text())
    api_block = next(b for b in blocks if "Predictor.from_checkpoint" in b)
    plain_block = next(b for b in blocks if "ort.InferenceSession" in b)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "best.pt").symlink_to(exported["ckpt"])
    (tmp_path / "runs" / "demo" / "model.onnx").symlink_to(exported["dir"] / "model.onnx")
    (tmp_path / "model.onnx").symlink_to(exported["dir"] / "model.onnx")
    photo = next((demo_root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))
    Image.open(photo).resize((90, 70)).save(tmp_path / "photo.jpg")  # not the working size: the output must follow
    monkeypatch.chdir(tmp_path)

    api, plain = {}, {}
    exec(compile(api_block, "README.md", "exec"), api)
    exec(compile(plain_block, "README.md", "exec"), plain)

    mask = api["mask"]
    assert mask.dtype == np.uint8 and mask.shape == (70, 90)  # "H×W uint8 class map at the photo's size"
    saved = Image.open("mask.png")
    assert saved.mode == "P" and saved.size == (90, 70)
    assert np.array_equal(np.array(saved), mask)
    assert Image.open("overlay.jpg").size == (90, 70)
    # resunet.load on the ONNX file (fp32) gives the map of the checkpoint's Predictor (device auto: bf16 on a CPU
    # that has it, so a few boundary pixels may differ)
    assert (api["predictor"].predict("photo.jpg") == mask).mean() > 0.99
    # plain onnxruntime: mask and logits at the input's size, the mask their argmax
    onnx_mask, logits = plain["mask"], plain["logits"]
    assert onnx_mask.shape == (1, 70, 90) and logits.shape[:1] + logits.shape[2:] == (1, 70, 90)
    assert np.array_equal(onnx_mask[0], logits[0].argmax(0))
    assert (onnx_mask[0] == mask).mean() > 0.99


def test_readme_training_block_runs(tmp_path, monkeypatch):
    """The README's training block, executed as written with `train` recording each run's settings instead of
    training (the suite trains for real elsewhere): the names it imports exist, its TrainConfig fields are real, and
    resume continues the run in its folder with its recipe and the new epoch count."""
    import resunet.train
    from resunet.checkpoint import save_checkpoint

    block = next(b for b in python_blocks((ROOT / "README.md").read_text()) if "TrainConfig(" in b)
    runs = []

    def recorded(cfg):
        runs.append(cfg)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_checkpoint({"train_config": cfg.to_dict()}, Path(cfg.out) / "last.pt")
        return {}

    monkeypatch.setattr(resunet.train, "train", recorded)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    first, resumed = runs
    assert (first.out, first.encoder, first.epochs, first.size) == ("runs/mine", "efficientnet-lite0", 20, 128)
    assert Path(resumed.out) == (tmp_path / "runs" / "mine").resolve() and resumed.epochs == 40
    assert resumed.resume == "runs/mine/last.pt" and resumed.encoder == "efficientnet-lite0" and resumed.size == 128


def test_the_python_the_package_asks_for_runs_every_pinned_dependency():
    """Found by a helper: pyproject said Python 3.10 would do, but numpy 2.4.6, scipy, pillow, onnxruntime and fastapi
    as pinned need 3.11, so on 3.10 the install failed at numpy's pin instead of saying which Python it needs."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = re.fullmatch(r">=\s*(3\.\d+)", project["requires-python"].split("#")[0].strip()).group(1)
    pins = [Requirement(line) for line in project["dependencies"]]
    too_new = []
    for pin in pins:
        needs = metadata.metadata(pin.name).get("Requires-Python")  # the pinned version, as installed
        if needs and lowest + ".0" not in SpecifierSet(needs):
            too_new.append(f"{pin} needs Python {needs}")
    assert len(pins) > 10 and not too_new, f"requires-python >={lowest}, but: {too_new}"
    assert f"Python {lowest}+" in (ROOT / "README.md").read_text()


def test_the_readme_says_where_make_installed_and_quotes_extras():
    """`make demo` installs into .venv and activates nothing: the README's bare `resunet ...` lines failed with
    "command not found" until it said so. An unquoted `pip install resunet[lite]` is a glob to zsh."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start")[1].split("\n## ")[0]
    assert ".venv/bin/resunet" in quick_start and "source .venv/bin/activate" in quick_start
    sources = [readme, *(path.read_text() for path in (ROOT / "src" / "resunet").rglob("*.py"))]
    unquoted = [hit for text in sources for hit in re.findall(r"pip install [^'`\s]*\[[a-z-]+\]", text)]
    assert not unquoted


@pytest.mark.parametrize("value, overwrites", [("0", False), ("", False), ("1", True)])
def test_make_camvid_starts_a_run_over_only_when_asked(value, overwrites):
    """Found by a helper: OVERWRITE=0 (as CAMVID_EMA=0 turns the average off) passed --overwrite, which removes a
    finished run's checkpoints once the new one starts. Read from make's dry run: nothing is executed."""
    import subprocess

    printed = subprocess.run(["make", "-n", "-C", str(ROOT), "camvid", f"OVERWRITE={value}", "DATA=somewhere"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert "resunet train --data-root somewhere" in printed
    assert ("--overwrite" in printed) == overwrites
