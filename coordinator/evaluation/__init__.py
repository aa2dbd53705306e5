"""The five-way evaluation, its full-model baselines, cross-checks and run report."""
