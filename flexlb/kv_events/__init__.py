"""vLLM / SGLang KV cache events: the wire format (``wire``), shared by the master's subscriber
(``flexlb.master.kv_events``) and the simulator's publisher (``flexlb.sim.kv_events``)."""
