"""Train a CIFAR-10 classifier whose conv and pooling layers are manualconv's (or torch.nn's).

    python train.py                                   # default: airbench-style net, CPU recipe
    python train.py --backend native                  # the identical model built from torch.nn
    python train.py --model resnet20 --epochs 30      # He et al.'s CIFAR ResNet-20 (option A)
    python train.py --preset gpu --device cuda        # airbench94 widths 64/256/256, aims at >= 94%
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel (gloo on CPU, nccl)

Models (--model): airbench (default), resnet20, lenet5 (manualconv.models.LeNet5) and tiny (a
small batch-norm-free net for smoke tests and the data-parallel equivalence test). Every model is
built from a layer namespace holding Conv2d/MaxPool2d/AvgPool2d from manualconv (--backend manual)
or torch.nn (--backend native): both construct the same parameters from the same seed.

airbench (after Keller Jordan's airbench94): a 2x2 conv whose frozen filters whiten the training
images' 2x2 patches (its bias trains for --whiten-bias-epochs), GELU, three blocks of conv3x3 ->
maxpool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU, maxpool 3, a bias-free linear
layer and logits scaled by 1/9. Label smoothing 0.2, Nesterov SGD (momentum 0.85) with a
triangular schedule, 64x the learning rate for the batch-norm shifts, lookahead weight averaging,
random 2-pixel translations and alternating flips; test-time augmentation by flips and 1-pixel
shifts. --preset cpu (the default without CUDA): widths 32/64/128, batch 512, 10 epochs, about
7-8 minutes natively on 2 idle cores. --preset gpu: airbench94's 64/256/256, batch 1024, 15 epochs.

Kernels (--backend manual): manualconv's C++ kernels ('cpp') wherever the built extension has
them for the device (CPU always; CUDA when built with MANUALCONV_CUDA=1), else its 'reference'
kernels; the log says which run and why (--conv-backend chooses).

Mixed precision (--amp): the forward passes run under torch.autocast, in bfloat16 on CPU and in
float16 on CUDA (where a GradScaler scales the loss); parameters, optimizer and loss stay float32.

Data (--data-dir, default ./data; loading and augmentation in cifar10.py beside this script): a
folder holding torchvision's cifar-10-batches-py/, that folder itself, or an ImageFolder tree
train/<class>/*, test/<class>/* (such as the offline JPEG archive); downloaded by torchvision
when the folder is missing or empty. Decoded images are cached as uint8 tensors in
DIR/.manualconv_cache.pt when DIR is writable. Augmentation runs batched on the device, from a
generator seeded by (--seed, epoch).

Several processes: --batch-size is the global batch; each step every rank takes its contiguous
share of the same global batch (and of its augmentation), gradients are averaged, so a model
without batch norm trains as in one process. Batch-norm statistics are per rank; evaluation and
checkpoints use rank 0's. Only rank 0 logs and writes.

Outputs (--out, default runs/<timestamp>): checkpoint.pt (each epoch; --resume PATH|auto),
metrics.csv, metrics.json and curves.png. On CPU a run is bitwise reproducible for a given seed.
A resumed run continues exactly where the checkpoint stopped: it refuses arguments that change
the data or the schedule (--limit, --lr, --epochs, --seed, --amp, ...) unless --resume-override.
On a machine shared with other work, --threads 1 avoids OpenMP threads waiting on a busy core.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import os
import random
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import manualconv
from cifar10 import DataError, augment, epoch_plan, load_cifar10, normalize, take_train_subset
from manualconv.models import airbench, layers, lenet5, resnet20, tiny

# --------------------------------------------------------------------------------- models

@torch.no_grad()
def init_whitening(conv, images, eps=5e-4):
    """airbench: the first conv's filters are the eigenvectors of the covariance of the training
    images' 2x2 patches, scaled by 1/sqrt(eigenvalue), and their negatives."""
    k = conv.kernel_size[0]
    cov = torch.zeros(3 * k * k, 3 * k * k, dtype=torch.float64)
    for chunk in images.split(500):
        patches = normalize(chunk).unfold(2, k, 1).unfold(3, k, 1)  # N C H' W' k k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        cov += patches.T @ patches
    values, vectors = torch.linalg.eigh(cov / (len(images) * (32 - k + 1) ** 2))
    filters = (vectors.T / torch.sqrt(values.clamp(min=0) + eps)[:, None]).flip(0).reshape(-1, 3, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).float())


