"""TVM TensorIR kernels for the project's sparse operator, the measured choice among them, and tuning.

Rooms: ``choice`` (the registry of kernel families and the :class:`~.choice.Choice` of a kernel per
batch size), ``measure`` (timing the candidates on this machine, kept in the tuning database),
``dispatch`` (emitting the chosen kernels, with a per-call branch on the batch for a symbolic one),
one module per kernel family (``blocked_rows``: column-blocked ELL in register tiles, for batches;
``labeled_tiles``: FPE children and dense-enough layers streamed as parent tiles, small batches;
``gather_gemv``: sliced ELL with hardware gathers, small batches; ``sparse_linear``: the TensorIR ELL
kernel that MetaSchedule tunes, the CUDA kernel and the fallback), the packings they read (``ell``),
``row_blocks`` (a layer of dense rows above nearly empty ones run as two kernels), ``transpose`` (to
and from the feature-major layout the kernels use), and ``tuning`` (MetaSchedule
into a reusable database).

Importing this package imports tvm; :mod:`neurorewrite.runtime` only imports it lazily. Nothing here
knows ONNX: kernels take numpy weights and shapes, tuning takes a Relax module.
"""

from neurorewrite.kernels import blocked_rows, gather_gemv, group_gemv, labeled_tiles, sparse_linear  # noqa: F401  (register)
