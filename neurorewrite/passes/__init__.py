"""Passes: each takes a model and returns a NEW model plus a report; none mutates its input.

The ``expand`` pipeline (``neurorewrite.api.expand``, run by ``rewriter.pipeline``), in order:

1. ``expand_blocks`` - FPE-expand every selected MLP block to the exact original nonzero count;
2. ``tie_outputs`` - ``--structured`` only: children share their parent's original outgoing column;
3. ``calibrate`` - ``--calibrate`` only: label-free refit of each chain's last linear on a sample;
4. ``lower`` - write the blocks in a registered format (``dense``, ``grouped``, ``sparse``).

``finetune_onnx`` trains an expanded ONNX model's layers in torch with their masks fixed.

The runtime preparation (``prepare``), called once by ``runtime.ort_session`` and ``runtime.compile``:
``fold_tied`` (sum tied children before the second layer), then for onnxruntime ``sparse_to_standard``
(the project's operator to standard ops).
"""
