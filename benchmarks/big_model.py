"""Every command on a model over 2 GB: wall time and peak resident memory, one fresh process each.

    python -m benchmarks.big_model [--folder DIR] [--d 8192] [--hidden 32768] [--only expand-a2,analyze]

Builds one FFN (Gemm d -> hidden, Relu, Gemm hidden -> d; 2.1 GB of float32 weights at the default
sizes) with its weights in an external data file, written tensor by tensor so the builder never holds
a protobuf over 2 GB, then runs each command as ``python -m neurorewrite.cli ...`` in its own process
and reads that process's peak RSS from ``wait4``. Prints, per command: exit code, seconds, peak RSS,
input and output bytes, and for expand the ratio peak / (input + output bytes) against the target 3x.
The last line of a failing command's stderr is printed as it is. Timings never appear in tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.machine import describe

GIB = 1 << 30
CHUNK_ROWS = 1024  # rows generated at a time: the builder's memory stays far below one weight matrix


def build(folder: Path, d: int, hidden: int, seed: int = 0) -> Path:
    """Write ``ffn.onnx`` + ``ffn.onnx.data`` (x (N, d) -> Gemm -> Relu -> Gemm -> y) into ``folder``."""
    path = folder / "ffn.onnx"
    data_name = "ffn.onnx.data"
    rng = np.random.default_rng(seed)
    tensors = []
    offset = 0
    with open(folder / data_name, "wb") as f:
        for name, shape, scale in (("fc1.weight", (hidden, d), d ** -0.5), ("fc1.bias", (hidden,), 0.01),
                                   ("fc2.weight", (d, hidden), hidden ** -0.5), ("fc2.bias", (d,), 0.01)):
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            start = offset
            rows = shape[0]
            for r in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - r)
                block = (rng.standard_normal((n, *shape[1:]), dtype=np.float32) * np.float32(scale))
                f.write(block.tobytes())
                offset += block.nbytes
            t = TensorProto(name=name, dims=list(shape), data_type=TensorProto.FLOAT,
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(offset - start))):
                t.external_data.add(key=key, value=value)
            tensors.append(t)
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "fc2.weight", "fc2.bias"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path


def model_bytes(path: Path) -> int:
    """The model file plus every external data file it names."""
    if not path.exists():
        return 0
    if path.suffix == ".so":
        return path.stat().st_size
    head = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in head.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def measure(argv: list[str], cwd: Path) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS bytes, last stderr line) of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "neurorewrite.cli", *argv], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        err.seek(0)
        lines = [line for line in err.read().decode(errors="replace").splitlines() if line.strip()]
    return proc.returncode, seconds, usage.ru_maxrss * 1024, lines[-1] if lines else ""


def cases(folder: Path) -> dict[str, tuple[list[str], Path | None]]:
    """name -> (arguments, output path) of every measured command."""
    return {
        "inspect": (["inspect", "ffn.onnx"], None),
        "expand-a2-dense": (["expand", "ffn.onnx", "--alpha", "2", "-o", "a2.onnx"], folder / "a2.onnx"),
        "expand-a2-sparse": (["expand", "ffn.onnx", "--alpha", "2", "--format", "sparse", "-o", "a2s.onnx"],
                             folder / "a2s.onnx"),
        "expand-a4-dense": (["expand", "ffn.onnx", "--alpha", "4", "-o", "a4.onnx"], folder / "a4.onnx"),
        "expand-a4-sparse": (["expand", "ffn.onnx", "--alpha", "4", "--format", "sparse", "-o", "a4s.onnx"],
                             folder / "a4s.onnx"),
        "expand-a2-calibrate": (["expand", "ffn.onnx", "--alpha", "2", "--calibrate", "sample.npz", "-o", "a2c.onnx"],
                                folder / "a2c.onnx"),
        "finetune": (["finetune", "ffn.onnx", "--data", "train.npz", "--epochs", "1", "--batch-size", "16",
                      "-o", "tuned.onnx"], folder / "tuned.onnx"),
        "analyze": (["analyze", "ffn.onnx"], None),
        "analyze-data": (["analyze", "ffn.onnx", "--data", "sample.npz"], None),
        "compile": (["compile", "ffn.onnx", "--shape", "x=1,8192", "-o", "ffn.so"], folder / "ffn.so"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--d", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=64, help="rows of the calibration / training sample")
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    parser.add_argument("--keep-outputs", action="store_true", help="do not delete each output after measuring")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="big_model."))
    folder.mkdir(parents=True, exist_ok=True)
    print(describe())
    try:
        path = folder / "ffn.onnx"
        if not path.exists():
            start = time.monotonic()
            build(folder, args.d, args.hidden)
            print(f"built {path}: {model_bytes(path) / GIB:.2f} GiB in {time.monotonic() - start:.0f} s")
        rng = np.random.default_rng(1)
        x = rng.standard_normal((args.rows, args.d), dtype=np.float32)
        np.savez(folder / "sample.npz", x=x)
        np.savez(folder / "train.npz", x=x, y=rng.standard_normal((args.rows, args.d), dtype=np.float32))
        in_bytes = model_bytes(path)
        selected = cases(folder)
        if args.only:
            selected = {k: v for k, v in selected.items() if k in args.only.split(",")}
        print(f"{'case':22} {'rc':>3} {'seconds':>8} {'peak GiB':>9} {'in GiB':>7} {'out GiB':>8} {'peak/(in+out)':>14}  note")
        for name, (argv, output) in selected.items():
            rc, seconds, peak, last = measure(argv, folder)
            out_bytes = model_bytes(output) if output is not None and rc == 0 else 0
            ratio = f"{peak / (in_bytes + out_bytes):.2f}x" if name.startswith("expand") and rc == 0 else "-"
            note = "" if rc == 0 else last[:160]
            print(f"{name:22} {rc:>3} {seconds:>8.1f} {peak / GIB:>9.2f} {in_bytes / GIB:>7.2f} "
                  f"{out_bytes / GIB:>8.2f} {ratio:>14}  {note}", flush=True)
            if output is not None and not args.keep_outputs:
                for p in folder.glob(output.name + "*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
