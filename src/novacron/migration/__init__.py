"""Live migration of QEMU VMs over DWCP: orchestrator (control plane) and data paths (data plane)."""
