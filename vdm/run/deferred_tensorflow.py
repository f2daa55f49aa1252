"""Importing clu without TensorFlow: its TensorFlow SummaryWriter is loaded when first built.

clu's metric_writers package (imported by clu.periodic_actions too) imports its TensorFlow
SummaryWriter eagerly: about 5 of the 14 s a tiny training run took to start on a 2-core
Xeon (python -X importtime), paid by every run and by every test that launches one, though a
run with --tensorboard=false never writes a TensorFlow summary. vdm/run/__init__.py calls
`defer()` before any module of the package imports clu.
"""

import sys
import types

_MODULE = "clu.metric_writers.summary_writer"


class SummaryWriter:
    """clu's TensorFlow SummaryWriter: constructing one imports it and returns clu's own."""

    def __new__(cls, *args, **kwargs):
        from clu.metric_writers.tf.summary_writer import SummaryWriter as TfSummaryWriter

        return TfSummaryWriter(*args, **kwargs)


def defer() -> None:
    """Registers the module clu re-exports its SummaryWriter from as this lazy one.

    Only clu's `from .tf.summary_writer import SummaryWriter` line is skipped: every other
    part of clu is the package's own, and a TensorBoard run gets exactly clu's writer. Does
    nothing when clu's writers are loaded already.
    """
    if "clu.metric_writers" in sys.modules or _MODULE in sys.modules:
        return
    module = types.ModuleType(_MODULE, "clu's SummaryWriter, its TensorFlow import deferred.")
    module.SummaryWriter = SummaryWriter
    sys.modules[_MODULE] = module
