"""litellm itself, imported at the first real call and configured once.

Importing litellm costs 2-5 s, so a run served from stamps or the cache never pays for it.
agenther/__init__.py has set LITELLM_LOCAL_MODEL_COST_MAP: litellm's price map is the one in
the installed package, nothing is downloaded.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

# litellm hands every answered call to a background "success logging" thread pool that builds its
# standard logging payload (and prices the answer again) for the callbacks registered with litellm.
# agenther registers none: its own accounting reads the answer's usage and litellm's price where it
# returns them (agenther/llm/transport.py). A logging backlog of 0 makes litellm drop that work
# instead of queuing it: ~0.6 ms less CPU per call (bench/README.md). Read once, at litellm's import;
# set LOGGING_EXECUTOR_MAX_PENDING_TASKS yourself to keep litellm's callbacks running.
LOGGING_BACKLOG_VAR = "LOGGING_EXECUTOR_MAX_PENDING_TASKS"
_DROPPED_NOTICE = "litellm logging executor backlog is full"


class _NoDroppedLogNotice(logging.Filter):
    """The backlog of 0 is on purpose: litellm's notice that it dropped the logging work is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DROPPED_NOTICE)


@functools.cache
def litellm() -> ModuleType:
    """The configured litellm module (imported on first use)."""
    os.environ.setdefault(LOGGING_BACKLOG_VAR, "0")
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        # Their INFO lines echo every request; ours say what matters, and never carry keys.
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("LiteLLM").addFilter(_NoDroppedLogNotice())
    return litellm
