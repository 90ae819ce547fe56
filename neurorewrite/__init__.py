"""neurorewrite: FPE-expand the MLP blocks of ONNX models, train them in torch, deploy them fast."""

from neurorewrite.errors import NeurorewriteError

__all__ = ["NeurorewriteError", "analyze", "convert", "expand", "inspect"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the package must not pull in onnx for the torch side
    if name == "expand":
        from neurorewrite.api import expand

        return expand
    if name == "convert":
        from neurorewrite.api import convert

        return convert
    if name == "inspect":
        from neurorewrite.api import inspect

        return inspect
    if name == "analyze":
        from neurorewrite.analysis import analyze

        return analyze
    raise AttributeError(name)
