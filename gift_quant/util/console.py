"""Console output of the command line: which library log lines it silences.

Library users keep their own logging untouched; only the CLI (and the compare subprocesses it starts)
call these.
"""

from __future__ import annotations

__all__ = ["quiet_import_noise", "silence_library_bars"]


def quiet_import_noise() -> None:
    """Silence warnings printed when transformers imports torchao (a gptqmodel dependency), for the CLI only.

    transformers imports torchao whenever it is installed; torchao then logs, on every command, that its
    CUDA-only kernels cannot load and that some enums are registered with torch's pytree. Neither
    concerns gift-quant; library users keep their own logging untouched.
    """
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def silence_library_bars() -> None:
    """``--no-progress``: also hide the bars libraries draw themselves (transformers' "Loading weights",
    datasets' map/download bars), not only gift-quant's own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar
    except ImportError:  # datasets is optional at run time for some commands
        return
    disable_progress_bar()
