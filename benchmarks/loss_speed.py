"""What each training loss costs per step: forward + backward of `resunet.losses.SegmentationLoss` alone on a batch
shaped like `make camvid`'s (8 crops of 320×320, 11 classes, fp32 logits as the trainer passes them, a band of
ignored pixels, class weights), in milliseconds, on this machine's CPU.

Run: `python benchmarks/loss_speed.py` (about a minute on 2 cores). The whole training step is ~1.2–1.4 s there, so
a loss's milliseconds over cross-entropy's are what it adds to every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from resunet.losses import LOSSES, SegmentationLoss
from resunet.runtime import cpu_name


def time_loss(criterion: SegmentationLoss, logits: torch.Tensor, target: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one forward + backward, after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        x = logits.detach().requires_grad_(True)
        started = time.perf_counter()
        criterion(x, target).backward()
        if i >= 2:
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.classes, args.size, args.size)
    logits = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, args.classes, (args.batch_size, args.size, args.size), generator=generator)
    target[:, : args.size // 16] = 255  # a band of void, as CamVid's unlabelled pixels
    weight = torch.rand(args.classes, generator=generator) + 0.5
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; logits {'×'.join(map(str, shape))} fp32")
    ce_ms = None
    for name in LOSSES:
        ms = time_loss(SegmentationLoss(name, weight, 255), logits, target, args.repeats)
        ce_ms = ms if name == "ce" else ce_ms
        print(f"{name:10s} {ms:8.1f} ms  ({ms / ce_ms:.1f}× cross-entropy)")


if __name__ == "__main__":
    main()
