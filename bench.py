"""Training speed, side by side, in one process on the same model and batch size.

    python bench.py --data-dir ../shared/data/cifar10-jpg

For each norm it times train.py's training step (recipe.make_step: the recipe's
optimizer, loss, augmentation and precision) fed three ways:
  project       cached uint8 tensors, augmentation on whole batches on the device
  limit         forward + backward + step on one pre-made batch: no data work at all
                (also with model and batch in the other memory layout: NCHW on the CPU,
                channels_last on CUDA; devices.memory_format says which one trains)
  dataloader-N  torchvision-style: a PIL image per sample, RandomCrop(32, padding=4),
                RandomHorizontalFlip, ToTensor, Normalize, DataLoader with N workers
  project-eager with CUDA graphs only: the project's step launched kernel by kernel, as
                the limit rows are, so that project-eager/limit compares like with like
  at-once-N     N runs of the project's step trained at the same time (utils.train, as
                train.py trains --seeds and --norm all on a GPU): images/s over all N
  bn-batch-B    with --bn-batches (BN only): the project's step with BN's statistics over
                groups of B images (train.py --bn-batch B), so that its "time vs project"
                is the cost of ghost batches against plain BN, measured in the same rounds
  eval-B        no training: utils.test (inference mode) on as many images, in batches of B
and prints images/second, seconds per 50k-image epoch and the time ratios
project/limit (the data pipeline's overhead), dataloader/project (the speed-up
over the conventional pipeline, fastest worker count) and dataloader/limit (the
most that any data pipeline could gain over it with this network).
"""
import time

START = time.perf_counter()  # start-up is measured from here: imports count

import torch  # noqa: E402

import cli  # noqa: E402
import devices  # noqa: E402
import recipe  # noqa: E402
import utils  # noqa: E402
from cli import non_negative_int, positive_int  # noqa: E402
from models import NORMS  # noqa: E402
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


def endless(loader):
    """Batches from the loader forever, so timing never pays a new epoch's start."""
    while True:
        yield from loader


def timed(run, batches, batch_images, device):
    """Images per second of `run(n)`, which trains on n batches of `batch_images` in all."""
    def finish():  # GPU work is queued: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(WARMUP_BATCHES)
    finish()
    start = time.perf_counter()
    run(batches)
    finish()
    return batches * batch_images / (time.perf_counter() - start)


