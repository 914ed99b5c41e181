"""What a leaner decoder would save in `make camvid`'s fp32 training step on this CPU: the EfficientNet-Lite0 U-Net,
8 crops of 320×320, 11 classes, cross-entropy + Dice, AdamW, channels_last (as `train` runs it in fp32).

Variants, each from the same random initialisation of the encoder:
- full: the decoder as `make camvid` trains it (256, 128, 64, 32; learned ×2 upsampling to full resolution);
- bilinear head: the classifier at stride 2, then bilinear ×2 (no learned upsampling at full resolution);
- stride-4 output: the decoder stops after its third block; classifier at stride 4, then bilinear ×4;
- last block 16: decoder channels 256, 128, 64, 16;
- half width: 128, 64, 32, 16 (the ablation's row: 18.9 points lost at 15 epochs, RESULTS.md).
Only the first and the last two are `resunet train` options (`--decoder-channels`); the two heads are probes of what
cutting the full-resolution end would be worth, built here by replacing modules.

The steps alternate in one process, so a shared machine's drift hits all alike; medians after warm-up. Run:
`python benchmarks/decoder_speed.py` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from layout_speed import alternate, training_step  # benchmarks/ is on the path when this script runs
from resunet.losses import SegmentationLoss
from resunet.model.unet import ResNetUNet
from resunet.allocator import tune_cpu_allocator
from resunet.runtime import cpu_kind, cpu_name


class BilinearHead(nn.Module):
    """1×1 classifier at the decoder's last stride, then bilinear upsampling by `factor`."""

    def __init__(self, channels: int, classes: int, factor: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(channels, classes, 1)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.classifier(x), scale_factor=self.factor, mode="bilinear", align_corners=False)


def variant(name: str, classes: int) -> nn.Module:
    torch.manual_seed(0)
    channels = {"last block 16": (256, 128, 64, 16), "half width": (128, 64, 32, 16)}.get(name, (256, 128, 64, 32))
    model = ResNetUNet(classes, "efficientnet-lite0", encoder_weights=None, decoder_channels=channels)
    if name == "bilinear head":
        model.head = BilinearHead(channels[-1], classes, 2)
    elif name == "stride-4 output":
        # ResNetUNet.forward zips the blocks with the skips deepest first, so three blocks end at stride 4.
        model.decoder = model.decoder[:3]
        model.head = BilinearHead(channels[2], classes, 4)
    return model.train().to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    tune_cpu_allocator()
    print(f"{cpu_name()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, "
          f"channels_last, batch {args.batch_size} × {args.crop}²")
    criterion = SegmentationLoss("ce+dice", torch.ones(args.classes))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop), generator=generator)
    names = ("full", "bilinear head", "stride-4 output", "last block 16", "half width")
    models = {name: variant(name, args.classes) for name in names}
    seconds = alternate({name: training_step(model, criterion, images, masks) for name, model in models.items()},
                        args.rounds)
    for name in names:
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(f"{name:16s} {params:5.2f}M params  {1000 * seconds[name]:6.0f} ms/step  "
              f"{args.batch_size / seconds[name]:5.2f} img/s  {seconds['full'] / seconds[name]:.2f}×", flush=True)


if __name__ == "__main__":
    main()
