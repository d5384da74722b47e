"""The warning when ``parallelize`` finds no linear to shard: the program would run, silently unsharded.

before::

    gm = tpfx.parallelize(model, tp=2)     # every linear stayed whole: each rank computes the whole model

after::

    NoSitesWarning: tpfx found no linear to shard in Model at tp=2: all 3 linears stay whole, so every
    rank holds and computes the whole model; the largest: 'head' [64, 32]: feeds ... | ...; see the
    reasons of all linears with `tpfx explain` or gm.tpfx_report.linear_decisions()      (one line)
"""

from __future__ import annotations

import math
import warnings

from tpfx.passes.find_sites import SiteFinding
from tpfx.errors import NoSitesWarning

LARGEST_SHOWN = 3


def warn_if_no_sites(model_name: str, finding: SiteFinding, *, tp: int, stacklevel: int = 1) -> None:
    """Warn once, in one line, when ``finding`` has linears but no site: name the largest and why each stayed whole.

    Args:
        model_name: the model's class name, for the message.
        finding: what the site finder read off the model's graph.
        tp: the tensor-parallel degree asked for.
        stacklevel: which frame the warning points at, counted from the caller (1: the caller's line).

    Warns:
        NoSitesWarning: the graph calls at least one linear and none is a site.
    """
    if finding.sites or not finding.replicated:
        return
    # the largest weights first; graph order among equal sizes (sorted is stable)
    largest = sorted(finding.replicated, key=lambda r: -math.prod(r.weight_shape))[:LARGEST_SHOWN]
    named = " | ".join(f"'{r.module_path}' {list(r.weight_shape)}: {r.reason}" for r in largest)
    count = len(finding.replicated)
    warnings.warn(f"tpfx found no linear to shard in {model_name} at tp={tp}: all {count} linear"
                  f"{'s stay' if count > 1 else ' stays'} whole, so every rank holds and computes the whole model; "
                  f"the largest: {named}; see the reasons of all linears with `tpfx explain` or "
                  "gm.tpfx_report.linear_decisions()", NoSitesWarning, stacklevel=stacklevel + 1)