def build_model(args, data, seed):
    torch.manual_seed(seed)
    L, n = layers(args.backend), len(data["classes"])
    if args.model == "airbench":
        model = airbench(L, args.width, n)
        init_whitening(model[0], data["train_x"][:5000])
    elif args.model == "resnet20":
        model = resnet20(L, args.width[0], n)
    elif args.model == "tiny":
        model = tiny(L, args.width[0], n)
    else:
        model = lenet5(L, n)
    # --backend manual: every layer hand-derived, not only those built from L (batch norm, GELU,
    # ReLU, linear, and F.* calls in forward through manualconv.capture); parameters unchanged
    return manualconv.convert(model, inplace=True) if args.backend == "manual" else model


# Per-model defaults for the options left unset. airbench: lr 11.5 per 1024 examples of summed
# loss with momentum 0.85 (airbench94), i.e. 1.5 * batch/1024 for the mean loss; weight decay
# 0.0153/11.5 coupled to lr; batch-norm shifts get 64x the lr (and 1/64 the decay).
COMMON = dict(tta=1, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0, crop_pad=4, bias_scale=1.0,
              lookahead=False, schedule=(0.1, 0.15, 0.0))  # schedule: start, warm-up fraction, end
DEFAULTS = {
    "airbench": dict(COMMON, epochs=10, batch_size=512, width="32,64,128", tta=2, momentum=0.85, label_smoothing=0.2,
                     weight_decay=0.0153 / 11.5, crop_pad=2, bias_scale=64.0, lookahead=True, schedule=(0.2, 0.23, 0.07)),
    "resnet20": dict(COMMON, epochs=30, batch_size=128, lr=0.1, width="16"),
    "lenet5": dict(COMMON, epochs=20, batch_size=128, lr=0.05, width=None),
    "tiny": dict(COMMON, epochs=2, batch_size=64, lr=0.05, width="8"),
}
# airbench94's widths and batch (94.0% in 9.9 epochs there, on the original PNG-exact data); 15
# epochs leave a margin for the JPEG copy and flip/shift TTA only, at a few seconds an epoch on a GPU
GPU_PRESET = dict(epochs=15, batch_size=1024, width="64,256,256")

# ------------------------------------------------------------------------------ run state


@dataclasses.dataclass
class RunState:
    """How far a run has got, beside its model, optimizer, lookahead and loss-scaler states: saved
    in checkpoint.pt after every epoch (its fields are the checkpoint's top-level keys) and taken
    up again by --resume."""
    epoch: int = 0                        # epochs completed
    step: int = 0                         # optimizer steps taken: the schedule's position
    history: list = dataclasses.field(default_factory=list)  # one row of metrics per epoch
    first_batch_loss: float | None = None  # the mean loss of the first batch (native = manual check)
    init_sha256: str | None = None        # of the initial parameters: equal for both backends
    train_time: float = 0.0               # seconds spent in training epochs, evaluation excluded
    train_images: int = 0                 # images trained on, over all ranks
    precision: str = "float32"            # the forward passes' autocast dtype (--amp), else float32
    rng: dict | None = None               # the torch, numpy, python (and CUDA) generators' states

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{f.name: checkpoint[f.name] for f in dataclasses.fields(cls)})

    def save_rng(self, device):
        self.rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                        cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore_rng(self, device):
        torch.set_rng_state(self.rng["torch"])
        np.random.set_state(self.rng["numpy"])
        random.setstate(self.rng["python"])
        if self.rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.rng["cuda"], device)


