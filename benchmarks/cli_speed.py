"""The command line's speed against the load + save floor and the peers (issue 16), as whole processes.

Each command runs as a fresh process, round-robin (so that a change in the machine's load falls on every
command alike), ``--repeats`` times; the table shows medians of wall time, CPU time (user + system, from
``wait4``: what the process itself spent, less sensitive to other processes on the machine than wall time)
and peak resident memory (``ru_maxrss`` of that process), and each as a ratio to the floor,
``onnx.save(onnx.load(A), B)``. Peers (``onnxslim``, ``onnxsim``) run when installed. Then the Conv->BN
chain scaling: ``fold_onnx(verify=False)`` CPU time per pair on ``conv_bn_chain(N)``, in this process.

Run: .venv/bin/python benchmarks/cli_speed.py [--models resnet50,mobilenet_v2] [--repeats 5] [--large]
[--baseline ../other-checkout]
(``--large`` adds the 2.25 GiB external-data chain of ``large_model.py``: builds it once, minutes;
``--baseline`` adds the bnfold rows of another checkout, e.g. the main branch, measured in the same rounds.)
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS_DIR = HERE / ".cache" / "models-v1"  # shared with compare_folders.py
PYTHON = sys.executable
BNFOLD = [PYTHON, "-c", "import sys; from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()"]
FLOOR = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
# A model past 2 GiB cannot be one protobuf: the floor writes its tensors to a data file, as bnfold does.
FLOOR_EXTERNAL = (
    "import os, sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True, "
    "location=os.path.basename(sys.argv[2]) + '.data')"
)
LARGE_GIB = 2.25
CHAIN_SIZES = (500, 8000)


def exported(name: str) -> Path:
    """The cached export of architecture ``name`` (compare_folders.py writes the same files)."""
    path = MODELS_DIR / f"{name}.onnx"
    if not path.exists():
        from bnfold.architectures import example_image, realistic_model
        from bnfold.testing import export_onnx

        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp.onnx")
        export_onnx(realistic_model(name), example_image(name), staging)
        staging.replace(path)
    return path


def large_model() -> Path:
    import large_model

    path = large_model.CACHE / f"chain_{LARGE_GIB:g}gib.onnx"
    if not path.exists():
        # Built in a child: a process started by fork keeps its parent's peak in ru_maxrss, so a parent that
        # had held the 2.25 GiB model would show that peak for every command measured after it.
        large_model.CACHE.mkdir(parents=True, exist_ok=True)
        build = f"import sys; sys.path.insert(0, {str(HERE)!r}); import large_model, pathlib; large_model.build(pathlib.Path({str(path)!r}), {LARGE_GIB})"
        subprocess.run([PYTHON, "-c", build], check=True)
    return path


def commands(model: Path, scratch: Path, external: bool, baseline: Path | None) -> dict[str, list[str] | None]:
    """The commands measured on ``model``, by row label, each writing a file of its own in ``scratch``;
    None for a peer that is not installed."""
    rows = {"floor: onnx.load + onnx.save": [PYTHON, "-c", FLOOR_EXTERNAL if external else FLOOR, str(model), str(scratch / "floor.onnx")]}
    for root, tag in ((REPO, ""), (baseline, f" ({baseline.name})" if baseline else "")):
        if root is None:
            continue
        run_from = ["env", f"PYTHONPATH={root}"]
        rows[f"bnfold A -o B --no-verify{tag}"] = [*run_from, *BNFOLD, str(model), "-o", str(scratch / f"unverified{tag}.onnx"), "--no-verify"]
        rows[f"bnfold A -o B{tag}"] = [*run_from, *BNFOLD, str(model), "-o", str(scratch / f"verified{tag}.onnx")]
    for tool in ("onnxslim", "onnxsim"):
        executable = shutil.which(tool, path=str(Path(PYTHON).parent)) or shutil.which(tool)
        rows[f"{tool} A B"] = [executable, str(model), str(scratch / f"{tool}.onnx")] if executable else None
    return rows


def run(command: list[str]) -> tuple[float, float, int, int]:
    """Wall time, CPU time (user + system), peak RSS in bytes and exit code of one process."""
    started = time.perf_counter()
    # From a neutral folder: `python -c` puts the working directory first on sys.path, before PYTHONPATH.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        print(f"  exit {process.returncode}: {' '.join(command[-4:])}: {process.stderr.read().decode()[-300:]}", file=sys.stderr)
    process.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, process.returncode


def measure(rows: dict[str, list[str] | None], repeats: int) -> dict[str, tuple[float, float, int] | str]:
    """Medians over ``repeats`` round-robin runs of every command (after one unmeasured warm-up round)."""
    runnable = {label: command for label, command in rows.items() if command}
    samples: dict[str, list[tuple[float, float, int, int]]] = {label: [] for label in runnable}
    for round_ in range(repeats + 1):
        for label, command in runnable.items():
            result = run(command)
            if round_:
                samples[label].append(result)
    medians: dict[str, tuple[float, float, int] | str] = {}
    for label in rows:
        results = samples.get(label)
        if results is None:
            medians[label] = "not installed"
        elif any(code for *_, code in results):
            medians[label] = f"exit {max(code for *_, code in results)}"
        else:
            medians[label] = tuple(statistics.median(values) for values in list(zip(*results))[:3])
    return medians


def table(title: str, medians: dict, floor_label: str) -> str:
    floor = medians[floor_label]
    lines = [f"{title}", "", "| command | wall s | × floor | CPU s | × floor | peak MiB | × floor |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, result in medians.items():
        if isinstance(result, str):
            lines.append(f"| `{label}` | {result} | | | | | |")
            continue
        wall, cpu, rss = result
        lines.append(
            f"| `{label}` | {wall:.2f} | {wall / floor[0]:.2f} | {cpu:.2f} | {cpu / floor[1]:.2f} | "
            f"{rss / 2**20:.0f} | {rss / floor[2]:.2f} |"
        )
    return "\n".join(lines)


def startup(repeats: int) -> str:
    run_from = ["env", f"PYTHONPATH={REPO}"]
    rows = {"bnfold --help": [*run_from, *BNFOLD, "--help"], "bnfold --version": [*run_from, *BNFOLD, "--version"], "python -c pass": [PYTHON, "-c", "pass"]}
    medians = measure(rows, repeats)
    lines = ["Start-up (target: under 0.3 s)", "", "| command | wall s | CPU s | peak MiB |", "|---|---:|---:|---:|"]
    lines += [f"| `{label}` | {wall:.2f} | {cpu:.2f} | {rss / 2**20:.0f} |" for label, (wall, cpu, rss) in medians.items()]
    return "\n".join(lines)


def chain_scaling(repeats: int) -> str:
    """``fold_onnx(verify=False)`` CPU time per pair: the least of ``repeats`` runs per size."""
    from bnfold.onnx_fold import fold_onnx
    from bnfold.testing import conv_bn_chain

    models = {pairs: conv_bn_chain(pairs) for pairs in CHAIN_SIZES}
    times: dict[int, list[float]] = {pairs: [] for pairs in CHAIN_SIZES}
    for round_ in range(repeats + 1):  # round-robin, as the commands
        for pairs, model in models.items():
            started = time.process_time()
            fold_onnx(model, verify=False)
            if round_:
                times[pairs].append(time.process_time() - started)
    per_pair = {pairs: min(costs) / pairs for pairs, costs in times.items()}
    lines = ["Conv->BN chains, `fold_onnx(verify=False)` on the ModelProto (target: per pair at 8000 within 1.3x of 500)", ""]
    lines += ["| pairs | CPU ms | µs/pair |", "|---:|---:|---:|"]
    lines += [f"| {pairs} | {cost * pairs * 1e3:.1f} | {cost * 1e6:.1f} |" for pairs, cost in per_pair.items()]
    first, last = per_pair[CHAIN_SIZES[0]], per_pair[CHAIN_SIZES[-1]]
    lines += ["", f"µs/pair at {CHAIN_SIZES[-1]} / at {CHAIN_SIZES[0]}: **{last / first:.2f}**"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large", action="store_true", help=f"also the {LARGE_GIB} GiB external-data chain")
    parser.add_argument("--baseline", type=Path, help="another checkout whose bnfold rows to add, e.g. the main branch")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    models = {name: (exported(name), False) for name in args.models.split(",") if name}
    if args.large:
        models[f"chain_{LARGE_GIB:g}gib (external data)"] = (large_model(), True)
    for root in filter(None, (REPO, args.baseline)):
        # An installed wheel has its modules compiled at install; a checkout run with PYTHONDONTWRITEBYTECODE
        # set (as on the machine these figures come from) would compile bnfold at every run: 0.05-0.1 s.
        compileall.compile_dir(root / "bnfold", quiet=1)
    load = os.getloadavg()
    sections = [startup(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="bnfold-cli-speed-") as scratch:
        for name, (path, external) in models.items():
            print(f"measuring {name}", file=sys.stderr)
            size = sum(file.stat().st_size for file in path.parent.glob(path.name + "*"))
            rows = commands(path, Path(scratch), external, args.baseline and args.baseline.absolute())
            sections.append(table(f"{name} ({size / 2**20:.0f} MiB), medians of {args.repeats}", measure(rows, args.repeats), next(iter(rows))))
    sections.append(chain_scaling(args.repeats))
    print(f"{os.cpu_count()} CPUs; load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
