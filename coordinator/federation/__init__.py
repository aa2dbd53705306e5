"""Flower's server side: the ServerApp, its strategy, aggregation and simulation."""
