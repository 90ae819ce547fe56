"""Mutation testing of the core modules with mutmut: which small bugs does the test suite miss?

    python -m benchmarks.mutation [MODULE ...] [--max-children 2] [--report benchmarks/MUTATION.md]
    python -m benchmarks.mutation --list

Not part of the test run (it takes minutes to hours): each MODULE below is mutated by mutmut
(https://github.com/boxed/mutmut, 3.x) in a scratch copy of the repository, with the test selection given
here, so a mutant runs only the tests that exercise the function it changes (mutmut records which test
calls which function in a first, clean run). The script then writes a report: per module the mutants
killed, survived, untested (no selected test calls the function) and timed out, and every survivor's
diff with its explanation from ``benchmarks/mutation_equivalent.toml`` (a survivor that computes the same
function as the original, or one whose effect no promise covers) or ``UNEXPLAINED``. The target
(issue 16): at least 90% of the mutants killed in each module, every survivor killed or explained.

Why mutmut rather than cosmic-ray: cosmic-ray starts a fresh test process per mutant (numpy, onnx and
onnxruntime imports alone cost seconds, torch more), while mutmut forks workers from a process that has
imported everything and runs only the tests that reach the mutated function. mutmut runs its own
workers (``--max-children``) instead of pytest-xdist, whose plugin is disabled in the mutant runs.
Install: ``pip install -e ".[mutation]"`` (pins mutmut 3.8.1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.machine import describe

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"


@dataclass(frozen=True)
class Module:
    """One mutation run: the files mutmut mutates and the tests that judge them."""

    files: tuple[str, ...]
    tests: tuple[str, ...]


# Test selections: the tests that exercise a module directly (end-to-end tests elsewhere would also kill
# mutants, but would make each run many times slower). Paths are pytest node ids.
MODULES: dict[str, Module] = {
    "fpe": Module(("neurorewrite/fpe/*",), ("tests/core",)),  # ~890 mutants, ~25 min on 2 cores
    "expand_blocks": Module(("neurorewrite/passes/expand_blocks.py",), (
        "tests/passes/test_expand.py", "tests/passes/test_expand_values.py", "tests/core/test_fpe_gated.py",
        "tests/families/test_families_expand.py",  # gated ONNX blocks (split and separate up projections)
        "tests/passes/test_expand_report.py",
        "tests/passes/test_expand_inputs.py",  # gated biases, prune scales, a shared down bias
        "tests/core/test_fpe_split_tiered.py",  # the inputs' rms reaching the tiered split through expand
    )),
    "calibrate": Module(("neurorewrite/passes/calibrate.py",), (
        "tests/passes/test_calibrate.py", "tests/passes/test_calibrate_real_output.py",
        "tests/passes/test_calibrate_sample.py", "tests/passes/test_tie_outputs.py",
        "tests/passes/test_calibrate_options.py", "tests/passes/test_calibrate_model.py",
        "tests/passes/test_calibrate_constant_inputs.py",
    )),
    "fold_tied": Module(("neurorewrite/passes/fold_tied.py",), (
        "tests/passes/test_fold_tied.py", "tests/passes/test_fold_untied.py", "tests/passes/test_fold_report.py",
        "tests/passes/test_prepare.py",
    )),
    "models_fpe": Module(("neurorewrite/models/fpe.py",), (
        "tests/models/test_fpe_torch.py", "tests/models/test_fpe_structured.py", "tests/models/test_finetune_masks.py",
        "tests/models/test_mask_enforcement.py", "tests/models/test_fpe_layer_promises.py",
        "tests/models/test_fpe_gated_torch.py", "tests/models/test_fpe_hf.py", "tests/models/test_module_blocks.py",
    )),
    "memel": Module(("neurorewrite/models/memel*.py",), (
        "tests/models/test_memel.py", "tests/models/test_memel_insert.py", "tests/models/test_memel_distributed.py",
        "tests/models/test_memel_fused.py", "tests/models/test_checkpoints.py", "tests/models/test_memel_native.py",
        "tests/models/test_memel_parts.py",
    )),
    "io": Module(("neurorewrite/rewriter/io.py",), (
        "tests/rewriter/test_io_save.py", "tests/test_cli_expand.py", "tests/test_cli_errors.py",
        "tests/attack/test_corrupt_inputs.py", "tests/attack/test_nonfinite.py", "tests/rewriter/test_io_checks.py",
        "tests/rewriter/test_io_errors.py",
        "tests/passes/test_expand.py::test_external_data_models_round_trip",
    )),
}

# mutmut's exit codes, as its ``stats.status_by_exit_code`` names them
STATUS_NAMES = ("killed", "survived", "no tests", "timeout", "suspicious", "skipped", "caught by type check",
                "not checked", "segfault", "check was interrupted by user")


@dataclass
class ModuleResult:
    name: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[tuple[str, str]] = field(default_factory=list)  # (mutant name, diff)
    error: str | None = None

    @property
    def tested(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "no tests")

    @property
    def score(self) -> float:
        """Killed (a test failed), timed out (a test ran past mutmut's limit: an endless loop is caught
        too) or crashed (the test process died of a signal, e.g. a segfault in the C kernel: the test run
        fails), out of every mutant, including those no selected test reaches."""
        total = sum(self.counts.values())
        detected = sum(self.counts.get(k, 0) for k in ("killed", "timeout", "crashed"))
        return detected / total if total else float("nan")


def repo_files() -> list[Path]:
    """The files of the working tree that git tracks or would track (what a clean clone plus local edits has)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [Path(p) for p in out.splitlines() if (ROOT / p).is_file()]


