"""Graph passes of tpfx: each file holds one analysis or rewrite, a function of a GraphModule.

The passes use tpfx's runtime layers and collectives, and tpfx's API uses the passes; importing
the runtime package first makes either entry point (``import tpfx`` or ``import passes.x``) work.
"""

import tpfx  # noqa: F401
