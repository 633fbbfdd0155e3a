"""Code shared by the router, the expert pool and the gateway."""