def mutmut_config(module: Module) -> str:
    lines = [
        "[tool.mutmut]",
        'source_paths = ["neurorewrite"]',
        f"only_mutate = {json.dumps(list(module.files))}",
        f"pytest_add_cli_args_test_selection = {json.dumps(list(module.tests))}",
        # xdist off (mutmut runs its own workers); the slow tier stays out as in the default run
        'pytest_add_cli_args = ["-p", "no:xdist", "-p", "no:cacheprovider", "-q"]',
        'also_copy = ["examples", "benchmarks"]',
        # torch and onnxruntime are not fork-safe once used: fork each mutant from a clean server process
        'process_isolation = "forkserver"',
        "timeout_multiplier = 10.0",
    ]
    return "\n".join(lines) + "\n"


def prepare(scratch: Path, module: Module) -> None:
    if scratch.exists():
        shutil.rmtree(scratch)
    for rel in repo_files():
        dest = scratch / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    pyproject = scratch / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text + "\n" + mutmut_config(module))


# run in the scratch copy: the diff of every named mutant, as mutmut's ``show`` prints it, in one process
_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
wanted = json.loads(sys.stdin.read())
print(json.dumps({name: get_diff_for_mutant(name, path=path) for name, path in wanted}))
"""


def collect(scratch: Path, result: ModuleResult) -> None:
    """Read mutmut's per-file results (``mutants/<file>.meta``) and the survivors' diffs."""
    from mutmut.stats import status_by_exit_code

    survivors = []
    for meta in sorted((scratch / "mutants").rglob("*.py.meta")):
        source = meta.relative_to(scratch / "mutants").with_suffix("")  # neurorewrite/fpe/split.py
        data = json.loads(meta.read_text())
        for name, code in sorted(data.get("exit_code_by_key", {}).items()):
            # a test process killed by a signal (not mutmut's timeout) is a failed test run, not a survivor
            status = status_by_exit_code[code]
            if code is not None and code < 0 and status != "timeout":
                status = "crashed"
            result.counts[status] = result.counts.get(status, 0) + 1
            if status == "survived":
                survivors.append((name, str(source)))
    if survivors:
        out = subprocess.run([sys.executable, "-c", _DIFFS], cwd=scratch, input=json.dumps(survivors),
                             capture_output=True, text=True, check=True).stdout
        diffs = json.loads(out)
        result.survivors = [(name, diffs[name]) for name, _ in survivors]


def run_module(name: str, module: Module, work: Path, max_children: int, limit_s: int) -> ModuleResult:
    scratch = work / name
    prepare(scratch, module)
    # the real exports are made once and reused by every mutant's test session
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "NEUROREWRITE_EXPORT_CACHE": str(work / "exports")}
    start = time.perf_counter()
    result = ModuleResult(name, 0.0)
    try:
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                              cwd=scratch, env=env, capture_output=True, text=True, timeout=limit_s)
        (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            result.error = f"mutmut exited {proc.returncode}; log: {work / f'{name}.log'}"
    except subprocess.TimeoutExpired:
        result.error = f"stopped after {limit_s} s; partial results"
    result.seconds = time.perf_counter() - start
    collect(scratch, result)
    return result


def load_explanations() -> dict[str, dict[str, str]]:
    if not EQUIVALENT.is_file():
        return {}
    return tomllib.loads(EQUIVALENT.read_text()).get("mutant", {})


def explanation(name: str, diff: str, explained: dict[str, dict[str, str]]) -> str | None:
    """The stored reason for a survivor, if its stored mutated line is still what the mutant changes."""
    entry = explained.get(name)
    if entry is None:
        return None
    if entry.get("line", "").strip() and entry["line"].strip() not in diff:
        return None  # the function changed since the explanation was written: judge it again
    return entry["reason"]


def render(results: list[ModuleResult], machine: str, command: str, note: str = "") -> str:
    explained = load_explanations()
    lines = [
        "# Mutation testing (mutmut)", "",
        f"Produced by `{command}` on {machine}.", *([note] if note else []), "",
        "detected % = (killed + timeout + crashed) / mutants: a timeout is a mutant whose tests ran past mutmut's",
        "limit (an endless loop is caught too); crashed: the test process died of a signal (a segfault or abort",
        "in the C kernel), so the test run fails. No tests: no selected test calls the mutated function.", "",
        "| module | mutants | killed | survived | no tests | timeout | crashed | other | detected % | explained survivors | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.counts
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "no tests", "timeout", "crashed"))
        n_expl = sum(explanation(n, d, explained) is not None for n, d in r.survivors)
        lines.append(
            f"| {r.name} | {sum(c.values())} | {c.get('killed', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} "
            f"| {c.get('timeout', 0)} | {c.get('crashed', 0)} | {other} | {100 * r.score:.1f} | {n_expl}/{len(r.survivors)} "
            f"| {'-' if r.seconds != r.seconds else f'{r.seconds / 60:.1f}'} |"
        )
    for r in results:
        lines += ["", f"## {r.name}", ""]
        if r.error:
            lines += [f"Run problem: {r.error}", ""]
        if not r.survivors:
            lines.append("No survivors.")
            continue
        for name, diff in r.survivors:
            why = explanation(name, diff, explained)
            lines += [f"### `{name}`", "", f"{'Equivalent / not a promise: ' + why if why else '**UNEXPLAINED**'}", "",
                      "```diff", diff.strip(), "```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default all: {', '.join(MODULES)})")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--limit", type=int, default=3600, help="seconds per module before mutmut is stopped")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "neurorewrite-mutation")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "MUTATION.md")
    parser.add_argument("--list", action="store_true", help="print the modules and their test selections")
    parser.add_argument("--note", default="", help="a line for the report (how the results were made)")
    parser.add_argument("--report-only", action="store_true",
                        help="do not run mutmut: write the report from the results already under --work "
                        "(after re-running single mutants there, or after adding explanations)")
    args = parser.parse_args()
    if args.list:
        for name, m in MODULES.items():
            print(f"{name}: mutate {', '.join(m.files)}; tests {' '.join(m.tests)}")
        return
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    machine = describe()
    print(machine)
    results = []
    for name in args.modules or list(MODULES):
        if args.report_only:
            r = ModuleResult(name, float("nan"))
            collect(args.work / name, r)
            results.append(r)
            continue
        print(f"mutating {name} ...", flush=True)
        r = run_module(name, MODULES[name], args.work, args.max_children, args.limit)
        print(f"  {r.counts} in {r.seconds / 60:.1f} min{'; ' + r.error if r.error else ''}", flush=True)
        results.append(r)
    shown = [a for a, prev in zip(sys.argv[1:], [""] + sys.argv[1:]) if a != "--note" and prev != "--note"]
    command = "python -m benchmarks.mutation " + " ".join(shown)
    args.report.write_text(render(results, machine, command.strip(), args.note))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
