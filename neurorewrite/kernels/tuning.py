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
from tvm import relax, s_tir
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
    """The tuning tasks of ``mod`` worth measuring that have no record in ``database`` yet.

    Tasks are extracted after the same fusion :func:`apply_database` compiles with, so their records
    match. Kept: every fused function with a reduction (matmuls, softmax, layer norm, the TensorIR ELL
    kernel). Left out: the hand-scheduled kernels (``tirx.is_scheduled``) and pure data movement or
    element-wise functions, which compile fine unscheduled and would take trials from the rest.
    """
    tasks = ms.relax_integration.extract_tasks(fuse_for_tuning(mod, target), target)
    return [t for t in tasks if _worth_tuning(t.dispatched[0]) and not database.has_workload(t.dispatched[0])]


def fuse_for_tuning(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse as MetaSchedule's ``compile_relax`` does before it applies a database."""
    from tvm.relax import pipeline

    try:
        dispatch = list(pipeline.library_dispatch_passes(target))
    except (ValueError, AttributeError):  # targets without a registered dispatcher
        dispatch = []
    passes = [*dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _worth_tuning(task_mod: tvm.IRModule) -> bool:
    func = task_mod["main"]
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
        return False
    anchor = s_tir.analysis.find_anchor_sblock(task_mod)
    return anchor is not None and any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in anchor.iter_vars)


def _is_ell_kernel(task: ms.ExtractedTask) -> bool:
    from neurorewrite.kernels.sparse_linear import RULE

    return RULE in task.dispatched[0].script()


def _contexts(tasks: list, work_dir: str, target: tvm.target.Target) -> tuple[list, list]:
    """Tune contexts: MetaSchedule's default design space for the dense tasks; for the ELL kernel, a
    space of its own rule only.

    The default CPU space adds its parallel/vectorize/unroll annotations to the root block and its
    postprocessor then rejects every candidate of a kernel that is already parallel and vectorised:
    the search sampled nothing, recorded nothing, and tuning silently did nothing.
    """
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    own_rule = ms.space_generator.PostOrderApply(
        sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[],
        mutator_probs={ms.mutator.MutateTileSize(): 1.0},
    )
    # MetaSchedule rebuilds its logging config from its logger's handlers by name; one without a name
    # (left by a test harness or a second tuning run in the process) made that config fail
    meta_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in meta_logger.handlers if h.get_name() is None]:
        meta_logger.removeHandler(handler)
    loggers = get_loggers_from_work_dir(work_dir, [t.task_name for t in tasks])
    contexts = [
        ms.TuneContext(
            mod=task.dispatched[0], target=task.target, space_generator=own_rule if _is_ell_kernel(task) else "post-order-apply",
            search_strategy="evolutionary", task_name=task.task_name, logger=logger, rand_state=seed,
            num_threads=_cores(target),
        ).clone()
        for task, logger, seed in zip(tasks, loggers, fork_seed(0, n=len(tasks)))
    ]
    weights = [task.weight for task in tasks]
    return contexts, weights


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
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
    contexts, weights = _contexts(tasks, work_dir, target)
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    if progress is not None:
        callbacks = [*callbacks, _ProgressCallback(progress, trials)]
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=trials,
        num_trials_per_iter=min(64, max(8, trials // max(len(tasks), 1))), database=database,
        measure_callbacks=callbacks, builder=ms.builder.LocalBuilder(f_build=build_kernel, timeout_sec=120),
        runner=ms.runner.LocalRunner(f_alloc_argument=alloc_valid_arguments),
    )
    if progress is not None:
        progress(trials, trials, "done")
    return len(tasks)


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target, _params: object) -> object:
    """MetaSchedule's default build minus its ``import tvm.s_tir.tensor_intrin``.

    That import registers every CUDA/ROCm tensor intrinsic and takes ~30 s on a busy 2-core machine,
    in each fresh builder worker: every candidate hit the builder's 30 s timeout and failed.
    The ELL kernels use no tensor intrinsics.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def alloc_valid_arguments(device, args_info: list, alloc_repeat: int) -> list:
    """MetaSchedule's argument allocation, but integer tensors (the ELL column indices) hold valid indices.

    The default fills every tensor with random bits, so candidates read far outside the input, crash or
    are timed on garbage addresses: tuning then picks schedules at random (it made kernels slower).
    The kernel's first argument is the input ``XT`` of shape ``(in_features, n)``: indices are drawn
    uniformly from ``[0, in_features)``, which is what FPE's random split produces.
    """
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    bound = int(args_info[0][2][0]) if args_info and args_info[0][0] == "TENSOR" else 1
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for kind, dtype, shape in args_info:
            if kind != "TENSOR":
                raise NotImplementedError(f"MetaSchedule argument kind {kind}")
            if "int" in dtype:
                data = rng.integers(0, bound, size=shape).astype(dtype)
            else:
                data = rng.standard_normal(shape).astype(dtype)
            args.append(tvm.runtime.tensor(data, device))
        repeated.append(args)
    return repeated


def build(mod: tvm.IRModule, target: tvm.target.Target, database: ms.database.Database | None = None) -> relax.VMExecutable:
    """Build ``mod``: fused as for tuning, the tuned schedules from ``database`` applied, and on a CPU
    every function still unscheduled given the default parallel schedule (:mod:`.default_schedule`).
    A TensorIR ELL kernel without a valid record (tuning skipped, or every candidate failed) gets its
    untuned default schedule, never none."""
    from neurorewrite.kernels.default_schedule import schedule_leftovers
    from neurorewrite.kernels.sparse_linear import RULE, schedule_default

    if database is not None:
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or RULE not in func.script():
                continue
            record = database.query_tuning_record(tvm.IRModule({"main": func}), target, "main")
            if record is None or not record.run_secs:
                updates[gv] = schedule_default(func, target)
        for gv, func in updates.items():
            mod[gv] = func
    with target:
        mod = fuse_for_tuning(mod, target)
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        if target.kind.name == "llvm":
            mod = schedule_leftovers(mod)
    return tvm.compile(mod, target=target)


def _cores(target: tvm.target.Target) -> int:
    cores = target.attrs.get("num-cores") if hasattr(target, "attrs") else None
    return int(cores) if cores else max(1, os.cpu_count() or 1)
