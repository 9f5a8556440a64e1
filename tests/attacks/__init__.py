"""Attack tests: each mounts one attack on a real server and agent and checks it is refused."""
