"""What other libraries print while the `bitdance` command runs: by default, nothing but their errors.

Three levers, all used by the command only (the package never changes a user's logging):

* `hide_unused_quantization_libraries`: diffusers imports every installed quantization backend as soon as it loads a
  model (``diffusers.quantizers.auto``, reached from ``ModelMixin``), and transformers probes them too. Imported,
  bitsandbytes tries to fetch a CPU kernel from the Hub and torchao reports the CUDA extensions it cannot load, before
  any of our work starts. The command marks the backends that the requested ``--quantize`` scheme does not use as
  absent for its own process, before diffusers is imported.
* `quiet_library_imports`: the verbosity variables diffusers and transformers read when imported.
* `library_logs` and `library_output`: the libraries' log levels, warnings and loading bars for the duration of a
  command, restored after.
"""

import logging
import os
import sys
import warnings
from contextlib import contextmanager

from ..quantization import BITSANDBYTES_SCHEMES, QUANTIZATION_SCHEMES


QUANTIZATION_LIBRARIES = {
    "torchao": tuple(scheme for scheme in QUANTIZATION_SCHEMES if scheme not in BITSANDBYTES_SCHEMES),
    "bitsandbytes": BITSANDBYTES_SCHEMES,
}
# Libraries that read which quantization backends are installed when they are first imported.
_BACKEND_PROBES = ("diffusers", "transformers", "accelerate", "peft")
# Libraries logging through the standard `logging` tree (diffusers and transformers have switches of their own).
LIBRARY_LOGGERS = ("torch", "torchao", "bitsandbytes", "accelerate", "peft", "huggingface_hub", "httpx", "filelock")

VERBOSITIES = ("quiet", "normal", "verbose")


def hide_unused_quantization_libraries(scheme: str | None) -> list[str]:
    """Make the quantization libraries that ``scheme`` does not use unimportable in this process; returns their names.

    A ``None`` entry in ``sys.modules`` is Python's documented way to block an import: ``import torchao`` then raises
    ImportError and ``importlib.util.find_spec("torchao")`` returns None, which is how diffusers, transformers,
    accelerate and peft decide whether a backend is installed. Nothing is changed once one of those has been imported
    (they would keep their earlier answer), nor for a library already imported.
    """
    if any(name in sys.modules for name in _BACKEND_PROBES):
        return []
    hidden = [
        library for library, schemes in QUANTIZATION_LIBRARIES.items()
        if scheme not in schemes and library not in sys.modules
    ]  # fmt: skip
    for library in hidden:
        sys.modules[library] = None
    return hidden


@contextmanager
def library_logs(verbosity: str = "normal"):
    """Within the block, unless ``verbosity`` is ``"verbose"``: Python warnings from other packages are ignored and the
    standard loggers of other libraries (`LIBRARY_LOGGERS`) pass errors only. Restored on exit. Imports nothing."""
    loggers = {name: logging.getLogger(name) for name in LIBRARY_LOGGERS}
    saved_levels = {name: logger.level for name, logger in loggers.items()}
    with warnings.catch_warnings():
        if verbosity != "verbose":
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"bitdance_diffusers(\.|$)")  # ours stay visible
            for logger in loggers.values():
                logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, logger in loggers.items():
                logger.setLevel(saved_levels[name])


def quiet_library_imports(verbosity: str = "normal") -> None:
    """Set diffusers' and transformers' documented verbosity variables (``DIFFUSERS_VERBOSITY``,
    ``TRANSFORMERS_VERBOSITY``) for this process, unless the user set them: those libraries read them once, when first
    imported, and log before any code could call their ``set_verbosity`` (e.g. diffusers' notice that torchao tensor
    types could not be imported). For the command's own process only (call it before diffusers is imported)."""
    level = "info" if verbosity == "verbose" else "error"
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, level)


@contextmanager
def library_output(verbosity: str = "normal"):
    """`library_logs`, plus the switches of diffusers, transformers and huggingface_hub: ``"quiet"`` and ``"normal"``
    keep their errors only and hide diffusers' and transformers' loading bars (``"quiet"`` also the Hub's download
    bars); ``"verbose"`` shows their info logs and loading bars. Everything is restored on exit.

    Imports torch, diffusers and transformers (in that order, torch's loggers quiet before the others load): enter it
    where the command is about to load a pipeline.
    """
    import torch  # noqa: F401  (torch resets its loggers' levels when imported: they are set after)

    with library_logs(verbosity):
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub import utils as hub_utils
        from transformers.utils import logging as transformers_logging

        saved = [
            (library, library.get_verbosity(), library.is_progress_bar_enabled())
            for library in (diffusers_logging, transformers_logging)
        ]
        hub_bars_disabled = hub_utils.are_progress_bars_disabled()
        verbose = verbosity == "verbose"
        for library, _, _ in saved:
            library.set_verbosity(logging.INFO if verbose else logging.ERROR)
            if verbose:
                library.enable_progress_bar()
            else:
                library.disable_progress_bar()
        if verbosity == "quiet":
            hub_utils.disable_progress_bars()
        try:
            yield
        finally:
            for library, level, bars_enabled in saved:
                library.set_verbosity(level)
                if bars_enabled:
                    library.enable_progress_bar()
                else:
                    library.disable_progress_bar()
            if not hub_bars_disabled:
                hub_utils.enable_progress_bars()