def bench_norm(norm, data, args, device):
    """{pipeline: images/second}, the best of args.rounds interleaved rounds. Every
    pipeline trains with the recipe's training step (recipe.make_step), its data fed
    in its own way."""
    images, labels = data["train"]
    device_images, device_labels = images.to(device), labels.to(device)
    bs = args.batch_size
    run = recipe.run_options(norm, args)

    def make_step(memory_format, n_batches=1, cuda_graph=args.cuda_graph, seed=0, run=run):
        """A fresh model of `run` in `memory_format`, its optimizer at the peak learning
        rate and its TrainStep on the first n_batches batches."""
        torch.manual_seed(seed)
        model = recipe.make_model(run).to(device, memory_format=memory_format)
        optimizer = recipe.make_optimizer(run, model)
        step_model = torch.compile(model) if args.compile else model
        generator = torch.Generator(device=device).manual_seed(seed)
        return recipe.make_step(run, step_model, optimizer, device_images[:n_batches * bs],
                                device_labels[:n_batches * bs], generator, cuda_graph=cuda_graph)

    layout = devices.memory_format(device)
    other_layout, other_name = ((torch.contiguous_format, "limit-contiguous")
                                if layout == torch.channels_last else
                                (torch.channels_last, "limit-channels_last"))
    step = make_step(layout)
    y = device_labels[:bs]

    def project(runs=1, cuda_graph=args.cuda_graph, run=run):
        """`runs` runs of the project's step of `run`, trained at the same time."""
        made = {}  # batch count -> the runs' steps and constant schedules, kept: a CUDA
        #            graph is captured once

        def train_on(n):
            if n not in made:
                steps = [make_step(layout, n, cuda_graph, seed, run) for seed in range(runs)]
                made[n] = steps, [torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda _: 1.0)
                                  for s in steps]
            utils.train(*made[n], bs)
        return train_on

    def limit(step, x):
        def train_on(n):
            step.model.train()
            for _ in range(n):
                step.learn(x, y)
        return train_on

    def conventional(batches):
        def train_on(n):
            step.model.train()
            for _ in range(n):
                xb, yb = next(batches)
                step.learn(xb.to(device).contiguous(memory_format=layout), yb.to(device))
        return train_on

    x = utils.normalize(device_images[:bs])
    pipelines = {"project": project(), "limit": limit(step, x),
                 other_name: limit(make_step(other_layout), x.contiguous(memory_format=other_layout))}
    if args.cuda_graph:
        pipelines["project-eager"] = project(cuda_graph=False)
    batch_images = {}  # images per batch over all runs, where not batch_size
    for runs in args.at_once:
        pipelines[f"at-once-{runs}"], batch_images[f"at-once-{runs}"] = project(runs), runs * bs
    for bn_batch in args.bn_batches:
        pipelines[f"bn-batch-{bn_batch}"] = project(run=run | {"bn_batch": bn_batch})
    for workers in args.workers:
        batches = endless(conventional_loader(images, labels, bs, workers))
        pipelines[f"dataloader-{workers}"] = conventional(batches)

    def evaluate(eval_batch_size):
        def test_on(n):
            utils.test(step.model, device_images[:n * bs], device_labels[:n * bs],
                       batch_size=eval_batch_size, amp=run["amp"])
        return test_on

    for eval_batch_size in args.eval_batch_sizes:
        pipelines[f"eval-{eval_batch_size}"] = evaluate(eval_batch_size)

    # Rounds interleave the pipelines, so a slow spell of the machine does not
    # land on one of them only; the best round is the least disturbed.
    speeds = dict.fromkeys(pipelines, 0.0)
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            speeds[name] = max(speeds[name], timed(pipeline, args.batches,
                                                   batch_images.get(name, bs), device))
    return speeds


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norm", choices=[*NORMS, "all"], default="all")
    parser.add_argument("--batches", type=positive_int, default=20,
                        help="timed batches per pipeline and round (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="interleaved rounds; the best counts (default: %(default)s)")
    cli.add_recipe_options(parser)  # the recipe whose training step is timed
    parser.add_argument("--at-once", type=positive_int, nargs="+", default=[3], metavar="N",
                        help="numbers of runs to time training at the same time (default: 3)")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 1, 2],
                        help="DataLoader worker counts to try (default: 0 1 2)")
    parser.add_argument("--eval-batch-sizes", type=positive_int, nargs="+", default=[1000, 250],
                        help="evaluation batch sizes to time (default: 1000 250)")
    parser.add_argument("--bn-batches", type=positive_int, nargs="+", default=[], metavar="B",
                        help="BN only: also time the step with --bn-batch B for each B, "
                             "against plain BN in the same rounds (default: none)")
    cli.add_data_options(parser)
    parser.add_argument("--synthetic", type=positive_int, metavar="N",
                        help="use N random images instead of CIFAR-10 (smoke test)")
    cli.add_device_options(parser)
    args = parser.parse_args(argv)
    cli.resolve_device(parser, args)
    cli.check_norm_options(parser, args, NORMS if args.norm == "all" else [args.norm])
    if args.bn_batches and (args.norm != "bn" or args.bn_batch):
        parser.error("--bn-batches times BatchNorm's ghost batches against plain BN: "
                     "use it with --norm bn and without --bn-batch")
    cli.check_bn_batches(parser, "--bn-batches", args.bn_batches, args.batch_size)
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
        cli.fail(error)
    startup = time.perf_counter() - START

    print(f"device {devices.describe(device)}, {args.blocks} blocks, batch size {args.batch_size}, "
          f"best of {args.rounds} rounds of {args.batches} batches, "
          f"compile={args.compile}, cuda_graph={args.cuda_graph}")
    print(f"data: {data['source']}; start-up to data ready: {startup:.2f}s\n")
    print("| norm | pipeline | images/s | s/epoch (50k) | time vs project |")
    print("|---|---|---:|---:|---:|")
    amp = devices.use_amp(args.amp, device)
    for norm in NORMS if args.norm == "all" else [args.norm]:
        rows = bench_norm(norm, data, args, device)
        for name, speed in rows.items():
            print(f"| {norm} | {name} | {speed:,.0f} | {EPOCH_IMAGES / speed:.1f} "
                  f"| {rows['project'] / speed:.2f} |", flush=True)
        best = max((k for k in rows if k.startswith("dataloader")), key=rows.get)
        # Like with like: the limit rows launch their kernels one by one.
        project = "project-eager" if args.cuda_graph else "project"
        at_once = "".join(f"project/at-once-{n} **{rows[f'at-once-{n}'] / rows['project']:.2f}**, "
                          for n in args.at_once)
        print(f"| {norm} | time {project}/limit **{rows['limit'] / rows[project]:.2f}**, "
              f"{at_once}"
              f"{best}/project **{rows['project'] / rows[best]:.2f}** "
              f"(at most {best}/limit **{rows['limit'] / rows[best]:.2f}**), "
              f"{'bfloat16' if amp else 'float32'}, {args.optimizer} | | | |", flush=True)


if __name__ == "__main__":
    main()
