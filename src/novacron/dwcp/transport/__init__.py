"""AMST: the multi-stream transport of DWCP (session, streams, stream-count controller)."""
