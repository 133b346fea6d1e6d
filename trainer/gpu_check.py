"""The first-contact check of a GPU machine, driven by `bash launch/gpu-check.sh` (which sets up the venv first).

`python -m trainer.gpu_check run --out DIR [--dry-run]` runs, each step time-boxed and within one overall budget
(8 minutes by default, setup included), a failing step never stopping the later ones:

  env            driver, CUDA, torch, Triton (and the ptxas it assembles with), DeepSpeed versions
  kernel-smoke   every Triton kernel launched once, fwd + bwd vs reference (what train.kernels=auto does first)
  gpu-tests      pytest -m gpu
  bench          python -m kernels.bench --no-compile at paper shapes, with the atomic-gradient drift
  data           a small synthetic dataprep dataset
  tiny-triton    20 bf16 steps of the tiny recipe through launch/pretrain.sh with train.kernels=triton ...
  tiny-reference ... and with train.kernels=reference
  tiny-compare   the two loss curves agree within --loss-rtol at every step
  huge-probe     one process, the huge recipe at micro-batch 1 with activation checkpointing: peak memory and step
                 time, or a clear "does not fit"

and writes DIR/report.json and DIR/report.txt (pass / fail / skipped per step, with the reason). `--dry-run` runs
the same flow on CPU at toy sizes (interpreted kernels, fp32, 2 steps, the tiny recipe for the probe). Subcommands
`env`, `smoke`, `huge-probe` are the steps that run in their own process. Importing this module needs only the
standard library, so the report is written even where torch itself is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("setup", "env", "kernel-smoke", "gpu-tests", "bench", "data", "tiny-triton", "tiny-reference",
         "tiny-compare", "huge-probe")  # fmt: skip
OOM_EXIT = 3  # huge-probe: ran, but the model does not fit


# ------------------------------------------------------------------------------------------------ in-process steps
def _version(*dists: str) -> str | None:
    import importlib.metadata as md

    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return None


def _cuda_release(text: str | None) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def env_report() -> dict:
    """Versions of everything the GPU path depends on, and warnings for known incompatibilities."""
    info: dict = {"python": sys.version.split()[0], "warnings": []}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip().splitlines() or smi.stderr.strip()[:300]
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        m = re.search(r"CUDA Version:\s*([\d.]+)", header)
        info["driver_cuda"] = m.group(1) if m else None
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"[:200]
        info["driver_cuda"] = None
    info["triton"] = _version("triton", "pytorch-triton", "pytorch-triton-rocm")
    info["deepspeed"] = _version("deepspeed")
    import torch

    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{cap[0]}.{cap[1]}",
                    device_count=torch.cuda.device_count())  # fmt: skip
        try:
            v = torch._C._cuda_getDriverVersion()  # e.g. 12040
            info["driver_cuda"] = info["driver_cuda"] or f"{v // 1000}.{v % 1000 // 10}"
        except (AttributeError, RuntimeError):
            pass
        if info["triton"] and torch.version.hip is None:
            try:
                from kernels.cuda_compile import ptxas_for

                sm = cap[0] * 10 + cap[1]
                info["ptxas"], info["ptxas_cuda"] = ptxas_for(sm)
                drv, asm = _cuda_release(info["driver_cuda"]), _cuda_release(info["ptxas_cuda"])
                if drv and asm and drv < asm:
                    var = "TRITON_PTXAS_BLACKWELL_PATH" if sm >= 90 else "TRITON_PTXAS_PATH"
                    info["warnings"].append(
                        f"the driver supports CUDA {info['driver_cuda']} but Triton assembles sm_{sm} kernels with "
                        f"CUDA {info['ptxas_cuda']} ptxas: the kernels may not load ('device kernel image is "
                        f"invalid'); train.kernels=auto then falls back to PyTorch. Fix: {var}=<a ptxas no newer "
                        "than the driver, e.g. /usr/local/cuda/bin/ptxas>"
                    )
            except Exception as exc:  # ptxas missing or unreadable: a warning, not a failed check
                info["warnings"].append(f"cannot find Triton's ptxas: {type(exc).__name__}: {exc}"[:300])
    return info


def smoke_report(dry_run: bool) -> dict:
    """kernels.check_kernels on cuda:0 in bf16 and fp32 (CPU interpreter in fp32 for a dry run)."""
    import torch

    import kernels

    if dry_run:
        targets = [("cpu", torch.float32)]
    elif torch.cuda.is_available():
        targets = [("cuda:0", torch.bfloat16), ("cuda:0", torch.float32)]
    else:
        return {"skipped": "no CUDA device"}
    out = {}
    for device, dtype in targets:
        out[f"{device} {str(dtype).replace('torch.', '')}"] = kernels.check_kernels(device, dtype)
    return {"results": out, "failed": sum(why is not None for r in out.values() for why in r.values())}


def losses_of(run_dir: Path) -> list[float]:
    """loss/total of every step in RUN/metrics.jsonl, in step order."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["loss/total"] for r in sorted(rows, key=lambda r: r["step"])]


