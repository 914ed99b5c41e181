"""What a large photo costs in memory through the paths that need full-size logits: a two-model ensemble with
`--confidence` (as `resunet predict MODEL --ensemble MODEL2 --confidence`), and one model with multi-scale TTA. Each
case runs in its own process and reports its peak resident memory (VmHWM) above what it held before the call, the
image itself excluded; "whole" forces the pre-banding path (full-size logits held whole) for comparison.

Random-weight resnet18 U-Nets at working size 48, 21 classes: the network's cost is small, the full-size tensors are
what is measured. Run: `python benchmarks/full_size_memory.py [--sides 4000 8000]` (about 5 minutes on 2 cores;
"whole" at 8000 px needs about 20 GB and is left out unless --whole-at-8000).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = """
import json, sys
import numpy as np, torch
import resunet.predict as predict_module
from resunet.data.classes import generic_info
from resunet.model.unet import ResNetUNet
from resunet.predict import Ensemble, Predictor

side, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "whole":
    predict_module.FULL_SIZE_WHOLE_ELEMENTS = 10**15
torch.manual_seed(0)
def member():
    return Predictor(ResNetUNet(21, "resnet18", None).eval(), generic_info(21), 48, (0.5,) * 3, (0.25,) * 3, "cpu",
                     "fp32")
predictor = Ensemble([member(), member()]) if path == "ensemble" else member()
if path == "ms":
    predictor.set_inference("ms", scales=(0.75, 1.0))
image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
def peak_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
before = peak_mb()
predictor.predict_with_confidence(image)
print(json.dumps({"peak_above_mb": round(peak_mb() - before)}))
"""


def main() -> None:
    from resunet.runtime import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4000, 8000])
    parser.add_argument("--whole-at-8000", action="store_true")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"full-size memory, {cpu_name()}, commit {commit}")
    print(f"{'path':<10} {'side':>6} {'banded MiB':>10} {'whole MiB':>10}")
    for path in ("ensemble", "ms"):
        for side in args.sides:
            peaks = {}
            for mode in ("band", "whole"):
                if mode == "whole" and side >= 8000 and not args.whole_at_8000:
                    peaks[mode] = "-"
                    continue
                out = subprocess.run([sys.executable, "-c", CASE, str(side), path, mode], capture_output=True,
                                     text=True, check=True).stdout
                peaks[mode] = json.loads(out.splitlines()[-1])["peak_above_mb"]
            print(f"{path:<10} {side:>6} {peaks['band']:>10} {peaks['whole']:>10}", flush=True)


if __name__ == "__main__":
    main()
