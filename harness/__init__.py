"""Harnesses above the services: the local stack, throwaway certificates, the load generator, the OTLP test
receiver, and the demo. They start and drive the services; the library (specrec) never imports them."""
