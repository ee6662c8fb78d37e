#!/usr/bin/env python
"""Train the tiny Fashion-MNIST ViT (``qwt.models.vit_fmnist``) on CPU and write its checkpoint.

The checkpoint is the float32 model the quantization experiments start from, so the run is
deterministic: the same command on the same software stack and thread count writes the same file.
The defaults are sized to finish in about 8 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # don't spin-wait on a shared, small CPU

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from qwt.data.fashion_mnist import MEAN, STD, load_fashion_mnist, normalize  # noqa: E402
from qwt.evaluate import tensor_batches, top1_accuracy  # noqa: E402
from qwt.models.vit_fmnist import CHECKPOINT, vit_fmnist  # noqa: E402
from qwt.utils import seed_everything, warmup_cosine  # noqa: E402

MAX_CHECKPOINT_BYTES = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the ones that produced the shipped checkpoint."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="training epochs over the 60k train split")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms/biases/embeddings)")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of steps with linear LR warmup")
    p.add_argument("--aug-prob", type=float, default=0.25, help="fraction of samples augmented (2-px-pad random crop + flip p=0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed for python/numpy/torch RNGs and the shuffling generator")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results are reproducible per thread count)")
    p.add_argument("--root", type=Path, default=None, help="Fashion-MNIST directory (default: the Debian package path)")
    p.add_argument("--out", type=Path, default=CHECKPOINT, help="output safetensors checkpoint")
    p.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop after this many optimizer steps (0 = full run); for quick determinism checks",
    )
    return p.parse_args(argv)


def augment(images: torch.Tensor, gen: torch.Generator, prob: float = 1.0) -> torch.Tensor:
    """Random 28x28 crop from the 2-px zero-padded image plus horizontal flip, on a uint8 (B, 28, 28) batch.

    Only a ``prob`` fraction of the samples is augmented: with a few epochs of budget the tiny ViT
    underfits, and augmenting every image slows learning more than it regularizes.
    """
    b, h, w = images.shape
    pad = 2
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    keep = torch.rand(b, generator=gen) < prob
    return torch.where(keep[:, None, None], out, images)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices; decaying norms, biases and token/position embeddings hurts small ViTs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name in ("cls_token", "pos_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)  # shuffling and augmentation

    x_train, y_train = load_fashion_mnist("train", args.root)
    x_test, y_test = load_fashion_mnist("test", args.root)
    # jax-style init (xavier linears, zero head) learns noticeably faster than timm's default std=0.02
    # init in this few-epoch regime; it only affects the starting point, not the architecture.
    model = vit_fmnist(pretrained=False, weight_init="jax")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} params; train {len(x_train)}, test {len(x_test)}; MEAN={MEAN} STD={STD}")

    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = max(1, round(args.warmup_frac * args.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup_steps))

    step = 0
    t_start = time.time()
    acc = float("nan")
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, n_seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True)
        for i in bar:
            if args.max_steps and step >= args.max_steps:
                break
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = normalize(augment(x_train[idx], gen, args.aug_prob))
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            n_seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        bar.close()
        acc = top1_accuracy(model, tensor_batches(normalize(x_test), y_test, 1000), progress=False)
        tqdm.write(
            f"epoch {epoch}/{args.epochs}  train_loss {loss_sum / max(1, n_seen):.4f}  "
            f"test_top1 {acc:.2f}%  {time.time() - t0:.1f}s"
        )
        if args.max_steps and step >= args.max_steps:
            break

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "arch": "vit_fmnist",
        "epochs": str(args.epochs),
        "steps": str(step),
        "seed": str(args.seed),
        "test_top1": f"{acc:.2f}",
    }
    # One metadata key: safetensors stores metadata in a hash map whose order varies run to run,
    # which would make otherwise identical checkpoints differ byte-wise.
    save_file(state, str(args.out), metadata={"qwt": json.dumps(meta, sort_keys=True)})
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size} bytes); test top-1 {acc:.2f}%; total {time.time() - t_start:.1f}s")
    if size >= MAX_CHECKPOINT_BYTES:
        print(f"error: checkpoint is {size} bytes, must be < {MAX_CHECKPOINT_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
