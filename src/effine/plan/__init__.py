"""Memory planning: predict a run's peak memory before loading anything (:func:`plan_memory`), and measure it for
real to validate the prediction (:func:`effine.plan.measure.measure_peak`)."""

from effine.plan.memory import MemoryPlan, plan_memory

__all__ = ["MemoryPlan", "plan_memory"]
