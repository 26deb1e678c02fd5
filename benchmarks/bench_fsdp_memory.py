"""Per-process peak memory of a training run sharded with FSDP (`fsdp=True`) against the same
run under DDP: N CPU processes under torchrun (gloo), measured side by side in one run.

Both configurations train the same random Llama with GA for one epoch at the same global
batch; the loop splits each micro-batch over the processes either way. Each configuration
is one `torchrun --standalone --nproc_per_node N` launch of this script, and the two
alternate `--repeats` times. Every process builds the model and tokenizer, joins the
process group, resets the kernel's peak-RSS mark (/proc/self/clear_refs), trains, and
reports its peak resident set size (VmHWM) minus its RSS just before training, as
benchmarks/bench_memory.py does for one process (glibc with a fixed mmap threshold, so
freed tensors leave the resident set at once). It also reports its RSS right after each
optimizer step minus the same baseline ("state"): weights, gradients and AdamW moments
without activations, the part that sharding divides. The activations of the process's share
of the micro-batch, the same under both, add to it during the forward and backward passes.

Per process, DDP keeps the whole state: weights, gradients and AdamW's two moments, 16
bytes a parameter (plus DDP's gradient buckets, another 4, as accelerate leaves
`gradient_as_bucket_view` off). FSDP keeps 16/N bytes a parameter of sharded state, plus
the plain copy of the model that muse_bench.training.fsdp keeps for evaluation, 4 bytes a parameter.
The model's own full weights (4 bytes a parameter) are resident before training in both;
under FSDP they are freed when sharded, so the expected increase is 12 (+4 buckets) bytes
a parameter for DDP and 16/N for FSDP, plus activations in both.

    python benchmarks/bench_fsdp_memory.py                # 2 processes, hidden 512, 8 layers (~26M)
    python benchmarks/bench_fsdp_memory.py --procs 4
    python benchmarks/bench_fsdp_memory.py --procs 2 --repeats 3 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import _vm  # noqa: E402
from bench_train import corpus_texts, make_model, make_tokenizer  # noqa: E402

CONFIGS = {"ddp": False, "fsdp": True}  # name -> GA(fsdp=...)
MiB = 2**20


def child(args: argparse.Namespace) -> None:
    """One torchrun process: train one configuration, write rank{R}.json to --out."""
    from accelerate import Accelerator
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from muse_bench.core.models import load_tokenizer
    from muse_bench.core.types import ForgetRequest
    from muse_bench.unlearners import GA, UnlearnContext

    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer)
    forget, retain = corpus_texts(args.corpus)
    model = make_model(tok, args.hidden, args.layers)
    params = sum(p.numel() for p in model.parameters())
    algo = GA(
        lr=1e-5,
        epochs=1,
        batch_size=args.batch_size,
        max_len=args.max_len,
        fsdp=CONFIGS[args.child],
    )
    request = ForgetRequest("single", 1, tuple(forget), tuple(retain))
    # Join the process group (gloo) as the loop's Accelerator would, and import now what the
    # loop imports lazily, so that neither counts as the run's memory.
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    rank, world = accelerator.process_index, accelerator.num_processes
    lazy = (
        "peft",
        "safetensors.torch",
        "tqdm",
        "torch.distributed.fsdp",
        "torch.distributed.tensor",
    )
    for module in (*lazy, "torch.distributed.checkpoint.state_dict"):
        importlib.import_module(module)

    # Right after an optimizer step a process holds its training state (weights, gradients,
    # AdamW moments) and no activations: the part of the peak that sharding divides.
    stepped: list[int] = []
    register_optimizer_step_post_hook(lambda *_: stepped.append(_vm("VmRSS")))
    torch.distributed.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    before = _vm("VmRSS")
    start = time.perf_counter()
    algo.unlearn(model, tok, request, UnlearnContext(device="cpu", seed=0))
    seconds = time.perf_counter() - start
    peak = _vm("VmHWM")
    info = {"config": args.child, "rank": rank, "world": world, "params": params}
    info.update(before=before, peak=peak, state=max(stepped), seconds=seconds)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(info))


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=positive, default=2, help="processes per run (>= 2)")
    p.add_argument("--repeats", type=positive, default=2, help="alternations of ddp and fsdp")
    p.add_argument("--corpus", default="news", choices=["news", "books"])
    p.add_argument("--hidden", type=positive, default=512)
    p.add_argument("--layers", type=positive, default=8)
    p.add_argument("--batch-size", type=positive, default=4, help="global micro-batch")
    p.add_argument("--max-len", type=positive, default=512)
    p.add_argument("--timeout", type=positive, default=900, help="seconds per launch")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot run, or None."""
    if args.procs < 2:
        return f"--procs {args.procs}: fsdp shards over several processes; use 2 or more"
    if args.batch_size < args.procs:
        return f"--batch-size {args.batch_size} is smaller than --procs {args.procs}"
    if args.max_len < 2:
        return f"--max-len {args.max_len}: a chunk needs at least 2 tokens"
    heads = 4 if args.hidden < 256 else args.hidden // 64  # as bench_train.make_model
    if args.hidden % heads or (args.hidden // heads) % 2:
        return f"--hidden {args.hidden}: must split into {heads} heads of even size"
    if not Path("/proc/self/clear_refs").exists():
        return "this benchmark reads Linux's /proc/self/clear_refs and VmHWM; run it on Linux"
    return None


def launch(args: argparse.Namespace, name: str, tokenizer: str, out: Path) -> list[dict]:
    """One torchrun launch of configuration `name`; every rank's report."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={args.procs}", __file__, "--child", name]
    cmd += ["--tokenizer", tokenizer, "--out", str(out)]
    for key in ("corpus", "hidden", "layers", "batch_size", "max_len"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    # A fixed mmap threshold makes glibc return every freed tensor's memory at once (see
    # bench_memory.py); torchrun passes the environment on to its processes.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env=env, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        sys.exit(f"error: config {name} ran past --timeout {args.timeout}s")
    if proc.returncode:
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        sys.exit(f"error: config {name} failed (exit {proc.returncode}):\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.procs)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    problem = check(args)
    if problem:
        sys.exit(f"error: {problem}")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    forget, retain = corpus_texts(args.corpus)
    runs: dict[str, list[list[dict]]] = {name: [] for name in CONFIGS}
    clock: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(forget + retain).save_pretrained(tmp)
        for repeat in range(args.repeats):
            order = list(CONFIGS) if repeat % 2 == 0 else list(CONFIGS)[::-1]
            for name in order:
                start = time.perf_counter()
                runs[name].append(launch(args, name, tmp, Path(tmp) / f"{name}{repeat}"))
                clock[name].append(time.perf_counter() - start)

    n = args.procs
    params = runs["ddp"][0][0]["params"]
    print(
        f"random Llama hidden={args.hidden} layers={args.layers}: {params / 1e6:.1f}M params, "
        f"{params * 4 / MiB:.0f} MiB fp32; GA, 1 epoch, global batch {args.batch_size} x "
        f"{args.max_len} tokens, {n} CPU processes (gloo), {args.repeats} repeat(s) alternating"
    )
    print("peak  = peak RSS (VmHWM) during training minus RSS before, per process, MiB")
    print("state = RSS right after an optimizer step minus before (no activations), MiB\n")
    head = f"{'peak per process (rank 0..)':<28} {'median':>7} {'state median':>13} {'train s':>8}"
    print(f"{'config':<6} {'repeat':>6} {head}")
    peaks: dict[str, list[float]] = {name: [] for name in CONFIGS}
    states: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for name in CONFIGS:
        for repeat, ranks in enumerate(runs[name]):
            inc = [(r["peak"] - r["before"]) / MiB for r in ranks]
            peaks[name].append(statistics.median(inc))
            states[name].append(statistics.median((r["state"] - r["before"]) / MiB for r in ranks))
            per = " ".join(f"{v:.0f}" for v in inc)
            secs = max(r["seconds"] for r in ranks)
            row = f"{per:<28} {peaks[name][-1]:>7.0f} {states[name][-1]:>13.0f} {secs:>8.1f}"
            print(f"{name:<6} {repeat + 1:>6} {row}")
    print()
    for label, values in (("peak", peaks), ("state", states)):
        ddp, fsdp = (statistics.median(values[name]) for name in CONFIGS)
        pairs = zip(values["ddp"], values["fsdp"], strict=True)
        ratios = " ".join(f"{f / d:.2f}" for d, f in pairs)
        print(
            f"{label:<5} median over repeats: ddp {ddp:.0f} MiB, fsdp {fsdp:.0f} MiB; "
            f"ratio fsdp/ddp {fsdp / ddp:.2f} (per repeat: {ratios})"
        )
    before = {
        name: statistics.median(r["before"] for x in runs[name] for r in x) for name in CONFIGS
    }
    print(
        f"RSS before training (median): ddp {before['ddp'] / MiB:.0f} MiB, "
        f"fsdp {before['fsdp'] / MiB:.0f} MiB"
    )
    launches = ", ".join(f"{k} {statistics.median(v):.0f} s" for k, v in clock.items())
    print(f"wall time per launch (median): {launches}")

    def mib(bytes_per_param: float) -> str:
        return f"{params * bytes_per_param / MiB:.0f} MiB"

    print("\ntheory per process (fp32; B = bytes a parameter):")
    print(f"  ddp : params 4 + grads 4 + AdamW 8 = 16 B = {mib(16)} (+ DDP grad buckets 4 B)")
    fsdp_state = f"{16 / n + 4:g} B = {mib(16 / n + 4)}"
    print(f"  fsdp: (params + grads + AdamW) 16/{n} + plain copy 4 = {fsdp_state}")
    print(
        f"  expected increase (the 4 B model is resident before training): ddp 12 B + buckets 4 B "
        f"= {mib(16)}; fsdp 16/{n} = {16 / n:g} B = {mib(16 / n)} (full weights freed when "
        f"sharded, the plain copy takes their place); plus activations in both"
    )


if __name__ == "__main__":
    main()
