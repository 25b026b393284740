"""hybridep: Mixture-of-Experts training across datacenters (HybridEP).

Layout, in the direction data flows: config -> topology -> strategies (typed specs, one grammar of
names) -> costmodel -> planner -> plan file -> runtime -> training / benchmark -> cli; the
simulator, the calibration and the testbed beside them.
"""

__version__ = "0.1.0"
