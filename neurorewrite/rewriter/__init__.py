"""Reading, indexing, matching and editing ONNX graphs; everything the passes stand on.

Rooms: ``io`` (load with typed errors, external data), ``publish`` (save: a model and its data file as one
unit), ``graph`` (the read-only index of
producers, consumers and constants), ``linear`` (linear layers: Gemm, MatMul + Add, MatMul) and
``blocks`` (MLP blocks, and the near misses with their reasons), ``editor`` (the one graph editor),
``record`` (the typed FPE record in ``metadata_props``), ``lowering/`` (block formats registered by
name), ``sparse_nodes`` (reading ``SparseLinear`` nodes), ``pipeline`` (the pass manager).
"""
