"""The GPU check: every CUDA claim of the project exercised in one time-boxed run, one JSON, one summary table.

``bash benchmarks/gpu_check.sh`` makes a fresh virtual environment, installs torch and ``.[dev]`` into it and
then runs this driver with that environment's Python. The driver runs each step as a subprocess under its own
timeout, cut further to what is left of the overall budget (``--budget``, 8 minutes), so a hang costs at most
its step's time box and the run always ends with the JSON written:

* ``probe``: torch version, CUDA device, bf16 support;
* ``cuda_tests``: every test that skips without CUDA (found by their CUDA skip markers), which on a GPU must
  all run and pass;
* ``train_bf16``: the demo's Engram model trained with ``engram train`` (bf16 autocast on CUDA); the loss must
  fall (first vs last logged training loss, first vs last evaluation);
* ``bench_hashing``, ``bench_models`` (at a GPU size), ``bench_models_compile`` (the torch.compile'd train
  step), ``bench_offload`` (host-resident vs device-resident table, prefetch on and off: the paper's < 3%
  claim over PCIe) and ``bench_generate``.

Every markdown table a benchmark prints is parsed into the JSON (header -> cell), and a few key figures per
step go into the summary table. ``--dry-run`` runs the same steps on the CPU at tiny sizes with the current
Python (no environment is made, nothing is installed); ``tests/benchmarks/test_gpu_check.py`` runs it.

This module is also the pytest plugin that selects the CUDA tests (``-p gpu_check``): it only uses the
standard library, so it runs before torch is installed and in any interpreter.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: ~8 minutes, gpu_check/gpu_check.json
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc   # CPU, tiny sizes, ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CUDA_REASON = re.compile(r"cuda", re.IGNORECASE)
DRY_RUN_BOX_FACTOR = 5.0


# ------------------------------------------------------------------------------------------- pytest plugin
def pytest_collection_modifyitems(config, items) -> None:
    """Keep only the tests that carry a skip condition about CUDA (their ``reason`` names it); deselect the rest."""
    keep, drop = [], []
    for item in items:
        cuda = any(CUDA_REASON.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))
        (keep if cuda else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def cuda_test_files() -> list[str]:
    """Test files that mention a CUDA skip: only these are collected (collecting the whole suite costs more
    than running the CUDA tests)."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if "skipif" in text and "cuda" in text.lower():
            files.append(str(path.relative_to(ROOT)))
    return files


