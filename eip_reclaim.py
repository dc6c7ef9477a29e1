"""In a checkout, ``import eip_reclaim`` is the package in stacks/ (the wheel installs stacks/ as it).

Import the public names from the top (``from eip_reclaim import HealingService``); submodules are
``stacks.<module>`` here and ``eip_reclaim.<module>`` installed.
"""

import sys
from typing import TYPE_CHECKING

import stacks

if TYPE_CHECKING:
    from stacks import *  # noqa: F403

sys.modules[__name__] = stacks
