"""Narrow filters for third-party messages that every run printed and that ask nothing of the user.

Each filter matches one exact message (never a whole category or module), so our own warnings, and any other
message of these libraries, still show:

* torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside Lightning's own pytree
  helper at every fit (nothing a user of Lightning can change);
* Lightning's "Tip: ... try installing [litlogger]" advertisement, logged when no LitLogger is attached;
* Lightning's "Trainer already configured with model summary callbacks", about the compact summary train.py
  adds on purpose.

(W&B's "The anonymous setting has no effect" is avoided at its cause: `runs.training.build_loggers` does not
pass Lightning's `anonymous=None` on to `wandb.init`.)
"""

from __future__ import annotations

import logging
import warnings

LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LITLOGGER_TIP = "Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
SUMMARY_NOTE = "Trainer already configured with model summary callbacks"
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessage(logging.Filter):
    """Drops the log records whose message contains one of `texts`."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_third_party() -> None:
    """Install the filters (idempotent); called by train.py / `ce-dynamics` before any work."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(LITLOGGER_TIP, SUMMARY_NOTE))
