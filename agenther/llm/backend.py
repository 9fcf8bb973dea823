"""litellm itself, imported at the first real call and configured once.

Importing litellm costs 2-5 s, so a run served from stamps or the cache never pays for it.
agenther/__init__.py has set LITELLM_LOCAL_MODEL_COST_MAP: litellm's price map is the one in
the installed package, nothing is downloaded.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType


@functools.cache
def litellm() -> ModuleType:
    """The configured litellm module (imported on first use)."""
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        # Their INFO lines echo every request; ours say what matters, and never carry keys.
        logging.getLogger(name).setLevel(logging.WARNING)
    return litellm