def autocast_dtype(amp, device):
    """--amp: bfloat16 on CPU, float16 on CUDA; None (float32) without it."""
    return (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None


def precision_name(dtype):
    return str(dtype or torch.float32).removeprefix("torch.")


# A checkpoint is a dict: these keys and RunState's fields. Keys that later versions added, with
# the value a checkpoint written before them implies.
CHECKPOINT_KEYS = ("model", "optimizer", "lookahead", "args", "scaler")
ADDED_LATER = dict(scaler=None, precision="float32")
# numpy's generator state holds an ndarray: torch.load(weights_only=True) may rebuild these
NUMPY_ARRAY = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.empty(0).__reduce__()[0]]


def save_checkpoint(path, model, optimizer, lookahead, scaler, args, state):
    checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                      lookahead=lookahead.ema if lookahead else None, scaler=scaler.state_dict(), args=vars(args),
                      **dataclasses.asdict(state))
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed while saving leaves the previous checkpoint whole


def read_checkpoint(path):
    """The checkpoint at path, on the CPU; a usage error when it is unreadable or not train.py's."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at the end
            fail(f"--resume {path}: cannot read it: not a complete torch.save file (cut short, or another "
                 f"kind of file: {type(error).__name__})")
        if "Weights only load failed" in str(error):
            found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "Python objects"
            fail(f"--resume {path}: not a train.py checkpoint (it holds {found})")
        fail(f"--resume {path}: cannot read it ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    if not isinstance(checkpoint, dict):
        fail(f"--resume {path}: not a train.py checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    expected = CHECKPOINT_KEYS + tuple(f.name for f in dataclasses.fields(RunState))
    missing = [key for key in expected if key not in checkpoint and key not in ADDED_LATER]
    if missing:
        fail(f"--resume {path}: not a train.py checkpoint (missing {', '.join(missing)})")
    return {key: checkpoint.get(key, ADDED_LATER.get(key)) for key in expected}


# ------------------------------------------------------------------------------- training


def lr_factor(step, total, schedule):
    """Triangular: linear from start to 1 over the first `warm` fraction of steps, then to end."""
    start, warm, end = schedule
    warm_steps = int(total * warm)
    if step < warm_steps:
        return start + (1 - start) * step / warm_steps
    return 1 + (end - 1) * (step - warm_steps) / max(1, total - warm_steps)


def make_optimizer(model, args):
    groups = {"params": [], "bn_bias": [], "whiten_bias": []}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if args.model == "airbench" and module_name == "0":
                groups["whiten_bias"].append(p)
            elif isinstance(module, nn.BatchNorm2d) and name == "bias":
                groups["bn_bias"].append(p)
            else:
                groups["params"].append(p)
    scale = {"params": 1.0, "bn_bias": args.bias_scale, "whiten_bias": 1.0}
    params = [dict(params=ps, name=k, base_lr=args.lr * scale[k], lr=args.lr * scale[k],
                   weight_decay=args.weight_decay / scale[k]) for k, ps in groups.items() if ps]
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0)


class Lookahead:
    """airbench's lookahead: every 5 steps and after the last one, the weights are replaced by
    their running average, whose decay rises as 0.95^5 (step/total)^3."""

    def __init__(self, model):
        self.model, self.ema = model, {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, decay):
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].lerp_(v, 1 - decay)
                v.copy_(self.ema[k])


@torch.no_grad()
def evaluate(model, x_uint8, y, tta=0, fmt=torch.contiguous_format, world=1, rank=0, batch=1000, amp=None):
    """(loss sum, correct, count) over this rank's share of the test set. Test-time augmentation
    (airbench's levels): 1 averages the logits of each image and its mirror; 2 also those of the
    image shifted by one pixel up-left and down-right (reflect padding), weighted 1/2, 1/4, 1/4.
    amp: the autocast dtype of the forward passes (None: float32)."""
    model.eval()

    def forward(x):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            return model(x).float()

    mirror = lambda x: (forward(x) + forward(x.flip(3))) / 2 if tta else forward(x)  # noqa: E731
    loss, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    share = torch.arange(len(y)).tensor_split(world)[rank]
    for idx in share.split(batch):
        x, t = normalize(x_uint8[idx]).contiguous(memory_format=fmt), y[idx]
        logits = mirror(x)
        if tta >= 2:
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = (mirror(padded[:, :, :32, :32].contiguous(memory_format=fmt)) +
                       mirror(padded[:, :, 2:, 2:].contiguous(memory_format=fmt))) / 2
            logits = (logits + shifted) / 2
        loss += F.cross_entropy(logits.float(), t, reduction="sum").double().cpu()
        correct += (logits.argmax(1) == t).sum().cpu()
    return loss, correct, len(share)


def reduce_sum(*values, world=1):
    if world > 1:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        values = t.tolist()
    return [float(v) for v in values]


def sync_buffers(model, world):
    """BatchNorm statistics are per rank; evaluation and checkpoints use rank 0's."""
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def write_outputs(out, history, summary, plot=True):
    """metrics.csv and metrics.json (after every epoch) and curves.png (at the end)."""
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(dict(summary, epochs=history), f, indent=1)
    if plot and history:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
        epochs = [h["epoch"] for h in history]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        smoothing = summary["args"]["label_smoothing"]
        for ax, key, label in ((ax1, "loss", "loss"), (ax2, "acc", "accuracy (%)")):
            train_label = f"train (label smoothing {smoothing:g})" if key == "loss" and smoothing else "train"
            ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label=train_label)
            ax.plot(epochs, [h[f"test_{key}"] for h in history], "o-", label="test")
            ax.set(xlabel="epoch", ylabel=label)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{summary['args']['model']} ({summary['args']['backend']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "curves.png"), dpi=100)
        plt.close(fig)


