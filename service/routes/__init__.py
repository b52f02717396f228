"""The HTTP routes, one module per resource; service.app mounts them."""
