"""TVM TensorIR kernels for the project's sparse operator, their schedules, and MetaSchedule tuning.

Importing this package imports tvm; :mod:`neurorewrite.runtime` only imports it lazily.
Nothing here knows ONNX: kernels take numpy weights and shapes, tuning takes a Relax module.
"""