def write_grad_norms(out, record, steps_per_epoch):
    """grads.csv (step, layer, kind, norm) and grads.png: per-layer ‖δ‖ and ‖∂J/∂W‖ over training,
    on a log scale — the picture that shows vanishing or exploding gradients."""
    rows = record.as_rows()
    with open(os.path.join(out, "grads.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "name", "kind", "norm"])
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, table) in zip(axes, (("delta ‖∂J/∂y‖ per layer", record.deltas),
                                          ("weight gradient ‖∂J/∂W‖ per layer", record.param_grads))):
        names = [n for n in table if not n.endswith(".bias")]
        for i, name in enumerate(names):
            epochs = [step / steps_per_epoch for step in range(len(table[name]))]
            ax.plot(epochs, table[name], color=plt.cm.viridis(i / max(1, len(names) - 1)), label=name, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
    for ax in axes:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grads.png"), dpi=100)
    plt.close(fig)


def train(args, data, device, rank, world, log, checkpoint=None):
    """Trains (from checkpoint, a read_checkpoint dict, when resuming); (model, summary, history)."""
    train_x, train_y = data["train_x"].to(device), data["train_y"].to(device)
    test_x, test_y = data["test_x"].to(device), data["test_y"].to(device)
    model = build_model(args, data, args.seed).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    amp = autocast_dtype(args.amp, device)
    state = RunState(precision=precision_name(amp), init_sha256=hashlib.sha256(
        b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest())
    optimizer = make_optimizer(model, args)
    lookahead = Lookahead(model) if args.lookahead else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # float16's range needs loss scaling
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  forward_sync_buffers=False)  # BN statistics stay per rank
    if args.compile:
        net = torch.compile(net)
    n, B = len(train_x), args.batch_size
    # every batch of B (the last may be smaller) except a last one too small to give each rank an image
    steps_per_epoch = n // B + (0 < n % B and n % B >= world)
    total = steps_per_epoch * args.epochs
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if lookahead:
            lookahead.ema = {k: v.to(device) for k, v in checkpoint["lookahead"].items()}
        if checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        state = RunState.from_checkpoint(checkpoint)
        state.restore_rng(device)
        log(f"resumed from {args.resume} after epoch {state.epoch}")
    kernels = f", {args.conv_backend} kernels" if args.backend == "manual" else ""
    log(f"model: {args.model} ({args.backend}{kernels}, {state.precision}{' autocast' if amp else ''}), "
        f"{sum(p.numel() for p in model.parameters())} parameters; {n} training images, {len(test_x)} test; "
        f"batch {B} ({world} rank{'s' if world > 1 else ''}), lr {args.lr:g}, {args.epochs} epochs on {device}")
    loss_class = manualconv.CrossEntropyLoss if args.backend == "manual" else nn.CrossEntropyLoss
    criterion = loss_class(label_smoothing=args.label_smoothing, reduction="sum")
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    bar_on = rank == 0 and not args.quiet and sys.stderr.isatty()
    from tqdm import tqdm
    recording = contextlib.ExitStack()
    record = recording.enter_context(manualconv.record_deltas(model)) if args.plot_grads and rank == 0 else None
    for epoch in range(state.epoch, last_epoch):
        model.train()
        order, dy, dx, flip = epoch_plan(n, epoch, args.seed, args.crop_pad)
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.int64)
        seen, start = 0, time.time()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not bar_on, leave=False)
        for batch in order.split(B)[:steps_per_epoch]:
            for group in optimizer.param_groups:
                frozen = group["name"] == "whiten_bias" and epoch >= args.whiten_bias_epochs
                group["lr"] = 0.0 if frozen else group["base_lr"] * lr_factor(state.step, total, args.schedule)
            mine = batch.tensor_split(world)[rank]  # this rank's share of the global batch
            idx = mine.to(device)
            x = augment(train_x[idx], dy[mine].to(device), dx[mine].to(device), flip[mine].to(device),
                        args.crop_pad, args.pad_mode)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = net(x.contiguous(memory_format=fmt))
            loss = criterion(logits.float(), train_y[idx])  # the loss in float32, with or without --amp
            optimizer.zero_grad(set_to_none=True)
            # the global batch's summed loss / B; DDP averages over ranks, hence * world
            scaler.scale(loss * (world / B)).backward()
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            if lookahead and (state.step % 5 == 0 or state.step == total):
                lookahead.update(0.95 ** 5 * (state.step / total) ** 3)
            if state.first_batch_loss is None:
                state.first_batch_loss = loss.item() / len(mine)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == train_y[idx]).sum()
            seen += len(mine)
            bar.update()
            if bar_on and (bar.n % 5 == 0 or bar.n == steps_per_epoch):
                bar.set_postfix_str(f"loss {loss_sum.item() / seen:.3f} acc {100 * correct.item() / seen:.1f}% "
                                    f"{seen * world / (time.time() - start):.0f} img/s")
        bar.close()
        epoch_train = time.time() - start
        state.train_time += epoch_train
        loss_g, correct_g, seen_g = reduce_sum(loss_sum.item(), correct.item(), seen, world=world)
        state.train_images += int(seen_g)
        sync_buffers(model, world)
        t_loss, t_correct, t_n = reduce_sum(*evaluate(model, test_x, test_y, 0, fmt, world=world, rank=rank, amp=amp),
                                            world=world)
        state.history.append(dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], train_loss=loss_g / seen_g,
                                  train_acc=100 * correct_g / seen_g, test_loss=t_loss / t_n,
                                  test_acc=100 * t_correct / t_n, epoch_time_s=time.time() - start,
                                  train_images_per_s=seen_g / epoch_train))
        state.epoch = epoch + 1
        h = state.history[-1]
        log(f"epoch {h['epoch']:3d}/{args.epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:6.2f}%  "
            f"test loss {h['test_loss']:.4f} acc {h['test_acc']:6.2f}%  {h['epoch_time_s']:.1f}s "
            f"{h['train_images_per_s']:.0f} img/s")
        if rank == 0:
            state.save_rng(device)
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, optimizer, lookahead, scaler, args, state)
            write_outputs(args.out, state.history, dict(args=vars(args), completed_epochs=state.epoch), plot=False)
    recording.close()
    if record is not None:
        write_grad_norms(args.out, record, steps_per_epoch)
    history = state.history
    summary = dict(args=vars(args), world_size=world, device=str(device), precision=state.precision,
                   init_sha256=state.init_sha256, first_batch_loss=state.first_batch_loss,
                   completed_epochs=state.epoch, train_time_s=state.train_time,
                   train_images_per_s=state.train_images / state.train_time if state.train_time else None)
    summary["test_acc"], summary["test_loss"] = history[-1]["test_acc"], history[-1]["test_loss"]  # the last model's
    if args.tta:  # the final accuracy with test-time augmentation too
        final = reduce_sum(*evaluate(model, test_x, test_y, args.tta, fmt, world=world, rank=rank, amp=amp),
                           world=world)
        summary["test_acc_tta"] = 100 * final[1] / final[2]
    if state.epoch < args.epochs:
        log(f"stopped after epoch {state.epoch} of {args.epochs} (--stop-after); continue with "
            f"--resume {os.path.join(args.out, 'checkpoint.pt')}")
    return model, summary, history


