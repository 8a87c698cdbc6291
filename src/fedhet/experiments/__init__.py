"""Experiments: the runner (arms × seeds → runs, reuse, PROTOCOL v2's reference
points and budgets), its statistics and its one table writer."""
