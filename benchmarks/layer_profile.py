"""Where one AA layer's time goes: torch.profiler op totals of AugmentedConv2d forward + backward,
beside the plain 3x3 conv it replaces, for each CPU backend.

    python benchmarks/layer_profile.py                       # aa_resnet50 layer2[1].conv2: 28x28, batch 8
    python benchmarks/layer_profile.py --model aa_resnet50 --layer layer3.1.conv2 --batch 8

Prints, per backend, the milliseconds per forward + backward of the ops that take the most
self time (median-free: total over ``--repeats`` iterations after a warm-up, divided by them),
and the plain conv's time measured the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.layers import AugmentedConv2d


def profile_ms(
    module: torch.nn.Module, x: torch.Tensor, repeats: int, top: int
) -> tuple[float, list[tuple[str, float]]]:
    """(total ms, [(op, self ms)] of the ``top`` ops) per forward + backward of ``module``."""
    module(x).sum().backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            module(x).sum().backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000 / repeats
    return total, [(e.key, e.self_cpu_time_total / 1000 / repeats) for e in events[:top]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="aa_resnet50")
    p.add_argument("--layer", default="layer2.1.conv2", help="an AugmentedConv2d inside the model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backends", nargs="+", default=["chunked", "cpu_kernel"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    layer = timm.create_model(args.model).get_submodule(args.layer)
    if not isinstance(layer, AugmentedConv2d):
        raise SystemExit(f"{args.model}.{args.layer} is a {type(layer).__name__}, not an AugmentedConv2d")
    h, w = layer.feat_size
    x = torch.randn(args.batch, layer.in_channels, h, w, requires_grad=True)
    conv = torch.nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.kernel_size // 2, bias=False
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; "
        f"{date.today()}\n{args.model}.{args.layer}: {layer!r}; input {tuple(x.shape)}\n"
    )
    conv_ms, _ = profile_ms(conv, x, args.repeats, 0)
    print(f"plain {layer.kernel_size}x{layer.kernel_size} conv it replaces: {conv_ms:.1f} ms per forward + backward\n")
    for backend in args.backends:
        layer.backend = backend
        total, ops = profile_ms(layer, x, args.repeats, args.top)
        print(f"backend {backend}: {total:.1f} ms per forward + backward\n| op | ms |\n|---|---|")
        for name, ms in ops:
            print(f"| {name[:70]} | {ms:.1f} |")
        print()


if __name__ == "__main__":
    main()
