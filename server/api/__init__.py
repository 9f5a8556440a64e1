"""Uptake's HTTP API: see :mod:`server.api.application` for the routes and who may call them."""
