"""Training from the browser: the playground's Train view's routes (routes.py), the queue of `lorakit train` child
processes (jobs.py) and what the page may set (settings.py). It sits above serve/ and train/ and uses both;
`lorakit serve` adds its routes to the server (commands.cmd_serve)."""

from .routes import add_train_routes

__all__ = ["add_train_routes"]
