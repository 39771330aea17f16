"""Training throughput: the LightningModule under a Trainer vs a plain PyTorch loop.

Both do the same work per step (forward, loss, backward, clip at 1.0, Adam, warm-up LR, EMA update)
on the same model, batch and in-memory data; the runs alternate in rounds so that machine noise
hits both. Prints images/s of each, their ratio (Lightning overhead) and peak memory.

    python benchmarks/train_throughput.py --config quickstart --steps 50
    python benchmarks/train_throughput.py --config cifar --steps 100 --precision bf16-mixed   # on a GPU
"""

import argparse
import contextlib
import platform
import resource
import time

import lightning as L
import torch
import yaml

from uncdiff.lightning.cli import CONFIG_DIR
from uncdiff.lightning.module import DiffusionModule


def model_kwargs(config: str) -> dict:
    with open(CONFIG_DIR / f"{config}.yaml") as f:
        return yaml.safe_load(f)["model"]


def make_loader(kwargs: dict, batch_size: int, n_batches: int) -> torch.utils.data.DataLoader:
    shape = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    images = torch.randint(0, 256, (batch_size * n_batches, *shape), dtype=torch.uint8)
    data = torch.utils.data.TensorDataset(images.float() / 127.5 - 1)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)


class Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_lightning(kwargs, loader, steps, warmup, precision, accelerator) -> float:
    model = DiffusionModule(**kwargs)
    timer = Timer(warmup)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=warmup + steps, precision=precision,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer], log_every_n_steps=50)
    trainer.fit(model, loader)
    return timer.seconds


def run_plain(kwargs, loader, steps, warmup, precision, device) -> float:
    model = DiffusionModule(**kwargs).to(device)
    net, opt_cfg = model.net, model.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    net.train()
    step, start = 0, None
    while step < warmup + steps:
        for (x0,) in loader:
            if step == warmup:
                sync(device)
                start = time.perf_counter()
            if step == warmup + steps:
                break
            x0 = x0.to(device, non_blocking=True)
            torch.manual_seed(step)
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            with autocast:
                loss = model.diffusion_loss(net, x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            model.ema.update()
            step += 1
    sync(device)
    return time.perf_counter() - start


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", choices=["quickstart", "cifar"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (64 / 128)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating Lightning/plain rounds")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()

    kwargs = model_kwargs(args.config)
    batch_size = args.batch_size or (64 if args.config == "quickstart" else 128)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_loader(kwargs, batch_size, n_batches=args.warmup + args.steps + 1)
    images = batch_size * args.steps
    lightning_s, plain_s = [], []
    for _ in range(args.rounds):
        lightning_s.append(run_lightning(kwargs, loader, args.steps, args.warmup, args.precision, device.type))
        plain_s.append(run_plain(kwargs, loader, args.steps, args.warmup, args.precision, device))
    best_l, best_p = images / min(lightning_s), images / min(plain_s)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"config={args.config} batch={batch_size} steps={args.steps} precision={args.precision} machine={machine}")
    print(f"lightning: {best_l:9.1f} images/s   (rounds: {', '.join(f'{images / s:.1f}' for s in lightning_s)})")
    print(f"plain:     {best_p:9.1f} images/s   (rounds: {', '.join(f'{images / s:.1f}' for s in plain_s)})")
    print(f"ratio lightning/plain: {best_l / best_p:.3f}  (overhead {100 * (1 - best_l / best_p):+.1f}%, goal <= 3%)")
    print(f"peak memory: {peak_memory(device)}")


if __name__ == "__main__":
    main()
