"""Federation protocol math both roles share: SecAgg, DP, robust rules, sparse upload."""
