#!/usr/bin/env python3
"""The CDK app: the only reader of context and environment; builds the config, the stacks and cdk-nag.

One consumer of the `eip_reclaim` library among others (examples/): the whole app as cdk.json describes it.
"""

from __future__ import annotations

import sys

import aws_cdk as cdk

import eip_reclaim


def main() -> int:
    app = cdk.App()
    try:
        config = eip_reclaim.from_context(app.node.try_get_context(eip_reclaim.CONTEXT_KEY))
    except eip_reclaim.ConfigError as err:
        # One line, naming the key; the CDK CLI adds only that the app exited non-zero.
        print(f"eip-reclaim: bad configuration: {err}", file=sys.stderr)
        return 2
    try:
        # Builds the payload bundle once for every service, or finds it in the cache under build/.
        eip_reclaim.build(app, config)
    except eip_reclaim.BundleError as err:
        print(f"eip-reclaim: cannot build the payload bundle: {err}", file=sys.stderr)
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
