"""TVM TensorIR kernels for the project's sparse operator, their schedules, and MetaSchedule tuning.

Rooms: ``choice`` (the registry that picks a kernel per layer), one module per kernel
(``blocked_rows``: 8+ rows on a CPU; ``labeled_tiles``: FPE children and dense-enough layers below 8
rows; ``gather_gemv``: sparse layers below 8 rows with hardware gathers; ``sparse_linear``: the
TensorIR ELL kernel that MetaSchedule tunes, the fallback and the CUDA kernel), the packings they read
(``ell``), ``transpose`` (a tiled transpose), and ``tuning`` (MetaSchedule into a reusable database).

Importing this package imports tvm; :mod:`neurorewrite.runtime` only imports it lazily. Nothing here
knows ONNX: kernels take numpy weights and shapes, tuning takes a Relax module.
"""

from neurorewrite.kernels import blocked_rows, gather_gemv, labeled_tiles, sparse_linear  # noqa: F401  (register)
