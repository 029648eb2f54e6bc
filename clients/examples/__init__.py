"""Example workloads and the demo for khod."""
