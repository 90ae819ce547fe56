"""The project's own ONNX operators: names, schema, builders, the one validator, the numpy reference.

Today there is one: ``ai.neurorewrite.SparseLinear`` (:mod:`neurorewrite.ops.sparse_linear`, schema in
``docs/sparse-op.md``). Everything that writes, checks, converts or runs the operator takes its
constants and checks from here, so a bad CSR gets the same error wherever it is met.
"""

from neurorewrite.ops.sparse_linear import (
    DOMAIN,
    FORMATS_SUPPORTED,
    OP,
    VERSION,
    CsrMatrix,
    check_csr,
    csr_arrays,
    csr_from_entries,
    densify,
    is_sparse_linear,
    narrowest_int,
    sparse_linear_node,
    sparse_linear_reference,
)

__all__ = [
    "DOMAIN", "FORMATS_SUPPORTED", "OP", "VERSION", "CsrMatrix", "check_csr", "csr_arrays", "csr_from_entries", "densify",
    "is_sparse_linear", "narrowest_int", "sparse_linear_node", "sparse_linear_reference",
]
