"""A real Kubernetes control plane for the integration tests, and a fake kubelet for it."""
