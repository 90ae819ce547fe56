"""Reading, indexing, matching and editing ONNX graphs; everything the passes stand on.

Rooms: ``io`` (load with typed errors, external data), ``publish`` (save: a model and its data file as one
unit), ``graph`` (the read-only index of
producers, consumers and constants), ``patterns`` (declared patterns, matched backwards, with reasons),
``linear`` (linear layers: Gemm, MatMul + Add, MatMul, FusedMatMul, 1x1 Conv, SparseLinear),
``activations`` (elementwise ops and the declared decompositions that name them), ``region`` (the walk
between two linears), ``shapes`` (shape arithmetic at two widths), ``gated`` (up projections and fused
gate/up cuts), ``blocks`` and ``block_checks`` (MLP blocks, their notes, and the near misses with their
reasons), ``widen`` (shape constants rewritten with the width), ``stored`` (the grouped format read
back), ``editor`` (the one graph editor),
``record`` (the typed FPE record in ``metadata_props``), ``lowering/`` (block formats registered by
name), ``sparse_nodes`` (reading ``SparseLinear`` nodes), ``pipeline`` (the pass manager).
"""