# ---------------------------------------------------------------------------- distributed

def init_distributed(device_arg):
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise SystemExit("train.py: error: --device cuda, but CUDA is not available")
    if want_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return dist.get_rank(), world, device


# ------------------------------------------------------------------------------------ CLI

class UsageError(SystemExit):
    """Exit status 2, as argparse's parser.error, for a bad argument found after parsing (a
    checkpoint, the output folder); str() is the message."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def fail(message):
    """Ends the run as parser.error does: a 'train.py: error: ...' line on stderr, exit status 2."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise UsageError(message)


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" message
    return parse


def make_parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="airbench", choices=list(DEFAULTS))
    p.add_argument("--backend", default="manual", choices=["manual", "native"],
                   help="conv/pool layers from manualconv (default) or torch.nn")
    p.add_argument("--conv-backend", choices=["cpp", "reference"], help="manualconv kernels (default: cpp)")
    p.add_argument("--preset", default="auto", choices=["auto", "cpu", "gpu"],
                   help="airbench defaults: cpu (widths 32,64,128, 10 epochs, batch 512) or gpu (64,256,256, "
                        "15 epochs, batch 1024); auto: gpu on CUDA")
    p.add_argument("--width", help="channel widths: 'a,b,c' for airbench, the first stage's for resnet20/tiny")
    p.add_argument("--epochs", type=positive(int), help="default: airbench 10 (cpu) or 15 (gpu), resnet20 30, "
                   "lenet5 20, tiny 2")
    p.add_argument("--batch-size", type=positive(int), help="global batch, split evenly across ranks (default: "
                   "airbench 512 (cpu) or 1024 (gpu), resnet20 and lenet5 128, tiny 64)")
    p.add_argument("--lr", type=positive(float), help="peak learning rate for the batch-mean loss (default: "
                   "airbench 1.5*batch/1024, resnet20 0.1, lenet5 and tiny 0.05)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--crop-pad", type=int, help="random-crop padding (airbench 2, others 4)")
    p.add_argument("--pad-mode", default="reflect", choices=["reflect", "zeros"])
    p.add_argument("--whiten-bias-epochs", type=int, default=3, help="airbench: epochs the whitening bias trains")
    p.add_argument("--tta", type=int, choices=[0, 1, 2], help="final test-time augmentation: 0 none, 1 flip, "
                   "2 flip and 1-pixel shifts (default: 2 for airbench, 1 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="./data", help="cifar-10-batches-py (or its parent) or train/, test/ "
                   "ImageFolder trees; downloaded when missing or empty")
    p.add_argument("--no-download", dest="download", action="store_false", help="fail instead of downloading")
    p.add_argument("--workers", type=positive(int), default=min(4, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--limit", type=positive(int), help="train on N (seeded random) training images")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output folder (default runs/<timestamp>)")
    p.add_argument("--resume", help="checkpoint.pt to continue from, or 'auto' (OUT/checkpoint.pt, else "
                                    "the newest runs/*/checkpoint.pt; fresh start if none)")
    p.add_argument("--resume-override", action="store_true",
                   help="resume even though arguments that change the data or the schedule (--limit, --lr, "
                        "--epochs, --seed, --amp, ...) differ from the checkpoint's: continue with the new ones")
    p.add_argument("--stop-after", type=positive(int), help="stop after this epoch (the schedule still spans --epochs)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW tensors (channels-last makes torch.nn's CPU convs ~1.6x faster)")
    p.add_argument("--threads", type=positive(int), help="torch CPU threads per process (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plot-grads", action="store_true",
                   help="record each manualconv layer's delta and parameter-gradient norms every step "
                        "(manualconv.record_deltas) and write grads.png and grads.csv")
    p.add_argument("--amp", action="store_true", help="mixed precision: autocast the forward passes to bfloat16 "
                   "on CPU, float16 on CUDA (with loss scaling)")
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)

    defaults = dict(DEFAULTS[args.model])
    if args.preset != "auto" and args.model != "airbench":
        p.error(f"--preset applies to --model airbench, not {args.model}")
    gpu = args.preset == "gpu" or (args.preset == "auto" and args.device != "cpu" and torch.cuda.is_available())
    if args.model == "airbench" and gpu:
        defaults.update(GPU_PRESET)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model == "airbench" and args.lr is None:
        args.lr = 11.5 * args.batch_size / (1024 * (1 + 1 / (1 - 0.85)))
    if args.model == "lenet5" and args.width is not None:
        p.error("--width does not apply to lenet5")
    if args.width is not None:
        try:
            args.width = [int(w) for w in str(args.width).split(",")]
            if min(args.width) <= 0 or len(args.width) != (3 if args.model == "airbench" else 1):
                raise ValueError
        except ValueError:
            p.error(f"--width {args.width!r}: expected {'three' if args.model == 'airbench' else 'one'} "
                    "positive integer(s), comma-separated")
    if args.crop_pad < 0 or args.crop_pad > 16:
        p.error(f"--crop-pad must be in 0..16, got {args.crop_pad}")
    if not 0 <= args.label_smoothing < 1:
        p.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.momentum < 0 or args.weight_decay < 0:
        p.error("--momentum and --weight-decay must be non-negative")
    if args.backend == "native" and args.conv_backend:
        p.error("--conv-backend selects manualconv's kernels; it needs --backend manual")
    if args.backend == "native" and args.plot_grads:
        p.error("--plot-grads records manualconv layers; it needs --backend manual")
    if args.resume == "auto":
        pattern = os.path.join(args.out, "checkpoint.pt") if args.out else os.path.join("runs", "*", "checkpoint.pt")
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        args.resume = found[-1] if found else None
    elif args.resume and not os.path.isfile(args.resume):
        p.error(f"--resume {args.resume}: no such checkpoint file")
    if args.out is None:
        args.out = os.path.dirname(os.path.abspath(args.resume)) if args.resume else \
            os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    blocking = file_on_path(args.out)
    if blocking:
        p.error(f"--out {args.out}: {blocking} is a file, not a folder")
    args.schedule = list(args.schedule)
    return args


