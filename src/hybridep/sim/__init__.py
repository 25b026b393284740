"""Flow-level simulator of one training iteration, built on the planner's cost model."""
