"""The master's side of flexlb: talking to the engine workers it polls."""
