"""Training speed, side by side, in one process on the same model and batch size.

    python bench.py --data-dir ../shared/data/cifar10-jpg

For each norm it times the same training steps (its recipe's optimizer) fed three ways:
  project       cached uint8 tensors, augmentation on whole batches on the device
  limit         forward + backward + step on one pre-made batch: no data work at all
                (also with model and batch in the other memory layout: NCHW on the CPU,
                channels_last on CUDA; utils.memory_format says which one trains)
  dataloader-N  torchvision-style: a PIL image per sample, RandomCrop(32, padding=4),
                RandomHorizontalFlip, ToTensor, Normalize, DataLoader with N workers
  eval-B        no training: utils.test (inference mode) on as many images, in batches of B
and prints images/second, seconds per 50k-image epoch and the time ratios
project/limit (the data pipeline's overhead), dataloader/project (the speed-up
over the conventional pipeline, fastest worker count) and dataloader/limit (the
most that any data pipeline could gain over it with this network).
"""
import time

START = time.perf_counter()  # start-up is measured from here: imports count

import argparse  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import utils  # noqa: E402
from models import ACTIVATIONS, BLOCKS, NORMS, Net  # noqa: E402
from train import (ACTIVATION, BATCH_SIZE, BLOCKS_DEFAULT, OPTIMIZER, Parser,  # noqa: E402
                   non_negative_int, positive_int, resolve_device)
from utils import UserError  # noqa: E402

EPOCH_IMAGES = 50_000
WARMUP_BATCHES = 3  # untimed batches before each timing


class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: array -> PIL image -> transform.

    Built on the cached arrays, so no JPEG decoding is charged to it.
    """

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def conventional_loader(images, labels, batch_size, workers):
    import torchvision.transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(utils.MEAN, utils.STD)])
    return torch.utils.data.DataLoader(PILImages(images, labels, transform), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def step(model, optimizer, x, y, amp):
    with utils.autocast(x.device, amp):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def endless(loader):
    """Batches from the loader forever, so timing never pays a new epoch's start."""
    while True:
        yield from loader


def timed(run, batches, batch_size, device):
    """Images per second of `run(n)`, which trains on n batches."""
    def finish():  # GPU work is queued: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(WARMUP_BATCHES)
    finish()
    start = time.perf_counter()
    run(batches)
    finish()
    return batches * batch_size / (time.perf_counter() - start)


def bench_norm(norm, data, args, device, amp):
    """{pipeline: images/second}, the best of args.rounds interleaved rounds."""
    images, labels = data["train"]
    device_images, device_labels = images.to(device), labels.to(device)
    bs = args.batch_size
    x, y = utils.normalize(device_images[:bs]), device_labels[:bs]

    def make_model(memory_format):
        torch.manual_seed(0)
        model = Net(norm, args.blocks, activation=args.activation or ACTIVATION[norm])
        model = model.to(device, memory_format=memory_format)
        optimizer = utils.make_optimizer(model, args.optimizer, lr=0.01, momentum=0.9,
                                         weight_decay=0.0, muon_lr=0.01)
        return (torch.compile(model) if args.compile else model), optimizer

    layout = utils.memory_format(device)
    other_layout, other_name = ((torch.contiguous_format, "limit-contiguous")
                                if layout == torch.channels_last else
                                (torch.channels_last, "limit-channels_last"))
    model, optimizer = make_model(layout)
    constant_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator(device=device).manual_seed(0)

    steps = {}  # batch count -> TrainStep on that many batches, kept: a CUDA graph is captured once

    def project(n):
        if n not in steps:
            steps[n] = utils.TrainStep(model, optimizer, device_images[:n * bs], device_labels[:n * bs],
                                       generator, augmentation={"translate": 4}, amp=amp,
                                       cuda_graph=args.cuda_graph)
        utils.train(steps[n], constant_lr, bs)

    def limit(model, optimizer, x):
        def run(n):
            model.train()
            for _ in range(n):
                step(model, optimizer, x, y, amp)
        return run

    def conventional(batches):
        def run(n):
            model.train()
            for _ in range(n):
                xb, yb = next(batches)
                step(model, optimizer, xb.to(device).contiguous(memory_format=layout),
                     yb.to(device), amp)
        return run

    pipelines = {"project": project, "limit": limit(model, optimizer, x),
                 other_name: limit(*make_model(other_layout), x.contiguous(memory_format=other_layout))}
    for workers in args.workers:
        batches = endless(conventional_loader(images, labels, bs, workers))
        pipelines[f"dataloader-{workers}"] = conventional(batches)

    def evaluate(eval_batch_size):
        def run(n):
            utils.test(model, device_images[:n * bs], device_labels[:n * bs],
                       batch_size=eval_batch_size, amp=amp)
        return run

    for eval_batch_size in args.eval_batch_sizes:
        pipelines[f"eval-{eval_batch_size}"] = evaluate(eval_batch_size)

    # Rounds interleave the pipelines, so a slow spell of the machine does not
    # land on one of them only; the best round is the least disturbed.
    speeds = dict.fromkeys(pipelines, 0.0)
    for _ in range(args.rounds):
        for name, run in pipelines.items():
            speeds[name] = max(speeds[name], timed(run, args.batches, bs, device))
    return speeds


