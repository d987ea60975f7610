"""Training speed: compute floor, our MoCo step, an official-style MoCo step, the full loop.

    python scripts/benchmark.py              # the default Fashion-MNIST setting (minutes on a CPU)
    python scripts/benchmark.py --batch 64 --queue-size 4096 --steps 3 --warmup 1 --interleave
    python scripts/benchmark.py --interleave --variants floor,moco,official,loop
    python scripts/benchmark.py --interleave --variants floor,floor_nchw   # channels_last
    python scripts/benchmark.py --interleave --variants floor,floor_plain_convs --stem imagenet
    python scripts/benchmark.py --variants loop_w0,loop_w1,loop_w2 --threads 1,2
    python scripts/benchmark.py --variants levers,moco_noclone,moco_compiled

Variants (moco/tools/benchmark/ says what each measures): floor, moco, official, loop (the
configured data.num_workers), loop_w<n> (n workers), moco_noclone, moco_compiled, floor_nchw,
floor_plain_convs, levers. Each comma-separated list of --stem, --precision, --channels-last,
--threads and --malloc makes one case per combination. Each measurement runs in a fresh process
(peak memory: its ru_maxrss) unless --in-process; --interleave runs the step variants of a case
in one process, a step of each in turn, which is what makes their ratios fair on a machine
shared with other jobs. The second line above is a quick run. Prints one table per case and
writes everything to --json.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from moco.encoders import STEMS
from moco.errors import MocoUserError
from moco.run.hardware import MALLOC_MODES
from moco.tools.benchmark import MAIN_VARIANTS, Settings, run, validate_variant


def _list(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _one_of(choices):
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}")
        return text

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument(
        "--stem",
        type=_list(_one_of(STEMS)),
        default=["small"],
        help="small,small_pool,imagenet,late_pool,auto",
    )
    parser.add_argument("--data", default="fashion_mnist", help="a conf/data group")
    parser.add_argument("--image-size", type=int, help="default: the data config's")
    parser.add_argument("--channels", type=int, help="default: the data config's")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue-size", type=int, default=65536, help="K")
    parser.add_argument("--dim", type=int, help="embedding dim; default: conf/model")
    parser.add_argument("--bn-splits", type=int, help="default: conf/model")
    parser.add_argument("--precision", type=_list(str), default=["32"], help="32,bf16-mixed,auto")
    parser.add_argument("--channels-last", type=_list(_on_off), default=[True], help="on,off")
    parser.add_argument("--threads", type=_list(int), default=[0], help="torch threads; 0: default")
    parser.add_argument(
        "--malloc",
        type=_list(_one_of(MALLOC_MODES)),
        default=["no-mmap"],
        help="no-mmap (as pretraining), default (glibc's)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=1, help="all variants in turn, N times")
    parser.add_argument("--variants", type=_list(validate_variant), default=list(MAIN_VARIANTS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="the step variants in one process, a step of each in turn (fair under load)",
    )
    parser.add_argument("--in-process", action="store_true", help="no subprocess per variant")
    parser.add_argument("--json", type=Path, help="default: runs/benchmark/<date>_<time>.json")
    args = parser.parse_args()
    if min(args.warmup, args.steps, args.rounds) < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")

    cases = [
        Settings(
            backbone=args.backbone,
            stem=stem,
            data=args.data,
            image_size=args.image_size,
            channels=args.channels,
            batch=args.batch,
            queue_size=args.queue_size,
            dim=args.dim,
            bn_splits=args.bn_splits,
            precision=precision,
            channels_last=channels_last,
            threads=threads,
            warmup=args.warmup,
            steps=args.steps,
            device=args.device,
            malloc=malloc,
            overrides=tuple(args.override),
        )
        for stem, precision, channels_last, threads, malloc in itertools.product(
            args.stem, args.precision, args.channels_last, args.threads, args.malloc
        )
    ]
    try:
        results = run(
            cases,
            args.variants,
            isolate=not args.in_process,
            rounds=args.rounds,
            interleave=args.interleave,
        )
    except MocoUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    path = args.json or Path("runs/benchmark") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"Results: {path}")


if __name__ == "__main__":
    main()