def compare_losses(a: list[float], b: list[float], steps: int, rtol: float) -> tuple[bool, dict]:
    """Kernels-on losses `a` vs kernels-off `b`: equal length `steps`, |a - b| <= rtol * |b| at every step."""
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    details = {"triton": a, "reference": b, "rel_diff": diffs, "max_rel_diff": max(diffs, default=None),
               "rtol": rtol, "steps": steps}  # fmt: skip
    if len(a) != steps or len(b) != steps:
        details["reason"] = f"expected {steps} steps, got {len(a)} (triton) and {len(b)} (reference)"
        return False, details
    bad = [i + 1 for i, d in enumerate(diffs) if not d <= rtol]  # NaN fails too
    if bad:
        details["reason"] = f"steps {bad[:5]} differ by more than {rtol:g} (max {max(diffs):.3g})"
        return False, details
    details["reason"] = f"{steps} steps within {rtol:g} (max relative difference {max(diffs):.2g})"
    return True, details


def is_oom(exc: BaseException) -> bool:
    """CUDA (or host) out-of-memory, however DeepSpeed or torch wrapped it."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return "out of memory" in str(exc).lower()


def guarded(phase: str, fn: Callable[[], object], result: dict) -> bool:
    """Run fn(); on out-of-memory record "does not fit" in `result` and return False (other errors propagate)."""
    try:
        fn()
        return True
    except Exception as exc:
        if not is_oom(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.update(fits=False, phase=phase, reason=f"does not fit: out of memory during {phase}: {first[:300]}")
        return False


def huge_probe(recipe: str, data: str, run_dir: str, overrides: list[str], steps: int) -> dict:
    """Build `recipe` at micro-batch 1 with activation checkpointing in this one process and take `steps` steps."""
    import torch

    from trainer.config import resolve
    from trainer.distributed import init_distributed

    sets = [f"data.path={data}", f"run_dir={run_dir}", "train.micro_batch=1", "train.global_batch=1",
            "model.activation_checkpointing=true", "metrics.port=0", "data.num_workers=1", *overrides]  # fmt: skip
    cfg = resolve(recipe, sets)
    cuda = torch.cuda.is_available()
    result: dict = {"recipe": recipe, "overrides": sets, "fits": True, "step_s": [], "precision": cfg.train.precision}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        result.update(device=props.name, total_gib=props.total_memory / 2**30)
    init_distributed()
    from trainer.train import Trainer

    box: dict = {}

    def build():
        t = time.perf_counter()
        box["trainer"] = Trainer(cfg, resume=False)
        result["build_s"] = time.perf_counter() - t

    def step():
        trainer = box["trainer"]
        batches = iter(trainer.loader)
        for _ in range(steps):
            t = time.perf_counter()
            losses, _, _ = trainer.train_step(batches)
            if cuda:
                torch.cuda.synchronize()
            result["step_s"].append(time.perf_counter() - t)
            result["loss"] = losses.get("total")

    try:
        if guarded("build", build, result):
            guarded("step", step, result)
    finally:
        if cuda:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        else:
            import resource

            result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if "trainer" in box:
            box["trainer"].close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if result["fits"]:
        mem = result.get("peak_allocated_gib", result.get("peak_rss_gib"))
        result["reason"] = f"fits: peak {mem:.1f} GiB, step {result['step_s'][-1]:.2f} s" if result["step_s"] else ""
    return result


# --------------------------------------------------------------------------------------------------- orchestration
@dataclass(kw_only=True)
class Step:
    name: str
    cmd: list[str] | None = None  # None: `inline` runs in this process
    cap_s: float = 60.0
    needs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    judge: Callable[[int, str], tuple[str, str, dict]] | None = None  # (rc, log) -> (status, reason, details)
    inline: Callable[[], tuple[str, str, dict]] | None = None


def _reason_from_log(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error:|Exception|FAILED|failed|Killed)", ln):
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, logs: Path, deadline: float, done: dict[str, dict]) -> dict:
    """Run one step within min(its cap, the budget left); never raises."""
    res: dict = {"name": step.name, "status": "skipped", "reason": "", "seconds": 0.0}
    missing = [n for n in step.needs if done.get(n, {}).get("status") != "pass"]
    if missing:
        res["reason"] = "needs " + ", ".join(f"{n} ({done.get(n, {}).get('status', 'not run')})" for n in missing)
        return res
    left = deadline - time.monotonic()
    if left < 5:
        res["reason"] = "time budget spent"
        return res
    timeout = min(step.cap_s, left)
    start = time.monotonic()
    try:
        if step.inline is not None:
            res["status"], res["reason"], res["details"] = step.inline()
            return res
        log = logs / f"{step.name}.log"
        res.update(command=" ".join(step.cmd), log=str(log), timeout_s=round(timeout, 1))
        with open(log, "w") as f:
            proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **step.env}, start_new_session=True)  # fmt: skip
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                rc = None
        text = log.read_text(errors="replace")
        res["rc"] = rc
        res["tail"] = text.splitlines()[-15:]
        if rc is None:
            res["status"], res["reason"] = "fail", f"timed out after {timeout:.0f} s: {_reason_from_log(text)}"
        elif step.judge is not None:
            res["status"], res["reason"], res["details"] = step.judge(rc, text)
        elif rc == 0:
            res["status"], res["reason"] = "pass", ""
        else:
            res["status"], res["reason"] = "fail", f"exit {rc}: {_reason_from_log(text)}"
    except Exception as exc:  # a broken step (or judge) is a failed step, never a stopped check
        res["status"], res["reason"] = "fail", f"{type(exc).__name__}: {exc}"[:400]
    finally:
        res["seconds"] = round(time.monotonic() - start, 1)
    return res


def run_steps(steps: list[Step], logs: Path, deadline: float, on_result=None) -> list[dict]:
    """Every step in order (a failed one never stops the next); results in order."""
    logs.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for step in steps:
        print(f"== {step.name}", flush=True)
        done[step.name] = run_step(step, logs, deadline, done)
        r = done[step.name]
        print(f"   {r['status']} ({r['seconds']:.0f} s) {r['reason']}", flush=True)
        if on_result:
            on_result(r)
    return list(done.values())


def _json_judge(path: Path, ok: Callable[[dict], tuple[str, str]]) -> Callable[[int, str], tuple[str, str, dict]]:
    def judge(rc: int, text: str) -> tuple[str, str, dict]:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not data:
            return "fail", f"exit {rc}, no {path.name}: {_reason_from_log(text)}", {}
        status, reason = ok(data)
        if rc != 0 and status == "pass":
            status, reason = "fail", f"exit {rc}: {_reason_from_log(text)}"
        return status, reason, data

    return judge


def _pytest_judge(rc: int, text: str) -> tuple[str, str, dict]:
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    summary = lines[-1].strip("= ") if lines else _reason_from_log(text)
    if rc == 5 or (rc == 0 and " passed" not in summary):
        return "skipped", f"no gpu test ran: {summary}", {"summary": summary}
    return ("pass" if rc == 0 else "fail"), summary, {"summary": summary}


def _smoke_ok(data: dict) -> tuple[str, str]:
    if "skipped" in data:
        return "skipped", data["skipped"]
    bad = [f"{target} {op}: {why}" for target, r in data["results"].items() for op, why in r.items() if why]
    return ("fail", "; ".join(bad)[:600]) if bad else ("pass", f"{len(data['results'])} device/dtype pairs ok")


def _bench_ok(data: dict) -> tuple[str, str]:
    if "skipped" in data:
        return "skipped", data["skipped"]
    drift = data.get("drift", [])
    worst = max((max(r["bias_table"], r["logit_scale"]) for r in drift), default=None)
    note = f"{len(data['rows'])} cases" + (f", max atomic-gradient drift {worst:.1e}" if worst is not None else "")
    return ("fail", f"{data['failures']} failure(s); {note}") if data["failures"] else ("pass", note)


def _probe_judge(path: Path) -> Callable[[int, str], tuple[str, str, dict]]:
    def judge(rc: int, text: str) -> tuple[str, str, dict]:
        data = json.loads(path.read_text()) if path.exists() else {}
        if rc in (0, OOM_EXIT) and data:
            return ("pass" if rc == 0 else "fail"), data.get("reason", ""), data
        return "fail", f"exit {rc}: {_reason_from_log(text)}", data

    return judge


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_steps(args: argparse.Namespace, out: Path) -> list[Step]:
    """The check's steps for this machine (or the CPU dry run), in order."""
    py, dry = sys.executable, args.dry_run
    me = [py, "-m", "trainer.gpu_check"]
    interp = {"TRITON_INTERPRET": "1"} if dry else {}
    data, runs = out / "data", out / "runs"
    steps = [
        Step(name="env", cmd=[*me, "env", "--json", str(out / "env.json")], cap_s=60,
             judge=_json_judge(out / "env.json", lambda d: ("pass", "; ".join(d["warnings"])))),
        Step(name="kernel-smoke", cmd=[*me, "smoke", "--json", str(out / "smoke.json")] + (["--dry-run"] * dry),
             cap_s=120, env=interp, judge=_json_judge(out / "smoke.json", _smoke_ok)),
        Step(name="gpu-tests", cmd=[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                    *args.gpu_tests.split()], cap_s=150, judge=_pytest_judge),
        Step(name="bench", cmd=[py, "-m", "kernels.bench", "--no-compile", "--json", str(out / "bench.json"),
                                *(["--smoke", "--reps", "1", "--drift-reps", "2"] if dry else []),
                                *(["--ops", args.bench_ops] if args.bench_ops else [])],
             cap_s=150, judge=_json_judge(out / "bench.json", _bench_ok)),
    ]  # fmt: skip
    size = ["--hr-size", "128", "--s2-size", "32"] if dry else []
    sets = "8" if dry else "32"
    steps.append(Step(name="data", cap_s=120, cmd=["bash", "-c", (
        f'set -eo pipefail; rm -rf "{data}"; "{py}" -m dataprep sample --out "{data}/raw" --sets {sets} --seed 0 '
        f'{" ".join(size)}; "{py}" -m dataprep convert --manifest "{data}/raw/manifest.jsonl" --out "{data}/ds" '
        f'--shard-size 8 --no-progress {" ".join(size)} || [ $? = 1 ]')]))  # fmt: skip  (exit 1: some rows rejected)
    if dry:  # interpreted kernels: fp32 (the interpreter is wrong for bf16), 2 steps of one 32 px view pair
        tiny = ["train.precision=fp32", "train.micro_batch=1", "train.global_batch=1", "data.local_crops=0",
                "data.hr_crop=32", "data.local_crop=32", "data.s2_frames=1", "data.s1_frames=1"]  # fmt: skip
    else:
        tiny = ["train.precision=bf16"]
    tiny = [f"train.max_steps={args.steps}", "metrics.port=0", "train.log_every=1", *tiny]
    for backend in ("triton", "reference"):
        run = runs / f"tiny-{backend}"
        sets_ = [a for s in [*tiny, f"train.kernels={backend}"] for a in ("--set", s)]
        steps.append(Step(name=f"tiny-{backend}", needs=("data",), cap_s=180 if dry else 120,
                          env=interp if backend == "triton" else {},
                          cmd=["bash", "-c", f'rm -rf "{run}"; exec "$@"', "tiny", "bash", "launch/pretrain.sh",
                               "--num-ranks", "1", "--master-port", str(_free_port()), "--recipe", "tiny", "--data",
                               str(data / "ds"), "--run-dir", str(run), "--no-resume", *sets_]))  # fmt: skip

    def compare() -> tuple[str, str, dict]:
        ok, details = compare_losses(losses_of(runs / "tiny-triton"), losses_of(runs / "tiny-reference"),
                                     args.steps, args.loss_rtol)  # fmt: skip
        return ("pass" if ok else "fail"), details["reason"], details

    steps.append(Step(name="tiny-compare", needs=("tiny-triton", "tiny-reference"), inline=compare))
    probe = [*me, "huge-probe", "--json", str(out / "huge-probe.json"), "--data", str(data / "ds"),
             "--run-dir", str(runs / "huge-probe")]  # fmt: skip
    dry_probe = ["train.precision=fp32", "data.local_crops=0", "data.hr_crop=32", "data.s2_frames=1",
                 "data.s1_frames=1"]  # fmt: skip
    probe += ["--recipe", "tiny", "--steps", "1", *[a for s in dry_probe for a in ("--set", s)]] if dry else [
        "--recipe", "huge"]  # fmt: skip
    steps.append(Step(name="huge-probe", needs=("data",), cmd=probe, cap_s=180,
                      judge=_probe_judge(out / "huge-probe.json")))  # fmt: skip
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for s in steps:
        s.cap_s *= 5 if dry else 1  # interpreted kernels on a shared 2-core CPU; the budget still bounds the total
        if s.name in skip:
            s.cmd, s.inline = None, (lambda: ("skipped", "--skip", {}))
    return steps


