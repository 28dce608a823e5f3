"""The HTTP API: app factory, auth, routes and response models."""
