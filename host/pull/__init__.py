"""Pull mode: publish signed bundles to any HTTP origin, roll them out over MQTT."""