def parse_args(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norm", choices=[*NORMS, "all"], default="all")
    parser.add_argument("--batches", type=positive_int, default=20,
                        help="timed batches per pipeline and round (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="interleaved rounds; the best counts (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help="default: %(default)s, as train.py")
    parser.add_argument("--blocks", choices=BLOCKS, default=BLOCKS_DEFAULT,
                        help="default: %(default)s, as train.py")
    parser.add_argument("--activation", choices=ACTIVATIONS,
                        help="default: per norm, as train.py")
    parser.add_argument("--optimizer", choices=utils.OPTIMIZERS, default=OPTIMIZER,
                        help="default: %(default)s, as train.py")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 1, 2],
                        help="DataLoader worker counts to try (default: 0 1 2)")
    parser.add_argument("--eval-batch-sizes", type=positive_int, nargs="+", default=[1000, 250],
                        help="evaluation batch sizes to time (default: 1000 250)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--cache-dir", default=str(utils.default_cache_dir()))
    parser.add_argument("--synthetic", type=positive_int, metavar="N",
                        help="use N random images instead of CIFAR-10 (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                        help="the project pipeline's steps as CUDA graphs (default: as train.py, "
                             "on with CUDA unless --compile)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="bfloat16 mixed precision (default: as train.py, on for CPUs "
                             "with AVX-512 bfloat16 instructions)")
    args = parser.parse_args(argv)
    resolve_device(parser, args)
    return args


def load_data(args):
    if args.synthetic:
        generator = torch.Generator().manual_seed(0)
        data = {"train": (torch.randint(0, 256, (args.synthetic, 3, 32, 32), dtype=torch.uint8,
                                        generator=generator),
                          torch.randint(0, 10, (args.synthetic,), generator=generator)),
                "source": f"{args.synthetic} random images"}
    else:
        data = utils.load_cifar10(args.data_dir, args.cache_dir, download=False)
    # Each timing takes its batches from the start of the data, never wrapping round.
    needed = max(args.batches, WARMUP_BATCHES) * args.batch_size
    if len(data["train"][1]) < needed:
        raise UserError(f"{args.batches} batches of {args.batch_size} need {needed:,} training "
                        f"images, and there are {len(data['train'][1]):,}; time fewer batches")
    return data


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    try:
        data = load_data(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    startup = time.perf_counter() - START

    print(f"device {utils.describe(device)}, {args.blocks} blocks, batch size {args.batch_size}, "
          f"best of {args.rounds} rounds of {args.batches} batches, "
          f"compile={args.compile}, cuda_graph={args.cuda_graph}")
    print(f"data: {data['source']}; start-up to data ready: {startup:.2f}s\n")
    print("| norm | pipeline | images/s | s/epoch (50k) | time vs project |")
    print("|---|---|---:|---:|---:|")
    amp = utils.use_amp(args.amp, device)
    for norm in NORMS if args.norm == "all" else [args.norm]:
        rows = bench_norm(norm, data, args, device, amp)
        for name, speed in rows.items():
            print(f"| {norm} | {name} | {speed:,.0f} | {EPOCH_IMAGES / speed:.1f} "
                  f"| {rows['project'] / speed:.2f} |", flush=True)
        best = max((k for k in rows if k.startswith("dataloader")), key=rows.get)
        print(f"| {norm} | time project/limit **{rows['limit'] / rows['project']:.2f}**, "
              f"{best}/project **{rows['project'] / rows[best]:.2f}** "
              f"(at most {best}/limit **{rows['limit'] / rows[best]:.2f}**), "
              f"{'bfloat16' if amp else 'float32'}, {args.optimizer} | | | |", flush=True)


if __name__ == "__main__":
    main()
