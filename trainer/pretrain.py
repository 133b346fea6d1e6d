"""Entry point: `python -m trainer.pretrain --recipe tiny --data DIR [--set key=value ...]` on every rank.

Normally started by `launch/pretrain.sh` (the deepspeed launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
run alone it is a one-rank job. Exit status: 0 done or preempted (SIGTERM/SIGINT: the step finishes, a checkpoint is
written), 1 the run failed (e.g. non-finite loss K steps in a row), 2 bad configuration, data or checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from dataprep.remote import is_url
from trainer.checkpoint import ResumeError
from trainer.config import RECIPES, ConfigError, resolve
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.preempt import STOP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny", choices=sorted(RECIPES), help="base configuration (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set model.depths=2,2,6,2 --set train.micro_batch=4")
    p.add_argument("--data", help="a dataprep dataset directory, or s3:// or gs://bucket/prefix (sets data.path)")
    p.add_argument("--max-steps", type=int, help="stop after step N (sets train.stop_step); the schedules keep "
                   "spanning train.max_steps")
    p.add_argument("--run-dir", help="where config.json, checkpoints and metrics.jsonl go (sets run_dir)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if RUN/checkpoints/latest exists")
    p.add_argument("--dry-run", action="store_true", help="build everything, run no step, exit")
    p.add_argument("--verbose", action="store_true", help="every library's INFO lines too (DeepSpeed, compiler "
                   "probes); by default only our progress lines, warnings and errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise ConfigError(f"--max-steps must be a positive step number, got {args.max_steps}")
        overrides.append(f"train.stop_step={args.max_steps}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = resolve(args.recipe, overrides)
    if not cfg.data.path:
        raise ConfigError("no dataset: pass --data DIR (a directory written by `python -m dataprep convert`)")
    # s3:// and gs:// are checked when opened (dataprep.remote), with the object store's error
    if not is_url(cfg.data.path) and not os.path.exists(os.path.join(cfg.data.path, "index.parquet")):
        raise ConfigError(f"--data {cfg.data.path} is not a dataprep dataset (no index.parquet)")
    t = cfg.train
    if t.stop_step < 0 or t.max_bad_steps < 0 or t.collective_timeout_s <= 0:
        raise ConfigError(f"train.stop_step and train.max_bad_steps must be >= 0 and train.collective_timeout_s > 0, "
                          f"got {t.stop_step}, {t.max_bad_steps}, {t.collective_timeout_s}")
    return cfg


def fail(message: str, code: int) -> int:
    """One `error:` line for the whole job (rank 0 says it; the other ranks hit the same error and stay quiet)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Root at WARNING: libraries' INFO lines (DeepSpeed, setuptools' gcc probes for DeepSpeed's op builders) stay out
    # of the console unless --verbose; our own loggers keep INFO.
    verbose = args.verbose or os.environ.get("SKYSENSE_VERBOSE") == "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for ours in ("trainer", "dataprep", "kernels"):
        logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # DeepSpeed's ZeRO calls it on every step; not ours to fix, nothing an operator can act on
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning)
    STOP.install()  # before anything slow: a signal during start-up stops the run after its first step
    try:
        cfg = build_config(args)
    except ConfigError as e:
        return fail(str(e), 2)
    init_distributed(cfg.train.collective_timeout_s)

    from trainer.train import NonFiniteError, Trainer

    try:
        trainer = Trainer(cfg, resume=not args.no_resume)
    except (ConfigError, ResumeError) as e:  # the same on every rank: checked before any rank goes on alone
        shutdown_distributed()
        return fail(str(e), 2)
    together = False  # every rank leaves the same way: a normal end or a decision taken by all
    try:
        if args.dry_run:
            logging.getLogger("trainer").info("dry run: built %s on %d ranks, no step taken", cfg.recipe,
                                              trainer.world)
        else:
            trainer.fit()
        together = True
    except NonFiniteError as e:  # a decision all ranks took together
        together = True
        return fail(str(e), 1)
    finally:
        trainer.close()
        shutdown_distributed(sync=together)
    return 0


if __name__ == "__main__":
    sys.exit(main())
