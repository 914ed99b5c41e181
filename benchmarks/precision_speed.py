"""What bf16 autocast is worth against fp32 on this machine's CPU, for `make camvid`'s training step: the
EfficientNet-Lite0 U-Net, 8 crops, 11 classes, cross-entropy + Dice, AdamW, channels_last, through `train.train_step`
itself. Crops of 320×320 (the recipe where bf16 pays) and 256×256 (where it does not), each in bf16 and fp32; then
one 480×360 inference (a CamVid photo at its size), bf16 against fp32.

A CPU whose bf16 kernels run no faster than its fp32 ones trains more epochs in `make camvid`'s time budget in fp32.
This measured it for `runtime.cpu_bf16_pays`, the rule `--precision auto` and `make camvid` follow (it had been the
CPU's flags alone, avx512_bf16 or amx_bf16, until an Intel Xeon with avx512_bf16 and no AMX ran fp32 faster).

The variants' steps alternate in one process, so a shared machine's drift hits all alike; medians after warm-up.
Run: `python benchmarks/precision_speed.py` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse

import torch

from layout_speed import alternate  # benchmarks/ is on the path when this script runs
from resunet.allocator import tune_cpu_allocator
from resunet.losses import SegmentationLoss
from resunet.model.unet import ResNetUNet
from resunet.runtime import autocast, cpu_kind, cpu_name
from resunet.train import train_step


CPU = torch.device("cpu")


def fresh_model(args, train: bool) -> torch.nn.Module:
    """The Lite0 U-Net, channels_last, from the same random initialisation for every variant."""
    torch.manual_seed(0)
    model = ResNetUNet(args.classes, "efficientnet-lite0", encoder_weights=None).train(train)
    return model.to(memory_format=torch.channels_last)


def step_at(dtype: torch.dtype | None, crop: int, args):
    """One `train_step` of a fresh model on a fixed batch."""
    model = fresh_model(args, train=True)
    criterion = SegmentationLoss("ce+dice", torch.ones(args.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, crop, crop, generator=generator)
    masks = torch.randint(0, args.classes, (args.batch_size, crop, crop), generator=generator)
    return lambda: train_step(model, images, masks, criterion, optimizer, scaler, CPU, dtype, True)


def inference_at(dtype: torch.dtype | None, args):
    model = fresh_model(args, train=False)
    x = torch.randn(1, 3, 360, 480, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode(), autocast(CPU, dtype):
            model(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crops", default="320,256")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    tune_cpu_allocator()
    print(f"{cpu_name()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    steps = {f"{name} {crop}²": step_at(dtype, crop, args)
             for crop in map(int, args.crops.split(",")) for name, dtype in (("bf16", torch.bfloat16), ("fp32", None))}
    seconds = alternate(steps, args.rounds)
    for name, value in seconds.items():
        print(f"training step {name:10s} {1000 * value:7.0f} ms  {args.batch_size / value:5.2f} img/s", flush=True)
    for crop in args.crops.split(","):
        print(f"{crop}²: fp32 / bf16 step time {seconds[f'fp32 {crop}²'] / seconds[f'bf16 {crop}²']:.2f}×")
    seconds = alternate({name: inference_at(dtype, args) for name, dtype in (("bf16", torch.bfloat16), ("fp32", None))},
                        3 * args.rounds)
    for name, value in seconds.items():
        print(f"inference 480×360 {name:6s} {1000 * value:7.1f} ms  {1 / value:5.2f} img/s")
    print(f"inference: fp32 / bf16 time {seconds['fp32'] / seconds['bf16']:.2f}×")


if __name__ == "__main__":
    main()
