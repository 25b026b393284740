"""hybridep: Mixture-of-Experts training across datacenters (HybridEP).

Layout, in the direction data flows: config -> topology -> costmodel -> planner -> plan ->
runtime strategies -> training / benchmark -> cli; the simulator and the testbed beside them.
"""

__version__ = "0.1.0"
