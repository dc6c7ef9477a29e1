"""The CDK side of eip-reclaim: configuration, constructs and stacks."""
