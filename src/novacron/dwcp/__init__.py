"""DWCP v3: the distributed WAN communication protocol (frames, handshake, mode, transport, encoding, ...)."""
