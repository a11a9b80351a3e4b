"""Marks shared by the conformance modules.

``SLOW_ON_TPU``: a case the default suite runs on torch platforms only; on the TPU plugin (JAX
on the CPU backend here, where every new shape compiles) it is in the slow session
(``nox -s slow``). Each one also runs on the CPU in the default suite, so the behaviour stays
covered there; the TPU plugin shares the step layer that decides it.
"""

import os

import pytest

# Elsewhere a mark that does nothing (usable as a decorator and in pytest.param's marks alike).
SLOW_ON_TPU = (pytest.mark.slow if os.environ.get("PISTON_PLATFORM") == "tpu"
               else pytest.mark.skipif(False, reason="runs in the default suite off the TPU plugin"))