def file_on_path(folder):
    """The file at folder or at its nearest existing parent, if that is a file: None if the folder
    exists or can be created."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


# Arguments a resumed run may change: where and how it runs, not what it learns from. --amp is
# compared as the precision (RunState.precision), which also depends on the device.
RESUME_FREE = {"out", "resume", "resume_override", "stop_after", "data_dir", "download", "workers", "device",
               "threads", "quiet", "compile", "channels_last", "plot_grads", "backend", "conv_backend", "tta",
               "preset", "amp"}
ARCHITECTURE = ("model", "width")  # the checkpoint's weights fit no other


def shown(value):
    """An argument's value as it is written on the command line ('unset' for None)."""
    if value is None:
        return "unset"
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resume_differences(args, checkpoint, precision):
    """['--limit unset (now 12)', ...]: the checkpoint's data and schedule arguments that differ
    from args (for arguments it predates: their defaults), with the precision (--amp) it trained
    in; refuses outright another architecture."""
    p, saved = make_parser(), checkpoint["args"]
    flags = {action.dest: action.option_strings[-1] for action in p._actions if action.option_strings}
    for key in ARCHITECTURE:
        if saved.get(key) != getattr(args, key):
            fail(f"--resume {args.resume}: it was trained with --{key} {shown(saved.get(key))}, not "
                 f"{shown(getattr(args, key))} (its weights fit no other model)")
    differ = [f"{flags.get(key, key)} {shown(saved.get(key, p.get_default(key)))} (now {shown(value)})"
              for key, value in vars(args).items()
              if key not in RESUME_FREE and key not in ARCHITECTURE and saved.get(key, p.get_default(key)) != value]
    if checkpoint["precision"] != precision:
        differ.append(f"--amp: {checkpoint['precision']} (now {precision})")
    return differ


