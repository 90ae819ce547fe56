"""MetaSchedule tuning of a Relax module into a JSON tuning database that later compiles reuse.

The database is a directory (MetaSchedule's two JSON files plus ``neurorewrite-target.json``, the
target it was tuned for). Tasks that already have a record are not tuned again, so a second compile
of the same shapes only applies the records. A database tuned for another target is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from neurorewrite.errors import InvalidOptionError

Progress = Callable[[int, int, str], None]
MANIFEST = "neurorewrite-target.json"


def target_key(target: tvm.target.Target) -> str:
    """What must match between a database and a compile: the target's kind, cpu/arch and attributes."""
    return json.dumps({k: str(v) for k, v in sorted(target.export().items()) if k not in ("host", "tag")})


def open_database(path: str | os.PathLike, target: tvm.target.Target) -> ms.database.JSONDatabase:
    """Open (or create) the database at ``path``; refuse one that was tuned for a different target."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidOptionError(f"--database {folder} is a file; it must be a directory (created if missing)")
    manifest = folder / MANIFEST
    key = target_key(target)
    if manifest.exists():
        try:
            recorded = json.loads(manifest.read_text())["target"]
        except (OSError, ValueError, KeyError) as e:
            raise InvalidOptionError(f"--database {folder}: {MANIFEST} is unreadable ({e}); delete the folder") from e
        if recorded != key:
            raise InvalidOptionError(
                f"--database {folder} was tuned for target {json.loads(recorded).get('kind')} {recorded}, not {key}; "
                "use another --database folder for this target"
            )
    elif (folder / "database_tuning_record.json").exists():
        raise InvalidOptionError(f"--database {folder} has tuning records but no {MANIFEST}: its target is unknown")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        database = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
    except Exception as e:  # MetaSchedule raises TVMError on malformed JSON lines
        raise InvalidOptionError(f"--database {folder}: cannot read the tuning records ({e}); delete the folder") from e
    _check_records(database, folder, target)
    manifest.write_text(json.dumps({"target": key}))
    return database


def _check_records(database: ms.database.JSONDatabase, folder: Path, target: tvm.target.Target) -> None:
    for record in database.get_all_tuning_records()[:1]:
        if record.target is not None and record.target.kind.name != target.kind.name:
            raise InvalidOptionError(f"--database {folder} holds {record.target.kind.name} records, not {target.kind.name}")


def untuned_tasks(mod: tvm.IRModule, target: tvm.target.Target, database: ms.database.Database) -> list:
    """The tuning tasks of ``mod`` with no record in ``database`` yet."""
    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if not database.has_workload(t.dispatched[0])]


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:  # noqa: ANN001
        self.done = min(self.total, self.done + len(measure_candidates))
        self.progress(self.done, self.total, f"task {task_id}")


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    database: ms.database.JSONDatabase,
    trials: int,
    progress: Progress | None = None,
) -> int:
    """Tune the tasks of ``mod`` that have no record yet, within ``trials`` measurements; returns how many tuned."""
    tasks = untuned_tasks(mod, target, database)
    if not tasks or trials <= 0:
        return 0
    work_dir = str(Path(database.path_workload).parent)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir, num_threads=_cores(target), seed=0
    )
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    if progress is not None:
        callbacks = [*callbacks, _ProgressCallback(progress, trials)]
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=trials,
        num_trials_per_iter=min(64, max(8, trials // max(len(tasks), 1))), database=database,
        measure_callbacks=callbacks,
    )
    if progress is not None:
        progress(trials, trials, "done")
    return len(tasks)


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, database: ms.database.Database) -> relax.VMExecutable:
    """Build ``mod`` with the tuned schedules from ``database``; a sparse kernel without a valid record
    (tuning skipped, or every candidate failed) gets the untuned default schedule, never none."""
    from neurorewrite.kernels.sparse_linear import RULE, schedule_default

    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or RULE not in func.script():
            continue
        record = database.query_tuning_record(tvm.IRModule({"main": func}), target, "main")
        if record is None or not record.run_secs:
            updates[gv] = schedule_default(func, target)
    for gv, func in updates.items():
        mod[gv] = func
    return ms.relax_integration.compile_relax(database, mod, target, params=None)


def _cores(target: tvm.target.Target) -> int:
    cores = target.attrs.get("num-cores") if hasattr(target, "attrs") else None
    return int(cores) if cores else max(1, os.cpu_count() or 1)
