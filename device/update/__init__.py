"""Pull-mode updates: follow the bundle a rollout names on the broker, fetch it over HTTP."""
