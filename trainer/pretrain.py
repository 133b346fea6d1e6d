"""Entry point: `python -m trainer.pretrain --recipe tiny --data DIR [--set key=value ...]` on every rank.

Normally started by `launch/pretrain.sh` (the deepspeed launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
run alone it is a one-rank job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.config import RECIPES, ConfigError, resolve
from trainer.distributed import init_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny", choices=sorted(RECIPES), help="base configuration (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set model.depths=2,2,6,2 --set train.micro_batch=4")
    p.add_argument("--data", help="a dataprep dataset directory (sets data.path)")
    p.add_argument("--max-steps", type=int, help="sets train.max_steps")
    p.add_argument("--run-dir", help="where config.json, checkpoints and metrics.jsonl go (sets run_dir)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if RUN/checkpoints/latest exists")
    p.add_argument("--dry-run", action="store_true", help="build everything, run no step, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = resolve(args.recipe, overrides)
    if not cfg.data.path:
        raise ConfigError("no dataset: pass --data DIR (a directory written by `python -m dataprep convert`)")
    if not os.path.exists(os.path.join(cfg.data.path, "index.parquet")):
        raise ConfigError(f"--data {cfg.data.path} is not a dataprep dataset (no index.parquet)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed()
    from trainer.train import Trainer

    trainer = Trainer(cfg, resume=not args.no_resume)
    try:
        if args.dry_run:
            logging.getLogger("trainer").info("dry run: built %s on %d ranks, no step taken", cfg.recipe,
                                              trainer.world)
        else:
            trainer.fit()
    finally:
        trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
