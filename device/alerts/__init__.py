"""Alerts: the durable outbox and the MQTT publisher."""
