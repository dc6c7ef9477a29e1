"""eip-reclaim payload: take the Elastic IP through the subnet's NAT at boot, then restore routing."""
