"""`python -m dataprep {sample,convert,ingest-ssl4eo,verify,inspect,bench,bench-read,bench-scale}`: thin entry point."""

from __future__ import annotations

import argparse
import os
import sys


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataprep", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample", help="write synthetic co-registered image sets and a manifest")
    s.add_argument("--out", required=True)
    s.add_argument("--sets", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--hr-size", type=int, default=256)
    s.add_argument("--s2-size", type=int, default=64)
    s.add_argument("--missing-rate", type=float, default=0.1)

    c = sub.add_parser("convert", help="convert a manifest into a sharded Zarr dataset")
    c.add_argument("--manifest", required=True)
    c.add_argument("--out", required=True, help="a folder, or s3://bucket/prefix (AWS_* environment; docs/dataprep.md)")
    c.add_argument("--stage", default=None, help="--out s3://...: local staging folder of the shards before upload")
    c.add_argument("--keep-stage", action="store_true", help="--out s3://...: keep uploaded shards in the stage")
    c.add_argument("--root", default=None, help="reject any path that resolves outside this directory")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--shard-size", type=int, default=256)
    c.add_argument("--hr-size", type=int, default=256)
    c.add_argument("--s2-size", type=int, default=64)
    c.add_argument("--frames-per-chunk-shard", type=int, default=64)
    c.add_argument("--codec", choices=("blosc", "zstd"), default="blosc")
    c.add_argument("--clevel", type=int, default=3)
    c.add_argument("--crop", action="store_true", help="centre-crop larger rasters instead of rejecting them")
    c.add_argument("--strict", action="store_true", help="stop at the first rejected row")
    c.add_argument("--missing-bands", choices=("reject", "zero"), default="reject",
                   help="an S2/S1 source lacking SkySense bands: reject the row, or zero-fill "
                        "(recorded in the index)")  # fmt: skip
    c.add_argument("--resample-hr", action="store_true",
                   help="area-average HR images of another size to --hr-size (any ratio) "
                        "instead of rejecting them")  # fmt: skip
    c.add_argument("--cloud-max", type=float, default=None,
                   help="drop S2 frames whose SCL cloud fraction exceeds this (0..1)")  # fmt: skip
    c.add_argument("--rank", type=int, default=_env_int("RANK", 0))
    c.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE", 1))
    c.add_argument("--metrics-port", type=int, default=None)
    c.add_argument("--no-progress", action="store_true")

    ig = sub.add_parser("ingest-ssl4eo", help="SSL4EO-S12 v1.1 WebDataset tars -> a manifest for convert")
    ig.add_argument("--tar", action="append", required=True, help="a shard (S2L1C, S2L2A or S1GRD); repeatable")
    ig.add_argument("--out", required=True, help="folder for manifest.jsonl (paths in it are relative to it)")

    v = sub.add_parser("verify", help="read every chunk and cross-check the index against the stores")
    v.add_argument("dir", help="a dataset folder, or s3:// or gs://bucket/prefix (docs/dataprep.md)")
    v.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes checking shards")
    v.add_argument("--rank", type=int, default=_env_int("RANK", 0))
    v.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE", 1))
    v.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("inspect", help="counts, sizes, compression, statistics, dates, rejects")
    i.add_argument("dir", help="a dataset folder, or s3:// or gs://bucket/prefix (docs/dataprep.md)")
    i.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="conversion / codec / read benchmark")
    b.add_argument("--sets", type=int, default=64)
    b.add_argument("--hr-size", type=int, default=256)
    b.add_argument("--s2-size", type=int, default=64)
    b.add_argument("--workdir", default=None)

    br = sub.add_parser("bench-read", help="random-crop reads/s: tensorstore beside the hand-written reader")
    br.add_argument("--sets", type=int, default=32)
    br.add_argument("--hr-size", type=int, default=512)
    br.add_argument("--s2-size", type=int, default=64)
    br.add_argument("--crop", type=int, default=128, help="HR crop edge (px); S2/S1 crops cover the same ground")
    br.add_argument("--samples", type=int, default=300)
    br.add_argument("--workdir", default=None, help="keep the dataset here (reused when present)")
    br.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best is reported")
    br.add_argument("--s3", action="store_true", help="also from a moto S3 server on loopback (moto[server])")

    bs = sub.add_parser("bench-scale", help="index memory and load time at scale, on a simulated N-row index")
    bs.add_argument("--rows", type=int, default=2_000_000)
    bs.add_argument("--workers", type=int, default=4, help="forked reader processes (DataLoader workers)")
    bs.add_argument("--reads", type=int, default=20_000, help="random metadata reads per worker")
    bs.add_argument("--workdir", default=None, help="keep the simulated index here (reused when present)")
    bs.add_argument("--merge-rows", type=int, default=0, help="instead: rank 0's merge RSS over this many rows")
    bs.add_argument("--manifest-rows", type=int, default=0,
                    help="instead: a convert rank's manifest planning (time, RSS) over a manifest this long")
    bs.add_argument("--world-size", type=int, default=16, help="with --manifest-rows: the ranks planning it")
    bs.add_argument("--s3", action="store_true", help="with --merge-rows: also merge from a moto S3 server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "sample":
        from .sample import write_sample

        man = write_sample(args.out, args.sets, args.seed, args.hr_size, args.s2_size, args.missing_rate)
        print(man)
        return 0
    if args.cmd == "convert":
        from .convert import ConvertConfig, convert
        from .shard import ShardConfig

        shard = ShardConfig(hr_size=args.hr_size, s2_size=args.s2_size, shard_size=args.shard_size,
                            frames_per_chunk_shard=args.frames_per_chunk_shard, codec=args.codec,
                            clevel=args.clevel, crop=args.crop, missing_bands=args.missing_bands,
                            cloud_max=args.cloud_max, resample_hr=args.resample_hr)  # fmt: skip
        cfg = ConvertConfig(manifest=args.manifest, out=args.out, root=args.root, shard=shard, workers=args.workers,
                            rank=args.rank, world_size=args.world_size, strict=args.strict,
                            progress=not args.no_progress, metrics_port=args.metrics_port, stage=args.stage,
                            keep_stage=args.keep_stage)  # fmt: skip
        return convert(cfg)
    if args.cmd == "ingest-ssl4eo":
        from .ssl4eo import ingest

        man, counts = ingest(args.tar, args.out)
        print(man)
        print(" ".join(f"{k}={v}" for k, v in counts.items()), file=sys.stderr)
        return 0
    if args.cmd == "verify":
        from .verify import verify

        return verify(args.dir, workers=args.workers, rank=args.rank, world_size=args.world_size,
                      progress=not args.no_progress and sys.stderr.isatty())  # fmt: skip
    if args.cmd == "inspect":
        from .inspect_ import inspect_dataset

        return inspect_dataset(args.dir, as_json=args.json)
    if args.cmd == "bench":
        from .bench import bench

        return bench(sets=args.sets, hr_size=args.hr_size, s2_size=args.s2_size, workdir=args.workdir)
    if args.cmd == "bench-read":
        from .bench import bench_read

        return bench_read(sets=args.sets, hr_size=args.hr_size, s2_size=args.s2_size, crop=args.crop,
                          samples=args.samples, workdir=args.workdir, rounds=args.rounds, s3=args.s3)  # fmt: skip
    if args.cmd == "bench-scale":
        from .bench_scale import bench_scale

        return bench_scale(rows=args.rows, workers=args.workers, reads=args.reads, workdir=args.workdir,
                           merge_rows=args.merge_rows, manifest_rows=args.manifest_rows,
                           world_size=args.world_size, s3=args.s3)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main())