def setup_result(args: argparse.Namespace) -> dict:
    res = {"name": "setup", "seconds": args.setup_seconds, "log": args.setup_log}
    if args.setup_rc in (None, "skipped"):
        return {**res, "status": "skipped", "reason": "--no-setup: the current environment is used"}
    rc = int(args.setup_rc)
    if rc == 0:
        return {**res, "status": "pass", "reason": "", "rc": 0}
    tail = Path(args.setup_log).read_text(errors="replace") if args.setup_log and Path(args.setup_log).exists() else ""
    why = "timed out" if rc == 124 else f"exit {rc}"
    return {**res, "status": "fail", "rc": rc, "reason": f"{why}: {_reason_from_log(tail)}"}


def write_report(out: Path, report: dict) -> None:
    """report.json (everything) and report.txt (one line per step, then the key numbers)."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    env = report.get("env") or {}
    lines = [f"SkySense V2 gpu-check ({report['mode']}), {report['total_s']:.0f} s of a {report['budget_s']:.0f} s "
             f"budget: {report['summary']}",
             "versions: " + ", ".join(f"{k} {env.get(k)}" for k in ("device", "driver_cuda", "torch", "torch_cuda",
                                                                    "triton", "ptxas_cuda", "deepspeed")),
             *[f"WARNING: {w}" for w in env.get("warnings", [])], ""]  # fmt: skip
    for s in report["steps"]:
        lines.append(f"{s['name']:15s} {s['status']:8s} {s['seconds']:7.1f} s  {s.get('reason', '')}")
    by = {s["name"]: s for s in report["steps"]}
    bench = by.get("bench", {}).get("details") or {}
    if bench.get("rows"):
        lines += ["", f"kernels vs the PyTorch fallback ({bench.get('device')}, {bench.get('dtype')}):"]
        for r in bench["rows"]:
            if "ms" in r:
                lines.append(f"  {r['op']:26s} {r['shape']:32s} {r['ms']:9.3f} ms  x{r['speedup_torch']:.2f}  "
                             f"err {r['max_rel_err']:.1e}")  # fmt: skip
            else:
                lines.append(f"  {r['op']:26s} {r['shape']:32s} FAILED {r.get('error', '')}")
        for r in bench.get("drift", []):
            lines.append(f"  drift {r['shape']}: d bias_table {r['bias_table']:.1e}, d logit_scale "
                         f"{r['logit_scale']:.1e}, dq/dk/dv bitwise identical {r['qkv_bitwise_identical']}")
    probe = by.get("huge-probe", {}).get("details") or {}
    if probe:
        lines += ["", f"probe {probe.get('recipe')}: {probe.get('reason')} (step times {probe.get('step_s')})"]
    (out / "report.txt").write_text("\n".join(lines) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = args.started_at or time.time()
    deadline = time.monotonic() + args.budget - (time.time() - started)
    report = {"schema": 1, "mode": "dry-run" if args.dry_run else "gpu", "budget_s": args.budget, "total_s": 0.0,
              "loss_rtol": args.loss_rtol, "steps": [setup_result(args)], "env": {}, "summary": ""}  # fmt: skip

    def record(r: dict) -> None:
        if r["name"] == "env":
            report["env"] = r.get("details", {})
        report["steps"].append(r)
        counts = {k: sum(s["status"] == k for s in report["steps"]) for k in ("pass", "fail", "skipped")}
        report["summary"] = ", ".join(f"{v} {k}" for k, v in counts.items())
        report["total_s"] = time.time() - started
        write_report(out, report)  # after every step: a killed check still leaves its report

    run_steps(build_steps(args, out), out / "logs", deadline, record)
    print((out / "report.txt").read_text())
    print(f"report: {out / 'report.json'}, {out / 'report.txt'}")
    return 1 if any(s["status"] == "fail" for s in report["steps"]) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.gpu_check", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every step, time-boxed; report.json and report.txt in --out")
    r.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"))
    r.add_argument("--dry-run", action="store_true", help="the whole flow on CPU at toy sizes")
    r.add_argument("--budget", type=float, default=480.0, help="seconds for everything, setup included")
    r.add_argument("--steps", type=int, default=None, help="tiny-run steps (default 20, 2 in a dry run)")
    r.add_argument("--loss-rtol", type=float, default=None,
                   help="per-step relative loss tolerance, kernels on vs off (default 5e-2 bf16, 1e-4 dry run)")
    r.add_argument("--gpu-tests", default="tests", help="paths given to pytest -m gpu")
    r.add_argument("--bench-ops", default="", help="restrict the bench to these ops (comma-separated)")
    r.add_argument("--skip", default="", help=f"comma-separated steps to skip: {', '.join(STEPS[1:])}")
    r.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)  # from gpu-check.sh
    r.add_argument("--setup-rc", default=None, help=argparse.SUPPRESS)
    r.add_argument("--setup-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    r.add_argument("--setup-log", default=None, help=argparse.SUPPRESS)
    e = sub.add_parser("env", help="versions as JSON")
    e.add_argument("--json")
    s = sub.add_parser("smoke", help="launch every kernel once (kernels.check_kernels)")
    s.add_argument("--json")
    s.add_argument("--dry-run", action="store_true")
    h = sub.add_parser("huge-probe", help="one process: a recipe at micro-batch 1 with activation checkpointing")
    h.add_argument("--json")
    h.add_argument("--recipe", default="huge")
    h.add_argument("--data", required=True)
    h.add_argument("--run-dir", required=True)
    h.add_argument("--steps", type=int, default=2, help="steps taken (the first includes Triton's compiles)")
    h.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if args.cmd == "run":
        args.steps = args.steps or (2 if args.dry_run else 20)
        args.loss_rtol = args.loss_rtol if args.loss_rtol is not None else (1e-4 if args.dry_run else 5e-2)
        return cmd_run(args)
    if args.cmd == "env":
        data, rc = env_report(), 0
    elif args.cmd == "smoke":
        data = smoke_report(args.dry_run)
        rc = 1 if data.get("failed") else 0
    else:
        data = huge_probe(args.recipe, args.data, args.run_dir, args.overrides, args.steps)
        rc = 0 if data["fits"] else OOM_EXIT
    text = json.dumps(data, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
