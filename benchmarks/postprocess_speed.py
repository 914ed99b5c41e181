"""What the fused upsample + argmax (`resunet.classmap`) is worth with a *trained* model on real photos.

`resunet benchmark` times the Predictor with a randomly initialised network, whose class map is nearly one class
everywhere: there almost every output pixel takes the fused kernel's fast path (its four taps agree). A trained
model's map has object boundaries, where the kernel interpolates every class. This times, per image, the
Predictor's class map made both ways from the same checkpoint, alternating in one process (so a shared machine's
drift hits both alike): the full-size logits then `argmax` (as before the fused kernel), and `Predictor.predict`.
It checks that both give the same map, and reports the share of output pixels on the interpolating path.

Run (after `make camvid`): `python benchmarks/postprocess_speed.py runs/camvid/best.pt "../shared/camvid/val/images/*"
--size 500 375` (the last two numbers resize the photos first, as the benchmark's 500×375 images; omit to keep
their own size).
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import numpy as np
import torch
from PIL import Image

from resunet.classmap import linear_taps
from resunet.predict import Predictor
from resunet.runtime import cpu_kind, cpu_name


def full_size_argmax(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    return predictor.logits(pixels)[0].argmax(0).to(torch.uint8).numpy()


def interpolated_share(predictor: Predictor, image: np.ndarray) -> float:
    """The share of output pixels whose four bilinear taps disagree on the class (the kernel's full path)."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.inference_mode():
        low = predictor.working_logits_by_group([pixels], predictor.size)[0][0].argmax(0).numpy()
    y0, y1, _, _ = linear_taps(low.shape[0], image.shape[0])
    x0, x1, _, _ = linear_taps(low.shape[1], image.shape[1])
    k = low[y0][:, x0]
    agree = (low[y0][:, x1] == k) & (low[y1][:, x0] == k) & (low[y1][:, x1] == k)
    return float(1 - agree.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("images", help="a glob of photos")
    parser.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"), help="resize the photos first")
    parser.add_argument("--count", type=int, default=8, help="photos used (default 8)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating timed rounds (default 6)")
    args = parser.parse_args()

    predictor = Predictor.from_checkpoint(args.checkpoint, "cpu")
    images = []
    for path in sorted(glob.glob(args.images))[:args.count]:
        image = Image.open(path).convert("RGB")
        images.append(np.array(image.resize(tuple(args.size), Image.BILINEAR) if args.size else image))
    for image in images:
        assert np.array_equal(full_size_argmax(predictor, image), predictor.predict(image)), "maps differ"
    ways = {"full-size logits + argmax": lambda image: full_size_argmax(predictor, image),
            "fused (Predictor.predict)": predictor.predict}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            for image in images[:2]:  # warm-up
                way(image)
            start = time.perf_counter()
            for _ in range(3):
                for image in images:
                    way(image)
            times[name].append((time.perf_counter() - start) / (3 * len(images)) * 1e3)
    share = statistics.mean(interpolated_share(predictor, image) for image in images)
    shape = images[0].shape
    print(f"CPU {cpu_name()} (kind {cpu_kind()}), {torch.get_num_threads()} threads; {len(images)} photos "
          f"{shape[1]}×{shape[0]}, working size {predictor.size}, {predictor.info.num_classes} classes; "
          f"output pixels interpolated in full: {share:.1%}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"  {name:<28}{value:8.2f} ms/image  (rounds: {', '.join(f'{v:.2f}' for v in times[name])})")
    before, after = medians.values()
    print(f"  fused / full-size: {before / after:.3f}× the images per second, {before - after:.2f} ms less per image")


if __name__ == "__main__":
    main()
