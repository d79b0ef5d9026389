"""The Python steps of ``benchmarks/gpu_check.sh``: what the CUDA path of this project does, measured.

    python benchmarks/gpu_check.py correctness --out-dir docs/benchmarks/gpu   # every CUDA backend vs reference
    python benchmarks/gpu_check.py layer       --out-dir docs/benchmarks/gpu   # time / memory vs the flash floor
    python benchmarks/gpu_check.py models      --out-dir docs/benchmarks/gpu   # aa_resnet50 vs resnet50 training
    python benchmarks/gpu_check.py detection   --out-dir docs/benchmarks/gpu   # RetinaNet aa_resnet50 at 800x1333

Each step writes ``<step>.json`` and ``<step>.md``. ``--device cpu --smoke`` runs the same code on
tiny shapes on a CPU (the triton backend through ``TRITON_INTERPRET=1``), so the script is checked
where no GPU is: ``tests/benchmarks/test_gpu_check.py``.

- correctness: outputs and the five gradients of ``reference`` / ``chunked`` / ``fused`` /
  ``triton`` against ``reference`` in float64 (float32 and bfloat16 inputs), zoo-like shapes.
- layer: the attention op forward + backward (bfloat16) at 28x28, 56x56, 112x112 and 100x168
  (B 8, Nh 8, dkh 8, dvh 4 as at aa_resnet50's widths): median time and peak memory per backend,
  and the content-only flash SDPA floor with head dims padded to 16. Goal: triton <= 1.3x the
  floor at 56x56.
- models: training steps/s of aa_resnet50 vs resnet50 (bfloat16 autocast, channels_last, SGD),
  eager and torch.compile. Goal: >= 0.9x.
- detection: 50 RetinaNet training steps at 800x1333 (batch 2, bfloat16 autocast) with an
  aa_resnet50 backbone (attention in every block of stages 2-4): peak memory, steps/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date

STEPS = ("correctness", "layer", "models", "detection")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=STEPS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (for a CPU check of the script)")
    p.add_argument("--out-dir", default="docs/benchmarks/gpu")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU tensors

import torch  # noqa: E402
from report import write_report  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU dry run: the interpreter's bfloat16 dot made exact
    from aa_lightning.compat.triton import patch_interpreter_bfloat16_dot

    patch_interpreter_bfloat16_dot()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def _environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"{date.today()}, {name}, torch {torch.__version__}, triton {triton_version}"


def _inputs(b, nh, h, w, dkh, dvh, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, nh, h, w, dkh), (b, nh, h, w, dkh), (b, nh, h, w, dvh), (2 * h - 1, dkh), (2 * w - 1, dkh)]
    return [torch.randn(*s, generator=g).mul(0.5 if i >= 3 else 1.0).to(device, dtype) for i, s in enumerate(shapes)]


def correctness(device: torch.device, smoke: bool) -> tuple[list, str]:
    from aa_lightning.attention import relative_attention_2d

    backends = ["chunked", "triton"] if device.type == "cpu" else ["reference", "chunked", "fused", "triton"]
    shapes = (
        [(1, 2, 3, 5, 3, 2)]
        if smoke
        else [
            (2, 8, 28, 28, 3, 2),
            (2, 8, 14, 14, 6, 3),
            (2, 8, 7, 7, 13, 6),
            (2, 8, 32, 32, 20, 2),
            (1, 8, 25, 42, 13, 6),
            (1, 2, 7, 70, 64, 64),
            (1, 2, 1, 9, 8, 8),
        ]
    )
    rows = []
    for shape in shapes:
        ref_in = [t.double().requires_grad_() for t in _inputs(*shape, device=device, dtype=torch.float64)]
        ref = relative_attention_2d(*ref_in, backend="reference")
        weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
        ref_grads = torch.autograd.grad((ref * weights).sum(), ref_in)
        for dtype in (torch.float32, torch.bfloat16):
            for backend in backends:
                leaves = [
                    t.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(ref_in)
                ]
                try:
                    out = relative_attention_2d(*leaves, backend=backend)
                    grads = torch.autograd.grad((out.double() * weights).sum(), leaves)
                except Exception as err:  # noqa: BLE001  (reported)
                    rows.append(
                        dict(shape=shape, dtype=str(dtype), backend=backend, error=f"{type(err).__name__}: {err}"[:300])
                    )
                    continue
                scale = lambda t: t.abs().max().item() or 1.0  # noqa: E731
                errors = {"out": (out.double() - ref).abs().max().item() / scale(ref)}
                for name, got, want in zip(("q", "k", "v", "rel_h", "rel_w"), grads, ref_grads):
                    errors[name] = (got.double() - want).abs().max().item() / scale(want)
                rows.append(dict(shape=shape, dtype=str(dtype), backend=backend, **errors))
                print(rows[-1], flush=True)
    table = [
        "| B, Nh, H, W, dkh, dvh | dtype | backend | out | dq | dk | dv | drel_h | drel_w |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (
            [r.get("error", "")] * 6
            if "error" in r
            else [f"{r[k]:.1e}" for k in ("out", "q", "k", "v", "rel_h", "rel_w")]
        )
        table.append(
            f"| {r['shape']} | {r['dtype'].replace('torch.', '')} | {r['backend']} | " + " | ".join(cells) + " |"
        )
    header = (
        "Largest |error| / largest |value| against `reference` in float64, output and gradients "
        "(loss = sum(out * fixed random weights))."
    )
    return rows, header + "\n\n" + "\n".join(table)


def _time(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    fn()
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, _peak_mib(device)


def layer(device: torch.device, smoke: bool) -> tuple[list, str]:
    import torch.nn.functional as F

    from aa_lightning.attention import relative_attention_2d

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    grids = [(4, 4)] if smoke else [(28, 28), (56, 56), (112, 112), (100, 168)]
    backends = ["chunked", "triton"] if smoke else ["triton", "fused", "chunked"]
    b, nh, dkh, dvh = (1, 2, 8, 4) if smoke else (8, 8, 8, 4)
    repeats = 1 if smoke else 5
    rows = []
    for h, w in grids:
        q, k, v, rel_h, rel_w = (t.requires_grad_() for t in _inputs(b, nh, h, w, dkh, dvh, device, dtype))
        cases = {}
        for backend in backends:
            cases[backend] = lambda backend=backend, q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w: (
                relative_attention_2d(q, k, v, rel_h, rel_w, backend=backend).sum().backward()
            )

        def floor(q=q, k=k, v=v, h=h, w=w):  # content-only flash SDPA, head dims padded to 16 (what flash takes)
            pad = lambda x: F.pad(x.reshape(b, nh, h * w, x.shape[-1]), (0, 16 - x.shape[-1]))  # noqa: E731
            F.scaled_dot_product_attention(pad(q), pad(k), pad(v), scale=dkh**-0.5).sum().backward()

        cases["floor (flash SDPA, content only)"] = floor
        floor_ms = None
        for name in reversed(list(cases)):  # the floor first
            try:
                ms, mib = _time(cases[name], device, repeats)
            except Exception as err:  # noqa: BLE001  (an OOM or a missing kernel is a result here)
                rows.append(dict(grid=f"{h}x{w}", backend=name, error=f"{type(err).__name__}: {str(err)[:200]}"))
                continue
            floor_ms = ms if name.startswith("floor") else floor_ms
            rows.append(
                dict(grid=f"{h}x{w}", backend=name, ms=ms, peak_mib=mib, vs_floor=ms / floor_ms if floor_ms else None)
            )
            print(rows[-1], flush=True)
    table = ["| grid | backend | fwd+bwd ms | peak MiB | x floor |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['grid']} | {r['backend']} | {r['error']} | | |")
        else:
            mib = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
            table.append(f"| {r['grid']} | {r['backend']} | {r['ms']:.2f} | {mib} | {r['vs_floor']:.2f} |")
    header = (
        f"relative_attention_2d forward + backward, B {b}, Nh {nh}, dkh {dkh}, dvh {dvh}, {dtype}; median of "
        f"{repeats}. Goal: triton <= 1.3x the floor at 56x56."
    )
    return rows, header + "\n\n" + "\n".join(table)


def models(device: torch.device, smoke: bool) -> tuple[list, str]:
    import timm

    import aa_lightning  # noqa: F401  (registers the AA models)

    size, batch, steps = (32, 2, 1) if smoke else (224, 64, 20)
    dtype = torch.bfloat16
    rows = []
    for compiled in (False, True):
        for name in ("aa_resnet50", "resnet50"):
            torch.manual_seed(0)
            kwargs = dict(img_size=size) if name.startswith("aa_") else {}
            model = timm.create_model(name, **kwargs).to(device).to(memory_format=torch.channels_last).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            # the smoke run checks that dynamo traces the model (inductor would take minutes on a CPU)
            step_fn = torch.compile(model, backend="eager" if smoke else "inductor") if compiled else model
            x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (batch,), device=device)

            def step(step_fn=step_fn, opt=opt, x=x, y=y):
                with torch.autocast(device.type, dtype=dtype):
                    loss = torch.nn.functional.cross_entropy(step_fn(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                for _ in range(1 if smoke else 3):  # warm-up (and compilation)
                    step()
                _sync(device)
                _reset_peak(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                rate = steps * batch / (time.perf_counter() - start)
                rows.append(dict(model=name, compile=compiled, images_per_s=rate, peak_mib=_peak_mib(device)))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(model=name, compile=compiled, error=f"{type(err).__name__}: {str(err)[:200]}"))
            print(rows[-1], flush=True)
            del model, opt, step_fn
    table = ["| model | torch.compile | images/s | peak MiB | AA / baseline |", "|---|---|---|---|---|"]
    base = {r["compile"]: r.get("images_per_s") for r in rows if r["model"] == "resnet50"}
    for r in rows:
        if "error" in r:
            table.append(f"| {r['model']} | {r['compile']} | {r['error']} | | |")
            continue
        ratio = f"{r['images_per_s'] / base[r['compile']]:.2f}" if base.get(r["compile"]) else ""
        mib = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        table.append(f"| {r['model']} | {r['compile']} | {r['images_per_s']:.1f} | {mib} | {ratio} |")
    header = (
        f"Training (forward + backward + SGD), batch {batch} at {size}x{size}, bfloat16 autocast, channels_last, "
        f"{steps} timed steps. Goal: aa_resnet50 >= 0.9x resnet50."
    )
    return rows, header + "\n\n" + "\n".join(table)


def detection(device: torch.device, smoke: bool) -> tuple[list, str]:
    from aa_lightning.tasks import RetinaNetDetector

    (h, w), batch, steps = ((64, 96), 1, 1) if smoke else ((800, 1333), 2, 50)
    torch.manual_seed(0)
    task = RetinaNetDetector(num_classes=80, backbone="aa_resnet50", freeze_at=0, frozen_bn=False).to(device).train()
    opt = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
    images = [torch.rand(3, h, w, device=device) for _ in range(batch)]
    targets = [
        dict(
            boxes=torch.tensor([[10.0, 20.0, w / 2, h / 2], [w / 3, h / 4, w - 5.0, h - 5.0]], device=device),
            labels=torch.tensor([1, 7], device=device),
        )
        for _ in range(batch)
    ]
    _reset_peak(device)
    row = dict(image=f"{h}x{w}", batch=batch, steps=steps)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                losses = task.model(images, targets)
            sum(losses.values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        row.update(
            steps_per_s=steps / (time.perf_counter() - start),
            peak_mib=_peak_mib(device),
            final_loss=float(sum(v.detach() for v in losses.values())),
        )
    except Exception as err:  # noqa: BLE001  (an OOM is the result)
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    print(row, flush=True)
    mib = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "n/a"
    table = ["| image | batch | steps | steps/s | peak MiB | result |", "|---|---|---|---|---|---|"]
    table.append(
        f"| {row['image']} | {batch} | {steps} | {row.get('steps_per_s', 0):.2f} | {mib} | {row.get('error', 'fits')} |"
    )
    header = (
        "RetinaNet (torchvision) with the aa_resnet50 backbone, attention in every block of stages 2-4, "
        "bfloat16 autocast, SGD, whole network trained. Goal: batch 2 at 800x1333 fits."
    )
    return [row], header + "\n\n" + "\n".join(table)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    rows, text = globals()[args.step](device, args.smoke)
    header = _environment(device) + (" (smoke run)" if args.smoke else "")
    write_report(
        args.out_dir, args.step, header, rows, text, command=f"python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}"
    )
    failed = [r for r in rows if "error" in r and args.step == "correctness"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
