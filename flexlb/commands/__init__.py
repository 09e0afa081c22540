"""The sub-commands of ``flexlb``, one module each (flexlb/cli.py builds the parser and dispatches).

Each module has ``register(sub)``, which adds its parser to the sub-parsers and ``set_defaults(func=run)``, and
``run(args) -> int``, which loads the settings (``flexlb.settings.load_settings``) only when the command reads
them. ``bench``, ``demo``, ``up`` and ``launch`` hook the parsers that live with their code
(flexlb/bench/cli.py, flexlb/demo/cli.py, flexlb/up.py, flexlb/launch/cli.py) the same way.
"""

from __future__ import annotations

from flexlb.commands import bench, blocks, demo, launch, master, serve, sim_worker, up, worker

# In the order of `flexlb --help`.
COMMANDS = (serve, master, worker, blocks, sim_worker, bench, demo, up, launch)
