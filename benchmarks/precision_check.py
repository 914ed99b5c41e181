"""fp32 vs bf16 on demo data: does reduced precision cost accuracy?

Trains a ResNet34-UNet from scratch on the demo data (the `make demo` recipe before it moved to a pretrained
EfficientNet-Lite0; 12 epochs) twice with the same seed, once in fp32 and once with bf16 autocast (+ channels_last),
then evaluates each checkpoint on the demo val split in both precisions. Run: `make precision-check`
(or `python benchmarks/precision_check.py --out runs/precision`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resunet.config import TrainConfig
from resunet.data.demo import make_demo_dataset
from resunet.evaluate import run_evaluate
from resunet.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/precision")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "VOCdevkit").is_dir():
        make_demo_dataset(data, train=96, val=24, size=128, seed=0)
    rows = {}
    for precision in ("fp32", "bf16"):
        run = out / precision
        train(TrainConfig(data_root=str(data), out=str(run), epochs=args.epochs, size=128, scale_min=0.75,
                          scale_max=1.25, pretrained=False, optimizer="adamw", lr=1e-3, scheduler="cosine", seed=0,
                          precision=precision, progress=False, overwrite=True))  # a rerun starts over
        for eval_precision in ("fp32", "bf16"):
            scores = run_evaluate(str(run / "best.pt"), str(data), "val", precision=eval_precision)
            rows[(precision, eval_precision)] = scores["miou"]
    print("\ntrained in → evaluated in: val mIoU (demo data)")
    for (trained, evaluated), miou in rows.items():
        print(f"  {trained:>4} → {evaluated:>4}: {100 * miou:6.2f}%")
    (out / "precision.json").write_text(json.dumps({f"{t}->{e}": m for (t, e), m in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
