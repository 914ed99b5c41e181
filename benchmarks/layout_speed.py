"""What the channels_last (NHWC) memory layout is worth in fp32 on this machine's CPU, per encoder: the training step
of `make camvid` (8 crops of 320×320, 11 classes, cross-entropy + Dice, AdamW) and one 384×512 inference, each in
NCHW and in channels_last. `runtime.use_channels_last` turns NHWC on in fp32 only where this measured a gain.

The two layouts' steps alternate in one process, so a shared machine's drift in pace hits both alike; the figures
are medians after warm-up. Run: `python benchmarks/layout_speed.py` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from resunet.losses import SegmentationLoss
from resunet.model.unet import ResNetUNet
from resunet.allocator import tune_cpu_allocator
from resunet.runtime import cpu_kind, cpu_name


def twin_models(encoder: str, classes: int, train: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same randomly initialised model twice: NCHW, then channels_last."""
    torch.manual_seed(0)
    nchw = ResNetUNet(classes, encoder, encoder_weights=None).train(train)
    nhwc = ResNetUNet(classes, encoder, encoder_weights=None).train(train)
    nhwc.load_state_dict(nchw.state_dict())
    return nchw, nhwc.to(memory_format=torch.channels_last)


def alternate(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each step, the steps called in turn `rounds` times."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds + warmup):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[warmup:]) for name, values in times.items()}


def training_step(model: torch.nn.Module, criterion: Callable, images: torch.Tensor,
                  masks: torch.Tensor) -> Callable[[], None]:
    """One AdamW step of `model` on this batch, as a call to time (the optimizer made once, outside the timing)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = criterion(model(images).float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def training_steps(encoder: str, args) -> dict[str, float]:
    criterion = SegmentationLoss("ce+dice", torch.ones(args.classes))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, generator=generator)
    masks = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop), generator=generator)
    nchw, nhwc = twin_models(encoder, args.classes, train=True)
    return alternate({"NCHW": training_step(nchw, criterion, images, masks),
                      "channels_last": training_step(nhwc, criterion,
                                                     images.contiguous(memory_format=torch.channels_last), masks)},
                     args.rounds)


@torch.inference_mode()
def inference_steps(encoder: str, args) -> dict[str, float]:
    x = torch.randn(1, 3, 384, 512, generator=torch.Generator().manual_seed(0))
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    nchw, nhwc = twin_models(encoder, args.classes, train=False)
    return alternate({"NCHW": lambda: nchw(x), "channels_last": lambda: nhwc(x_nhwc)}, 3 * args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="efficientnet-lite0,resnet34")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    tune_cpu_allocator()
    print(f"{cpu_name()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}, fp32")
    for encoder in args.encoders.split(","):
        cases = (("training step", training_steps, args.batch_size), ("inference 384×512", inference_steps, 1))
        for what, measure, unit in cases:
            seconds = measure(encoder, args)
            nchw, nhwc = seconds["NCHW"], seconds["channels_last"]
            print(f"{encoder:20s} {what:18s} NCHW {1000 * nchw:7.0f} ms ({unit / nchw:5.2f} img/s)   channels_last "
                  f"{1000 * nhwc:7.0f} ms ({unit / nhwc:5.2f} img/s)   {nchw / nhwc:.2f}×", flush=True)


if __name__ == "__main__":
    main()
