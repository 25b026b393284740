"""Dense-gradient synchronisation modes (``dense_sync``)."""

import math

import pytest
import workers

from hybridep.config import ConfigError, load_config
from hybridep.launch import run_local


@pytest.mark.parametrize("names,counts", [(("dc", "gpu"), (2, 2)), (("dc", "node", "gpu"), (2, 2, 2))])
def test_hierarchical_sync_gives_the_rings_gradients(names, counts):
    """Reduce-scatter in each DC, all-reduce across DCs, all-gather in each DC: the same dense gradients
    as DDP's ring (float64, 1e-10), one bucket per parameter (uneven sizes), a rank without tokens; its
    bytes go through the communicator, across the DC level too."""
    out = run_local(workers.dense_sync_modes, math.prod(counts), (names, counts), timeout_s=240)
    for worst, counted in out:
        assert worst <= 1e-10
        assert counted.get("dc", 0) > 0


@pytest.mark.parametrize("value,says", [("bogus", "allowed: ring, hierarchical"), ("powersgd(rank=0)", "rank >= 1"),
                                        ("true", "a name")])
def test_bad_dense_sync_names_the_key(value, says):
    with pytest.raises(ConfigError, match="dense_sync") as err:
        load_config(None, [f"dense_sync={value}"])
    assert says in str(err.value)
