"""pyroute2's IPRoute, imported without the rest of pyroute2."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any


def iproute_class() -> Any:
    """The IPRoute class, loaded past ``pyroute2/__init__.py``.

    The package's ``__init__`` imports the whole library (NDB, IPDB, nftables, DHCP, ethtool, Plan 9 and
    what they pull in: asyncio, multiprocessing), a third of its import time, none of it used by IPRoute,
    and the bundle leaves those parts out (stacks/bundle.py). An empty module stands for the package
    (found, not executed), so only the submodules IPRoute imports load; the package's logging setup (a
    NullHandler on the "pyroute2" logger, so its warnings never reach stderr) is loaded as the
    ``__init__`` would. A process that imported pyroute2 the usual way keeps the real package.
    """
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("pyroute2 is not installed", name="pyroute2")
        sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
    import pyroute2.config.log  # noqa: F401, PLC0415 (the NullHandler)
    from pyroute2.iproute.linux import IPRoute  # noqa: PLC0415

    return IPRoute
