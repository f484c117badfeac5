"""The speculative session as sans-I/O state machines, one module per role."""
