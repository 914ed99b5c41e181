"""mIoU and images/s of one model under each inference mode: none, flip, ms, ms+flip, sliding window.

    python benchmarks/tta_table.py runs/camvid/best.pt --data-root ../shared/camvid --window 320 --stride 240 \
        --json runs/camvid/tta.json

Each mode evaluates the whole split (dataset-wide mIoU at original resolution, `resunet evaluate`'s metric) through
the same `Predictor`; images/s is the split's image count over the evaluation's wall time (decoding included, one
image per call), after one untimed image in that mode (first-call costs: numba kernels, oneDNN primitives, the first
allocations, which the first mode's time alone carried). MODEL may be a .pt checkpoint or a logits-graph .onnx file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from resunet import load
from resunet.data.dataset import open_dataset_for_model
from resunet.evaluate import evaluate_dataset
from resunet.runtime import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--window", type=int, default=320)
    parser.add_argument("--stride", type=int, default=240)
    parser.add_argument("--scales", default="0.75,1.0,1.25,1.5")
    parser.add_argument("--json")
    args = parser.parse_args()
    scales = tuple(float(s) for s in args.scales.split(","))
    modes = [("none", {}), ("flip", {"tta": "flip"}), ("ms", {"tta": "ms", "scales": scales}),
             ("ms+flip", {"tta": "ms+flip", "scales": scales}),
             (f"window {args.window}/{args.stride}", {"window": args.window, "stride": args.stride})]
    predictor = load(args.model)
    dataset = open_dataset_for_model(args.data_root, args.split, predictor.info)
    rows = []
    for name, options in modes:
        predictor.set_inference(**{"tta": "none", **options})
        predictor.predict(dataset.load(0).image)  # warm-up, untimed
        started = time.perf_counter()
        scores = evaluate_dataset(predictor, dataset, batch_size=1, workers=0, progress=False).compute()
        seconds = time.perf_counter() - started
        rows.append({"mode": name, "miou": scores["miou"], "images_per_s": len(dataset) / seconds,
                     "seconds": seconds})
        print(f"{name:<18} mIoU {100 * scores['miou']:6.2f}%   {len(dataset) / seconds:6.2f} img/s", flush=True)
    report = {"model": args.model, "split": args.split, "images": len(dataset), "cpu": cpu_name(),
              "precision": predictor.precision_name(), "rows": rows}  # an INT8 .onnx file's "int8", not "fp32"
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
