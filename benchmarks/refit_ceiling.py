"""How far can a W2' refit go? The first FFN block of all-MiniLM-L6-v2, expanded, refit every way (issue 11).

    python -m benchmarks.refit_ceiling [--fit 512] [--held 256] [--alpha 4] [--prune global] [--split S]
                                       [--bias split] [--prune-by activation]

The calibration refits ``W2'`` on the expanded block's hidden activations; the hidden activations
themselves (``act`` of each child's partial pre-activation) are fixed by the split and the prune. This
script separates the two: on block 0 (whose input is the same in the original and the expanded model,
so no earlier calibration is involved) it fits the block's output from the children's activations on
``--fit`` sentences and scores the fit on ``--held`` other sentences (RMSE per output element):

- ``bare``: the expanded weights as the prune left them;
- ``dense, damping d``: every one of ``W2'``'s ``alpha * H`` weights per row free (ridge ``d`` times the
  mean Gram diagonal): the best any support can do with these activations, a ceiling, not a model with
  the original's count;
- ``hessian x m``: the calibration's default (support chosen by saliency, CG refit) with ``m`` times the
  prune's count per row (``m > 1``: random extra positions raise each row's count; the saliency then
  chooses among all of them);
- ``kept``: the refit on the prune's own support.

Where ``hessian x1`` is close to ``dense``, a better choice of ``W2'``'s weights cannot win much more;
what is left lies in the activations (the split, the prune of ``W1'``, the act of partial sums).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import minilm, text_corpus
from benchmarks.machine import describe
from neurorewrite.table import format_table

NODE = "/bert/encoder/layer.0/output/dense/MatMul"  # the down projection of the first FFN block


def tapped(path: Path, tensor_of):  # noqa: ANN001, ANN202 - (session, tensor name, the node's weight or None)
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == NODE)
    name = tensor_of(node)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    weights = {i.name: i for i in model.graph.initializer}
    weight = numpy_helper.to_array(weights[node.input[1]]) if node.input[1] in weights else None
    return ort.InferenceSession(model.SerializeToString()), name, weight


def rows(session, name: str, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:  # noqa: ANN001
    """``name`` on every real (unpadded) position of ``feeds``, as (rows, features)."""
    out = []
    for lo in range(0, len(feeds["input_ids"]), batch):
        part = {k: v[lo:lo + batch] for k, v in feeds.items()}
        out.append(session.run([name], part)[0][part["attention_mask"].astype(bool)])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=512, help="fitting sentences (64 tokens, padded)")
    parser.add_argument("--held", type=int, default=256, help="held-out sentences (other fitting-corpus sentences)")
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--prune", default="global", help="expand's --prune")
    parser.add_argument("--split", default=None, help="expand's --split (default: expand's with a sample)")
    parser.add_argument("--bias", default="split", help="expand's --bias")
    parser.add_argument("--prune-by", default=None, help="expand's --prune-by (default: expand's with a sample)")
    args = parser.parse_args()
    from neurorewrite.api import expand
    from neurorewrite.fpe.gram import GramAccumulator
    from neurorewrite.fpe.refit import refit_masked
    from neurorewrite.fpe.support import choose_support
    from neurorewrite.passes.calibrate import CalibrateOptions

    print(f"machine: {describe()} | load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    sentences = text_corpus.split()[0]
    if args.fit + args.held > len(sentences):
        raise SystemExit(f"--fit + --held must be at most {len(sentences)}")
    fit, held = minilm.tokenize(sentences[: args.fit], 64), minilm.tokenize(sentences[args.fit: args.fit + args.held], 64)
    options = CalibrateOptions()
    with tempfile.TemporaryDirectory() as tmp:
        original = minilm.export(Path(tmp) / "minilm.onnx")
        expanded = Path(tmp) / "expanded.onnx"
        # the sample informs the prune and the split (as expand's defaults with a sample would); nothing is refit
        _, report = expand(original, alpha=args.alpha, calibrate=fit, prune_by=args.prune_by, prune=args.prune, split=args.split,
                           bias=args.bias, calibrate_options=CalibrateOptions(refit="none"), output=expanded)
        hidden, h_name, w2 = tapped(expanded, lambda n: n.input[0])
        target, t_name, _ = tapped(original, lambda n: n.output[0])
        h, t = rows(hidden, h_name, fit), rows(target, t_name, fit)
        h_held, t_held = rows(hidden, h_name, held), rows(target, t_name, held)
    w0 = np.ascontiguousarray(w2.T)  # (outputs, alpha * H)
    counts = np.count_nonzero(w0, axis=1)
    print(f"block 0 ({NODE}), alpha {args.alpha}, prune {args.prune}, split {report.split}, bias {args.bias}, "
          f"prune-by {args.prune_by or 'default'}: "
          f"{len(h)} fit rows, {len(h_held)} held-out rows, {w0.shape[1]} children, "
          f"W2' keeps {counts.mean():.0f} per row on average", flush=True)
    acc = GramAccumulator(h.shape[1], t.shape[1])
    acc.add(h, t)
    moments = acc.finish()

    def held_rmse(w: np.ndarray, b: np.ndarray | float = 0.0) -> float:
        return float(np.sqrt(((h_held @ w.T + b - t_held) ** 2).mean()))

    table = [("bare", f"{int(counts.sum())}", f"{held_rmse(w0):.4f}", "-")]
    gram = moments.gram.astype(np.float64)
    for damping in (1e-4, 1e-3, 1e-2):
        tick = time.perf_counter()
        dense = np.linalg.solve(gram + damping * np.mean(np.diag(gram)) * np.eye(len(gram)), moments.cross.astype(np.float64)).T
        table.append((f"dense, damping {damping:g}", f"{dense.size}", f"{held_rmse(dense, moments.mean_t - dense @ moments.mean_h):.4f}",
                      f"{time.perf_counter() - tick:.0f}"))
    del gram
    with_bias = np.ones(w0.shape[0], np.float32)  # a nonzero bias per row: the refit fits each row's intercept
    rng = np.random.default_rng(0)
    for multiple in (1.0, 1.5, 2.0):
        start = w0.copy()
        for o in range(len(start)):  # raise each row's count by random extra positions; the saliency chooses anew
            free = np.flatnonzero(start[o] == 0)
            start[o, rng.choice(free, min(len(free), int(counts[o] * (multiple - 1))), replace=False)] = 1.0
        tick = time.perf_counter()
        w, b, _ = refit_masked(moments, choose_support(moments, start), with_bias, options.ridge,
                               max_iters=options.iterations)
        table.append((f"hessian x{multiple:g}", f"{int(np.count_nonzero(w))}", f"{held_rmse(w, b):.4f}",
                      f"{time.perf_counter() - tick:.0f}"))
    tick = time.perf_counter()
    w, b, _ = refit_masked(moments, w0, with_bias, options.ridge, max_iters=options.iterations)
    table.append(("kept", f"{int(np.count_nonzero(w))}", f"{held_rmse(w, b):.4f}", f"{time.perf_counter() - tick:.0f}"))
    print(format_table(("W2' fit", "weights", "held-out RMSE", "s"), table))


if __name__ == "__main__":
    main()
