"""The calibration pass: label-free recovery of expanded blocks from sample inputs.

Replaces, block by block in graph order, first the lead child of every parent in the first linear
(``first="lead"``, the default per child; :mod:`neurorewrite.fpe.lead`: refit to the parent's whole
pre-activation; not for gated, tied or chain-middle layers), then the outgoing weights ``W2'`` (and
``b2``) of each expanded chain's last linear with the ridge least-squares fit, on the kept support only, of the block's target
from its hidden activations on the sample; with ``refit="block"`` it then trains the whole block
(``W1', b1', W2', b2``, masks fixed) on the same target (:mod:`neurorewrite.passes.block_fit`). Every
row keeps its nonzero count, so the model's count does not change; pruned weights stay exactly zero. Per
child (``support="hessian"``, the default) each row of ``W2'`` first chooses again which weights it keeps,
as many as before, by their second-order saliency on the sample (:mod:`neurorewrite.fpe.support`); with
``support="kept"``, and per parent or tied, the pattern is the prune's.

A gated block's down projection is refit the same way (its input is the gated product); a 1x1-Conv
block is read along its channel axis.

The target (``target``): ``output`` is the original block's output on the original model's inputs;
``residual`` (default where the block's output feeds an ``Add``, as in every transformer) adds the
drift of the other operand of that Add (original minus expanded), so the block also cancels the error
the earlier blocks left in the residual stream.

How (``docs/methods.md`` 1.7): the original and the expanded model are lifted into torch
(:class:`~neurorewrite.models.onnx_module.OnnxGraph`) and the sample runs through both in chunks
(:mod:`neurorewrite.passes.sample_chunks`: padding positions are not rows; a share of the samples is
held out and only scored). Each chunk's run stops before the next block; the block's statistics are
streamed into a Gram matrix (:mod:`neurorewrite.fpe.gram`, memory ``width^2``, not ``rows x width``;
a sample of ``n`` rows with ``n (n + 1) / 2 <= width`` is kept as rows instead, memory ``n x width``),
solved for all output rows at once (:mod:`neurorewrite.fpe.refit`), and the runs go on with the new
weights, so every block sees the already calibrated earlier ones. In a chain (``L1 -> act -> L2 -> act
-> L3``) only the last linear is refit. With ``tied`` (``--structured``) the fit is on each parent's
summed children, one weight per parent, so the ties survive; ``refit_per="parent"`` fits an untied
model the same way (its children keep sharing their parent's copied column, pruned copies stay zero):
a Gram ``alpha^2`` times smaller, for models too wide for a per-child refit. The children the prune left
without an input are constant inputs of the refit, left out of its Gram, support and solve
(:mod:`neurorewrite.fpe.constant_inputs`: the bias takes their shift). ``alpha == 1`` changes nothing.

Blocks that read one set of weights (expand shares them: ALBERT's layers) are fit as one: each adds
its rows where the runs reach it (the later ones see the earlier ones before the fit), the last one
solves, every member takes the same W2' (written once), and W1' keeps its expansion (no lead refit,
no block training). Its note gives the errors over all the members' rows.

The input model is never modified. Place in the pipeline: expand -> (tie) -> **calibrate** -> lower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch

from neurorewrite.errors import DataError, InvalidOptionError, UnsupportedModelError
from neurorewrite.fpe import copy_outputs
from neurorewrite.fpe.constant_inputs import ConstantInputs, constant_inputs
from neurorewrite.fpe.gram import FitAccumulator, Moments, Scratch
from neurorewrite.fpe.lead import InputMoments, refit_lead_children
from neurorewrite.fpe.refit import SOLVERS, refit_masked
from neurorewrite.fpe.support import choose_support
from neurorewrite.models.fpe import MaskedLinear, linear_arrays
from neurorewrite.models.onnx_module import Cursor, OnnxGraph, Step
from neurorewrite.passes.block_fit import fit_block
from neurorewrite.passes.expand_blocks import ExpandReport
from neurorewrite.passes.sample_chunks import MASK_INPUT, SampleChunks, chunk_sample_for
from neurorewrite.rewriter.blocks import MLPBlock, blocks_by_output, chain_ends, shape_only_nodes
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear
from neurorewrite.rewriter.record import read_record, write_record

REFITS = ("w2", "block", "none")  # none: the sample only informs the prune (--prune-by activation)
REFIT_PER = ("child", "parent")  # W2': a weight per child, or one per parent shared by its children
TARGETS = ("residual", "output")
FIRSTS = ("lead", "keep")  # W1': each parent's lead child refit to the parent's pre-activation (fpe/lead.py), or as expanded
SUPPORTS = ("hessian", "kept")  # W2' per child: rows' supports chosen again from the Gram (fpe/support.py), or the prune's
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CalibrateOptions:
    """Options of :func:`calibrate_model` (the CLI's ``--refit``, ``--target``, ``--holdout``, ...)."""

    refit: str = "w2"
    refit_per: str = "child"
    support: str = "hessian"
    target: str = "residual"
    holdout: float = 0.2  # share of the samples that is only scored, never fit
    solver: str = "cg"
    ridge: float = 1e-4  # relative to the mean diagonal of the Gram matrix
    max_iters: int | None = None  # CG iterations per block; None: 10 per child, 20 per parent (see iterations)
    tol: float = 1e-3  # CG stops when every row's relative residual is below it
    chunk_rows: int = 4096  # positions per chunk of the sample
    block_steps: int = 100  # Adam steps of the block-wise reconstruction (refit="block")
    block_lr: float = 1e-4
    block_batch: int = 512
    block_rows: int = 16384  # rows kept for the block-wise reconstruction
    mask_input: str | None = MASK_INPUT
    seed: int = 0
    first: str | None = None  # FIRSTS; None: lead per child, keep per parent (the fast path for wide models)

    def __post_init__(self) -> None:
        for name, value, allowed in (("refit", self.refit, REFITS), ("target", self.target, TARGETS),
                                     ("solver", self.solver, SOLVERS), ("refit-per", self.refit_per, REFIT_PER),
                                     ("support", self.support, SUPPORTS), ("first-layer", self.first_layer, FIRSTS)):
            if value not in allowed:
                raise InvalidOptionError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise InvalidOptionError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.max_iters is not None and self.max_iters < 1:
            raise InvalidOptionError(f"the CG iterations (max_iters) must be at least 1, got {self.max_iters}")

    @property
    def iterations(self) -> int:
        """``max_iters``, or its default. Stopping early regularises the per-child fit: on MiniLM at alpha 4
        (``benchmarks.recover_minilm``, 512 sentences) the mean cosine was 0.9494 / 0.9506 / 0.9503 / 0.9477
        at 5 / 10 / 20 / 40 iterations, 0.9694 / 0.9697 at 10 / 20 from 2048 sentences, and 10 took 5-8% less
        time than 20. Per parent the problem is alpha^2 times smaller and better determined: 0.8658 at 10,
        0.8723 at 20."""
        if self.max_iters is not None:
            return self.max_iters
        return 10 if self.refit_per == "child" else 20

    @property
    def first_layer(self) -> str:
        """``first``, or its default: ``lead`` per child; ``keep`` per parent, the fast path for wide models,
        where the lead's solves (one per parent) took the BERT-base-sized run from 267 s to 320 s
        (``benchmarks/RESULTS.md``)."""
        if self.first is not None:
            return self.first
        return "lead" if self.refit_per == "child" else "keep"


@dataclass
class _Runs:
    """The sample's chunks and, per chunk, a cursor through the original and the expanded model."""

    original: OnnxGraph
    expanded: OnnxGraph
    sample: SampleChunks
    orig_cursors: list[Cursor]
    exp_cursors: list[Cursor]
    scratch: Scratch  # the Gram and the support's factor, one array each, lent to every block in turn


def _residual_operand(index: GraphIndex, output: str) -> str | None:
    """The other operand of the one ``Add`` that reads ``output`` (the residual stream), if there is one."""
    users = index.consumers.get(output, [])
    if len(users) != 1 or output in index.graph_outputs:
        return None
    node = index.graph.node[users[0]]
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == output else node.input[0]
    return None if index.constant_source(other) in ("initializer", "constant") or other == output else other


@dataclass
class _SharedFit:
    """Blocks that read one set of weights (expand shares them: ALBERT's layers), refit as one: each
    member adds its rows where the runs reach it, the last one fits, and every member takes the fit."""

    members: list[MLPBlock]
    acc: FitAccumulator | None = None  # the fit rows of every member so far
    held: FitAccumulator | None = None  # the held-out rows of every member so far
    constant: ConstantInputs | None = None
    seconds: float = 0.0
    gram_cpu: list[float] = field(default_factory=list)

    def is_last(self, block: MLPBlock) -> bool:
        return block.name == self.members[-1].name


def _shared_fits(index: GraphIndex, blocks: list[MLPBlock], where: str) -> dict[str, _SharedFit]:
    """Block name -> the :class:`_SharedFit` of its group, for blocks whose linears read the weights of
    another block's (a group of one is left out). Refused when other nodes read such weights too (expand
    gives the group tensors of its own, so only a chain through the group or a hand-made graph does)."""
    by_weights: dict[tuple[str, ...], list[MLPBlock]] = {}
    for block in blocks:
        by_weights.setdefault(tuple(index.alias_root(lin.weight) for lin in block.linears), []).append(block)
    roots = [root for key, members in by_weights.items() for _ in members for root in key]
    fits: dict[str, _SharedFit] = {}
    for key, members in by_weights.items():
        if len(members) == 1:
            continue
        readers = {c for root in key for c in index.readers(root)[0]}
        linears = {lin.node for b in members for lin in b.linears}
        if not readers <= linears or any(roots.count(root) != len(members) for root in key):
            names = ", ".join(b.name for b in members)
            raise UnsupportedModelError(
                f"{where}: blocks {names} read one set of weights that other nodes read too; calibration refits the"
                " set for these blocks only: expand without --calibrate, or calibrate an export whose layers do not"
                " share weights")
        fit = _SharedFit(members)
        for block in members:
            fits[block.name] = fit
    return fits


def _rmse(sse: float, count: int) -> float:
    return float(np.sqrt(sse / count)) if count else float("nan")


def calibrate_model(
    original: onnx.ModelProto,
    expanded: onnx.ModelProto,
    report: ExpandReport,
    sample: Mapping[str, np.ndarray],
    tied: bool = False,
    options: CalibrateOptions = CalibrateOptions(),
    progress: Progress | None = None,
    where: str = "--calibrate",
) -> tuple[onnx.ModelProto, ExpandReport]:
    """Refit the last linear (or the whole block) of every expanded chain; see the module docstring."""
    if report.alpha == 1:  # the expansion is the original model: nothing to win back, nothing to change
        return expanded, report
    ends = chain_ends(blocks_by_output(expanded, {b.output_tensor for b in report.blocks}))
    train = {lin.name for b in ends for lin in (b.first, b.second)}
    index = GraphIndex.build(expanded.graph)
    shared = _shared_fits(index, ends, where)
    # lift only what the blocks' targets need: nodes after the last block may use any op
    needed = [b.second.output for b in ends] + [r for b in ends if (r := _residual_operand(index, b.second.output))]
    lifted_original = OnnxGraph(original, "the original model", outputs=needed)
    lifted = OnnxGraph(expanded, "the expanded model", train=train, outputs=needed)  # a group's layers: one each
    chunks = chunk_sample_for(lifted_original, lifted.inputs, sample, where, options.holdout, options.chunk_rows,
                              options.mask_input)
    runs = _Runs(lifted_original, lifted, chunks, [lifted_original.start(c.feeds) for c in chunks.chunks],
                 [lifted.start(c.feeds) for c in chunks.chunks], Scratch())
    notes, warnings = [], []
    for position, block in enumerate(ends):
        if progress is not None:
            progress(position, len(ends), block.name)
        note = _calibrate_block(runs, block, index, report.alpha, tied, options, where, shared.get(block.name))
        if note is None:  # a block that shares its weights with a later one: that one fits them all
            continue
        notes.append(note)
        inputs = note["width"] - note["constant_inputs"]  # a constant input's weight is the bias's to take
        if note["rows"] < inputs:
            warnings.append(
                f"{where}: {block.second.name} was fit on {note['rows']} rows for {inputs} inputs; "
                f"the fit is underdetermined (held-out error tells): give at least {inputs} rows "
                "(sample positions that are not padding)"
            )
    if progress is not None:
        progress(len(ends), len(ends), "writing")
    refit_layers = train if options.refit == "block" else {b.second.name for b in ends}
    refit_layers |= {n["first_layer"] for n in notes if n["first"] == "lead"}
    keys = {lifted.key_of(name) for name in refit_layers}
    model = replace_weights(expanded, [NewWeights(lin, w, b) for lin, w, b in lifted.weights(keys)])
    record = read_record(model)
    if record is not None:
        write_record(model, record.evolve(calibrated=tuple(str(n["layer"]) for n in notes)))
    # the options first, with the defaults that depend on other options as they were taken; the mask input the
    # sample actually used (None where the model has no such input) replaces the option's name
    summary = {**options.__dict__, "first": options.first_layer, "max_iters": options.iterations,
               "samples": chunks.samples, "holdout_samples": chunks.holdout_samples,
               "positions": chunks.positions, "rows": chunks.real_positions,
               "computed_positions": chunks.computed_positions, "mask_input": chunks.mask_input}
    return model, replace(report, calibration=notes, calibration_summary=summary,
                          warnings=[*report.warnings, *warnings])


def _calibrate_block(runs: _Runs, block: MLPBlock, index: GraphIndex, children: int, tied: bool,
                     options: CalibrateOptions, where: str = "--calibrate", group: _SharedFit | None = None) -> dict | None:
    """Stream one block's statistics over the sample, refit it, run the sample on past it.

    In a ``group`` (blocks that share their weights) the block adds its rows to the group's and, unless
    it is the last member, returns None; the last one fits the weights of all (W2' only: no lead refit
    of W1', no block training), and its note tells the fit and held-out errors over every member's rows."""
    start, gram_cpu = time.perf_counter(), []  # process CPU seconds of each chunk's accumulation
    # one weight per parent (tied, or --refit-per parent): fit on each parent's summed children
    alpha = children if tied or options.refit_per == "parent" else 1
    exp, orig = runs.expanded, runs.original
    lin1, lin2 = block.first, block.second
    key1, key2 = exp.key_of(lin1.name), exp.key_of(lin2.name)
    layer2 = exp.layers[key2]
    s1, s2 = exp.step_of(lin1.output), exp.step_of(lin2.output)
    so = orig.step_of(lin2.output)
    block_steps = exp.steps_of_nodes(block.nodes, as_identity=shape_only_nodes(index, block))
    residual = _residual_operand(index, lin2.output) if options.target == "residual" else None
    width, outputs = lin2.in_features // alpha, lin2.out_features
    empty = _inputless(exp, block, alpha)
    # made at the first fit rows: whether constant inputs can be left out of the fit depends on their value
    acc = None if group is None else group.acc
    constant = None if group is None else group.constant
    targets: list[torch.Tensor] = []  # per chunk, the target rows (outputs wide, not hidden wide)
    reservoir_x: list[torch.Tensor] = []
    reservoir_t: list[torch.Tensor] = []
    holdout_sse_before: list[float] = []  # per held-out chunk: the bare block's squared error
    # the lead refit: not for gated blocks (a gate and an up row per child); _refit_lead declines a chain's
    # middle linear (its input is widened too). bare: per chunk, the bare block's output rows (errors before)
    bare, held_out = None, any(c.holdout for c in runs.sample.chunks)
    if (options.first_layer == "lead" and options.refit != "none" and children > 1 and not tied and not block.gated
            and group is None):
        bare = _refit_lead(runs, lin1, lin2, s1, block_steps, children, options.ridge, fit_rows=not held_out)
    lead, fit_sse_before = bare is not None, 0.0
    with torch.no_grad():
        w_now, b_now = layer2.weight.detach().clone(), None if layer2.bias is None else layer2.bias.detach().clone()
        for position, (chunk, ocur, ecur) in enumerate(zip(runs.sample.chunks, runs.orig_cursors, runs.exp_cursors)):
            exp.advance(ecur, s1)
            orig.advance(ocur, so + 1)
            x = ecur.env[lin1.data_input]
            t = chunk.rows(ocur.env[lin2.output], outputs, lin2.feature_axis)
            if residual is not None and residual in ocur.env and residual in ecur.env:
                t = t + chunk.rows(ocur.env[residual], outputs, lin2.feature_axis) - chunk.rows(ecur.env[residual], outputs, lin2.feature_axis)
            else:
                residual = None
            targets.append(t)
            exp.release(ecur)  # what is read: the earlier blocks' outputs, this one's residual operand
            orig.release(ocur)
            if bare is not None and bare[position] is not None:
                sse = float((bare[position] - t).pow(2).sum())
                if chunk.holdout:
                    holdout_sse_before.append(sse)
                    continue
                fit_sse_before += sse
            # W1' and the activation: the hidden rows (a lead refit's held-out chunk, above, needs neither)
            env = exp.run_steps({lin1.data_input: x}, block_steps[:-1], keep={lin2.data_input})
            if chunk.holdout and group is None:  # the fit rows' error before comes from the moments, at a fraction of the cost
                y_now = chunk.rows(exp.run_steps(env, block_steps[-1:])[lin2.output], outputs, lin2.feature_axis)
                holdout_sse_before.append(float((y_now - t).pow(2).sum()))
                continue
            h_full = env[lin2.data_input]
            h = chunk.rows(h_full, lin2.in_features, lin2.feature_axis)
            if alpha > 1:
                h = h.reshape(len(h), width, alpha).sum(dim=-1)
            tick = time.process_time()
            rows_h = h.numpy()
            if acc is None:
                if empty is not None and len(rows_h):
                    has_bias = b_now is not None and bool((b_now != 0).all())
                    constant = constant_inputs(empty, rows_h[0], has_bias)
                acc = FitAccumulator(width - (0 if constant is None else len(constant.columns)), outputs, scratch=runs.scratch)
            if constant is not None:
                if not constant.matches(rows_h):
                    raise RuntimeError(f"{lin2.name}: an input no weight of {lin1.name} feeds varies over the sample "
                                       "(internal error: the block is not elementwise between its linears)")
                rows_h = np.take(rows_h, constant.active, axis=1)
            if chunk.holdout:  # a group's held-out rows: scored from their moments once the last member has fit
                assert group is not None
                group.held = group.held or FitAccumulator(acc.width, outputs)
                group.held.add(rows_h, t.numpy())
                continue
            acc.add(rows_h, t.numpy())
            gram_cpu.append(time.process_time() - tick)
            if options.refit == "block" and sum(len(r) for r in reservoir_x) < options.block_rows:
                reservoir_x.append(chunk.rows(x, lin1.in_features, lin1.feature_axis))
                reservoir_t.append(t)
        if group is not None:
            group.acc, group.constant = acc, constant
            group.seconds += time.perf_counter() - start
            group.gram_cpu += gram_cpu
            if not group.is_last(block):
                return None
            start, gram_cpu = time.perf_counter() - group.seconds, group.gram_cpu
        moments = (acc or FitAccumulator(width, outputs)).finish()
        if constant is not None:
            moments = replace(moments, constant=len(constant.columns))
        if moments.n < 2:
            raise DataError(f"the sample gives {moments.n} row(s) to fit {lin2.name}; it needs at least 2")
        w0 = w_now.numpy().reshape(outputs, -1)
        if alpha > 1:  # a parent's weight is the value its kept copies share (a pruned copy is zero)
            copies = w0.reshape(outputs, width, alpha)
            w0 = np.take_along_axis(copies, np.abs(copies).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        b0 = None if b_now is None else b_now.numpy()
        active = slice(None) if constant is None else constant.active  # the columns the fit sees
        # with a lead refit the moments are of the refit block; the fit rows' bare error costs a pass of the
        # bare block over them, made only when no rows are held out (else the held-out rows' error says it)
        if not lead:
            # the constant inputs' shift is part of each row's bias
            b_all = b0 if constant is None else (0.0 if b0 is None else b0) + constant.offset(w0)
            sse_before: float | None = float(moments.error(w0[:, active], b_all).sum())
        elif held_out:
            sse_before = None
        else:
            sse_before = fit_sse_before
        tick = time.process_time()
        # the layer that takes the fit: the group's members read one (OnnxGraph lifts a tie as one layer)
        refit = [layer2] if group is None else list({id(layer): layer for layer in (
            exp.layers[exp.key_of(m.second.name)] for m in group.members)}.values())
        # per child only: per parent (and tied) a row's support is a set of parents whose copies share one weight
        support = "hessian" if options.support == "hessian" and alpha == 1 and isinstance(moments, Moments) else "kept"
        if support == "hessian":
            counts = np.minimum(np.count_nonzero(w0, axis=1), moments.gram.shape[0])
            try:
                chosen = choose_support(moments, w0[:, active], scratch=runs.scratch, counts=counts)
            except DataError as error:
                raise DataError(f"{where}: {lin2.name}: {error}") from None
            w0 = chosen if constant is None else constant.widen(chosen, w0)
            for layer in refit:
                layer.weight_mask.copy_(torch.from_numpy(w0 != 0).reshape(layer.weight_mask.shape))
        support_cpu = time.process_time() - tick
        tick = time.process_time()
        # the preconditioner groups a parent's children; fit per parent there are none to group
        groups: int | np.ndarray = 1 if alpha > 1 else children
        if constant is not None and alpha == 1:
            groups = constant.groups(children)
        new_w, new_b, info = refit_masked(moments, w0[:, active], b0, options.ridge, options.solver, groups=groups,
                                          max_iters=options.iterations, tol=options.tol,
                                          offset=None if constant is None else constant.offset(w0))
        if constant is not None:  # the constant columns keep their weights (the bias took their shift)
            new_w = constant.widen(new_w, w0)
        fitted = new_w, new_b
        if alpha > 1:
            new_w = copy_outputs(new_w, alpha)
        for layer in refit:
            layer.weight.copy_(torch.from_numpy(new_w))
            if new_b is not None and layer.bias is not None:
                layer.bias.copy_(torch.from_numpy(new_b))
            if not tied:  # pruned copies stay zero before the sample runs on (OnnxGraph.weights restores the support)
                layer.apply_mask()
        solve_cpu = time.process_time() - tick
    block_fit = None
    tick = time.process_time()
    if options.refit == "block" and not tied and group is None:  # training would untie shared columns or blocks
        x_rows, t_rows = torch.cat(reservoir_x)[: options.block_rows], torch.cat(reservoir_t)[: options.block_rows]
        block_fit = fit_block(exp, block_steps, [key1, key2], lin1.data_input, lin2.output, x_rows, t_rows,
                              options.block_steps, options.block_lr, options.block_batch, options.seed)
    block_cpu = time.process_time() - tick
    sse_after: dict[bool, list[float]] = {False: [], True: []}  # per chunk, by whether it is held out
    if group is not None:  # every member's rows, from their moments: W1' did not change, so neither did h
        scored = {False: moments, True: None if group.held is None else group.held.finish()}
        rows = {h: 0 if m is None else int(m.n) for h, m in scored.items()}
        for h, m in scored.items():
            if m is not None:
                w_fit, b_fit = fitted
                shift = None if constant is None else constant.offset(w_fit)
                sse_after[h].append(float(m.error(w_fit[:, active], b_fit if shift is None else (0.0 if b_fit is None else b_fit) + shift).sum()))
                if h:
                    holdout_sse_before.append(float(m.error(w0[:, active], b_all).sum()))
    with torch.no_grad():
        for chunk, ecur, t in zip(runs.sample.chunks, runs.exp_cursors, targets):
            if group is not None:
                break
            exp.advance(ecur, s2 + 1)
            y = chunk.rows(ecur.env[lin2.output], outputs, lin2.feature_axis)
            exp.release(ecur)
            sse_after[chunk.holdout].append(float((y - t).pow(2).sum()))
    if group is None:
        rows = {h: sum(len(t) for c, t in zip(runs.sample.chunks, targets) if c.holdout == h) for h in (False, True)}
    return {
        "block": block.name, "layer": lin2.name, "rows": rows[False], "holdout_rows": rows[True],
        "shared_with": [] if group is None else [m.name for m in group.members if m.name != block.name],
        "width": width, "constant_inputs": 0 if constant is None else len(constant.columns), "target": "residual" if residual is not None else "output", "refit": options.refit, "support": support,
        "first": "lead" if lead else "keep", "first_layer": lin1.name,
        "rmse_before": None if sse_before is None else _rmse(sse_before, rows[False] * outputs), "rmse_after": _rmse(sum(sse_after[False]), rows[False] * outputs),
        "holdout_rmse_before": _rmse(sum(holdout_sse_before), rows[True] * outputs),
        "holdout_rmse_after": _rmse(sum(sse_after[True]), rows[True] * outputs),
        "solver": info.solver, "iterations": info.iterations, "residual": info.residual,
        "block_mse": None if block_fit is None else list(block_fit),
        "seconds": time.perf_counter() - start,
        # process CPU time (all threads) of the parts
        "cpu_seconds": {"gram": round(sum(gram_cpu), 2), "support": round(support_cpu, 2), "solve": round(solve_cpu, 2),
                        "block": round(block_cpu, 2)},
    }


def _inputless(exp: OnnxGraph, block: MLPBlock, alpha: int) -> np.ndarray | None:
    """Per input of the block's second linear (per parent with ``alpha > 1``), whether no weight of the first
    linear (nor of the up projection) feeds it: the prune left that child no input, so its activation is one
    value on every row. None where a first-layer linear is not lifted."""
    try:
        layers = [exp.layers[exp.key_of(lin.name)] for lin in (block.first, block.up) if lin is not None]
    except KeyError:
        return None
    empty = [~layer.weight_mask.any(dim=1).numpy() for layer in layers if isinstance(layer, MaskedLinear)]
    if len(empty) != len(layers):
        return None
    if block.split is not None:  # one fused linear: the gate half and the up half feed hidden unit j together
        fused, half = empty[0], len(empty[0]) // 2
        empty = [fused[:half], fused[half:]]
    inputless = np.logical_and.reduce(empty)
    if len(inputless) != block.second.in_features:
        return None
    return inputless.reshape(-1, alpha).all(axis=1)


def _refit_lead(runs: _Runs, lin1: Linear, lin2: Linear, s1: int, block_steps: list[Step], alpha: int,
                ridge: float, fit_rows: bool) -> list[torch.Tensor | None] | None:
    """Stream the first layer's input in both models over the fit chunks, then refit its lead children
    (:mod:`neurorewrite.fpe.lead`). Returns, per chunk, the bare block's output rows on a held-out chunk
    (the report's error before calibration), and on a fit chunk with ``fit_rows`` (None without); or
    None (nothing done) where the original layer is not lifted or reads another width than the expanded
    one (a chain's middle linear)."""
    exp, orig = runs.expanded, runs.original
    try:
        key, so1 = orig.key_of(lin1.name), orig.step_of(lin1.output)
    except KeyError:  # the original's layer is not lifted (its weights are not constants of its own)
        return None
    if orig.linears[key].in_features != lin1.in_features:
        return None
    bare: list[torch.Tensor | None] = []
    layer, teacher = exp.layers[exp.key_of(lin1.name)], orig.layers[key]
    moments = InputMoments.zeros(lin1.in_features)
    with torch.no_grad():
        for chunk, ocur, ecur in zip(runs.sample.chunks, runs.orig_cursors, runs.exp_cursors):
            exp.advance(ecur, s1)
            x = ecur.env[lin1.data_input]
            bare.append(chunk.rows(exp.run_steps({lin1.data_input: x}, block_steps)[lin2.output], lin2.out_features,
                                   lin2.feature_axis) if chunk.holdout or fit_rows else None)
            if chunk.holdout:
                continue
            orig.advance(ocur, so1)
            moments.add(chunk.rows(x, lin1.in_features, lin1.feature_axis).numpy(),
                        chunk.rows(ocur.env[lin1.data_input], lin1.in_features, lin1.feature_axis).numpy())
        w, b = linear_arrays(layer)
        w1, b1 = linear_arrays(teacher)
        new_w, new_b, _ = refit_lead_children(moments, w.reshape(len(w), -1), b, w1.reshape(len(w1), -1), b1, alpha, ridge)
        layer.weight.copy_(torch.from_numpy(new_w.astype(np.float32)).reshape(layer.weight.shape))
        if new_b is not None and layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(new_b.astype(np.float32)))
    return bare
