"""earshot fleet on Ray Serve (DESIGN §10): imported only by `earshot fleet`, never by the server."""
