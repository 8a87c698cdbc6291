"""Runtimes: one federation driver (:mod:`~fedhet.runtime.driver`) over two
executors, the in-process virtual-clock simulator (:mod:`~fedhet.runtime.sim`)
and a Flower grid (:mod:`~fedhet.runtime.flower`)."""
