"""End-to-end demo: train a dense MLP on digits, export it, FPE-expand it, calibrate it, compare.

    python -m examples.demo [--hidden 16] [--alpha 4] [--seed 0] [--out DIR]

Everything runs in onnxruntime; the table shows accuracy and nonzero counts of the three models.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import neurorewrite
from examples.digits import accuracy, export, load_data, recovered, train_mlp
from neurorewrite.table import format_table


def run(hidden: int, alpha: int, seed: int, out: Path, keep: bool = True) -> dict[str, float]:
    x_train, x_test, y_train, y_test = load_data(seed)
    dense_path = export(train_mlp(x_train, y_train, hidden, seed), out / "digits.onnx")
    np.savez(out / "sample.npz", x=x_train[:512])
    _, bare = neurorewrite.expand(dense_path, alpha=alpha, seed=seed, output=out / "digits.fpe.onnx")
    _, cal = neurorewrite.expand(
        dense_path, alpha=alpha, seed=seed, calibrate=out / "sample.npz", output=out / "digits.fpe.cal.onnx"
    )
    dense_info = neurorewrite.inspect(dense_path).blocks[0]
    acc = {
        "dense": accuracy(dense_path, x_test, y_test),
        "fpe": accuracy(out / "digits.fpe.onnx", x_test, y_test),
        "fpe+calibrate": accuracy(out / "digits.fpe.cal.onnx", x_test, y_test),
    }
    rows = [
        ("dense", str(dense_path.name), dense_info.width, dense_info.nonzeros, f"{acc['dense']:.4f}"),
        ("fpe", "digits.fpe.onnx", bare.blocks[0].width_after, bare.blocks[0].nnz_after, f"{acc['fpe']:.4f}"),
        ("fpe+calibrate", "digits.fpe.cal.onnx", cal.blocks[0].width_after, cal.blocks[0].nnz_after,
         f"{acc['fpe+calibrate']:.4f}"),
    ]
    print(format_table(("model", "file", "hidden", "nonzeros", "test accuracy"), rows,
                       title=f"digits MLP 64-{hidden}-10, FPE alpha={alpha}, seed={seed} (onnxruntime, {len(y_test)} test images)"))
    share = recovered(acc["dense"], acc["fpe"], acc["fpe+calibrate"])
    where = f"models in {out}" if keep else "pass --out DIR to keep the models"
    print(f"\ncalibration won back {100 * share:.0f}% of the accuracy the bare expansion lost; {where}")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the models (default: a temporary folder)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.hidden, args.alpha, args.seed, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(args.hidden, args.alpha, args.seed, Path(tmp), keep=False)


if __name__ == "__main__":
    main()
