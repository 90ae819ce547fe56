"""Compile an ONNX model (with or without neurorewrite operators) into a deployable TVM library.

``compile`` prepares the model for TVM once (:mod:`neurorewrite.passes.prepare`: fold tied child
copies), imports it with the Relax ONNX frontend (SparseLinear -> the project's kernels), optionally
tunes with MetaSchedule into a reusable database, builds, and writes ``OUTPUT`` (a shared library)
plus ``OUTPUT.json`` (input names/shapes, outputs, target) atomically: on any failure nothing is
written and an existing output is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from neurorewrite.errors import InvalidOptionError, OutputError, UnsupportedModelError, last_line
from neurorewrite.external_data import materialize
from neurorewrite.paths import Labeled, check_no_overwrite, check_output_target
from neurorewrite.rewriter.io import ModelLike, load_model, model_files, weight_bytes

Progress = Callable[[int, int, str], None]
DEFAULT_TRIALS = 128
FORMAT_VERSION = 1


@dataclass
class CompileReport:
    """What ``compile`` did: target, kernels, tuning, timings and where it wrote."""

    target: str
    inputs: dict[str, list[int | str]]  # a symbolic dimension (any size at run time) is its name
    outputs: list[str]
    input_types: dict[str, str] = field(default_factory=dict)  # numpy dtype name per input (token ids: int64)
    sparse_kernels: list[dict[str, object]] = field(default_factory=list)
    folded: list[dict[str, object]] = field(default_factory=list)  # SparseLinear nodes that sum tied children
    constant: list[dict[str, object]] = field(default_factory=list)  # second layers that took constant children
    tuned_tasks: int = 0
    trials: int = 0
    database: str | None = None
    seconds_tune: float = 0.0
    seconds_build: float = 0.0
    output: str | None = None
    kernel_choice: str = "measure"  # measure: kernels timed on this machine (kept in the database); estimate
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compile(  # noqa: A001 (the public name the issue asks for)
    model: ModelLike,
    target: str | dict = "llvm",
    output: str | os.PathLike | None = None,
    tune: bool = False,
    trials: int = DEFAULT_TRIALS,
    database: str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
    kernel_choice: str = "measure",
):  # -> tuple[relax.VMExecutable, CompileReport]
    """Compile ``model`` for ``target``; with ``tune`` run up to ``trials`` MetaSchedule measurements.

    Without ``shapes`` for an input with symbolic dimensions the library keeps them symbolic: it runs
    every batch size, each sparse layer choosing its kernel per call; ``shapes`` fixes them (the fast
    path, and the only one MetaSchedule can tune). ``kernel_choice``: ``measure`` times the candidate
    kernels of every sparse layer on this machine (when the target is this machine) and keeps the
    choice in the database; ``estimate`` ranks them by static costs.
    The database (default: ``OUTPUT.tuning/`` beside the output) keeps the records (MetaSchedule's and
    the kernel choices); a later compile with the same shapes and target reuses them without measuring again.
    """
    from neurorewrite.kernels import tuning
    from neurorewrite.kernels.measure import KernelRecords
    from neurorewrite.passes.fold_static import fold_static_values
    from neurorewrite.passes.prepare import prepare_for_runtime
    from neurorewrite.runtime.tvm_import import import_model, input_shapes, is_static, symbolic_hint
    from neurorewrite.runtime.tvm_target import parse_target
    from neurorewrite.runtime.tvm_threads import use_physical_cores

    use_physical_cores()  # before the pool starts: the kernel choice is timed on the pool the library runs on
    if trials < 0:
        raise InvalidOptionError(f"--trials must be >= 0, got {trials}")
    if kernel_choice not in ("measure", "estimate"):
        raise InvalidOptionError(f"--kernel-choice must be measure or estimate, got {kernel_choice!r}")
    if tune and database is None:
        if output is None:
            raise InvalidOptionError("tuning needs a --database folder (or an output path to put it beside)")
        database = Path(str(output) + ".tuning")
    check_outputs(model, output, database)
    tvm_target = parse_target(target)
    proto, prepared = prepare_for_runtime(load_model(model), "tvm")
    proto = materialize(proto)  # TVM's importer reads initializers itself: no spilled tensor may reach it
    if output is not None:
        check_space(Path(output), weight_bytes(proto))
    static = input_shapes(proto, shapes)
    db = tuning.open_database(database, tvm_target) if database is not None else None
    fixed = all(is_static(shape) for shape in static.values())
    frozen = None
    if fixed:  # the shape arithmetic and masks become constants: TVM's frontend fails on several while computed
        proto, frozen = fold_static_values(proto, static)
    # measured kernel choices are kept in the database folder (default: beside the output, as for --tune)
    records_folder = database if database is not None else None if output is None else Path(str(output) + ".tuning")
    mod, kernels = import_model(proto, static, tvm_target, scheduled=db is None or not fixed,
                                records=None if records_folder is None else KernelRecords(records_folder),
                                measure=kernel_choice == "measure")
    report = CompileReport(
        target=str(tvm_target), inputs=static, outputs=[o.name for o in proto.graph.output],
        input_types=input_types(proto, static),
        sparse_kernels=kernels, folded=prepared.folded, constant=prepared.constant,
        trials=trials if tune else 0, database=None if database is None else str(database),
        kernel_choice=kernel_choice,
    )
    if frozen is not None and frozen.modified:
        report.notes.append(f"{frozen.tensors} tensor(s) that the fixed input shapes determine were folded into"
                            f" constants ({frozen.nodes} node(s) dropped)")
    start = time.monotonic()
    if db is not None and tune and not fixed:
        report.notes.append("MetaSchedule tunes static shapes only: pass --shape to tune the dense operators")
    elif db is not None and tune:
        report.tuned_tasks = tuning.tune(mod, tvm_target, db, trials, progress)
    report.seconds_tune = time.monotonic() - start
    start = time.monotonic()
    try:
        executable = _build(mod, tvm_target, db if fixed else None)
    except MemoryError:
        raise
    except Exception as e:  # TVM's lowering raises its own errors on graphs it cannot compile
        raise UnsupportedModelError(f"TVM could not build the model: {last_line(e)}{symbolic_hint(static)}") from e
    report.seconds_build = time.monotonic() - start
    if output is not None:
        write_library(executable, report, output)
        report.output = str(output)
    return executable, report


def _build(mod, target, db):  # noqa: ANN001, ANN202
    from neurorewrite.kernels import tuning

    return tuning.build(mod, target, db)


# what a tuning database folder holds: MetaSchedule's two files and kernels.tuning.MANIFEST
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json", "neurorewrite-target.json")


def check_outputs(model: ModelLike, output: str | os.PathLike | None, database: str | os.PathLike | None) -> None:
    """Before any work: the library, its description and the tuning database are none of the model's
    files (nor each other), and the library's folder can be written."""
    inputs: list[Labeled] = [] if not isinstance(model, (str, os.PathLike)) else list(model_files(model))
    outputs: list[Labeled] = []
    if output is not None:
        out = Path(output)
        outputs += [("-o", out), ("-o's description", metadata_path(out))]
        folder = out.parent if str(out.parent) else Path(".")
        if out.is_dir():
            raise OutputError(f"-o {out} is a directory; give a file name such as model.so")
        check_output_target(out, "-o")
        check_output_target(metadata_path(out), "-o's description")
        if not folder.is_dir():
            raise OutputError(f"-o {out}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"-o {out}: folder {folder} is not writable")
    if database is not None:
        db = Path(database)
        outputs += [("--database", db)] + [("--database", db / name) for name in DATABASE_FILES]
    check_no_overwrite(inputs, outputs)


def check_space(output: Path, weights: int) -> None:
    """Refuse up front when the library (which embeds the weights) cannot fit where it is written:
    LLVM writes its object file into the temporary folder and ends the process when that write fails,
    and the linker's failure on a full output folder would come after the whole build."""
    need = int(weights * 1.1) + (16 << 20)
    for where, folder in (("-o", output.parent if str(output.parent) else Path(".")),
                          ("the temporary folder", Path(tempfile.gettempdir()))):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        if free < need:
            raise OutputError(f"cannot write {output}: {where} {folder} has {free >> 20} MiB free, the library needs "
                              f"about {need >> 20} MiB")


def input_types(model: onnx.ModelProto, inputs: Mapping[str, object]) -> dict[str, str]:
    """The numpy dtype name of each of ``inputs`` as the graph declares it (the library takes that type)."""
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    return {name: np.dtype(helper.tensor_dtype_to_np_dtype(declared[name])).name for name in inputs}


def write_library(executable, report: CompileReport, output: str | os.PathLike) -> None:  # noqa: ANN001
    """Export the library and its ``.json`` description beside it, each via a temporary file + rename.

    The library gets mode 0755 and the description 0644 (less what the umask removes), like any file
    the user would build: another user can load a library they can read.
    """
    out = Path(output)
    if out.is_dir():
        raise OutputError(f"-o {out} is a directory; give a file name such as model.so")
    if not out.parent.exists():
        raise OutputError(f"-o {out}: folder {out.parent} does not exist")
    meta = {"format": FORMAT_VERSION, "target": report.target, "inputs": report.inputs, "outputs": report.outputs,
            "input_types": report.input_types}
    try:
        lib_tmp = _temp_path(out, ".so")
        meta_tmp = _temp_path(out, ".json")
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    umask = _umask()
    try:
        try:
            executable.export_library(str(lib_tmp))
        except Exception as e:  # TVM runs the system compiler: a full or read-only disk is its RuntimeError
            raise OutputError(f"cannot write {out}: the library export failed ({_export_reason(e)})") from e
        meta["sha256"] = file_digest(lib_tmp)
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.chmod(lib_tmp, 0o755 & ~umask)
        os.chmod(meta_tmp, 0o644 & ~umask)
        os.replace(meta_tmp, metadata_path(out))
        os.replace(lib_tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        for tmp in (lib_tmp, meta_tmp):
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _export_reason(e: BaseException) -> str:
    """The line of a compiler failure that says why (``No space left``, ``Permission denied``...)."""
    text = str(e)
    for key in ("No space left", "Permission denied", "Read-only file system", "Disk quota"):
        if key in text:
            return key.lower()
    return last_line(e)[:200]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: the loader refuses a library whose bytes changed (dlopen of a damaged file can crash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_path(library: str | os.PathLike) -> Path:
    return Path(str(library) + ".json")


def _temp_path(out: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
    os.close(fd)
    return Path(name)