def has_kernels(device):
    """Whether the built extension registers a kernel on device's type for every manualconv
    operator (all of them have CPU kernels)."""
    def registered(key):
        return {name for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                if name.startswith("manualconv::")}
    return manualconv.ops.AVAILABLE and registered("CPU") <= registered(device.type.upper())


def choose_conv_backend(requested, device):
    """(backend, why): manualconv's C++ kernels wherever the extension has them for device, else
    the reference kernels (plain tensor code, on any device); --conv-backend forces one."""
    if requested == "reference":
        return "reference", "--conv-backend reference"
    if has_kernels(device):
        return "cpp", f"the C++ extension's {device.type.upper()} kernels"
    why = f"the C++ extension is not built ({manualconv.ops.LOAD_ERROR})" if not manualconv.ops.AVAILABLE else \
        f"the C++ extension was built without {device.type.upper()} kernels (build with MANUALCONV_CUDA=1 for them)"
    if requested == "cpp":
        fail(f"--conv-backend cpp: {why}; use --conv-backend reference")
    return "reference", why


def main(argv=None):
    """Returns (model, summary, history); exits with a message on bad arguments or data."""
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    checkpoint = read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        differ = resume_differences(args, checkpoint, precision_name(autocast_dtype(args.amp, device)))
        if differ and not args.resume_override:
            fail(f"--resume {args.resume}: it was trained with other data or schedule arguments: {', '.join(differ)}; "
                 "resume with the checkpoint's, or add --resume-override to continue with the new ones")
        if differ:
            log(f"note: --resume-override: continuing {args.resume} with {', '.join(differ)}")
    if args.backend == "manual":
        args.conv_backend, why = choose_conv_backend(args.conv_backend, device)
        manualconv.set_backend(args.conv_backend)
        log(f"manualconv kernels: {args.conv_backend} ({why})")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as error:
            fail(f"--out {args.out}: cannot create it ({error.strerror})")
    wall = time.time()
    try:
        # rank 0 decodes (and caches) first; the other ranks then read its cache
        with contextlib.ExitStack() as stack:
            if world > 1 and rank != 0:
                dist.barrier()
            else:
                stack.callback(lambda: world > 1 and dist.barrier())
            data = load_cifar10(args.data_dir, args.workers, args.download, log)
    except DataError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(1)
    if args.limit:
        if args.limit > len(data["train_x"]):
            raise SystemExit(f"train.py: error: --limit {args.limit} exceeds the {len(data['train_x'])} training images")
        data = take_train_subset(data, args.limit, args.seed)
    if min(args.batch_size, len(data["train_x"])) < world:
        raise SystemExit(f"train.py: error: {world} ranks need a batch and a training set of at least {world} images")
    model, summary, history = train(args, data, device, rank, world, log, checkpoint)
    summary["wall_time_s"] = time.time() - wall
    if rank == 0:
        write_outputs(args.out, history, summary)
        tta = f" (with TTA level {args.tta}: {summary['test_acc_tta']:.2f}%)" if args.tta else ""
        log(f"final test accuracy: {summary['test_acc']:.2f}%{tta}; wall time {summary['wall_time_s']:.1f}s, "
            f"training {summary['train_time_s']:.1f}s at {summary['train_images_per_s'] or 0:.0f} images/s; "
            f"outputs in {args.out}")
    if world > 1:
        dist.barrier()  # rank 0 may still be writing outputs: no rank tears gloo down before all are done
        dist.destroy_process_group()
    return model, summary, history


if __name__ == "__main__":
    main()