# ------------------------------------------------------------------------------------------- parsing output
def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as a list of rows (header -> cell); separator rows are dropped."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|") and line.strip().endswith("|"):
            block.append([c.strip() for c in line.strip()[1:-1].split("|")])
            continue
        if len(block) >= 2:
            header = unique_names(block[0])
            rows = [r for r in block[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            tables.append([dict(zip(header, r)) for r in rows if len(r) == len(header)])
        block = []
    return tables


def unique_names(header: list[str]) -> list[str]:
    """Repeated column names get " #2", " #3", ... so that no column is lost in the row dicts."""
    seen: dict[str, int] = {}
    out = []
    for name in header:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def number(cell: str | None) -> float | None:
    """The first number in a table cell ("1.63x numpy throughput" -> 1.63, "9,300" -> 9300), else None."""
    if cell is None:
        return None
    m = re.search(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?", cell)
    return float(m.group(0).replace(",", "")) if m else None


def find_row(tables: list[list[dict[str, str]]], column: str, pattern: str) -> dict[str, str] | None:
    """The first row whose ``column`` matches ``pattern`` (regex, case-insensitive) in any table."""
    for table in tables:
        for row in table:
            if re.search(pattern, row.get(column, ""), re.IGNORECASE):
                return row
    return None


# ------------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class Step:
    """One time-boxed subprocess. ``figures`` reads the key numbers from its output (stdout text, tables) and
    raises ``StepFailed`` when the output shows a failure the exit status does not (e.g. a loss that rose)."""

    name: str
    argv: list[str]
    timeout_s: float
    figures: Callable[[str, list], dict] = lambda text, tables: {}
    requires: str | None = None  # a flag the called script must define; otherwise the step is "missing"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    stdout_to: Path | None = None  # where a successful step's stdout is written (a file a later step reads)


class StepFailed(Exception):
    pass


def probe_figures(text: str, tables: list) -> dict:
    info = json.loads(text.strip().splitlines()[-1])
    return info


PROBE = """
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda,
                  "device_name": torch.cuda.get_device_name(0) if cuda else None,
                  "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
                  "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
                  "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
                  "cpu_threads": torch.get_num_threads()}))
"""


def cuda_tests_figures(junit: Path, dry_run: bool) -> Callable[[str, list], dict]:
    def read(text: str, tables: list) -> dict:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        names = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")]
        if counts["tests"] == 0:
            raise StepFailed("no CUDA test was selected")
        if not dry_run and counts["passed"] != counts["tests"]:
            raise StepFailed(f"on a GPU every CUDA test must run and pass: {counts}")
        return {**counts, "selected": names}

    return read


TRAIN_CONFIG = """
import json, sys
from engram.model import allocate
from engram.reports.compare import demo_base, demo_engram_template
spec = json.loads(sys.argv[1])
model = allocate(demo_base(), 0.75, demo_engram_template())
if spec.pop("tiny"):
    model = model.replace(num_layers=2, hidden_size=64, moe_intermediate_size=64, intermediate_size=192,
                          n_routed_experts=4, engram={**model.engram.to_dict(), "n_embed_per_ngram": 16,
                                                      "engram_vocab_size": [500, 500]})
optim = {"lr": 2e-3, "warmup_steps": spec.pop("warmup_steps")}
print(json.dumps({"model": model.to_dict(), "train": spec, "optim": optim}))  # JSON is YAML
"""


def train_figures(run_dir: Path) -> Callable[[str, list], dict]:
    def read(text: str, tables: list) -> dict:
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        train = [r for r in recs if r.get("kind") == "train"]
        evals = [r for r in recs if r.get("kind") == "eval"]
        if len(train) < 2 or len(evals) < 2:
            raise StepFailed(f"too few records to judge the loss: {len(train)} train, {len(evals)} eval")
        tps = sorted(r["tokens_per_s"] for r in train[1:])
        figures = {
            "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"],
            "first_val_loss": evals[0]["val_loss"],
            "last_val_loss": evals[-1]["val_loss"],
            "steps": train[-1]["step"],
            "median_tokens_per_s": tps[len(tps) // 2],
        }
        if not (figures["last_loss"] < figures["first_loss"] and figures["last_val_loss"] < figures["first_val_loss"]):
            raise StepFailed(f"the loss did not fall: {figures}")
        return figures

    return read


def hashing_figures(text: str, tables: list) -> dict:
    row = find_row(tables, "benchmark", r"NgramHasher\.hash, default")
    compiled = find_row(tables, "benchmark", r"compile=True")
    ref = find_row(tables, "benchmark", r"numpy")
    return {
        "torch_hash_tokens_per_s": number(row and row.get("tokens/s")),
        "numpy_tokens_per_s": number(ref and ref.get("tokens/s")),
        "vs_numpy": number(row and row.get("ratio")),
        "compiled_vs_numpy": number(compiled and compiled.get("ratio")),
    }


def models_figures(text: str, tables: list) -> dict:
    figures = {}
    for name in ("moe", "engram", "dense"):
        row = find_row(tables, "model", rf"^{name}$")
        figures[f"{name}_step_ms"] = number(row and row.get("step ms"))
        figures[f"{name}_vs_moe"] = number(row and row.get("vs moe"))
    return figures


def offload_figures(text: str, tables: list) -> dict:
    figures = {}
    for key, pattern in (("host_prefetch", r"^host, prefetch$"), ("host_no_prefetch", r"^host, no prefetch$")):
        row = find_row(tables, "variant", pattern) or {}
        # throughput / the device-resident baseline's (median over rounds): prefill, then decode columns
        figures[f"{key}_prefill_vs_device"] = number(row.get("vs device: median"))
        figures[f"{key}_decode_vs_device"] = number(row.get("vs device: median #2"))
    return figures


def generate_figures(text: str, tables: list) -> dict:
    figures = {}
    for table in tables:
        for row in table:
            if "tokens/s" in row and "model" in row and "batch" in row:
                figures[f"{row['model']} b{row['batch']} tokens/s"] = number(row["tokens/s"])
    return figures


def build_steps(args: argparse.Namespace, python: str) -> list[Step]:
    out = Path(args.out)
    dev = "cpu" if args.dry_run else "cuda"
    dry = args.dry_run
    junit = out / "cuda_tests.xml"
    run_dir = out / "train_bf16"
    spec = {
        "tiny": dry,
        "out_dir": str(run_dir),
        "device": dev,
        "steps": 40 if dry else 300,
        "batch_size": 8 if dry else 16,
        "seq_len": 64 if dry else 128,
        "eval_every": 20 if dry else 100,
        "eval_batches": 4 if dry else 10,
        "log_every": 10 if dry else 20,
        "ckpt_every": 1000,
        "max_bytes": 1_000_000 if dry else 4_000_000,
        "vocab_size": 512 if dry else 4096,
        "progress": False,
        "resume": False,
        "warmup_steps": 5 if dry else 30,
    }
    config_path = out / "train_bf16.yaml"
    hashing = (
        [
            "--batch",
            "2",
            "--seq",
            "256",
            "--vprime",
            "1000",
            "--table-size",
            "5000",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--hidden",
            "64",
            "--d-mem",
            "64",
            "--heads",
            "4",
            "--module-table-size",
            "1000",
            "--module-batch",
            "1",
            "--module-seq",
            "64",
        ]
        if dry
        else []
    )
    models = (
        [
            "--hidden",
            "64",
            "--layers",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--vocab",
            "512",
        ]
        if dry
        else [
            "--hidden",
            "1024",
            "--layers",
            "8",
            "--batch",
            "16",
            "--seq",
            "512",
            "--vocab",
            "32768",
            "--steps",
            "10",
            "--warmup",
            "3",
        ]
    )
    offload = (
        [
            "--table-mib",
            "8",
            "--hidden",
            "64",
            "--layers",
            "2",
            "--batch",
            "2",
            "--prefill-len",
            "32",
            "--gen-batch",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--rounds",
            "2",
            "--max-bytes",
            "300000",
            "--vocab",
            "512",
            "--tiers",
            "device,host",
        ]
        if dry
        else [
            "--table-mib",
            "2048",
            "--hidden",
            "1024",
            "--layers",
            "8",
            "--batch",
            "8",
            "--prefill-len",
            "512",
            "--gen-batch",
            "8",
            "--prompt-len",
            "64",
            "--new-tokens",
            "64",
            "--rounds",
            "4",
            "--tiers",
            "device,host",
        ]
    )
    generate = (
        ["--quick", "--hidden", "64", "--layers", "2"]
        if dry
        else ["--hidden", "1024", "--layers", "8", "--vocab", "32768", "--corpus-bytes", "1000000"]
        + ["--positions", "128,1024,4096"]
    )
    py = [python]
    # a dry run shares a CPU machine with other work: its time boxes are wider, the mechanism the same
    box = DRY_RUN_BOX_FACTOR if dry else 1.0
    return [
        Step("probe", [*py, "-c", PROBE], 60 * box, probe_figures),
        Step(
            "cuda_tests",
            [*py, "-m", "pytest", "-p", "gpu_check", "-q", "-rs", f"--junitxml={junit}", *cuda_test_files()],
            120 * box,
            cuda_tests_figures(junit, dry),
            env={"PYTHONPATH": str(BENCH)},
        ),
        Step("train_config", [*py, "-c", TRAIN_CONFIG, json.dumps(spec)], 60 * box, stdout_to=config_path),
        Step(
            "train_bf16",
            [*py, "-m", "engram.cli", "train", "--config", str(config_path)],
            150 * box,
            train_figures(run_dir),
        ),
        Step(
            "bench_hashing",
            [*py, str(BENCH / "bench_hashing.py"), "--device", dev, *hashing],
            60 * box,
            hashing_figures,
        ),
        Step("bench_models", [*py, str(BENCH / "bench_models.py"), "--device", dev, *models], 90 * box, models_figures),
        Step(
            "bench_models_compile",
            [*py, str(BENCH / "bench_models.py"), "--device", dev, "--compile", *models],
            150 * box,
            models_figures,
            requires="--compile",
        ),
        Step(
            "bench_offload",
            [*py, str(BENCH / "bench_offload.py"), "--device", dev, *offload],
            120 * box,
            offload_figures,
        ),
        Step(
            "bench_generate",
            [*py, str(BENCH / "bench_generate.py"), "--device", dev, *generate],
            120 * box,
            generate_figures,
        ),
    ]


def run_step(step: Step, out: Path, deadline: float, env: dict[str, str]) -> dict:
    """Run one step under min(its time box, what is left of the budget); never raises."""
    left = deadline - time.monotonic()
    rec = {"name": step.name, "command": step.argv, "timeout_s": round(min(step.timeout_s, left), 1)}
    if step.requires and f'"{step.requires}"' not in Path(step.argv[1]).read_text(encoding="utf-8"):
        return {
            **rec,
            "status": "missing",
            "seconds": 0.0,
            "error": f"{Path(step.argv[1]).name} has no {step.requires} option in this checkout",
        }
    if left < 5:
        return {**rec, "status": "skipped", "error": "the overall budget was spent before this step"}
    log = out / "logs" / f"{step.name}.log"
    t0 = time.monotonic()
    step_env = {**env, **step.env}
    if "PYTHONPATH" in step.env and env.get("PYTHONPATH"):
        step_env["PYTHONPATH"] = step.env["PYTHONPATH"] + os.pathsep + env["PYTHONPATH"]
    try:
        proc = subprocess.run(
            step.argv, check=False, cwd=ROOT, env=step_env, capture_output=True, text=True, timeout=rec["timeout_s"]
        )
        text, rc, status = proc.stdout, proc.returncode, "ok" if proc.returncode == 0 else "failed"
        log.write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
        error = None if rc == 0 else proc.stderr.strip().splitlines()[-1:] or [f"exit status {rc}"]
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, status, error = None, "timeout", [f"killed after {rec['timeout_s']} s"]
        log.write_text(text)
    rec.update(
        status=status, rc=rc, seconds=round(time.monotonic() - t0, 2), log=str(log), error=error[0] if error else None
    )
    tables = markdown_tables(text)
    rec["tables"] = tables
    if status == "ok" and step.stdout_to is not None:
        step.stdout_to.write_text(text)
    if status == "ok":
        try:
            rec["figures"] = step.figures(text, tables)
        except (StepFailed, OSError, ValueError, KeyError, IndexError, ET.ParseError) as e:
            rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    return rec


def summary_table(result: dict) -> str:
    lines = ["| step | status | seconds | key figures |", "|---|---|---:|---|"]
    for s in result["steps"]:
        figs = s.get("figures") or {}
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in figs.items()
            if not isinstance(v, (list, dict))
        )
        note = shown or (s.get("error") or "")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} | {note[:160]} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, current Python, no installs")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, logs and the training run")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check, setup included (default 480; 1800 for a dry run)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter of the steps (the one with torch)")
    p.add_argument("--only", default="", help="comma list of step names to run (default: all)")
    p.add_argument("--setup-json", default=None, help="written by gpu_check.sh: the setup step's record")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 480.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    start_wall = time.time()
    if args.setup_json:
        setup = json.loads(Path(args.setup_json).read_text())
    else:
        setup = {
            "name": "setup",
            "status": "skipped",
            "seconds": 0.0,
            "error": "dry run: no environment made" if args.dry_run else "no --setup-json: current Python used",
        }
    # the budget counts the setup's time too
    deadline = time.monotonic() + args.budget - float(setup.get("seconds", 0.0))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "ENGRAM_CACHE_DIR": str(out / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run must not touch a GPU even where one exists
    only = {s for s in args.only.split(",") if s} | {"probe"}
    steps = [s for s in build_steps(args, args.python) if args.only == "" or s.name in only]
    records, probe = [setup], {}
    for step in steps:
        if setup["status"] == "failed":
            rec = {"name": step.name, "command": step.argv, "status": "skipped", "error": "setup failed"}
        elif step.name != "probe" and probe.get("status") != "ok":
            rec = {
                "name": step.name,
                "command": step.argv,
                "status": "skipped",
                "error": f"probe {probe.get('status')}: {probe.get('error')}",
            }
        else:
            rec = run_step(step, out, deadline, env)
        if step.name == "probe":
            if rec["status"] == "ok" and not args.dry_run and not rec["figures"]["cuda_available"]:
                rec.update(status="failed", error="torch sees no CUDA device")
            probe = rec
        records.append(rec)
        print(f"[gpu_check] {rec['name']}: {rec['status']} ({rec.get('seconds', 0):.1f} s)", flush=True)
    result = {
        "dry_run": args.dry_run,
        "device": "cpu" if args.dry_run else "cuda",
        "budget_s": args.budget,
        "started_unix": round(start_wall, 1),
        "wall_s": round(time.time() - start_wall + float(setup.get("seconds", 0.0)), 1),
        "machine": probe.get("figures"),
        "steps": records,
        "missing": [r["name"] for r in records if r["status"] == "missing"],
        "ok": all(r["status"] in ("ok", "missing") for r in records if r["name"] != "setup")
        and setup["status"] in (("ok", "skipped") if args.dry_run or not args.setup_json else ("ok",)),
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print()
    print(summary_table(result))
    if result["missing"]:
        print(f"\nNOT RUN, their code is not in this checkout: {', '.join(result['missing'])}")
    print(
        f"\n{'all steps ok' if result['ok'] else 'SOME STEPS FAILED'} in {result['wall_s']:.0f} s; "
        f"JSON: {out / 'gpu_check.json'}, logs: {out / 'logs'}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
