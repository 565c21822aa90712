"""AdamW step time: torch's single-tensor loop vs foreach vs fused, on the trainer's param groups.

The trainer's optimizer (``maskteacher.train.schedule.build_optimizer``) is the fused AdamW;
torch's default for CPU parameters is the single-tensor loop (foreach only on CUDA). Each
implementation steps the same model with the same gradients, interleaved (so load from other
processes hits them alike); ms per optimizer step, median, and the ratio to the single-tensor
loop, with the largest weight difference to it after all steps.

    python bench/optimizer.py                                  # CPU, vit_t_tiny and vit_t
    python bench/optimizer.py --device cuda --models vit_t vit_h
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from maskteacher.models import build_sam
from maskteacher.train.schedule import build_optimizer, param_groups

KINDS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(model_type: str, image_size: int, device: torch.device, steps: int) -> list:
    torch.manual_seed(0)
    base = build_sam(model_type, image_size=image_size).to(device)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in base.parameters()]
    models, optimizers = {}, {}
    for kind, flags in KINDS.items():
        models[kind] = copy.deepcopy(base)
        groups = param_groups(models[kind], lr=1e-4, encoder_lr_scale=0.1)
        optimizers[kind] = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4, **flags)
    trainer = build_optimizer(base, lr=1e-4, weight_decay=1e-4, encoder_lr_scale=0.1)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for step in range(steps + 2):  # 2 warm-up steps
        for kind in KINDS:
            for p, g in zip(models[kind].parameters(), grads):
                p.grad = g * (1 + 0.1 * step)
            _sync(device)
            start = time.perf_counter()
            optimizers[kind].step()
            _sync(device)
            if step >= 2:
                times[kind].append(time.perf_counter() - start)
    rows = []
    single = statistics.median(times["single"])
    for kind in KINDS:
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(models[kind].parameters(), models["single"].parameters())
        )
        ms = 1000 * statistics.median(times[kind])
        rows.append((model_type, kind, ms, single * 1000 / ms, diff))
    params = sum(p.numel() for p in base.parameters())
    tensors = len(list(base.parameters()))
    print(
        f"{model_type} @{image_size}: {params / 1e6:.2f} M parameters in {tensors} tensors; "
        f"trainer's optimizer: fused={trainer.defaults['fused']}"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["vit_t_tiny", "vit_t"])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for model_type in args.models:
        size = 128 if model_type.endswith("_tiny") else args.image_size
        rows += bench_model(model_type, size, device, args.steps)
    print(f"device={args.device} threads={torch.get_num_threads()} steps={args.steps} (median)")
    print(f"{'model':<12}{'AdamW':<10}{'ms/step':>10}{'single/this':>13}{'max |dw|':>11}")
    for model_type, kind, ms, ratio, diff in rows:
        print(f"{model_type:<12}{kind:<10}{ms:>10.2f}{ratio:>12.2f}x{diff:>11.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
