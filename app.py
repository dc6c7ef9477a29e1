#!/usr/bin/env python3
"""The CDK app: the only reader of context and environment; builds the config, the stacks and cdk-nag."""

from __future__ import annotations

import sys

import aws_cdk as cdk

from stacks.assembly import build
from stacks.bundle import BundleError
from stacks.config import CONTEXT_KEY, ConfigError, from_context


def main() -> int:
    app = cdk.App()
    try:
        config = from_context(app.node.try_get_context(CONTEXT_KEY))
    except ConfigError as err:
        # One line, naming the key; the CDK CLI adds only that the app exited non-zero.
        print(f"eip-reclaim: bad configuration: {err}", file=sys.stderr)
        return 2
    try:
        # Builds the payload bundle once for every service, or finds it in the cache under build/.
        build(app, config)
    except BundleError as err:
        print(f"eip-reclaim: cannot build the payload bundle: {err}", file=sys.stderr)
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
