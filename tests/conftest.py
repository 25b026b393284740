"""Shared test settings: hypothesis without per-example deadlines (timing varies on 2 shared cores;
each test still has pytest-timeout's limit)."""

import sys
from pathlib import Path

from hypothesis import settings

settings.register_profile("hybridep", deadline=None)
settings.load_profile("hybridep")
sys.path.insert(0, str(Path(__file__).parent))  # tests/workers.py for spawned ranks
