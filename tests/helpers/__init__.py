"""What tests share and test processes run: the test bed's places, kernel clients, the leftover tracker,
process trees, a loopback OCI registry, the Lmod helper, the one fake builder."""
