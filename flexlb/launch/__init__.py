"""``flexlb launch``: start N engine processes (vLLM, SGLang, flexlb's simulator, or any command), give each its GPUs,
wait until each is healthy, register each as a worker of the fleet, restart a dead one with a backoff, and stop them
all on SIGINT / SIGTERM. ``flexlb.launch.plan`` decides what to start (pure), ``flexlb.launch.register`` writes the
registrations, ``flexlb.launch.run`` starts and supervises the processes (through ``flexlb.stack.processes``, the
project's one process launcher), ``flexlb.launch.cli`` is the command line."""
